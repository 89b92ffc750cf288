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


def per_step(prof, steps: int) -> tuple:
    """(device us per step by event, host us per step by event, device us per step
    of retro's named ranges, i.e. the kernels launched inside them) of a finished
    torch profiler that recorded ``steps`` steps."""
    dev, host, ranges = {}, {}, {}
    steps = max(1, steps)
    for e in prof.key_averages():
        t = device_us(e, self_time=True)
        if t > 0:
            dev[e.key] = t / steps
        if e.key.startswith("retro::"):
            ranges[e.key] = round(device_us(e) / steps, 1)
        if e.self_cpu_time_total > 0:
            host[e.key] = e.self_cpu_time_total / steps
    return dev, host, ranges


def top(d: dict, k: int = 15) -> dict:
    """The ``k`` largest entries of ``d``, keys cut to 90 characters, rounded."""
    return {key[:90]: round(v, 1) for key, v in sorted(d.items(), key=lambda kv: -kv[1])[:k]}
