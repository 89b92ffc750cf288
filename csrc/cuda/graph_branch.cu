// IF nodes in a graph under stream capture (graph_branch.h): CUDA 12.4+ conditional
// nodes, the CUDA 13 signatures of the capture-info and add-node calls.

#include <cuda_runtime.h>

#include "graph_branch.h"

namespace vllm_retro {
namespace {

__global__ void set_if_kernel(cudaGraphConditionalHandle handle, const bool* pred) {
  cudaGraphSetConditional(handle, *pred ? 1u : 0u);
}

// The ELSE body of the last IF-ELSE node begun on this thread (captures are
// sequential per thread: one switch, one layer at a time).
thread_local cudaGraph_t pending_else = nullptr;

// One handle per captured graph and predicate, set by one kernel before the graph's
// first node: every layer's node of the same capture reads it (a kernel and its
// launch latency per layer saved: ~55 us per step of 32 layers on the H200). A
// driver that refuses a handle shared between nodes gets one handle and one kernel
// per node, as before (`sharing_refused`, for the process).
struct SharedHandle {
  unsigned long long capture_id = 0;
  const void* pred = nullptr;
  cudaGraphConditionalHandle handle = 0;
  bool valid = false;
};
thread_local SharedHandle shared;
bool sharing_refused = false;

// A new handle of `graph`, set from *pred by a kernel captured on `parent`.
cudaError_t new_handle(cudaGraph_t graph, cudaStream_t parent, const void* pred,
                       cudaGraphConditionalHandle* handle) {
  // Default 0 and no "assign default" flag: the handle holds what the kernel set,
  // which runs before the nodes at every replay.
  cudaError_t err = cudaGraphConditionalHandleCreate(handle, graph, 0, 0);
  if (err != cudaSuccess) return err;
  set_if_kernel<<<1, 1, 0, parent>>>(*handle, static_cast<const bool*>(pred));
  return cudaGetLastError();
}

// Adds an IF (IF-ELSE) node on `handle` after what `parent` captured so far.
cudaError_t add_if_node(cudaStream_t parent, cudaGraphConditionalHandle handle,
                        bool with_else, cudaGraphNode_t* node, cudaGraph_t* bodies) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  cudaGraph_t graph = nullptr;
  const cudaGraphNode_t* deps = nullptr;
  const cudaGraphEdgeData* edges = nullptr;
  size_t ndeps = 0;
  cudaError_t err = cudaStreamGetCaptureInfo(parent, &status, nullptr, &graph, &deps,
                                             &edges, &ndeps);
  if (err != cudaSuccess) return err;
  cudaGraphNodeParams params = {};
  params.type = cudaGraphNodeTypeConditional;
  params.conditional.handle = handle;
  params.conditional.type = cudaGraphCondTypeIf;
  params.conditional.size = with_else ? 2 : 1;
  err = cudaGraphAddNode(node, graph, deps, edges, ndeps, &params);
  if (err != cudaSuccess) return err;
  bodies[0] = params.conditional.phGraph_out[0];
  bodies[1] = with_else ? params.conditional.phGraph_out[1] : nullptr;
  return cudaSuccess;
}

}  // namespace

int graph_begin_if_launch(const void* pred, void* parent_v, void* child_v, bool with_else) {
  cudaStream_t parent = static_cast<cudaStream_t>(parent_v);
  cudaStream_t child = static_cast<cudaStream_t>(child_v);
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  unsigned long long capture_id = 0;
  cudaGraph_t graph = nullptr;
  cudaError_t err = cudaStreamGetCaptureInfo(parent, &status, &capture_id, &graph,
                                             nullptr, nullptr, nullptr);
  if (err != cudaSuccess) return static_cast<int>(err);
  if (status != cudaStreamCaptureStatusActive) return kGraphBranchNotCapturing;
  const bool reuse = !sharing_refused && shared.valid && shared.capture_id == capture_id
                     && shared.pred == pred;
  cudaGraphConditionalHandle handle = shared.handle;
  if (!reuse) {
    err = new_handle(graph, parent, pred, &handle);
    if (err != cudaSuccess) return static_cast<int>(err);
    shared = {capture_id, pred, handle, !sharing_refused};
  }
  cudaGraphNode_t node;
  cudaGraph_t bodies[2];
  err = add_if_node(parent, handle, with_else, &node, bodies);
  if (err != cudaSuccess && reuse) {
    // This driver wants a handle per node: from now on, one handle and kernel each.
    (void)cudaGetLastError();
    sharing_refused = true;
    shared.valid = false;
    err = new_handle(graph, parent, pred, &handle);
    if (err != cudaSuccess) return static_cast<int>(err);
    err = add_if_node(parent, handle, with_else, &node, bodies);
  }
  if (err != cudaSuccess) return static_cast<int>(err);
  err = cudaStreamUpdateCaptureDependencies(parent, &node, nullptr, 1,
                                            cudaStreamSetCaptureDependencies);
  if (err != cudaSuccess) return static_cast<int>(err);
  pending_else = bodies[1];
  return static_cast<int>(cudaStreamBeginCaptureToGraph(
      child, bodies[0], nullptr, nullptr, 0, cudaStreamCaptureModeThreadLocal));
}

int graph_branch_handles_shared() { return sharing_refused ? 0 : 1; }

int graph_else_launch(void* child_v) {
  cudaStream_t child = static_cast<cudaStream_t>(child_v);
  if (pending_else == nullptr) return kGraphBranchNoElse;
  cudaGraph_t body = nullptr;
  cudaError_t err = cudaStreamEndCapture(child, &body);
  if (err != cudaSuccess) return static_cast<int>(err);
  cudaGraph_t other = pending_else;
  pending_else = nullptr;
  return static_cast<int>(cudaStreamBeginCaptureToGraph(child, other, nullptr, nullptr, 0,
                                                        cudaStreamCaptureModeThreadLocal));
}

int graph_end_if_launch(void* child_v) {
  cudaGraph_t body = nullptr;
  return static_cast<int>(cudaStreamEndCapture(static_cast<cudaStream_t>(child_v), &body));
}

}  // namespace vllm_retro
