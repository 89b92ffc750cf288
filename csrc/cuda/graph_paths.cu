// Node lists and node enabling of CUDA graphs (graph_paths.h).

#include <cuda_runtime.h>

#include "graph_paths.h"

namespace vllm_retro {

int graph_capture_nodes_list(void* stream_v, std::vector<int64_t>* nodes) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_v);
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  cudaGraph_t graph = nullptr;
  cudaError_t err = cudaStreamGetCaptureInfo(stream, &status, nullptr, &graph, nullptr,
                                             nullptr, nullptr);
  if (err != cudaSuccess) return static_cast<int>(err);
  if (status != cudaStreamCaptureStatusActive) return kGraphPathsNotCapturing;
  size_t n = 0;
  err = cudaGraphGetNodes(graph, nullptr, &n);
  if (err != cudaSuccess) return static_cast<int>(err);
  std::vector<cudaGraphNode_t> all(n);
  if (n > 0) {
    err = cudaGraphGetNodes(graph, all.data(), &n);
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  nodes->clear();
  for (size_t i = 0; i < n; ++i) {
    cudaGraphNodeType type;
    err = cudaGraphNodeGetType(all[i], &type);
    if (err != cudaSuccess) return static_cast<int>(err);
    if (type == cudaGraphNodeTypeKernel || type == cudaGraphNodeTypeMemset
        || type == cudaGraphNodeTypeMemcpy) {
      nodes->push_back(reinterpret_cast<int64_t>(all[i]));
    }
  }
  return 0;
}

int graph_exec_enable_nodes(int64_t exec, const int64_t* nodes, size_t count, bool enabled) {
  cudaGraphExec_t g = reinterpret_cast<cudaGraphExec_t>(exec);
  for (size_t i = 0; i < count; ++i) {
    cudaError_t err = cudaGraphNodeSetEnabled(g, reinterpret_cast<cudaGraphNode_t>(nodes[i]),
                                              enabled ? 1u : 0u);
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  return 0;
}

}  // namespace vllm_retro
