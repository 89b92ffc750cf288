"""Two paths of a captured CUDA graph, one enabled at a time: how the GPU backend's
dense switch (``gpu.DenseSwitch``) holds FlashAttention and retro's kernels in vLLM's
FULL CUDA graphs at no cost per replay.

Under capture, :meth:`GraphPaths.capture` runs both paths one after the other (each
writes the whole output, so with both enabled the graph computes retro's) and
records the graph nodes each added (``torch.ops.vllm_retro.graph_capture_nodes``).
Between replays, :meth:`GraphPaths.take` disables the nodes of the path the step
does not take in the instantiated graph (``graph_exec_enable``, CUDA's
``cudaGraphNodeSetEnabled``: a disabled node runs as an empty one, and the change
applies from the next launch), only when the choice changes. CUDA graph conditional
nodes did the same at ~10-15 us per layer and replay on the H200 (seventeenth session,
``docs/perf-notes.md``), more than the switch saves.

Node handles stay valid only while the graph they belong to lives, and torch
destroys a graph at the end of its capture unless it was created with
``keep_graph=True``; vLLM creates its graphs itself. :func:`install` therefore makes
every ``torch.cuda.CUDAGraph`` of the process keep its graph (host memory only) and
instantiate at the end of capture as before, and tracks the graph each thread is
capturing (:func:`capturing_graph`)."""

from __future__ import annotations

import inspect
import threading
import weakref
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

from ..kernels.extension import has_cuda_kernel

_state = threading.local()


def available() -> bool:
    """Whether this torch and ``vllm_retro._C`` can hold two paths in one graph:
    ``CUDAGraph(keep_graph=...)``, ``instantiate`` and ``raw_cuda_graph_exec`` (torch
    2.8+), and the extension's CUDA ops."""
    g = getattr(torch.cuda, "CUDAGraph", None)
    if g is None or not all(hasattr(g, a) for a in ("instantiate", "raw_cuda_graph_exec")):
        return False
    try:
        if "keep_graph" not in inspect.signature(g.__new__).parameters:
            return False
    except (TypeError, ValueError):
        return False
    return has_cuda_kernel("graph_capture_nodes") and has_cuda_kernel("graph_exec_enable")


def install(cls=None) -> None:
    """Makes every ``torch.cuda.CUDAGraph`` (or ``cls``) created from now on keep its
    graph and instantiate at the end of capture, and records which graph each thread
    captures. Idempotent; call before vLLM captures (the backend does at model
    build)."""
    cls = torch.cuda.CUDAGraph if cls is None else cls
    if cls.__dict__.get("_retro_keeps_graphs"):
        return
    new, init, begin, end = cls.__new__, cls.__init__, cls.capture_begin, cls.capture_end

    # torch's Python class passes keep_graph on in __new__, but its C++ base (a
    # pybind11 class) is constructed in __init__, which receives the caller's
    # arguments: both must see True.
    def keep_new(c, keep_graph: bool = False, *args, **kwargs):
        return new(c, True, *args, **kwargs)

    def keep_init(self, keep_graph: bool = False, *args, **kwargs):
        init(self, True, *args, **kwargs)

    def tracked_begin(self, *args, **kwargs):
        begin(self, *args, **kwargs)
        _state.graph = weakref.ref(self)

    def instantiating_end(self, *args, **kwargs):
        _state.graph = None
        end(self, *args, **kwargs)
        # What capture_end does without keep_graph; the first replay stays cheap.
        self.instantiate()

    cls.__new__ = staticmethod(keep_new)
    if init is not object.__init__:
        cls.__init__ = keep_init
    cls.capture_begin = tracked_begin
    cls.capture_end = instantiating_end
    cls._retro_keeps_graphs = True


def capturing_graph():
    """The ``torch.cuda.CUDAGraph`` this thread is capturing (after :func:`install`),
    else None."""
    ref = getattr(_state, "graph", None)
    return None if ref is None else ref()


@dataclass
class _Paths:
    """One graph's two paths: their nodes, the path its instantiation runs (None:
    both, True: dense, False: retro's) and that instantiation (a re-instantiated
    graph runs both again)."""
    dense: List[int] = field(default_factory=list)
    retro: List[int] = field(default_factory=list)
    taken: Optional[bool] = None
    exec_: int = 0


class GraphPaths:
    """The dense and retro paths' nodes in each captured graph that holds both,
    and the path each graph's instantiation currently runs.

    ``ops``: the namespace of ``graph_capture_nodes`` / ``graph_exec_enable``
    (``torch.ops.vllm_retro``; tests pass a stand-in). ``anchor``: a tensor on the
    graphs' device, which routes the ops to their CUDA kernels."""

    def __init__(self, anchor: torch.Tensor, ops=None) -> None:
        self.anchor = anchor
        self.ops = ops if ops is not None else torch.ops.vllm_retro
        self._graphs: "weakref.WeakKeyDictionary[object, _Paths]" = weakref.WeakKeyDictionary()
        self.toggles = 0     # node-enable calls made, for the tests and the log

    def __len__(self) -> int:
        return len(self._graphs)

    def capture(self, graph, dense_fn: Callable[[], None], retro_fn: Callable[[], None]) -> None:
        """Runs ``dense_fn()`` then ``retro_fn()`` under ``graph``'s capture (on the
        current stream) and records the nodes each added."""
        before = set(self.ops.graph_capture_nodes(self.anchor))
        dense_fn()
        mid = set(self.ops.graph_capture_nodes(self.anchor))
        retro_fn()
        after = set(self.ops.graph_capture_nodes(self.anchor))
        paths = self._graphs.setdefault(graph, _Paths())
        paths.dense.extend(sorted(mid - before))
        paths.retro.extend(sorted(after - mid))
        paths.taken = None

    def take(self, dense: bool) -> None:
        """Makes every instantiated graph holding both paths run only the dense
        (``dense``) or only retro's path from its next replay on."""
        for graph, paths in list(self._graphs.items()):
            exec_ = _exec_of(graph)
            if not exec_ or (paths.taken is dense and paths.exec_ == exec_):
                continue   # not instantiated (yet: taken at the next call), or taken
            self.ops.graph_exec_enable(self.anchor, exec_, paths.dense, dense)
            self.ops.graph_exec_enable(self.anchor, exec_, paths.retro, not dense)
            self.toggles += 1
            paths.taken, paths.exec_ = dense, exec_

    def nodes(self, graph) -> Optional[List[List[int]]]:
        """``[dense nodes, retro nodes]`` recorded for ``graph`` (None: none)."""
        p = self._graphs.get(graph)
        return None if p is None else [list(p.dense), list(p.retro)]


def _exec_of(graph) -> int:
    try:
        return int(graph.raw_cuda_graph_exec())
    except RuntimeError:   # torch checks that an instantiation exists
        return 0
