// CUDA twin of stage 1 of the paged decode, Triton's _score_kernel
// (vllm_retro/kernels/triton_decode.py): the log-mass of every cluster entry of a
// row for the G query heads of a KV head, stored page-addressed in the workspace's
// logits, and each program's partial max / sum-exp per query head.
//
// Same launch meaning and outputs as the Triton kernel: grid (B*H, NS), program
// (r*H + h, p) takes entries p, p+NS, p+2NS, ... of the row's C cluster entries;
//   log-mass = s q.c + ln(max(size, 1)) + min(s^2/2 sum_d q_d^2 var_d, cap)
// (-inf for an empty cluster), written to logits[ix[i], h, g] for valid
// entries (ix = ibt[hdr[blk0, HDR_IBT_ROW]], the row's index-table row: entry i's
// summaries and scratch at index-pool page ix[i]); partials at
// score_max / score_sum[(rh*NSP + p)*GP + g] (-inf / 0 where the
// program has no non-empty entry); program p == 0 zeroes the row-head's hist and
// ncand rows. One difference: query-head slots G <= g < GP get -inf / 0, where the
// Triton kernel leaves the statistics of a zero query; no kernel reads them.
//
// Design (the kernel is bound by the bandwidth of the cluster summaries, 2*D
// elements per entry and KV head; there is nothing for tensor cores to do with G <=
// 16 query rows): a "team" of lanes scores one entry. The team reads the entry's
// centroid and variance rows in 16-byte vectors, the first half of the team the
// centroid, the second half the variance (D=128, bf16: 32 lanes, one vector each).
// Each lane keeps its dims of q (centroid half) or q^2 (variance half) in registers
// in fp32 and accumulates G partial dot products in fp32; a reduce-scatter over the
// half (shuffles) leaves each lane the full sums of G / 2^steps query heads, one
// shuffle across the halves pairs q.c with q^2.var, and one "owner" lane per query
// head writes the log-mass and keeps the program's running max / sum-exp. Each lane
// has U entries' loads in flight, and the pool pages of the next U entries are
// loaded before this round's summaries are used (the index-table indirection is a
// dependent gather). The teams' partials merge through shared memory at the end.
//
// Only CUDA runtime headers here (see paged_score.h): CI compiles this file with
// nvcc for sm_90 without a CUDA build of torch (tests/kernels/test_cuda_sources_compile.py).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "paged_score.h"

namespace vllm_retro {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarps = 4;   // warps per program
constexpr int kUnroll = 4;  // entries per team per round (loads in flight per lane)

constexpr int ilog2(int x) { return x <= 1 ? 0 : 1 + ilog2(x / 2); }
constexpr int cmin(int a, int b) { return a < b ? a : b; }

// Lane geometry for a cache element type T, head dim D and GR (G rounded up to a
// power of two) query heads.
template <typename T, int D, int GR>
struct Geometry {
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per vector
  static constexpr int kNV = D / kVec;                  // vectors per summary row
  static constexpr int kTeam = cmin(32, 2 * kNV);      // lanes per entry
  static constexpr int kHalf = kTeam / 2;               // lanes per row (centroid / var)
  static constexpr int kVPL = kNV / kHalf;              // vectors per lane and entry
  static constexpr int kTPW = 32 / kTeam;               // teams per warp
  static constexpr int kSteps = cmin(ilog2(GR), ilog2(kHalf));  // reduce-scatter steps
  static constexpr int kNL = GR >> kSteps;              // query heads per owner lane
  static constexpr int kOwn = kHalf >> kSteps;          // lanes holding the same sums
  static_assert(D % kVec == 0 && kNV >= 1, "head dim must fill whole 16-byte vectors");
  static_assert((kNV & (kNV - 1)) == 0, "head dim / vector must be a power of two");
};

// 16 bytes of cache elements -> floats.
template <typename T>
__device__ __forceinline__ void unpack(const int4& raw, float* x);

template <>
__device__ __forceinline__ void unpack<float>(const int4& raw, float* x) {
  x[0] = __int_as_float(raw.x);
  x[1] = __int_as_float(raw.y);
  x[2] = __int_as_float(raw.z);
  x[3] = __int_as_float(raw.w);
}

// 16-bit element pairs to float2, one overload per pair type.
__device__ __forceinline__ float2 to_float2(const __half2& v) { return __half22float2(v); }
__device__ __forceinline__ float2 to_float2(const __nv_bfloat162& v) {
  return __bfloat1622float2(v);
}

// The 16-bit unpack: 8 elements as 4 pairs of T2 (__half2 or __nv_bfloat162).
template <typename T2>
__device__ __forceinline__ void unpack_pairs(const int4& raw, float* x) {
  T2 h[4];
  memcpy(h, &raw, sizeof(h));
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = to_float2(h[i]);
    x[2 * i] = f.x;
    x[2 * i + 1] = f.y;
  }
}

