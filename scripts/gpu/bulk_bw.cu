// Random KV-run gather bandwidth on sm_90: register loads against asynchronous bulk
// copies (cp.async.bulk into a shared-memory ring tracked by mbarriers).
//
// Role: at 128K and 6-8 rows the decode kernels read their retrieved K/V and their
// cluster summaries at ~1.8-2.2 TB/s on both the H100 and the H200 (4.18 TB/s copy):
// their rate is the bytes each program keeps in flight, which registers bound. A bulk
// copy moves any multiple of 16 bytes from global to shared memory with no register
// per byte and completes on an mbarrier, so one lane can keep many runs in flight.
// This measures, in the attention kernel's access shape and with nothing else in the
// kernels, what each form reaches: the ceiling a kernel built on bulk copies could
// approach, before such a kernel is written.
//
// Access shape. The cache is NB blocks of 16 tokens x 8 KV heads x 512 B (one token's
// K and V of one head: 2 x 128 bf16). An item is a run of n tokens (1-16) of one head
// inside one block, at a random block and head: a retrieved cluster's part in one
// block (the index build makes a cluster's tokens contiguous positions per head).
// Two layouts: HND (vLLM's [block][head][token][2D]: the run is n x 512 contiguous
// bytes, one bulk copy) and NHD ([block][token][head][2D], vLLM's FlashAttention
// layout: the run's rows are 4 KB apart, one 512 B copy per token).
//
// Forms:
//  * regs: each warp reads its items' rows with 16-byte loads (one row = 32 lanes x
//    16 B), 2-16 blocks of 4 warps per SM: the register gather at up to full
//    occupancy (ptxas interleaves the 16 loads of a run with their folds: ~3 rows in
//    flight per warp at 32 registers in the sm_90 build).
//  * bulk: each block has one producer warp (issues the copies of its items, in order,
//    into a ring of S slots of 8 KB) and 4 consumer warps (item j of the block is read
//    from shared memory by consumer j mod 4, which then frees its slot); the copies in
//    flight per block are up to S runs.
// Every form xors and sums every 32-bit word it reads into two global words; for a
// layout both words must be equal across forms (the program exits 1 otherwise).
//
//   nvcc -O3 -arch=sm_90 -std=c++17 scripts/gpu/bulk_bw.cu -o bulk_bw && ./bulk_bw [GiB] > out.json
//
// Prints one JSON object: device, the span, a plain copy's rate (bytes read + written
// per second) and per (layout, run length, form, parameter) the bytes of the runs read
// per second, with the checksums' agreement.

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <algorithm>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

namespace {

constexpr int kRow = 512;     // bytes: one token's K and V of one KV head
constexpr int kBS = 16;       // tokens per block
constexpr int kHeads = 8;     // KV heads
constexpr int kSlot = kBS * kRow;   // the largest run: one ring slot
constexpr int kConsumers = 4;       // consumer warps of a bulk block

#define CHECK(x)                                                                   \
  do {                                                                             \
    cudaError_t e_ = (x);                                                          \
    if (e_ != cudaSuccess) {                                                       \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x,               \
                   cudaGetErrorString(e_));                                        \
      std::exit(2);                                                                \
    }                                                                              \
  } while (0)

struct Item {
  uint32_t block;
  uint32_t meta;   // head | offset << 8 | length << 16
};

__host__ __device__ inline uint32_t mix(uint64_t i) {
  uint32_t x = static_cast<uint32_t>(i) * 0x9E3779B1u ^ static_cast<uint32_t>(i >> 32);
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  return x ^ (x >> 16);
}

__global__ void fill(uint32_t* buf, size_t words) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < words;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    buf[i] = mix(i);
}

// Byte offset of token t of an item's run, in the layout.
__device__ __forceinline__ size_t row_offset(bool hnd, uint32_t block, uint32_t head,
                                             uint32_t token) {
  return hnd ? ((static_cast<size_t>(block) * kHeads + head) * kBS + token) * kRow
             : ((static_cast<size_t>(block) * kBS + token) * kHeads + head) * kRow;
}

__device__ __forceinline__ void fold(const uint4& v, uint32_t& x, unsigned long long& s) {
  x ^= v.x ^ v.y ^ v.z ^ v.w;
  s += static_cast<unsigned long long>(v.x) + v.y + v.z + v.w;
}

