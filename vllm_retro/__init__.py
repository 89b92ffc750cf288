"""vllm-retro: RetroInfer-style sparse decode attention (wave index + wave buffer) for vLLM.

Public API: :class:`RetroConfig`, :class:`WaveIndex`, :func:`full_attention`, and
:func:`register` (the ``vllm.general_plugins`` entry point).
"""

from .attention import full_attention
from .config import RetroConfig
from .wave_index import AttendStats, WaveIndex

__all__ = ["RetroConfig", "WaveIndex", "AttendStats", "full_attention", "register"]
__version__ = "0.1.0"


def register() -> None:
    """vLLM general-plugin entry point: makes the ``retro`` attention backend known."""
    from .vllm_plugin import register as _register
    _register()
