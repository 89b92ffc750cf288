// The boundary between the torch op wrapper (paged_attend_op.cpp) and the CUDA
// attention kernel (paged_attend.cu): one plain struct of pointers, strides and sizes,
// and a host launcher that takes it. No CUDA and no torch headers here (the stream
// crosses as void*), as paged_score.h.
#pragma once

#include <cstdint>

#include "view_common.h"

namespace vllm_retro {

// The selection lists' packing (vllm_retro/kernels/triton_decode.py PACK, LIST_WORDS):
// items per (page, head) and their words (two per item).
constexpr int kListItems = 16;
constexpr int kListWords = 2 * kListItems;

// Everything the last stage of the paged decode (Triton's _attend_kernel without the
// wave buffer, 8-bit mean values or the value correction) reads and writes. Strides are
// in elements of the tensor they index; the innermost stride of q, kv, fp and out is 1.
// Launch meaning (Triton's _program): grid (B*H, MSPLIT); the programs per row-head NS
// follow the rows in use; program (r*H + h, p) attends the items p, p+NS, ... of row
// r's steady zone, retrieved clusters and estimated clusters for KV head h, writes one
// partial softmax, and the last program of the row-head merges the NS partials into out.
struct PagedAttendView {
  const void* q;  // [B, H*G, D]
  int64_t q_sb, q_sh;
  const void* kv;  // vLLM's view (NB, H, bs, 2D): K in [..., :D], V in [..., D:]
  int64_t kv_s0, kv_s1, kv_s2;
  const void* fp;  // index pool float part [P, H, S, D]: slot 2 the mean value
  int64_t fp_s0, fp_s1, fp_s2;
  const int32_t* bt;  // block_table [>=B, max_blocks]
  int64_t bt_s0;
  const int32_t* ibt;  // index table [R, max_pages]
  int64_t ibt_s0;
  const int32_t* seq;  // seq_lens [>=B]
  const int32_t* hdr;  // headers [NB, HDR_WORDS]
  int64_t hdr_s0;
  const float* logits;    // [P, H, G]: an estimated cluster's log-mass per query head
  const int32_t* lists;   // [P, H, kListWords]: (start, size) of a retrieved cluster,
                          // (page, -) of an estimated one, item k of a row-head at page
                          // ix[k / kListItems], words 2 (k % kListItems) and that + 1
  const int32_t* counts;  // [>=B*H, 2]: retrieved, estimated clusters
  float* part_o;          // [>= B*H*MSPLIT*G, D]
  float* part_m;          // [>= B*H*MSPLIT*G]
  float* part_l;
  int32_t* tickets;  // [>=B*H], zero between launches (the last program resets its own)
  void* out;         // [B, H*G, D]
  int64_t o_sb, o_sh;
  int32_t dtype, out_dtype;
  int32_t B, H, G, D, BS;
  int32_t S;       // sink_end: first clustered position
  int32_t TGT, MSPLIT, DYN;  // the split (Triton's _program)
  float scale;
};

// Whether the kernel is compiled for this dtype, head dim, group size and block size.
bool paged_attend_supported(int32_t dtype, int32_t head_dim, int32_t group_size,
                            int32_t block_size);

// Launches the kernel on `stream` (a cudaStream_t). Returns 0, a cudaError_t code of
// the launch, or kViewUnsupported.
int paged_attend_launch(const PagedAttendView& v, void* stream);

}  // namespace vllm_retro
