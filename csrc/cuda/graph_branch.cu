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

}  // namespace

int graph_begin_if_launch(const void* pred, void* parent_v, void* child_v, bool with_else) {
  cudaStream_t parent = static_cast<cudaStream_t>(parent_v);
  cudaStream_t child = static_cast<cudaStream_t>(child_v);
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  cudaGraph_t graph = nullptr;
  const cudaGraphNode_t* deps = nullptr;
  const cudaGraphEdgeData* edges = nullptr;
  size_t ndeps = 0;
  cudaError_t err = cudaStreamGetCaptureInfo(parent, &status, nullptr, &graph, &deps,
                                             &edges, &ndeps);
  if (err != cudaSuccess) return static_cast<int>(err);
  if (status != cudaStreamCaptureStatusActive) return kGraphBranchNotCapturing;
  // Default 0 and no "assign default" flag: the handle holds what the kernel set,
  // which runs before the node at every replay.
  cudaGraphConditionalHandle handle;
  err = cudaGraphConditionalHandleCreate(&handle, graph, 0, 0);
  if (err != cudaSuccess) return static_cast<int>(err);
  set_if_kernel<<<1, 1, 0, parent>>>(handle, static_cast<const bool*>(pred));
  err = cudaGetLastError();
  if (err != cudaSuccess) return static_cast<int>(err);
  // The node goes after the kernel just captured: read the dependencies again.
  err = cudaStreamGetCaptureInfo(parent, &status, nullptr, &graph, &deps, &edges, &ndeps);
  if (err != cudaSuccess) return static_cast<int>(err);
  cudaGraphNodeParams params = {};
  params.type = cudaGraphNodeTypeConditional;
  params.conditional.handle = handle;
  params.conditional.type = cudaGraphCondTypeIf;
  params.conditional.size = with_else ? 2 : 1;
  cudaGraphNode_t node;
  err = cudaGraphAddNode(&node, graph, deps, edges, ndeps, &params);
  if (err != cudaSuccess) return static_cast<int>(err);
  err = cudaStreamUpdateCaptureDependencies(parent, &node, nullptr, 1,
                                            cudaStreamSetCaptureDependencies);
  if (err != cudaSuccess) return static_cast<int>(err);
  pending_else = with_else ? params.conditional.phGraph_out[1] : nullptr;
  return static_cast<int>(cudaStreamBeginCaptureToGraph(
      child, params.conditional.phGraph_out[0], nullptr, nullptr, 0,
      cudaStreamCaptureModeThreadLocal));
}

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
