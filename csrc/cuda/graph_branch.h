// Conditional branches of a CUDA graph under stream capture, for torch builds whose
// CUDAGraph has no begin_capture_to_if_node (torch 2.11): the dense switch of the GPU
// backend (vllm_retro/backend/gpu.py, DenseSwitch) captures FlashAttention and retro's
// kernels each into an IF node whose predicate a device boolean sets at replay.
//
// No CUDA and no torch headers here (streams cross as void*), as paged_score.h.
#pragma once

namespace vllm_retro {

// Called with `parent` capturing: adds, after what `parent` has captured so far, an
// IF node on a conditional handle that holds *pred (a device bool) at replay: the
// first call of a capture for a predicate creates the handle and a one-thread kernel
// that sets it; later calls of the same capture and predicate reuse both (where the
// driver refuses a handle shared between nodes: a handle and a kernel per node). The
// node has an ELSE body if `with_else` (CUDA 12.8+). `parent` then continues after
// the node, and `child` (a stream not capturing)
// starts capturing into the IF body. Returns 0, or a cudaError_t code
// (kGraphBranchNotCapturing: `parent` is not capturing).
int graph_begin_if_launch(const void* pred, void* parent, void* child, bool with_else);

// Ends `child`'s capture into the IF body and starts it on the ELSE body of the node
// graph_begin_if_launch(..., true) added last on this thread. 0 or a cudaError_t code
// (kGraphBranchNoElse: no such node).
int graph_else_launch(void* child);

// Ends `child`'s capture into the body begun last. 0 or a cudaError_t code.
int graph_end_if_launch(void* child);

// 1 while handles are shared between the IF nodes of a capture, 0 once the driver
// refused it (graph_begin_if_launch's fallback).
int graph_branch_handles_shared();

constexpr int kGraphBranchNotCapturing = -1;
constexpr int kGraphBranchNoElse = -2;

}  // namespace vllm_retro
