// torch.ops.vllm_retro.graph_capture_nodes / graph_exec_enable on CUDA (graph_paths.h),
// dispatched by an anchor tensor on the graph's device. Device-generic c10 APIs only,
// as paged_score_op.cpp (CI compiles it against a CPU build of torch).

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "graph_paths.h"

namespace vllm_retro {

std::vector<int64_t> graph_capture_nodes_cuda(const at::Tensor& anchor) {
  const c10::DeviceGuard guard(anchor.device());
  void* stream = c10::impl::VirtualGuardImpl(c10::DeviceType::CUDA)
                     .getStream(anchor.device()).native_handle();
  std::vector<int64_t> nodes;
  const int err = graph_capture_nodes_list(stream, &nodes);
  TORCH_CHECK(err != kGraphPathsNotCapturing,
              "graph_capture_nodes: the current stream is not capturing a graph");
  TORCH_CHECK(err == 0, "graph_capture_nodes: CUDA error code ", err);
  return nodes;
}

void graph_exec_enable_cuda(const at::Tensor& anchor, int64_t exec, c10::IntArrayRef nodes,
                            bool enabled) {
  TORCH_CHECK(exec != 0, "graph_exec_enable: the graph is not instantiated");
  const c10::DeviceGuard guard(anchor.device());
  const int err = graph_exec_enable_nodes(exec, nodes.data(), nodes.size(), enabled);
  TORCH_CHECK(err == 0, "graph_exec_enable: CUDA error code ", err);
}

}  // namespace vllm_retro

TORCH_LIBRARY_IMPL(vllm_retro, CUDA, m) {
  m.impl("graph_capture_nodes", &vllm_retro::graph_capture_nodes_cuda);
  m.impl("graph_exec_enable", &vllm_retro::graph_exec_enable_cuda);
}
