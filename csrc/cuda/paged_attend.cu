// CUDA twin of the last stage of the paged decode, Triton's _attend_kernel
// (vllm_retro/kernels/triton_decode.py) without the wave buffer, 8-bit mean values or
// the value correction: exact attention over a row's steady zone (sinks, tail, recent
// window) and retrieved clusters, estimation over its estimated clusters (log-mass from
// the score stage over the cluster's mean value), one partial softmax per program and
// the merge of a row-head's partials by its last program. Same launch meaning, inputs,
// partials and output as the Triton kernel.
//
// Design. The Triton kernel multiplies tiles on tensor cores, which moves every K/V
// tile through shared memory (layout conversions and barriers per tile) and holds one
// tile's loads per program in flight. Here there are no tiles: G <= 4 query rows give
// tensor cores nothing to do, so each token is scored in fp32 on CUDA cores by a team
// of D/8 lanes (16 bytes of K and of V per lane, one vector load each), a warp holds
// 32 / (D/8) teams (token slots), and each slot keeps its own running max, sum and
// accumulator over the tokens it is handed, U at a time (U tokens' loads in flight per
// lane; the block-table lookups of a step are issued together, before its K/V loads).
// The warps never wait for each other inside the loops; the slots' softmax states
// merge by shuffles within a warp and through shared memory across warps at the end.
// A retrieved cluster's tokens are contiguous positions (the index build reordered
// them per KV head): warp 0 reads up to 32 of the program's clusters at a time and
// scans their sizes into shared memory; every slot then finds its token's cluster by a
// binary search there, so the clusters' tokens are spread over all slots evenly.
//
// Only CUDA runtime headers here (see paged_attend.h).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "paged_attend.h"

namespace vllm_retro {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kWarps = 4;    // warps per program
// Tokens per slot and step (their loads in flight per lane).
constexpr int kUnroll = 4;
constexpr int kMaxG = 4;     // query heads per KV head (8 would spill at 128 registers)
constexpr int kBatch = 32;   // retrieved clusters read per batch (one per lane of warp 0)
constexpr int kBS = 16;      // tokens per KV block (vLLM's block size for retro)

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

__device__ __forceinline__ float2 to_float2(const __half2& v) { return __half22float2(v); }
__device__ __forceinline__ float2 to_float2(const __nv_bfloat162& v) {
  return __bfloat1622float2(v);
}

template <typename T> struct Pair;
template <> struct Pair<__half> { using type = __half2; };
template <> struct Pair<__nv_bfloat16> { using type = __nv_bfloat162; };

// 8 16-bit elements (one 16-byte vector) -> floats.
template <typename T>
__device__ __forceinline__ void unpack8(const int4& raw, float* x) {
  typename Pair<T>::type h[4];
  memcpy(h, &raw, sizeof(h));
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = to_float2(h[i]);
    x[2 * i] = f.x;
    x[2 * i + 1] = f.y;
  }
}

__device__ __forceinline__ void store_out(void* out, int64_t i, float x, int32_t dtype) {
  if (dtype == kViewFloat32) {
    static_cast<float*>(out)[i] = x;
  } else if (dtype == kViewFloat16) {
    static_cast<__half*>(out)[i] = __float2half_rn(x);
  } else {
    static_cast<__nv_bfloat16*>(out)[i] = __float2bfloat16_rn(x);
  }
}

// The running softmax of one token slot over its lane's 8 dims, for G query heads.
template <int G>
struct Softmax {
  float m[G], l[G], acc[G][8];

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      m[g] = neg_inf();
      l[g] = 0.f;
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[g][i] = 0.f;
    }
  }

  // One online step over U logits s[u][g] (-inf: masked) and values v[u][8] (as
  // Triton's _online: the max over the step, the old state scaled once).
  template <int U>
  __device__ __forceinline__ void step(const float (&s)[U][G], const float (&v)[U][8]) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float mx = m[g];
#pragma unroll
      for (int u = 0; u < U; ++u) mx = fmaxf(mx, s[u][g]);
      const float ms = mx == neg_inf() ? 0.f : mx;   // all -inf so far: stay at 0
      const float alpha = __expf(m[g] - ms);
      float pr[U];
      float sum = 0.f;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        pr[u] = __expf(s[u][g] - ms);
        sum += pr[u];
      }
      l[g] = l[g] * alpha + sum;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        float a = acc[g][i] * alpha;
