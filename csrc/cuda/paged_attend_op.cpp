// torch.ops.vllm_retro.paged_attend on CUDA tensors: checks the tensors, fills the
// PagedAttendView (paged_attend.h) and launches the kernel of paged_attend.cu on the
// current stream (CUDA-graph safe: no allocation, no sync). Device-generic c10 APIs
// only, as paged_score_op.cpp, so CI compiles it against a CPU build of torch.

#include <torch/library.h>

#include <algorithm>

#include "../ops.h"
#include "op_checks.h"
#include "paged_attend.h"

namespace vllm_retro {
namespace {

void check_int(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kInt && t.dim() == dim && t.stride(dim - 1) == 1,
              "paged_attend: ", name, " must be a ", dim,
              "-d int32 tensor with unit innermost stride");
}

void check_f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous(),
              "paged_attend: ", name, " must be a contiguous float32 tensor");
}

}  // namespace

void paged_attend_cuda(const at::Tensor& query, const at::Tensor& kv_cache,
                       const at::Tensor& fpart, const at::Tensor& block_table,
                       const at::Tensor& ibt, const at::Tensor& seq_lens,
                       const at::Tensor& headers, const at::Tensor& logits,
                       const at::Tensor& lists, const at::Tensor& counts, at::Tensor& part_o,
                       at::Tensor& part_m, at::Tensor& part_l, at::Tensor& tickets,
                       at::Tensor& out, int64_t sink_end, int64_t target_programs,
                       int64_t max_split, int64_t dynamic, double scale) {
  const at::Device dev = query.device();
  check_one_device("paged_attend", dev, {&kv_cache, &fpart, &block_table, &ibt, &seq_lens,
                                         &headers, &logits, &lists, &counts, &part_o, &part_m,
                                         &part_l, &tickets, &out});
  TORCH_CHECK(query.dim() == 3 && kv_cache.dim() == 4 && fpart.dim() == 4 && out.dim() == 3,
              "paged_attend: query / out [B, Hq, D], kv_cache (NB, H, bs, 2D), fpart "
              "[P, H, S, D] expected");
  const int64_t B = query.size(0), H = kv_cache.size(1), BS = kv_cache.size(2);
  const int64_t D = query.size(2);
  TORCH_CHECK(H > 0 && query.size(1) % H == 0 && kv_cache.size(3) == 2 * D &&
                  fpart.size(1) == H && fpart.size(2) >= 3 && fpart.size(3) == D &&
                  out.sizes() == query.sizes(),
              "paged_attend: shapes of query, kv_cache, fpart and out do not match");
  const int64_t G = query.size(1) / H;
  const int32_t dt = view_dtype(query, "paged_attend", "query / cache", false);
  TORCH_CHECK(kv_cache.scalar_type() == query.scalar_type() &&
                  fpart.scalar_type() == query.scalar_type(),
              "paged_attend: query, kv_cache and fpart must have one dtype");
  TORCH_CHECK(paged_attend_supported(dt, static_cast<int32_t>(D), static_cast<int32_t>(G),
                                     static_cast<int32_t>(BS)),
              "paged_attend: not compiled for head dim ", D, ", ", G,
              " query heads per KV head and block size ", BS,
              " (head dims 64/128, up to 4, 16)");
  TORCH_CHECK(rows_vec16(query) && rows_vec16(kv_cache) && rows_vec16(fpart),
              "paged_attend: query, kv_cache and fpart rows must be contiguous and "
              "16-byte aligned");
  TORCH_CHECK(out.stride(2) == 1, "paged_attend: out must have unit innermost stride");
  check_int(block_table, 2, "block_table");
  check_int(ibt, 2, "ibt");
  check_int(seq_lens, 1, "seq_lens");
  check_int(headers, 2, "headers");
  check_int(lists, 3, "lists");
  check_int(counts, 2, "counts");
  check_int(tickets, 1, "tickets");
  check_f32(logits, "logits");
  check_f32(part_o, "part_o");
  check_f32(part_m, "part_m");
  check_f32(part_l, "part_l");
  TORCH_CHECK(block_table.size(0) >= B && seq_lens.size(0) >= B && counts.size(0) >= B * H &&
                  counts.size(1) == 2 && tickets.size(0) >= B * H,
              "paged_attend: block_table / seq_lens / counts / tickets have too few rows");
  TORCH_CHECK(logits.dim() == 3 && logits.size(0) >= fpart.size(0) && logits.size(1) == H &&
                  logits.size(2) == G && lists.size(0) >= fpart.size(0) && lists.size(1) == H &&
                  lists.size(2) == kListWords,
              "paged_attend: logits [>=P, H, G] and lists [>=P, H, ", kListWords,
              "] expected");
  TORCH_CHECK(max_split >= 1 && max_split <= 65535 && target_programs >= 1 && sink_end >= 0,
              "paged_attend: bad split or sink_end");
  // The partials the launch can write: rows (r*H + h)*NS + p for the rows in use.
  int64_t rows = 0;
  for (int64_t nr = dynamic ? 1 : B; nr <= B; ++nr) {
    const int64_t ns = std::max<int64_t>(std::min(max_split, target_programs / (nr * H)), 1);
    rows = std::max(rows, nr * H * ns);
  }
  TORCH_CHECK(part_m.numel() >= rows * G && part_l.numel() >= rows * G &&
                  part_o.numel() >= rows * G * D,
              "paged_attend: partial buffers too small for ", rows, " partials");
  if (B == 0) return;

  PagedAttendView v{};
  v.q = query.data_ptr();
  v.q_sb = query.stride(0);
  v.q_sh = query.stride(1);
  v.kv = kv_cache.data_ptr();
  v.kv_s0 = kv_cache.stride(0);
  v.kv_s1 = kv_cache.stride(1);
  v.kv_s2 = kv_cache.stride(2);
  v.fp = fpart.data_ptr();
  v.fp_s0 = fpart.stride(0);
  v.fp_s1 = fpart.stride(1);
  v.fp_s2 = fpart.stride(2);
  v.bt = block_table.data_ptr<int32_t>();
  v.bt_s0 = block_table.stride(0);
  v.ibt = ibt.data_ptr<int32_t>();
  v.ibt_s0 = ibt.stride(0);
  v.seq = seq_lens.data_ptr<int32_t>();
  v.hdr = headers.data_ptr<int32_t>();
  v.hdr_s0 = headers.stride(0);
  v.logits = logits.data_ptr<float>();
  v.lists = lists.data_ptr<int32_t>();
  v.counts = counts.data_ptr<int32_t>();
  v.part_o = part_o.data_ptr<float>();
  v.part_m = part_m.data_ptr<float>();
  v.part_l = part_l.data_ptr<float>();
  v.tickets = tickets.data_ptr<int32_t>();
  v.out = out.data_ptr();
  v.o_sb = out.stride(0);
  v.o_sh = out.stride(1);
  v.dtype = dt;
  v.out_dtype = view_dtype(out, "paged_attend", "out", true);
  v.B = static_cast<int32_t>(B);
  v.H = static_cast<int32_t>(H);
  v.G = static_cast<int32_t>(G);
  v.D = static_cast<int32_t>(D);
  v.BS = static_cast<int32_t>(BS);
  v.S = static_cast<int32_t>(sink_end);
  v.TGT = static_cast<int32_t>(target_programs);
  v.MSPLIT = static_cast<int32_t>(max_split);
  v.DYN = dynamic ? 1 : 0;
  v.scale = static_cast<float>(scale);

  const c10::DeviceGuard guard(dev);
  check_launch("paged_attend", paged_attend_launch(v, current_stream(dev)));
}

}  // namespace vllm_retro

TORCH_LIBRARY_IMPL(vllm_retro, CUDA, m) {
  m.impl("paged_attend", &vllm_retro::paged_attend_cuda);
}