template <>
__device__ __forceinline__ void unpack<__half>(const int4& raw, float* x) {
  unpack_pairs<__half2>(raw, x);
}

template <>
__device__ __forceinline__ void unpack<__nv_bfloat16>(const int4& raw, float* x) {
  unpack_pairs<__nv_bfloat162>(raw, x);
}

// One element of a tensor of dtype code `dtype` as float (the query: read once).
__device__ __forceinline__ float load_float(const void* p, int64_t i, int32_t dtype) {
  if (dtype == kViewFloat32) return static_cast<const float*>(p)[i];
  if (dtype == kViewFloat16) return __half2float(static_cast<const __half*>(p)[i]);
  return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}

// An int32 or int64 index tensor element (block table, seq_lens).
__device__ __forceinline__ int64_t load_index(const void* p, int64_t i, int32_t is64) {
  return is64 ? __ldg(static_cast<const long long*>(p) + i)
              : static_cast<int64_t>(__ldg(static_cast<const int*>(p) + i));
}

template <typename T, int D, int GR>
__global__ void __launch_bounds__(kWarps * 32)
    paged_score_kernel(const PagedScoreView v) {
  using Geo = Geometry<T, D, GR>;
  constexpr int kVec = Geo::kVec, kHalf = Geo::kHalf, kTeam = Geo::kTeam;
  constexpr int kVPL = Geo::kVPL, kNL = Geo::kNL;
  constexpr int kTeams = kWarps * Geo::kTPW;     // teams per program
  constexpr int kSlots = kTeams * kUnroll;       // entries per program and round
  const float kNegInf = __int_as_float(0xff800000);  // -inf

  __shared__ float q_s[GR * D];
  __shared__ float m_s[kTeams][GR];
  __shared__ float s_s[kTeams][GR];

  const int rh = blockIdx.x;
  const int p = blockIdx.y;
  const int r = rh / v.H;
  const int h = rh % v.H;
  const int tid = threadIdx.x;
  const int lane = tid & 31;

  if (p == 0) {
    // Later kernels accumulate into these; zeroed here so every call starts clean.
    for (int i = tid; i < v.NBINS; i += kWarps * 32) v.hist[int64_t(rh) * v.NBINS + i] = 0;
    if (tid < 2) v.ncand[int64_t(rh) * 2 + tid] = 0;
  }

  // Row info, as Triton's _row_info: no context or no index -> no entries.
  const int L = static_cast<int>(load_index(v.seq, r, v.seq_is64));
  const int64_t bt_row = int64_t(r) * v.bt_s0;
  const int64_t blk0 = load_index(v.bt, bt_row, v.bt_is64);
  int E = __ldg(v.hdr + blk0 * v.hdr_s0);
  E = L > 0 ? E : 0;
  const int C = max(E / v.BS - v.SB, 0);
  // The row's index-table row (no index: C == 0, never read).
  const int irow = E > 0 ? __ldg(v.hdr + blk0 * v.hdr_s0 + kHdrIbtRow) : 0;
  const int32_t* ix_row = v.ibt + int64_t(irow) * v.ibt_s0;

  // The G query rows in fp32 (zero rows up to GR), staged once through shared memory.
  for (int i = tid; i < GR * D; i += kWarps * 32) {
    const int g = i / D, d = i % D;
    q_s[i] = g < v.G ? load_float(v.q, int64_t(r) * v.q_sb + int64_t(h * v.G + g) * v.q_sh +
                                           int64_t(d) * v.q_sd, v.q_dtype)
                     : 0.f;
  }
  __syncthreads();

  const int tl = lane % kTeam;        // lane within the team
  const int half = tl / kHalf;        // 0: centroid row, 1: variance row
  const int k = tl % kHalf;           // lane within the half
  const int team = (tid >> 5) * Geo::kTPW + lane / kTeam;
  // This lane's dims are the vectors k, k + kHalf, ...: q there (centroid half) or
  // q^2 (variance half), in registers for the whole loop.
  float qr[kVPL][kVec][GR];
#pragma unroll
  for (int w = 0; w < kVPL; ++w)
#pragma unroll
    for (int e = 0; e < kVec; ++e)
#pragma unroll
      for (int g = 0; g < GR; ++g) {
        const float x = q_s[g * D + (k + kHalf * w) * kVec + e];
        qr[w][e][g] = half ? x * x : x;
      }
  // After the reduce-scatter a lane holds the sums of query heads goff .. goff+kNL-1;
  // the centroid-half lane with k % kOwn == 0 owns them (one owner per head and team).
  int goff = 0;
#pragma unroll
  for (int s = 0; s < Geo::kSteps; ++s)
    if (k & (kHalf >> (s + 1))) goff += GR >> (s + 1);
  const bool owner = half == 0 && k % Geo::kOwn == 0;

  float m_run[kNL], s_run[kNL];
#pragma unroll
  for (int j = 0; j < kNL; ++j) {
    m_run[j] = kNegInf;
    s_run[j] = 0.f;
  }

  const int n_mine = max(C - p + v.NS - 1, 0) / v.NS;
  const T* rows = static_cast<const T*>(v.fp) + int64_t(h) * v.fp_s1 + half * v.fp_s2 +
                  int64_t(k) * kVec;
  const int32_t* ix_entries = ix_row + p;   // entry i = p + NS*m at ix_entries[NS*m]
  const float half_s2 = 0.5f * v.scale * v.scale;

  int64_t blk[kUnroll];
  bool valid[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int m = u * kTeams + team;
    valid[u] = m < n_mine;
    blk[u] = valid[u] ? int64_t(__ldg(ix_entries + int64_t(v.NS) * m)) : 0;
  }
  // Uniform trip count over the block: every lane takes part in every shuffle.
  for (int m0 = 0; m0 < n_mine; m0 += kSlots) {
    int4 raw[kUnroll][kVPL];
    int size[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int w = 0; w < kVPL; ++w)
        raw[u][w] = valid[u] ? __ldg(reinterpret_cast<const int4*>(
                                   rows + blk[u] * v.fp_s0 + int64_t(w) * kHalf * kVec))
                             : make_int4(0, 0, 0, 0);
      size[u] = valid[u] && owner
                    ? __ldg(v.ip + blk[u] * v.ip_s0 + int64_t(h) * v.ip_s1 + kIntSize)
                    : 0;
    }
    // The next round's pool pages, before this round's summaries are used.
    int64_t blk_n[kUnroll];
    bool valid_n[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int m = m0 + kSlots + u * kTeams + team;
      valid_n[u] = m < n_mine;
      blk_n[u] = valid_n[u] ? int64_t(__ldg(ix_entries + int64_t(v.NS) * m)) : 0;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float acc[GR];
#pragma unroll
      for (int g = 0; g < GR; ++g) acc[g] = 0.f;
#pragma unroll
      for (int w = 0; w < kVPL; ++w) {
        float x[kVec];
        unpack<T>(raw[u][w], x);
#pragma unroll
        for (int e = 0; e < kVec; ++e)
#pragma unroll
          for (int g = 0; g < GR; ++g) acc[g] = fmaf(qr[w][e][g], x[e], acc[g]);
      }
      // Reduce-scatter over the half: at each step a lane keeps one half of its
      // values (by its lane bit) and adds its partner's; acc[0..n) after the step.
#pragma unroll
      for (int s = 0; s < Geo::kSteps; ++s) {
        const int o = kHalf >> (s + 1);
        const int n = GR >> (s + 1);
        const bool up = k & o;
#pragma unroll
        for (int j = 0; j < n; ++j) {
          const float keep = up ? acc[j + n] : acc[j];
          const float send = up ? acc[j] : acc[j + n];
          acc[j] = keep + __shfl_xor_sync(kFullMask, send, o);
        }
      }
      // Lanes left over (more lanes than query heads) finish by a butterfly.
#pragma unroll
      for (int o = kHalf >> (Geo::kSteps + 1); o >= 1; o >>= 1)
#pragma unroll
        for (int j = 0; j < kNL; ++j) acc[j] += __shfl_xor_sync(kFullMask, acc[j], o);
      // The centroid half gets q^2.var of the same heads from its variance partner.
      float qv[kNL];
#pragma unroll
      for (int j = 0; j < kNL; ++j) qv[j] = __shfl_xor_sync(kFullMask, acc[j], kHalf);
      if (owner) {
#pragma unroll
        for (int j = 0; j < kNL; ++j) {
          const int g = goff + j;
          // Same operation order as Triton's: s q.c + ln size + min(s^2/2 q^2.var, cap).
          float lg = kNegInf;
          if (valid[u] && size[u] > 0) {
            lg = acc[j] * v.scale + __logf(static_cast<float>(size[u]));
            lg = lg + fminf(qv[j] * half_s2, v.cap);
          }
          if (valid[u] && g < v.G)
            v.logits[blk[u] * (int64_t(v.H) * v.G) + int64_t(h) * v.G + g] = lg;
          // Running max / sum-exp with one exp per entry: rescale the sum when the
          // max grows, else add the entry's term.
          if (lg != kNegInf) {
            const bool grow = lg > m_run[j];
            const float t = __expf(-fabsf(lg - m_run[j]));   // 0 while m_run is -inf
            s_run[j] = grow ? s_run[j] * t + 1.f : s_run[j] + t;
            m_run[j] = grow ? lg : m_run[j];
          }
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      blk[u] = blk_n[u];
      valid[u] = valid_n[u];
    }
  }

  // Merge the teams' partials per query head.
  if (owner) {
#pragma unroll
    for (int j = 0; j < kNL; ++j) {
      m_s[team][goff + j] = m_run[j];
      s_s[team][goff + j] = s_run[j];
    }
  }
  __syncthreads();
  if (tid < v.GP) {
    float m = kNegInf, s = 0.f;
    if (tid < v.G) {
      for (int t = 0; t < kTeams; ++t) m = fmaxf(m, m_s[t][tid]);
      const float m_safe = m == kNegInf ? 0.f : m;   // no exp(-inf - -inf)
      for (int t = 0; t < kTeams; ++t) s += s_s[t][tid] * __expf(m_s[t][tid] - m_safe);
    }
    const int64_t o = (int64_t(rh) * v.NSP + p) * v.GP + tid;
    v.score_max[o] = m;
    v.score_sum[o] = s;
  }
}

template <typename T, int D, int GR>
int launch(const PagedScoreView& v, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(v.B) * v.H, v.NS);
  paged_score_kernel<T, D, GR><<<grid, kWarps * 32, 0, stream>>>(v);
  return static_cast<int>(cudaGetLastError());
}