#pragma unroll
        for (int u = 0; u < U; ++u) a = fmaf(pr[u], v[u][i], a);
        acc[g][i] = a;
      }
      m[g] = mx;
    }
  }

  // Merges the state of the slot `off` lanes away (xor) into this one.
  __device__ __forceinline__ void merge_lanes(int off) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const float mo = __shfl_xor_sync(kFull, m[g], off);
      const float lo = __shfl_xor_sync(kFull, l[g], off);
      const float mx = fmaxf(m[g], mo);
      const float ms = mx == neg_inf() ? 0.f : mx;
      const float a = __expf(m[g] - ms), b = __expf(mo - ms);
      l[g] = l[g] * a + lo * b;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float oo = __shfl_xor_sync(kFull, acc[g][i], off);
        acc[g][i] = acc[g][i] * a + oo * b;
      }
      m[g] = mx;
    }
  }
};

template <typename T, int D, int G>
__global__ void __launch_bounds__(kWarps * 32, 4) paged_attend_kernel(const PagedAttendView v) {
  constexpr int LPT = D / 8;          // lanes per token slot (8 dims each)
  constexpr int TPW = 32 / LPT;       // token slots per warp
  constexpr int NSLOT = kWarps * TPW; // token slots per program
  static_assert(D % 8 == 0 && 32 % LPT == 0, "head dim: 64 or 128");
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int slot = warp * TPW + lane / LPT;
  const int dl = lane % LPT;
  const int rh = blockIdx.x, p = blockIdx.y;
  const int H = v.H;

  __shared__ int sh_last;
  __shared__ int sh_start[kBatch];
  __shared__ int sh_excl[kBatch + 1];
  __shared__ int sh_ticket;
  __shared__ float sh_m[kWarps][G], sh_l[kWarps][G];
  __shared__ float sh_o[kWarps][G][D];

  // The split follows the rows in use (Triton's _program).
  if (tid == 0) sh_last = 0;
  __syncthreads();
  int last = 0;
  for (int r = tid; r < v.B; r += kWarps * 32)
    if (__ldg(v.seq + r) > 0) last = r + 1;
  if (last) atomicMax(&sh_last, last);
  __syncthreads();
  const int nr = v.DYN ? max(sh_last, 1) : v.B;
  const int NS = max(min(v.MSPLIT, v.TGT / (nr * H)), 1);
  const int r = rh / H, h = rh % H;
  if (rh >= nr * H || p >= NS) {
    if (rh >= nr * H && p == 0) {
      // A row past the last one with context (a CUDA graph's padding): zeros.
      for (int i = tid; i < G * D; i += kWarps * 32)
        store_out(v.out, int64_t(r) * v.o_sb + int64_t(h * G + i / D) * v.o_sh + i % D, 0.f,
                  v.out_dtype);
    }
    return;
  }

  // The row (Triton's _row_info).
  const int L = __ldg(v.seq + r);
  const int32_t* bt_row = v.bt + int64_t(r) * v.bt_s0;
  const int64_t blk0 = __ldg(bt_row);
  int E = __ldg(v.hdr + blk0 * v.hdr_s0 + kHdrClusteredEnd);
  E = L > 0 ? E : 0;
  const bool indexed = E > 0;
  const int irow = indexed ? __ldg(v.hdr + blk0 * v.hdr_s0 + kHdrIbtRow) : 0;
  const int32_t* ix_row = v.ibt + int64_t(irow) * v.ibt_s0;
  const int S = v.S;
  const int n_steady = indexed ? S + L - E : L;
  const int split = indexed ? S : L;   // steady index j >= split lies at E + j - split
  const int n_ret = indexed ? __ldg(v.counts + 2 * rh) : 0;
  const int n_est = indexed ? __ldg(v.counts + 2 * rh + 1) : 0;

  const T* kv = static_cast<const T*>(v.kv);
  const T* fp = static_cast<const T*>(v.fp);
  const int64_t head_off = int64_t(h) * v.kv_s1 + 8 * dl;
  const int64_t lists_page = int64_t(H) * kListWords;

  // This lane's 8 dims of the G query rows, in fp32.
  float q[G][8];
  {
    const T* qp = static_cast<const T*>(v.q) + int64_t(r) * v.q_sb + 8 * dl;
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const int4 raw = __ldg(reinterpret_cast<const int4*>(qp + int64_t(h * G + g) * v.q_sh));
      unpack8<T>(raw, q[g]);
    }
  }
  const float scale = v.scale;
  Softmax<G> sm;
  sm.init();

  constexpr int STEP = NSLOT * kUnroll;   // items per program and step
  const int n_st = max(n_steady - p + NS - 1, 0) / NS;      // steady tokens of mine
  const int nc_mine = max(n_ret - p + NS - 1, 0) / NS;      // retrieved clusters of mine
  const int ne_mine = max(n_est - p + NS - 1, 0) / NS;      // estimated clusters of mine

  // The K/V of U tokens at (block, offset in the block); ok: attended (a masked token
  // neither loads nor counts).
  auto load_kv = [&](const int (&blk)[kUnroll], const int (&sub)[kUnroll],
                     const bool (&ok)[kUnroll], int4 (&kr)[kUnroll], int4 (&vr)[kUnroll]) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      kr[u] = make_int4(0, 0, 0, 0);
      vr[u] = make_int4(0, 0, 0, 0);
      if (ok[u]) {
        const T* t = kv + (int64_t(blk[u]) * v.kv_s0 + head_off + int64_t(sub[u]) * v.kv_s2);
        kr[u] = __ldg(reinterpret_cast<const int4*>(t));
        vr[u] = __ldg(reinterpret_cast<const int4*>(t + D));
      }
    }
  };
  // Exact attention over loaded tokens.
  auto attend = [&](const int4 (&kr)[kUnroll], const int4 (&vr)[kUnroll],
                    const bool (&ok)[kUnroll]) {
    float s[kUnroll][G];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float k[8];
      unpack8<T>(kr[u], k);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float a = 0.f;
#pragma unroll
        for (int i = 0; i < 8; ++i) a = fmaf(q[g][i], k[i], a);
        s[u][g] = a;
      }
    }
