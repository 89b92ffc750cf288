// The boundary between the torch op wrapper (paged_score_op.cpp) and the CUDA score
// kernel (paged_score.cu): one plain struct of pointers, strides and sizes, and a host
// launcher that takes it.
//
// This header includes no CUDA and no torch headers (the stream crosses as void*), so
// both sides compile without the other's headers: the kernel file needs only the CUDA
// toolkit (CI compiles it with nvcc for sm_90 on a CPU-only torch, whose ATen CUDA
// headers are incomplete), the wrapper only torch.
#pragma once

#include <cstdint>

#include "view_common.h"

namespace vllm_retro {

// Everything stage 1 of the paged decode (Triton's _score_kernel) reads and writes.
// Strides are in elements of the tensor they index. Meaning of the launch: grid
// (B*H, NS); program (r*H + h, p) scores cluster entries p, p+NS, p+2NS, ... of row r,
// KV head h (vllm_retro/kernels/triton_decode.py, module doc).
struct PagedScoreView {
  // query [B, H*G, D] (q_dtype), any strides.
  const void* q;
  int64_t q_sb, q_sh, q_sd;
  int32_t q_dtype;
  // Float part of the index pool, [P, H, 3, D] (fp_dtype = the cache's dtype): rows
  // centroid, key variance, mean value. fp_s3 must be 1 and every row 16-byte
  // aligned (the kernel reads rows in 16-byte vectors).
  const void* fp;
  int64_t fp_s0, fp_s1, fp_s2;
  int32_t fp_dtype;
  // Int part of the index pool, [P, H, 2] int32; word kIntSize of (page, head) is the
  // cluster's size (word 1: its first token position).
  const int32_t* ip;
  int64_t ip_s0, ip_s1;
  // block_table [>=B, max_blocks] (int32 or int64, unit stride along dim 1).
  const void* bt;
  int64_t bt_s0;
  int32_t bt_is64;
  // The index table ibt [R, max_pages] int32 (unit stride along dim 1): entry i of a
  // row's cluster zone has its index at pool page ibt[hdr[blk0, kHdrIbtRow], i].
  const int32_t* ibt;
  int64_t ibt_s0;
  // seq_lens [>=B] (int32 or int64, unit stride).
  const void* seq;
  int32_t seq_is64;
  // headers [NB, HDR_WORDS] int32 (unit stride along dim 1); word 0: clustered_end.
  const int32_t* hdr;
  int64_t hdr_s0;
  // Outputs (contiguous, as DecodeWorkspace allocates them):
  float* logits;      // [P, H, G]: log-mass of cluster entry i at its pool page ix[i]
  float* score_max;   // [>=B*H, NSP, GP]: per-program max of the log-masses per query head
  float* score_sum;   // [>=B*H, NSP, GP]: per-program sum of exp(log-mass - max)
  int32_t* hist;      // [>=B*H, NBINS]: zeroed by program p == 0
  int32_t* ncand;     // [>=B*H, 2]: zeroed by program p == 0
  // Sizes.
  int32_t B, H, G, D, BS;
  int32_t SB;         // sink blocks: cluster entry i of a row is its logical block SB + i
  int32_t NS, NSP, GP, NBINS;
  float scale;        // logit scale
  float cap;          // cap of the variance term (VARIANCE_CORRECTION_CAP)
};

// Whether the kernel is compiled for this cache dtype, head dim and group size.
bool paged_score_supported(int32_t fp_dtype, int32_t head_dim, int32_t group_size);

// Launches the kernel on `stream` (a cudaStream_t). Returns 0, a cudaError_t code of
// the launch, or kViewUnsupported.
int paged_score_launch(const PagedScoreView& v, void* stream);

}  // namespace vllm_retro
