// Two paths of a captured CUDA graph, one enabled at a time: the GPU backend's dense
// switch (vllm_retro/backend/graph_paths.py) captures FlashAttention and retro's
// kernels one after the other into the same graph and, between replays, disables the
// nodes of the path the step does not take (cudaGraphNodeSetEnabled on the
// instantiated graph: a disabled node runs as an empty one).
//
// No CUDA and no torch headers here (streams, graphs and nodes cross as integers), as
// paged_score.h.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace vllm_retro {

// The kernel, memset and memcpy nodes (the kinds an instantiated graph can disable)
// of the graph `stream` is capturing, as integers. Returns 0, or a cudaError_t code
// (kGraphPathsNotCapturing: `stream` is not capturing).
int graph_capture_nodes_list(void* stream, std::vector<int64_t>* nodes);

// Enables or disables `count` nodes (of the graph `exec` was instantiated from) in `exec`
// from its next launch on. 0 or the first cudaError_t code.
int graph_exec_enable_nodes(int64_t exec, const int64_t* nodes, size_t count, bool enabled);

constexpr int kGraphPathsNotCapturing = -1;

}  // namespace vllm_retro
