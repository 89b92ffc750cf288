"""The GPU backend's dense switch (``dense_below``): which steps run vLLM's
FlashAttention, which nodes of a captured graph each path holds and which the
switch disables per step (against stand-ins of the CUDA ops), and the row counter. The
switch itself inside CUDA graphs runs in ``tests/gpu/test_engine_gpu.py``."""

import pytest
import torch

from vllm_retro.backend.gpu import DENSE_MAX_ROWS, DenseSwitch, dense_step
from vllm_retro.backend.graph_paths import GraphPaths, capturing_graph, install


def test_dense_step_rows_and_average_context():
    ub = torch.tensor([30000, 9000, 0, 0, 5000], dtype=torch.int32)
    assert dense_step(ub, 2, 30000, 20000, real_rows=2)       # average 19,500
    assert not dense_step(ub, 2, 30000, 19500, real_rows=2)   # not below
    assert not dense_step(ub, 2, 30000, 0, real_rows=2)       # off
    assert not dense_step(ub, 0, 30000, 40000)                # no decode rows
    # One row padded to a CUDA graph of two: dense; two rows padded to four: that
    # graph holds no dense path (only graphs of at most DENSE_MAX_ROWS rows do).
    assert dense_step(ub[1:], 2, 9000, 10000, real_rows=1)
    assert not dense_step(ub, 4, 30000, 20000, real_rows=2)
    # Rows after the decode rows (prefill rows) do not count.
    assert dense_step(ub, 2, 30000, 19501) and not dense_step(ub, 1, 30000, 30000)
    # More than DENSE_MAX_ROWS rows: retro's batched kernels, however short.
    many = torch.full((DENSE_MAX_ROWS + 1,), 100, dtype=torch.int32)
    assert not dense_step(many, DENSE_MAX_ROWS + 1, 100, 40000)
    assert dense_step(many, DENSE_MAX_ROWS, 100, 40000)
    # Without host bounds the longest sequence bounds every row.
    assert dense_step(None, 2, 16000, 16001) and not dense_step(None, 2, 16000, 16000)


class _Graph:
    """Stands for a torch CUDAGraph: its instantiation's handle (0: none yet)."""

    def __init__(self, exec_handle: int) -> None:
        self.exec_handle = exec_handle

    def raw_cuda_graph_exec(self) -> int:
        return self.exec_handle


class _Ops:
    """Stands for torch.ops.vllm_retro's graph ops over one graph being captured:
    ``nodes`` are its nodes so far; enabling calls are recorded."""

    def __init__(self) -> None:
        self.nodes = [1, 2, 3]          # what the model captured before attention
        self.calls = []

    def add(self, *nodes):
        self.nodes.extend(nodes)

    def graph_capture_nodes(self, anchor):
        return list(self.nodes)

    def graph_exec_enable(self, anchor, exec_handle, nodes, enabled):
        self.calls.append((exec_handle, sorted(nodes), enabled))


def test_graph_paths_record_each_path_and_disable_the_other():
    ops = _Ops()
    paths = GraphPaths(torch.zeros(1), ops)
    g = _Graph(exec_handle=0)
    # Two layers: FlashAttention adds two nodes, retro's kernels five.
    for base in (10, 30):
        paths.capture(g, lambda b=base: ops.add(b, b + 1),
                      lambda b=base: ops.add(b + 2, b + 3, b + 4, b + 5, b + 6))
        ops.add(base + 7)                # the layer's other nodes (not recorded)
    assert paths.nodes(g) == [[10, 11, 30, 31], [12, 13, 14, 15, 16, 32, 33, 34, 35, 36]]
    dense_nodes, retro_nodes = paths.nodes(g)
    paths.take(True)                     # not instantiated yet: nothing to do
    assert ops.calls == []
    g.exec_handle = 77
    paths.take(True)
    assert ops.calls == [(77, dense_nodes, True), (77, retro_nodes, False)]
    paths.take(True)                     # unchanged: no call
    assert len(ops.calls) == 2
    paths.take(False)
    assert ops.calls[2:] == [(77, dense_nodes, False), (77, retro_nodes, True)]
    g.exec_handle = 78                   # re-instantiated: both enabled again
    paths.take(False)
    assert ops.calls[4:] == [(78, dense_nodes, False), (78, retro_nodes, True)]
    assert paths.toggles == 3