template <typename T, int D>
int launch_group(const PagedScoreView& v, cudaStream_t stream) {
  if (v.G <= 1) return launch<T, D, 1>(v, stream);
  if (v.G <= 2) return launch<T, D, 2>(v, stream);
  if (v.G <= 4) return launch<T, D, 4>(v, stream);
  if (v.G <= 8) return launch<T, D, 8>(v, stream);
  if (v.G <= 16) return launch<T, D, 16>(v, stream);
  return kViewUnsupported;
}

template <typename T>
int launch_dim(const PagedScoreView& v, cudaStream_t stream) {
  switch (v.D) {
    case 32: return launch_group<T, 32>(v, stream);
    case 64: return launch_group<T, 64>(v, stream);
    case 128: return launch_group<T, 128>(v, stream);
    case 256: return launch_group<T, 256>(v, stream);
    default: return kViewUnsupported;
  }
}

}  // namespace

bool paged_score_supported(int32_t fp_dtype, int32_t head_dim, int32_t group_size) {
  const bool dtype_ok = fp_dtype == kViewFloat32 || fp_dtype == kViewFloat16 ||
                        fp_dtype == kViewBFloat16;
  const bool dim_ok = head_dim == 32 || head_dim == 64 || head_dim == 128 || head_dim == 256;
  return dtype_ok && dim_ok && group_size >= 1 && group_size <= 16;
}

int paged_score_launch(const PagedScoreView& v, void* stream) {
  if (!paged_score_supported(v.fp_dtype, v.D, v.G)) return kViewUnsupported;
  if (v.B <= 0 || v.H <= 0 || v.NS <= 0) return 0;
  const auto s = static_cast<cudaStream_t>(stream);
  switch (v.fp_dtype) {
    case kViewFloat32: return launch_dim<float>(v, s);
    case kViewFloat16: return launch_dim<__half>(v, s);
    default: return launch_dim<__nv_bfloat16>(v, s);
  }
}

}  // namespace vllm_retro