#pragma unroll
    for (int o = LPT / 2; o > 0; o /= 2)
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
#pragma unroll
        for (int g = 0; g < G; ++g) s[u][g] += __shfl_xor_sync(kFull, s[u][g], o);
    float val[kUnroll][8];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int g = 0; g < G; ++g) s[u][g] = ok[u] ? s[u][g] * scale : neg_inf();
      unpack8<T>(vr[u], val[u]);
    }
    sm.step(s, val);
  };
  // Addresses of steady tokens j = p + NS m, m = m0 + u NSLOT + slot (a block-table load).
  auto steady_at = [&](int m0, int (&blk)[kUnroll], int (&sub)[kUnroll], bool (&ok)[kUnroll]) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int mm = m0 + u * NSLOT + slot;
      ok[u] = mm < n_st;
      const int j = p + NS * mm;
      const unsigned pos = unsigned(j < split ? j : j - split + E);
      blk[u] = ok[u] ? __ldg(bt_row + pos / kBS) : 0;
      sub[u] = pos % kBS;
    }
  };
  // Pool page of estimated cluster n_ret + p + NS m, m = m0 + u NSLOT + slot (two
  // dependent loads: the row's index table, then the list).
  auto estimated_at = [&](int m0, int (&page)[kUnroll], bool (&ok)[kUnroll]) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int mm = m0 + u * NSLOT + slot;
      ok[u] = mm < ne_mine;
      const unsigned k = unsigned(n_ret + p + NS * mm);
      page[u] = ok[u] ? __ldg(v.lists + int64_t(__ldg(ix_row + k / kListItems)) * lists_page +
                              int64_t(h) * kListWords + 2 * (k % kListItems))
                      : 0;
    }
  };
  // Warp 0, lane c: (start, size) of retrieved cluster k = p + NS (c0 + lane).
  auto cluster_at = [&](int c0, int& st, int& sz) {
    st = 0;
    sz = 0;
    const int c = c0 + lane;
    if (warp == 0 && c < nc_mine) {
      const unsigned k = unsigned(p + NS * c);
      const int32_t* e = v.lists + int64_t(__ldg(ix_row + k / kListItems)) * lists_page +
                         int64_t(h) * kListWords + 2 * (k % kListItems);
      st = __ldg(e);
      sz = max(__ldg(e + 1), 0);
    }
  };
  // Address of the retrieved token t of the batch in shared memory (its cluster by a
  // binary search over the batch's first tokens).
  auto retrieved_at = [&](int t0, int total, int (&blk)[kUnroll], int (&sub)[kUnroll],
                          bool (&ok)[kUnroll]) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = t0 + u * NSLOT + slot;
      int lo = 0;   // the last cluster beginning at or before t
