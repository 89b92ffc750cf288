// Declarations of the vllm_retro operators (registered in bindings.cpp as
// torch.ops.vllm_retro.*).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace vllm_retro {

// Tripartite decode attention of one decode query over a WaveIndex, CPU.
//
//   query                    [Hq, D]   any float dtype (converted to the compute dtype)
//   sink_keys / sink_values  [H, s, D] KV dtype (float32, bfloat16, float16, float64)
//   tail_keys / tail_values  [H, t, D] KV dtype
//   keys / values            [H, N, D] KV dtype, cluster-contiguous
//   centroids / value_sums   [H, C, D] compute dtype (float64 for float64 KV, else float32)
//   key_vars                 [H, C, D] compute dtype: per-channel variance of each cluster's
//                            keys (>= 0); each cluster's estimated log-mass, used for the
//                            ranking, the accuracy bound and the estimation zone, is
//                            ln size + q.c*scale + min(scale^2/2 sum_d q_d^2 var_d, cap)
//                            (vllm_retro.attention.cluster_log_mass; cap = variance_cap)
//   sizes / starts           [H, C]    int64, cluster c of head h is keys[h, starts:starts+sizes]
//   n_ret, n_est             clusters attended exactly / estimated per KV head (clamped to C)
//   scale                    logit scale
//   out                      [Hq, D]   float dtype, written
//   k_ret                    optional [H] int64: per-head exact-set size (overrides n_ret)
//   error_bound, max_ret     accuracy-bounded mode when error_bound > 0: the exact set is
//                            the smallest (>= n_ret, <= max_ret; max_ret < 0 means C) whose
//                            estimated outside softmax mass (from the log-masses above) is
//                            <= error_bound for every query head of the group
//                            (WaveIndex._bounded_retrieval)
//   variance_cap             cap of the variance term above (RetroConfig.variance_cap, 2)
//   bound_margin             bounded mode: >= 0 sizes the exact set with the one-sided
//                            outside-mass estimate (inside clusters at ln size + q.c*scale,
//                            outside ones uncapped + bound_margin nats;
//                            WaveIndex._one_sided_outside); < 0: the estimate above
//   vc_su / vc_w             optional [H, C, D] compute dtype, together: the value
//                            correction's pair (RetroConfig.value_correction); an
//                            estimated cluster's value is value_sum/size + scale (q.su) w
//   error_rank               retrieval_rank "error" (fixed budget only): the exact set is
//                            the n_ret clusters of the band (top n_ret + n_est by score)
//                            with the largest sum_g m_g t_g (m_g the cluster's share of
//                            query head g's attention, steady part included; t_g its
//                            uncapped variance term), ties in score order
//                            (WaveIndex._error_ranked)
//
// Only the last dim of the KV, query and out tensors must be contiguous.
// Returns [H, 3] int64: clusters retrieved, tokens retrieved, tokens estimated per KV head.
at::Tensor retro_decode_attention_cpu(
    const at::Tensor& query, const at::Tensor& sink_keys, const at::Tensor& sink_values,
    const at::Tensor& tail_keys, const at::Tensor& tail_values, const at::Tensor& keys,
    const at::Tensor& values, const at::Tensor& centroids, const at::Tensor& value_sums,
    const at::Tensor& key_vars, const at::Tensor& sizes, const at::Tensor& starts,
    int64_t n_ret, int64_t n_est,
    double scale, at::Tensor& out, const std::optional<at::Tensor>& k_ret,
    double error_bound, int64_t max_ret, double variance_cap, double bound_margin,
    const std::optional<at::Tensor>& vc_su, const std::optional<at::Tensor>& vc_w,
    bool error_rank);

// Shape-only implementation (Meta / fake tensors, torch.compile tracing).
at::Tensor retro_decode_attention_meta(
    const at::Tensor& query, const at::Tensor& sink_keys, const at::Tensor& sink_values,
    const at::Tensor& tail_keys, const at::Tensor& tail_values, const at::Tensor& keys,
    const at::Tensor& values, const at::Tensor& centroids, const at::Tensor& value_sums,
    const at::Tensor& key_vars, const at::Tensor& sizes, const at::Tensor& starts,
    int64_t n_ret, int64_t n_est,
    double scale, at::Tensor& out, const std::optional<at::Tensor>& k_ret,
    double error_bound, int64_t max_ret, double variance_cap, double bound_margin,
    const std::optional<at::Tensor>& vc_su, const std::optional<at::Tensor>& vc_w,
    bool error_rank);