def test_switch_takes_the_path_in_every_graph_and_counts_rows():
    ops = _Ops()
    sw = DenseSwitch(40000, torch.zeros(1), ops)
    graphs = [_Graph(5), _Graph(6)]       # graphs of one and two rows
    for g in graphs:
        sw.paths.capture(g, lambda: ops.add(len(ops.nodes) + 100),
                         lambda: ops.add(len(ops.nodes) + 200))
    ub = torch.tensor([20000, 0], dtype=torch.int32)
    assert sw.choose(ub, 2, 20000, real_rows=1) and sw.flash_rows == 1
    assert {(c[0], c[2]) for c in ops.calls} == {(5, True), (5, False), (6, True), (6, False)}
    assert all(c[1] == sw.paths.nodes(graphs[c[0] - 5])[0 if c[2] else 1]
               for c in ops.calls)
    n = len(ops.calls)
    assert sw.choose(ub, 2, 20000, real_rows=1) and sw.flash_rows == 2
    assert len(ops.calls) == n           # same path: no call
    long = torch.tensor([50000], dtype=torch.int32)
    assert not sw.choose(long, 1, 50000, real_rows=1) and sw.flash_rows == 2
    assert all(not c[2] for c in ops.calls[n:] if c[1] == sw.paths.nodes(graphs[c[0] - 5])[0])
    assert len(ops.calls) == n + 4


def test_switch_without_graphs_counts_rows():
    sw = DenseSwitch(40000)
    assert sw.paths is None
    ub = torch.tensor([20000, 0], dtype=torch.int32)
    assert sw.choose(ub, 2, 20000, real_rows=1) and sw.flash_rows == 1
    assert not sw.choose(torch.tensor([50000], dtype=torch.int32), 1, 50000, 1)
    assert sw.flash_rows == 1


def test_capture_outside_a_tracked_graph_is_refused():
    sw = DenseSwitch(40000, torch.zeros(1), _Ops())
    with pytest.raises(RuntimeError, match="not through torch.cuda.CUDAGraph"):
        sw.capture_both(lambda: None, lambda: None)


def test_install_keeps_graphs_tracks_the_capture_and_instantiates_at_its_end():
    class FakeCUDAGraph:
        """torch.cuda.CUDAGraph's interface as the patch sees it."""

        def __new__(cls, keep_graph=False):
            obj = super().__new__(cls)
            obj.keep_graph, obj.events = keep_graph, []
            return obj

        def capture_begin(self, pool=None, capture_error_mode="global"):
            self.events.append(("begin", pool))

        def capture_end(self):
            self.events.append(("end", capturing_graph()))

        def instantiate(self):
            self.events.append(("instantiate",))

    class FakeTorchCUDAGraph(FakeCUDAGraph):
        """As torch 2.11's: ``__new__`` passes keep_graph on, but the C++ base (a
        pybind11 class) takes it in ``__init__`` with the caller's arguments."""

        def __new__(cls, keep_graph=False):
            return super().__new__(cls, None)

        def __init__(self, keep_graph=False):
            self.keep_graph = keep_graph

    for cls in (FakeCUDAGraph, FakeTorchCUDAGraph):
        install(cls)
        install(cls)                     # idempotent: not wrapped twice
        assert cls().keep_graph is True and cls(keep_graph=False).keep_graph is True
    g = FakeCUDAGraph()
    assert capturing_graph() is None
    g.capture_begin(pool=(0, 1))
    assert capturing_graph() is g
    g.capture_end()
    assert capturing_graph() is None
    assert g.events == [("begin", (0, 1)), ("end", None), ("instantiate",)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_runs_only_the_path_taken():
    """On a GPU (with ``vllm_retro._C`` built with CUDA): a torch CUDA graph of three
    "layers", each capturing a dense path (``y = x + 1``) then a retro path (``y = 3
    x``) through :class:`GraphPaths`, replays as all-dense (2 -> 5) or all-retro
    (2 -> 54) as :meth:`GraphPaths.take` says, back and forth, and as retro's path
    (which writes last) before any choice."""
    from vllm_retro.backend import graph_paths
    if not graph_paths.available():
        pytest.skip("vllm_retro._C has no CUDA graph ops here (built without CUDA)")
    graph_paths.install()
    x = torch.zeros(4096, device="cuda")
    y = torch.zeros_like(x)
    paths = GraphPaths(torch.zeros(1, dtype=torch.int8, device="cuda"))

    def layers(capture_graph=None):
        for _ in range(3):
            dense, retro = (lambda: y.copy_(x + 1)), (lambda: y.copy_(x * 3))
            if capture_graph is None:
                retro()
            else:
                paths.capture(capture_graph, dense, retro)
            x.copy_(y)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        layers()                              # warm-up, as before any capture
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        assert graph_paths.capturing_graph() is g
        layers(g)
    assert graph_paths.capturing_graph() is None
    dense_nodes, retro_nodes = paths.nodes(g)
    assert len(dense_nodes) >= 3 and len(retro_nodes) >= 3
    assert not set(dense_nodes) & set(retro_nodes)

    def replay() -> float:
        x.fill_(2.0)
        g.replay()
        torch.cuda.synchronize()
        assert torch.all(x == x[0])
        return float(x[0])
    assert replay() == 54.0                   # both enabled: retro's writes last
    for dense, want in ((True, 5.0), (False, 54.0), (True, 5.0), (True, 5.0)):
        paths.take(dense)
        assert replay() == want, dense
    assert paths.toggles == 3
