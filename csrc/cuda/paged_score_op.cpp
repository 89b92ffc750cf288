// torch.ops.vllm_retro.paged_score on CUDA tensors: checks the tensors, fills the
// PagedScoreView (paged_score.h) and launches the kernel of paged_score.cu on the
// current stream (CUDA-graph safe: no allocation, no sync).
//
// Built only into CUDA builds of the extension (setup.py adds csrc/cuda/*.cpp with
// the .cu sources). It uses only device-generic c10 APIs (DeviceGuard, the CUDA
// guard implementation's current stream), not the ATen/c10 CUDA headers, so CI can
// also compile it against a CPU build of torch
// (tests/kernels/test_cuda_sources_compile.py).

#include <torch/library.h>

#include "../ops.h"
#include "op_checks.h"
#include "paged_score.h"

namespace vllm_retro {
namespace {

int32_t index_is64(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong,
              "paged_score: ", name, " must be int32 or int64");
  return t.scalar_type() == at::kLong ? 1 : 0;
}

void check_out(const at::Tensor& t, at::ScalarType dt, int64_t dim, const char* name) {
  TORCH_CHECK(t.scalar_type() == dt && t.dim() == dim && t.is_contiguous(),
              "paged_score: ", name, " must be a contiguous ", dim, "-d ", dt, " tensor");
}

}  // namespace

