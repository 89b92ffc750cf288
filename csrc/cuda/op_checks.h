// The checks and glue the torch-op wrappers of the CUDA kernels (paged_score_op.cpp,
// paged_attend_op.cpp) share: element type codes from tensors, one device for all
// tensors, 16-byte vector rows, the current stream. Device-generic c10 APIs only, so
// CI compiles the wrappers against a CPU build of torch.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <cstdint>
#include <initializer_list>

#include "view_common.h"

namespace vllm_retro {

// The view's type code of a 16-bit tensor, or of a float32 one where ``allow_f32``.
inline int32_t view_dtype(const at::Tensor& t, const char* op, const char* name,
                          bool allow_f32) {
  switch (t.scalar_type()) {
    case at::kHalf: return kViewFloat16;
    case at::kBFloat16: return kViewBFloat16;
    case at::kFloat:
      if (allow_f32) return kViewFloat32;
      [[fallthrough]];
    default:
      TORCH_CHECK(false, op, ": ", name, " must be float16 or bfloat16",
                  allow_f32 ? " or float32" : "");
  }
  return -1;
}

// Every tensor on ``dev`` (a CUDA device).
inline void check_one_device(const char* op, const at::Device& dev,
                             std::initializer_list<const at::Tensor*> tensors) {
  TORCH_CHECK(dev.is_cuda(), op, ": CUDA tensors expected");
  for (const at::Tensor* t : tensors)
    TORCH_CHECK(t->device() == dev, op, ": all tensors must be on ", dev);
}

// Rows readable as 16-byte vectors: innermost stride 1, the other strides (of
// dimensions longer than 1) and the base 16-byte aligned.
inline bool rows_vec16(const at::Tensor& t) {
  const int64_t vec = 16 / t.element_size();
  if (t.stride(t.dim() - 1) != 1 || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16) return false;
  for (int64_t i = 0; i + 1 < t.dim(); ++i)
    if (t.size(i) > 1 && t.stride(i) % vec) return false;
  return true;
}

// A view launcher's result: 0, else an error naming the op.
inline void check_launch(const char* op, int err) {
  TORCH_CHECK(err == 0, op, ": kernel launch failed (",
              err == kViewUnsupported ? "unsupported shape" : "CUDA error code ", err, ")");
}

// The current CUDA stream of ``dev`` as the views' launchers take it.
inline void* current_stream(const at::Device& dev) {
  return c10::impl::VirtualGuardImpl(c10::DeviceType::CUDA).getStream(dev).native_handle();
}

}  // namespace vllm_retro
