"""vLLM general plugin: makes ``--attention-backend retro`` work.

``register()`` (entry point ``vllm.general_plugins: retro``) is idempotent and
cheap; vLLM calls it in the front-end process, the engine core and every worker
(including spawned and Ray workers). It

1. aliases the name ``RETRO`` to vLLM's ``CUSTOM`` backend slot and points that
   slot at :class:`vllm_retro.backend.RetroBackend`. No enum member is added, so a
   pickled config (spawn, Ray) unpickles in processes that have not loaded the
   plugin yet: it holds ``CUSTOM``, which every vLLM has;
2. on the CPU platform, which otherwise always returns CPU_ATTN, makes the
   selector return retro when (and only when) it was asked for;
3. wraps the platform's config check: validates ``additional_config["retro"]``
   at start-up, refuses unsupported models, and turns prefix caching off;
4. wraps the front end's input processor to refuse requests whose index could
   never fit the host-memory budget (a client error, the server stays up);
5. installs retro's KV connector (:mod:`.backend.connector`), through which the
   workers learn the request lifecycle (new, finished, aborted, preempted) under
   either model runner, and report retro's statistics into vLLM's metrics
   (:mod:`.backend.metrics`);
6. GPU: pads the KV-cache pages of retro layers by the paged index
   (:mod:`.index.paged`), so vLLM sizes, admits and frees the index with the KV;
   with ``wave_buffer`` on, retro layers report ``RetroSpec`` instead, whose
   manager releases mirrored blocks (:mod:`.backend.kv_spec`, registered in
   vLLM's ``KVCacheSpecRegistry`` where the spec is made or unpickled). The CPU
   backend refuses ``wave_buffer``.
"""

from __future__ import annotations

import functools

BACKEND_PATH = "vllm_retro.backend.RetroBackend"
ALIASES = ("RETRO",)
_PATCH_FLAG = "_vllm_retro_patched"


def register() -> None:
    from . import compat
    E = compat.backend_enum()
    for alias in ALIASES:
        if alias not in E._member_map_:
            E._member_map_[alias] = E.CUSTOM
    compat.register_custom_backend(BACKEND_PATH)
    from vllm.platforms import current_platform
    platform_cls = type(current_platform)
    if compat.is_cpu_platform():
        _patch_cpu_selector(platform_cls)
    else:
        _patch_kv_cache_spec(compat.attention_layer_class())
    _patch_config_check(platform_cls)
    _patch_input_processor(compat.input_processor_class())


def retro_selected(vllm_config) -> bool:
    """Whether this engine asked for retro for any of its layers: its attention
    backend, or a per-kind choice (``attention_config.backend_per_kind``, e.g.
    ``{"full_attention": "retro"}``), is our CUSTOM slot. Either way the start-up
    checks, prefix caching off and the lifecycle connector apply: without them a
    per-kind choice decoded every row densely (no connector, so no request the
    workers knew of), silently, with prefix caching on."""
    from . import compat
    E = compat.backend_enum()
    if E.CUSTOM.get_path() != BACKEND_PATH:
        return False
    att = getattr(vllm_config, "attention_config", None)
    chosen = [getattr(att, "backend", None)]
    chosen += list((getattr(att, "backend_per_kind", None) or {}).values())
    return any(b is E.CUSTOM for b in chosen)


def _patched(obj, name: str) -> bool:
    return getattr(getattr(obj, name), _PATCH_FLAG, False)


def _mark(fn):
    setattr(fn, _PATCH_FLAG, True)
    return fn


def _patch_cpu_selector(platform_cls) -> None:
    if _patched(platform_cls, "get_attn_backend_cls"):
        return
    original = platform_cls.get_attn_backend_cls.__func__

    @functools.wraps(original)
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, *args, **kwargs):
        from . import compat
        E = compat.backend_enum()
        if (selected_backend is E.CUSTOM and E.CUSTOM.get_path() == BACKEND_PATH
                and not getattr(attn_selector_config, "use_mla", False)):
            return BACKEND_PATH
        return original(cls, selected_backend, attn_selector_config, *args, **kwargs)

    platform_cls.get_attn_backend_cls = classmethod(_mark(get_attn_backend_cls))


def _patch_config_check(platform_cls) -> None:
    if _patched(platform_cls, "check_and_update_config"):
        return
    original = platform_cls.check_and_update_config.__func__

    @functools.wraps(original)
    def check_and_update_config(cls, vllm_config):
        if retro_selected(vllm_config):
            check_engine_config(vllm_config)
        return original(cls, vllm_config)

    platform_cls.check_and_update_config = classmethod(_mark(check_and_update_config))


