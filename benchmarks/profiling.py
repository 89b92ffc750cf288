"""Reading torch profiler events in the GPU benchmarks (one place for the
attribute names, which changed from ``cuda_*`` to ``device_*`` across torch versions)."""


def device_us(event, self_time: bool = False) -> float:
    """Device time of a ``key_averages()`` event in microseconds: its total, or its
    self time (``self_time``, excluding child ranges)."""
    names = (("self_device_time_total", "self_cuda_time_total") if self_time
             else ("device_time_total", "cuda_time_total"))
    for name in names:
        t = getattr(event, name, None)
        if t is not None:
            return float(t)
    return 0.0