#pragma unroll
      for (int w = kBatch / 2; w > 0; w /= 2)
        if (sh_excl[lo + w] <= t) lo += w;
      const int pos = sh_start[lo] + (t - sh_excl[lo]);
      // Starts come from index bytes: positions are bounds-checked to the row's
      // clustered zone and context, as the Triton kernel's.
      ok[u] = t < total && pos >= S && pos < E && pos < L;
      blk[u] = ok[u] ? __ldg(bt_row + unsigned(pos) / kBS) : 0;
      sub[u] = unsigned(pos) % kBS;
    }
  };

  // Every zone's first addresses are requested before any is used, so their chains of
  // dependent loads overlap; each loop then requests the next step's addresses before
  // it uses this step's K/V (one exposed round trip per step, not two or three).
  int s_blk[kUnroll], s_sub[kUnroll];
  bool s_ok[kUnroll];
  steady_at(0, s_blk, s_sub, s_ok);
  int c_st, c_sz;
  cluster_at(0, c_st, c_sz);
  int e_pg[kUnroll];
  bool e_ok[kUnroll];
  estimated_at(0, e_pg, e_ok);

  // Exact attention over items [0, n) of a zone, a step at a time: this step's K/V
  // requested, then the next step's addresses (next_at(i0, ...)), then this step used.
  auto token_steps = [&](int n, int (&blk)[kUnroll], int (&sub)[kUnroll], bool (&ok)[kUnroll],
                         auto&& next_at) {
    for (int i0 = 0; i0 < n; i0 += STEP) {
      int4 kr[kUnroll], vr[kUnroll];
      load_kv(blk, sub, ok, kr, vr);
      bool cur[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) cur[u] = ok[u];
      next_at(i0 + STEP, blk, sub, ok);
      attend(kr, vr, cur);
    }
  };

  // Steady zone: tokens j = p + NS m of [0, sink_end) + [clustered_end, L).
  token_steps(n_st, s_blk, s_sub, s_ok, steady_at);

  // Retrieved clusters k = p + NS c: their tokens, concatenated, spread over the slots.
  for (int c0 = 0; c0 < nc_mine; c0 += kBatch) {
    __syncthreads();   // the previous batch's readers are done
    if (warp == 0) {
      int incl = c_sz;
#pragma unroll
      for (int o = 1; o < 32; o *= 2) {
        const int y = __shfl_up_sync(kFull, incl, o);
        if (lane >= o) incl += y;
      }
      sh_start[lane] = c_st;
      sh_excl[lane] = incl - c_sz;
      if (lane == 31) sh_excl[kBatch] = incl;
    }
    __syncthreads();
    cluster_at(c0 + kBatch, c_st, c_sz);   // the next batch's entries, in flight meanwhile
    const int total = sh_excl[kBatch];
    int r_blk[kUnroll], r_sub[kUnroll];
    bool r_ok[kUnroll];
    retrieved_at(0, total, r_blk, r_sub, r_ok);
    token_steps(total, r_blk, r_sub, r_ok,
                [&](int t0, int (&b)[kUnroll], int (&o)[kUnroll], bool (&k)[kUnroll]) {
                  retrieved_at(t0, total, b, o, k);
                });
  }

  // Estimated clusters n_ret + p + NS c: log-mass (score stage) over the mean value.
  for (int m0 = 0; m0 < ne_mine; m0 += STEP) {
    float s[kUnroll][G];
    int4 vr[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      vr[u] = make_int4(0, 0, 0, 0);
#pragma unroll
      for (int g = 0; g < G; ++g) s[u][g] = neg_inf();
      if (e_ok[u]) {
        const int64_t page = e_pg[u];
        vr[u] = __ldg(reinterpret_cast<const int4*>(fp + page * v.fp_s0 + int64_t(h) * v.fp_s1 +
                                                    2 * v.fp_s2 + 8 * dl));
        const float* lg = v.logits + (page * H + h) * G;
#pragma unroll
        for (int g = 0; g < G; ++g) s[u][g] = __ldg(lg + g);
      }
    }
    estimated_at(m0 + STEP, e_pg, e_ok);
    float val[kUnroll][8];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) unpack8<T>(vr[u], val[u]);
    sm.step(s, val);
  }

  // The program's partial: the warp's slots merged by shuffles, the warps in shared memory.
#pragma unroll
  for (int o = LPT; o < 32; o *= 2) sm.merge_lanes(o);
  if (lane < LPT) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      if (lane == 0) {
        sh_m[warp][g] = sm.m[g];
        sh_l[warp][g] = sm.l[g];
      }