def check_engine_config(vllm_config) -> None:
    """Start-up checks when retro is asked for: options valid, model supported.

    Raises ``ValueError`` with the reason; turns prefix caching off (a prefix-cache
    hit skips the forward pass of the shared tokens, so their KV never reaches the
    index), with a warning.
    """
    from . import compat
    from .worker_state import retro_config_from_vllm
    log = compat.logger(__name__)
    retro_config_from_vllm(vllm_config)
    mc = getattr(vllm_config, "model_config", None)
    if mc is not None:
        if getattr(mc, "use_mla", False):
            raise ValueError("retro attention does not support MLA models "
                             "(latent KV has no per-head keys to cluster)")
        if getattr(mc, "is_encoder_decoder", False):
            raise ValueError("retro attention supports decoder-only models; "
                             "encoder-decoder models are not supported")
        get_sw = getattr(mc, "get_sliding_window", None)
        if get_sw is not None and get_sw() is not None:
            raise ValueError("retro attention does not support sliding-window "
                             "attention layers (the window already bounds the KV)")
    cc = getattr(vllm_config, "cache_config", None)
    if cc is not None and getattr(cc, "enable_prefix_caching", False):
        log.warning("retro: prefix caching disabled (shared prefix tokens would "
                    "bypass the wave index)")
        cc.enable_prefix_caching = False
    if retro_config_from_vllm(vllm_config).wave_buffer:
        from .backend.kv_spec import wave_buffer_reasons
        from .backend.refusals import refuse
        # Prefix caching was turned off just above; RetroManager refuses it too, in
        # case a later config step turns it back on.
        refuse(wave_buffer_reasons(cpu_platform=compat.is_cpu_platform(),
                                   enable_prefix_caching=False))
    _install_connector(vllm_config, log)
    if not compat.is_cpu_platform():
        _check_gpu_engine_config(vllm_config)


def _install_connector(vllm_config, log) -> None:
    """Retro's KV connector carries the request lifecycle to the workers."""
    from .backend.connector import CONNECTOR_NAME, kv_transfer_config
    ktc = getattr(vllm_config, "kv_transfer_config", None)
    if ktc is not None and ktc.kv_connector not in (None, CONNECTOR_NAME):
        raise ValueError(
            f"retro attention uses vLLM's KV-connector slot for request lifecycle; "
            f"it cannot run together with --kv-transfer-config {ktc.kv_connector!r}")
    if ktc is None or ktc.kv_connector is None:
        vllm_config.kv_transfer_config = kv_transfer_config()
        log.info("retro: request lifecycle through the RetroConnector KV connector")


def _check_gpu_engine_config(vllm_config) -> None:
    """GPU: the paged index's option limits and KV block size 16."""
    from .backend.gpu import KERNEL_BLOCK_SIZE
    from .index.paged import check_config_for_paged
    from .worker_state import retro_config_from_vllm
    cfg = retro_config_from_vllm(vllm_config)
    cc = vllm_config.cache_config
    if getattr(cc, "block_size", None) in (None, 0):
        cc.block_size = KERNEL_BLOCK_SIZE
    elif cc.block_size != KERNEL_BLOCK_SIZE:
        raise ValueError(f"retro attention needs --block-size {KERNEL_BLOCK_SIZE} on "
                         f"GPUs, got {cc.block_size}")
    reasons = check_config_for_paged(cfg, KERNEL_BLOCK_SIZE)
    if reasons:
        raise ValueError("retro attention (GPU) cannot use these options: " +
                         "; ".join(reasons))


def _patch_kv_cache_spec(attention_cls) -> None:
    """Retro layers on GPU keep vLLM's stock KV pages (the index lives in retro's own
    index pool); with ``wave_buffer`` they report a :class:`RetroSpec` (block release)."""
    if _patched(attention_cls, "get_kv_cache_spec"):
        return
    original = attention_cls.get_kv_cache_spec

    @functools.wraps(original)
    def get_kv_cache_spec(self, vllm_config):
        spec = original(self, vllm_config)
        backend = getattr(self, "attn_backend", None)
        if spec is None or backend is None or backend.get_name() != "CUSTOM" or \
                not retro_selected(vllm_config):
            return spec
        from .worker_state import retro_config_from_vllm
        cfg = retro_config_from_vllm(vllm_config)
        if cfg.wave_buffer:
            from .backend import kv_spec
            kv_spec.ensure_registered(vllm_config)
            spec = kv_spec.retro_spec(spec, cfg, vllm_config)
        return spec

    attention_cls.get_kv_cache_spec = _mark(get_kv_cache_spec)


def _patch_input_processor(cls) -> None:
    if cls is None or _patched(cls, "process_inputs"):
        return
    from .admission import wrap_process_inputs
    cls.process_inputs = _mark(wrap_process_inputs(cls.process_inputs))
