// What the CUDA decode kernels' views (paged_score.h, paged_attend.h) share: the
// element type codes and the index's word positions. No CUDA and no torch headers, as
// the views themselves.
#pragma once

#include <cstdint>

namespace vllm_retro {

// Element type codes of the tensors a kernel reads or writes as floats.
enum ViewDtype : int32_t {
  kViewFloat32 = 0,
  kViewFloat16 = 1,
  kViewBFloat16 = 2,
};

// Returned by a view's launcher for a shape or dtype it was not compiled for (else
// 0 or a cudaError_t code).
constexpr int kViewUnsupported = -1;

// Header columns (vllm_retro/index/paged.py HDR_CLUSTERED_END, HDR_IBT_ROW).
constexpr int kHdrClusteredEnd = 0;
constexpr int kHdrIbtRow = 4;

// Words of the index's int part per (block, head) (vllm_retro/index/paged.py I_SIZE,
// I_START): the cluster's size, the position of its first token.
constexpr int kIntSize = 0;
constexpr int kIntStart = 1;

}  // namespace vllm_retro
