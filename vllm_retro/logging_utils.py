"""Loggers of the plugin: under vLLM's ``vllm`` logger when vLLM is importable."""

from __future__ import annotations

import logging

_WARNED: set = set()


def get_logger(name: str) -> logging.Logger:
    """A logger under vLLM's logger tree (its handler, format and level) when vLLM
    is installed, else a plain one."""
    try:
        from .compat import logger
        return logger(name)
    except ImportError:
        return logging.getLogger(name)


def warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        get_logger("vllm_retro").warning(msg)
