// torch.ops.vllm_retro.graph_begin_if / graph_else / graph_end_if on CUDA tensors: the IF nodes of
// graph_branch.h on the current stream of the predicate's device. Device-generic c10
// APIs only, as paged_score_op.cpp (CI compiles it against a CPU build of torch).

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/library.h>

#include <cstdint>

#include "graph_branch.h"

namespace vllm_retro {
namespace {

void check_pred(const at::Tensor& pred, const char* op) {
  TORCH_CHECK(pred.is_cuda() && pred.scalar_type() == at::kBool && pred.numel() == 1,
              op, ": pred must be one CUDA bool");
}

}  // namespace

void graph_begin_if_cuda(const at::Tensor& pred, int64_t child_stream, bool with_else) {
  check_pred(pred, "graph_begin_if");
  const c10::DeviceGuard guard(pred.device());
  void* parent = c10::impl::VirtualGuardImpl(c10::DeviceType::CUDA)
                     .getStream(pred.device()).native_handle();
  const int err = graph_begin_if_launch(pred.data_ptr(), parent,
                                        reinterpret_cast<void*>(child_stream), with_else);
  TORCH_CHECK(err != kGraphBranchNotCapturing,
              "graph_begin_if: the current stream is not capturing a graph");
  TORCH_CHECK(err == 0, "graph_begin_if: CUDA error code ", err);
}

void graph_else_cuda(const at::Tensor& pred, int64_t child_stream) {
  check_pred(pred, "graph_else");
  const c10::DeviceGuard guard(pred.device());
  const int err = graph_else_launch(reinterpret_cast<void*>(child_stream));
  TORCH_CHECK(err != kGraphBranchNoElse, "graph_else: no IF-ELSE node begun on this thread");
  TORCH_CHECK(err == 0, "graph_else: CUDA error code ", err);
}

void graph_end_if_cuda(const at::Tensor& pred, int64_t child_stream) {
  check_pred(pred, "graph_end_if");
  const c10::DeviceGuard guard(pred.device());
  const int err = graph_end_if_launch(reinterpret_cast<void*>(child_stream));
  TORCH_CHECK(err == 0, "graph_end_if: CUDA error code ", err);
}

}  // namespace vllm_retro

TORCH_LIBRARY_IMPL(vllm_retro, CUDA, m) {
  m.impl("graph_begin_if", &vllm_retro::graph_begin_if_cuda);
  m.impl("graph_else", &vllm_retro::graph_else_cuda);
  m.impl("graph_end_if", &vllm_retro::graph_end_if_cuda);
}