#pragma unroll
      for (int i = 0; i < 8; ++i) sh_o[warp][g][8 * lane + i] = sm.acc[g][i];
    }
  }
  __syncthreads();
  const int64_t row0 = (int64_t(rh) * NS + p) * G;   // this partial's first query-head row
  for (int i = tid; i < G * D; i += kWarps * 32) {
    const int g = i / D, d = i % D;
    float mx = neg_inf();
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, sh_m[w][g]);
    const float ms = mx == neg_inf() ? 0.f : mx;
    float o = 0.f, l = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float f = __expf(sh_m[w][g] - ms);
      o += f * sh_o[w][g][d];
      l += f * sh_l[w][g];
    }
    v.part_o[(row0 + g) * D + d] = o;
    if (d == 0) {
      v.part_m[row0 + g] = mx;
      v.part_l[row0 + g] = l;
    }
  }

  // The last program of the row-head merges the NS partials (0 if all empty).
  __threadfence();     // this thread's part of the partial is visible before the ticket
  __syncthreads();
  if (tid == 0) sh_ticket = atomicAdd(v.tickets + rh, 1);
  __syncthreads();
  if (sh_ticket != NS - 1) return;
  __threadfence();     // every other program's partial is visible after their tickets
  if (tid == 0) v.tickets[rh] = 0;
  for (int i = tid; i < G * D; i += kWarps * 32) {
    const int g = i / D, d = i % D;
    const int64_t base = int64_t(rh) * NS * G + g;   // partial p at base + p G
    float mx = neg_inf();
    for (int q2 = 0; q2 < NS; ++q2) mx = fmaxf(mx, __ldcg(v.part_m + base + int64_t(q2) * G));
    const float ms = mx == neg_inf() ? 0.f : mx;
    float den = 0.f, num = 0.f;
    for (int q2 = 0; q2 < NS; ++q2) {
      const int64_t row = base + int64_t(q2) * G;
      const float w = __expf(__ldcg(v.part_m + row) - ms);   // 0 for an empty partial
      den += w * __ldcg(v.part_l + row);
      num += w * __ldcg(v.part_o + row * D + d);
    }
    const float res = num / (den > 0.f ? den : 1.f);
    store_out(v.out, int64_t(r) * v.o_sb + int64_t(h * G + g) * v.o_sh + d, res, v.out_dtype);
  }
}

template <typename T, int D, int G>
int launch(const PagedAttendView& v, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(v.B) * v.H, v.MSPLIT);
  paged_attend_kernel<T, D, G><<<grid, kWarps * 32, 0, stream>>>(v);
  return static_cast<int>(cudaGetLastError());
}

template <typename T, int D>
int launch_group(const PagedAttendView& v, cudaStream_t stream) {
  switch (v.G) {
    case 1: return launch<T, D, 1>(v, stream);
    case 2: return launch<T, D, 2>(v, stream);
    case 3: return launch<T, D, 3>(v, stream);
    case 4: return launch<T, D, 4>(v, stream);
    default: return kViewUnsupported;
  }
}

template <typename T>
int launch_dim(const PagedAttendView& v, cudaStream_t stream) {
  switch (v.D) {
    case 64: return launch_group<T, 64>(v, stream);
    case 128: return launch_group<T, 128>(v, stream);
    default: return kViewUnsupported;
  }
}

}  // namespace

bool paged_attend_supported(int32_t dtype, int32_t head_dim, int32_t group_size,
                            int32_t block_size) {
  const bool dtype_ok = dtype == kViewFloat16 || dtype == kViewBFloat16;
  const bool dim_ok = head_dim == 64 || head_dim == 128;
  const bool g_ok = group_size >= 1 && group_size <= kMaxG;
  return dtype_ok && dim_ok && g_ok && block_size == kBS;
}

int paged_attend_launch(const PagedAttendView& v, void* stream) {
  if (!paged_attend_supported(v.dtype, v.D, v.G, v.BS)) return kViewUnsupported;
  if (v.B <= 0 || v.H <= 0 || v.MSPLIT <= 0) return 0;
  const auto s = static_cast<cudaStream_t>(stream);
  if (v.dtype == kViewFloat16) return launch_dim<__half>(v, s);
  return launch_dim<__nv_bfloat16>(v, s);
}

}  // namespace vllm_retro