// Stage 1 of the paged GPU decode (the CUDA twin of _score_kernel in
// vllm_retro/kernels/triton_decode.py), CUDA only (csrc/cuda/; registered in CUDA
// builds). Log-mass of every cluster entry of each row for the G query heads of each KV
// head, and per-program softmax partials; program (r*H + h, p), p < nsplit, takes
// entries p, p + nsplit, ... of the row's C = max(clustered_end / bs - sink_blocks, 0)
// (0 for seq_len 0) entries.
//
//   query        [B, H*G, D]      float32 / float16 / bfloat16, any strides
//   fpart        [P, H, S, D]     cache dtype (float32 / float16 / bfloat16): centroid,
//                                 key variance, mean value (the layer's IndexPool; S 3,
//                                 or 5 with the value correction's pair, not read here);
//                                 rows contiguous and 16-byte aligned
//   ipart        [P, H, 2]        int32: size (word 0), start (word 1)
//   block_table  [>=B, max_blocks] int32 / int64;  seq_lens [>=B] int32 / int64
//   ibt          [R, max_pages]   int32: the index table (entry i of a row at pool page
//                                 ix[i], ix = ibt[headers[bt[r, 0], HDR_IBT_ROW]])
//   headers      [NB, HDR_WORDS]  int32 (word 0: clustered_end, word 4: ibt row; the
//                                 row stride is read, later words are not)
//   logits       [>=P, H, G]      float32, written at the pool pages of the rows' entries:
//                                 logits[ix[i], h, g] = s q.c + ln size
//                                 + min(s^2/2 sum_d q_d^2 var_d, cap), -inf when size 0
//   score_max / score_sum [>=B*H, NSP >= nsplit, GP in G..128] float32: per program
//                                 (r*H + h, p), at [r*H + h, p, g], the max and the sum
//                                 of exp(log-mass - max) over its entries (-inf / 0 for
//                                 none; -inf / 0 for g >= G)
//   hist [>=B*H, NBINS], ncand [>=B*H, 2] int32: rows 0..B*H zeroed
//   block_size: tokens per KV block (bs)
//   head dims 32/64/128/256, G <= 16; scale: logit scale; cap: VARIANCE_CORRECTION_CAP
void paged_score_cuda(const at::Tensor& query, const at::Tensor& fpart, const at::Tensor& ipart,
                      const at::Tensor& block_table, const at::Tensor& ibt,
                      const at::Tensor& seq_lens,
                      const at::Tensor& headers, at::Tensor& logits, at::Tensor& score_max,
                      at::Tensor& score_sum, at::Tensor& hist, at::Tensor& ncand,
                      int64_t sink_blocks, int64_t block_size, int64_t nsplit,
                      double scale, double cap);

// Stage 5 of the paged GPU decode (csrc/cuda/paged_attend.cu; CUDA builds only), the
// CUDA twin of Triton's _attend_kernel without the wave buffer, 8-bit mean values and
// the value correction: exact attention over each row's steady zone and retrieved
// clusters and estimation over its estimated clusters (the list kernel's lists and
// counts, the score kernel's log-masses), one partial per program (part_o / part_m /
// part_l at rows (r*H + h)*NS + p), merged into `out` by the row-head's last program
// (tickets). Grid (B*H, max_split); the programs per row-head follow the rows in use
// when `dynamic` (Triton's _program: target_programs // (rows * H), at most max_split).
//   query [B, H*G, D] and kv_cache (NB, H, bs, 2D) and fpart [P, H, S, D]: one 16-bit
//   dtype, 16-byte aligned rows; head dims 64/128, G <= 4, bs 16; out [B, H*G, D]
//   float32 / float16 / bfloat16, every element written.
void paged_attend_cuda(const at::Tensor& query, const at::Tensor& kv_cache,
                       const at::Tensor& fpart, const at::Tensor& block_table,
                       const at::Tensor& ibt, const at::Tensor& seq_lens,
                       const at::Tensor& headers, const at::Tensor& logits,
                       const at::Tensor& lists, const at::Tensor& counts, at::Tensor& part_o,
                       at::Tensor& part_m, at::Tensor& part_l, at::Tensor& tickets,
                       at::Tensor& out, int64_t sink_end, int64_t target_programs,
                       int64_t max_split, int64_t dynamic, double scale);

}  // namespace vllm_retro