__device__ __forceinline__ void publish(uint32_t x, unsigned long long s, uint32_t* cx,
                                        unsigned long long* cs) {
  for (int d = 16; d > 0; d >>= 1) {
    x ^= __shfl_xor_sync(0xffffffffu, x, d);
    s += __shfl_xor_sync(0xffffffffu, s, d);
  }
  if ((threadIdx.x & 31) == 0) {
    atomicXor(cx, x);
    atomicAdd(cs, s);
  }
}

// regs: warp w of the grid reads items w, w + warps, ...; a run's 16 predicated row
// loads are issued before any is folded.
__global__ void __launch_bounds__(128) gather_regs(const char* __restrict__ src,
                                                   const Item* __restrict__ items,
                                                   int n_items, bool hnd, uint32_t* cx,
                                                   unsigned long long* cs) {
  const int lane = threadIdx.x & 31;
  const int warps = gridDim.x * (blockDim.x / 32);
  uint32_t x = 0;
  unsigned long long s = 0;
  for (int k = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; k < n_items; k += warps) {
    const Item it = items[k];
    const uint32_t head = it.meta & 0xff, off = (it.meta >> 8) & 0xff, n = it.meta >> 16;
    // Rows past the run load its last row again (a cache hit, not folded), so the 16
    // loads carry no branch and are all issued before the first fold.
    uint4 v[kBS];
#pragma unroll
    for (int t = 0; t < kBS; ++t)
      v[t] = *reinterpret_cast<const uint4*>(
          src + row_offset(hnd, it.block, head, off + min(t, static_cast<int>(n) - 1)) +
          lane * 16);
#pragma unroll
    for (int t = 0; t < kBS; ++t) {
      // (masked, not branched: a load used only under a branch is sunk into it)
      const uint32_t m = t < static_cast<int>(n) ? 0xffffffffu : 0u;
      fold(make_uint4(v[t].x & m, v[t].y & m, v[t].z & m, v[t].w & m), x, s);
    }
  }
  publish(x, s, cx, cs);
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void bar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count));
}

__device__ __forceinline__ void bar_expect(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)),
               "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void bar_arrive(uint64_t* bar) {
  asm volatile("{\n\t.reg .b64 st;\n\tmbarrier.arrive.shared::cta.b64 st, [%0];\n\t}" ::"r"(
                   smem_addr(bar))
               : "memory");
}

// Waits until the barrier's phase of this parity has completed.
__device__ __forceinline__ void bar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n\t.reg .pred P1;\n"
      "WAIT:\n\t"
      "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n\t"
      "@P1 bra DONE;\n\t"
      "bra WAIT;\n"
      "DONE:\n\t}" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
}

__device__ __forceinline__ void bulk_copy(void* dst, const void* src, uint32_t bytes,
                                          uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, "
      "[%3];" ::"r"(smem_addr(dst)),
      "l"(src), "r"(bytes), "r"(smem_addr(bar))
      : "memory");
}