void paged_score_cuda(const at::Tensor& query, const at::Tensor& fpart, const at::Tensor& ipart,
                      const at::Tensor& block_table, const at::Tensor& ibt,
                      const at::Tensor& seq_lens,
                      const at::Tensor& headers, at::Tensor& logits, at::Tensor& score_max,
                      at::Tensor& score_sum, at::Tensor& hist, at::Tensor& ncand,
                      int64_t sink_blocks, int64_t block_size, int64_t nsplit,
                      double scale, double cap) {
  const at::Device dev = query.device();
  check_one_device("paged_score", dev, {&fpart, &ipart, &block_table, &ibt, &seq_lens, &headers,
                                        &logits, &score_max, &score_sum, &hist, &ncand});
  TORCH_CHECK(query.dim() == 3, "paged_score: query must be [B, Hq, D]");
  TORCH_CHECK(fpart.dim() == 4 && fpart.size(2) >= 3,
              "paged_score: fpart must be [P, H, S >= 3, D]");
  TORCH_CHECK(ipart.dim() == 3 && ipart.scalar_type() == at::kInt && ipart.stride(2) == 1,
              "paged_score: ipart must be [P, H, 2] int32 (size, start)");
  const int64_t B = query.size(0), H = fpart.size(1), D = fpart.size(3);
  TORCH_CHECK(query.size(2) == D && H > 0 && query.size(1) % H == 0,
              "paged_score: query [B, H*G, D] does not match fpart [P, H, S, D]");
  const int64_t G = query.size(1) / H;
  const int64_t BS = block_size;
  TORCH_CHECK(ipart.size(1) == H && ipart.size(2) == 2 && BS > 0 && BS <= (1 << 20),
              "paged_score: ipart does not match fpart, or bad block_size");
  const int32_t fdt = view_dtype(fpart, "paged_score", "fpart", true);
  TORCH_CHECK(paged_score_supported(fdt, static_cast<int32_t>(D), static_cast<int32_t>(G)),
              "paged_score: not compiled for head dim ", D, " and ", G,
              " query heads per KV head (head dims 32/64/128/256, up to 16 heads)");
  // The kernel reads summary rows as 16-byte vectors.
  TORCH_CHECK(rows_vec16(fpart), "paged_score: fpart rows must be contiguous and 16-byte aligned");
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) >= B &&
                  (block_table.stride(1) == 1 || block_table.size(1) <= 1),
              "paged_score: block_table must be [>=B, max_blocks] with unit stride along dim 1");
  TORCH_CHECK(ibt.dim() == 2 && ibt.scalar_type() == at::kInt &&
                  (ibt.stride(1) == 1 || ibt.size(1) <= 1),
              "paged_score: ibt must be [R, max_pages] int32 with unit stride along dim 1");
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.size(0) >= B &&
                  (seq_lens.stride(0) == 1 || seq_lens.size(0) <= 1),
              "paged_score: seq_lens must be [>=B] with unit stride");
  // The row stride is passed in (hdr_s0): only the words the score reads are assumed.
  TORCH_CHECK(headers.dim() == 2 && headers.scalar_type() == at::kInt &&
                  headers.stride(1) == 1 && headers.size(1) > kHdrIbtRow,
              "paged_score: headers must be [NB, HDR_WORDS] int32");
  check_out(logits, at::kFloat, 3, "logits");
  check_out(score_max, at::kFloat, 3, "score_max");
  check_out(score_sum, at::kFloat, 3, "score_sum");
  check_out(hist, at::kInt, 2, "hist");
  check_out(ncand, at::kInt, 2, "ncand");
  TORCH_CHECK(logits.size(0) >= fpart.size(0) && logits.size(1) == H && logits.size(2) == G,
              "paged_score: logits must be [>=P, H, G]");
  TORCH_CHECK(score_sum.sizes() == score_max.sizes() && score_max.size(0) >= B * H &&
                  score_max.size(1) >= nsplit && score_max.size(2) >= G &&
                  score_max.size(2) <= 128,
              "paged_score: score_max / score_sum must be [>=B*H, >=nsplit, G..128]");
  TORCH_CHECK(hist.size(0) >= B * H && ncand.size(0) >= B * H && ncand.size(1) == 2,
              "paged_score: hist / ncand must have >= B*H rows");
  TORCH_CHECK(nsplit >= 1 && nsplit <= 65535 && sink_blocks >= 0,
              "paged_score: bad nsplit / sink_blocks");
  if (B == 0) return;

  PagedScoreView v{};
  v.q = query.data_ptr();
  v.q_sb = query.stride(0);
  v.q_sh = query.stride(1);
  v.q_sd = query.stride(2);
  v.q_dtype = view_dtype(query, "paged_score", "query", true);
  v.fp = fpart.data_ptr();
  v.fp_s0 = fpart.stride(0);
  v.fp_s1 = fpart.stride(1);
  v.fp_s2 = fpart.stride(2);
  v.fp_dtype = fdt;
  v.ip = ipart.data_ptr<int32_t>();
  v.ip_s0 = ipart.stride(0);
  v.ip_s1 = ipart.stride(1);
  v.bt = block_table.data_ptr();
  v.bt_s0 = block_table.stride(0);
  v.bt_is64 = index_is64(block_table, "block_table");
  v.ibt = ibt.data_ptr<int32_t>();
  v.ibt_s0 = ibt.stride(0);
  v.seq = seq_lens.data_ptr();
  v.seq_is64 = index_is64(seq_lens, "seq_lens");
  v.hdr = headers.data_ptr<int32_t>();
  v.hdr_s0 = headers.stride(0);
  v.logits = logits.data_ptr<float>();
  v.score_max = score_max.data_ptr<float>();
  v.score_sum = score_sum.data_ptr<float>();
  v.hist = hist.data_ptr<int32_t>();
  v.ncand = ncand.data_ptr<int32_t>();
  v.B = static_cast<int32_t>(B);
  v.H = static_cast<int32_t>(H);
  v.G = static_cast<int32_t>(G);
  v.D = static_cast<int32_t>(D);
  v.BS = static_cast<int32_t>(BS);
  v.SB = static_cast<int32_t>(sink_blocks);
  v.NS = static_cast<int32_t>(nsplit);
  v.NSP = static_cast<int32_t>(score_max.size(1));
  v.GP = static_cast<int32_t>(score_max.size(2));
  v.NBINS = static_cast<int32_t>(hist.size(1));
  v.scale = static_cast<float>(scale);
  v.cap = static_cast<float>(cap);

  const c10::DeviceGuard guard(dev);
  check_launch("paged_score", paged_score_launch(v, current_stream(dev)));
}

}  // namespace vllm_retro

TORCH_LIBRARY_IMPL(vllm_retro, CUDA, m) {
  m.impl("paged_score", &vllm_retro::paged_score_cuda);
}