// bulk: block b's items are b, b + grid, ... (its item j = the j-th of those); warp 0
// copies them into slot j mod S (HND: lane 0, one copy of the run; NHD: lane t copies
// row t), consumer warp 1 + j mod 4 reads slot j and frees it.
__global__ void __launch_bounds__(32 * (1 + kConsumers))
    gather_bulk(const char* __restrict__ src, const Item* __restrict__ items, int n_items,
                bool hnd, int slots, uint32_t* cx, unsigned long long* cs) {
  extern __shared__ __align__(128) unsigned char smem[];
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + static_cast<size_t>(slots) * kSlot);
  uint64_t* empty = full + slots;
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  if (slots % kConsumers != 0) __trap();   // (see the slot counts in main)
  if (threadIdx.x == 0) {
    for (int i = 0; i < slots; ++i) {
      bar_init(&full[i], 1);
      bar_init(&empty[i], 1);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  if (warp == 0) {
    for (int j = 0;; ++j) {
      const long long k = blockIdx.x + static_cast<long long>(j) * gridDim.x;
      if (k >= n_items) break;
      const int slot = j % slots;
      const uint32_t use = static_cast<uint32_t>(j / slots);
      if (lane == 0) bar_wait(&empty[slot], (use & 1) ^ 1);
      __syncwarp();
      const Item it = items[k];
      const uint32_t head = it.meta & 0xff, off = (it.meta >> 8) & 0xff, n = it.meta >> 16;
      unsigned char* dst = smem + static_cast<size_t>(slot) * kSlot;
      if (lane == 0) bar_expect(&full[slot], n * kRow);
      __syncwarp();
      if (hnd) {
        if (lane == 0)
          bulk_copy(dst, src + row_offset(true, it.block, head, off), n * kRow, &full[slot]);
      } else if (lane < static_cast<int>(n)) {
        bulk_copy(dst + lane * kRow, src + row_offset(false, it.block, head, off + lane), kRow,
                  &full[slot]);
      }
    }
    return;
  }
  uint32_t x = 0;
  unsigned long long s = 0;
  for (int j = warp - 1;; j += kConsumers) {
    const long long k = blockIdx.x + static_cast<long long>(j) * gridDim.x;
    if (k >= n_items) break;
    const int slot = j % slots;
    const uint32_t use = static_cast<uint32_t>(j / slots);
    bar_wait(&full[slot], use & 1);
    const uint32_t n = items[k].meta >> 16;
    const unsigned char* row = smem + static_cast<size_t>(slot) * kSlot + lane * 16;
    for (uint32_t t = 0; t < n; ++t) fold(*reinterpret_cast<const uint4*>(row + t * kRow), x, s);
    __syncwarp();
    if (lane == 0) bar_arrive(&empty[slot]);
  }
  publish(x, s, cx, cs);
}

std::vector<Item> make_items(int n_items, uint32_t n_blocks, int run, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<Item> v(n_items);
  for (auto& it : v) {
    const uint32_t n = run > 0 ? run : 1 + static_cast<uint32_t>(rng() % kBS);
    const uint32_t off = static_cast<uint32_t>(rng() % (kBS - n + 1));
    const uint32_t head = static_cast<uint32_t>(rng() % kHeads);
    it.block = static_cast<uint32_t>(rng() % n_blocks);
    it.meta = head | off << 8 | n << 16;
  }
  return v;
}

struct Sums {
  uint32_t* x;
  unsigned long long* s;
};

template <typename Launch>
double time_ms(Launch launch, Sums d, uint32_t* hx, unsigned long long* hs, int reps = 10) {
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  CHECK(cudaMemset(d.x, 0, sizeof(uint32_t)));
  CHECK(cudaMemset(d.s, 0, sizeof(unsigned long long)));
  launch();   // warm-up, and the checksums of one pass
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  CHECK(cudaMemcpy(hx, d.x, sizeof(uint32_t), cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(hs, d.s, sizeof(unsigned long long), cudaMemcpyDeviceToHost));
  CHECK(cudaEventRecord(a));
  for (int i = 0; i < reps; ++i) launch();
  CHECK(cudaEventRecord(b));
  CHECK(cudaEventSynchronize(b));
  CHECK(cudaGetLastError());
  float ms = 0;
  CHECK(cudaEventElapsedTime(&ms, a, b));
  CHECK(cudaEventDestroy(a));
  CHECK(cudaEventDestroy(b));
  return ms / reps;
}

}  // namespace

int main(int argc, char** argv) {
  const double gib = argc > 1 ? std::atof(argv[1]) : 32.0;
  std::setvbuf(stdout, nullptr, _IOLBF, 0);   // a killed run keeps its records
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  const int sms = prop.multiProcessorCount;
  const size_t block_bytes = static_cast<size_t>(kBS) * kHeads * kRow;   // 64 KB
  const uint32_t n_blocks = static_cast<uint32_t>(gib * (1ull << 30) / block_bytes);
  const size_t bytes = n_blocks * block_bytes;
  char* src = nullptr;
  CHECK(cudaMalloc(&src, bytes));
  fill<<<sms * 8, 256>>>(reinterpret_cast<uint32_t*>(src), bytes / 4);
  CHECK(cudaGetLastError());
  Sums d{};
  CHECK(cudaMalloc(&d.x, sizeof(uint32_t)));
  CHECK(cudaMalloc(&d.s, sizeof(unsigned long long)));

  // A plain copy of 2 GiB: bytes read + written per second.
  const size_t copy_bytes = std::min<size_t>(bytes / 2, 2ull << 30);
  uint32_t hx;
  unsigned long long hs;
  const double copy_ms = time_ms(
      [&] { CHECK(cudaMemcpyAsync(src + bytes - copy_bytes, src, copy_bytes,
                                  cudaMemcpyDeviceToDevice)); },
      d, &hx, &hs);
  // The copy overwrote the span's end: fill it again.
  fill<<<sms * 8, 256>>>(reinterpret_cast<uint32_t*>(src), bytes / 4);
  CHECK(cudaDeviceSynchronize());

  const int n_items = 1 << 20;
  Item* items = nullptr;
  CHECK(cudaMalloc(&items, n_items * sizeof(Item)));
  const int max_slots = 16;
  CHECK(cudaFuncSetAttribute(gather_bulk, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             max_slots * kSlot + 2 * max_slots * 8));

  std::printf("{\"device\": \"%s\", \"sms\": %d, \"span_gib\": %.1f, \"items\": %d,\n",
              prop.name, sms, bytes / double(1ull << 30), n_items);
  std::printf(" \"copy_tb_s\": %.3f,\n \"records\": [\n", 2.0 * copy_bytes / copy_ms / 1e9);
  bool ok = true, first = true;
  const int runs[] = {1, 4, 8, 16, 0};   // 0: uniform in [1, 16]
  for (int hnd = 1; hnd >= 0; --hnd) {
    for (int run : runs) {
      std::vector<Item> host = make_items(n_items, n_blocks, run, 1234 + run);
      double useful = 0;
      for (const auto& it : host) useful += (it.meta >> 16) * double(kRow);
      CHECK(cudaMemcpy(items, host.data(), n_items * sizeof(Item), cudaMemcpyHostToDevice));
      bool have_ref = false;
      uint32_t rx = 0;
      unsigned long long rs = 0;
      auto record = [&](const char* form, int slots, int per_sm, double ms) {
        const bool same = !have_ref || (hx == rx && hs == rs);
        if (!have_ref) {
          rx = hx;
          rs = hs;
          have_ref = true;
        }
        ok = ok && same;
        std::printf("%s  {\"layout\": \"%s\", \"run\": \"%s\", \"form\": \"%s\", "
                    "\"slots\": %d, \"blocks_per_sm\": %d, \"tb_s\": %.3f, \"us\": %.1f, "
                    "\"checksum_agrees\": %s}",
                    first ? "" : ",\n", hnd ? "HND" : "NHD",
                    run ? std::to_string(run).c_str() : "1-16", form, slots, per_sm,
                    useful / ms / 1e9, ms * 1e3, same ? "true" : "false");
        std::fflush(stdout);
        first = false;
      };
      for (int per_sm : {2, 4, 8, 16}) {
        const double ms = time_ms(
            [&] {
              gather_regs<<<sms * per_sm, 128>>>(src, items, n_items, hnd, d.x, d.s);
            },
            d, &hx, &hs);
        record("regs", 0, per_sm, ms);
      }
      // Slots a multiple of the consumers: item j's consumer then also read item j - S
      // of the same slot (its previous use), so no consumer waits on a slot's phase
      // before that phase's predecessor completed (a parity wait would pass wrongly).
      for (int slots : {4, 8, 16}) {
        const size_t sm_bytes = slots * static_cast<size_t>(kSlot) + 2 * slots * 8;
        int per_sm = 0;
        CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
            &per_sm, gather_bulk, 32 * (1 + kConsumers), sm_bytes));
        if (per_sm < 1) continue;
        const double ms = time_ms(
            [&] {
              gather_bulk<<<sms * per_sm, 32 * (1 + kConsumers), sm_bytes>>>(
                  src, items, n_items, hnd, slots, d.x, d.s);
            },
            d, &hx, &hs);
        record("bulk", slots, per_sm, ms);
      }
    }
  }
  std::printf("\n ],\n \"checksums_agree\": %s}\n", ok ? "true" : "false");
  CHECK(cudaFree(items));
  CHECK(cudaFree(src));
  return ok ? 0 : 1;
}
