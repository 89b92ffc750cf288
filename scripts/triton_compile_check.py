"""Compiles every Triton kernel of vllm-retro for an H100/H200 (sm_90) on a machine
without a GPU, through the real launchers.

Role: the CPU interpreter runs the kernels' semantics but not the GPU compiler, so a
kernel can pass every CPU test and still fail to compile on the GPU (a loop-carried
value that changes type, an op the interpreter tolerates). Here each launch of the
launchers (decode attention at a small and a large batch, the index build's
kernels) is intercepted and compiled ahead of time for ``GPUTarget("cuda", 90, 32)``
with the launch's own argument types, constexprs, warps and stages; nothing runs.
Exit status 1 with the compiler's message when a kernel does not compile, or when a
variant with 16-bit tensors loads them one element at a time (its SASS has scalar
8/16-bit global loads: a lost vectorisation, 8x the load instructions). Launches are
specialized as Triton's JIT specializes them (divisibility by 16 of integer
arguments and pointers), so registers and SASS are the GPU's.

    python scripts/triton_compile_check.py      # needs TRITON_INTERPRET unset / 0
    python scripts/triton_compile_check.py --resources _attend_kernel

``--sass DIR`` (with ``--resources``): also writes those variants' SASS to DIR.

``--only NAMES`` (comma-separated kernel names): compiles those kernels only (a
quicker loop while one kernel's registers are tuned).

``--resources NAME``: also the registers, stack and local (spill) bytes of NAME's
variants, from the cubin (``cuobjdump --dump-resource-usage``; without a GPU this
is where a kernel's register pressure shows).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import traceback

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise SystemExit("triton_compile_check: run without TRITON_INTERPRET")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TARGET = GPUTarget("cuda", 90, 32)
OPTION_KEYS = ("num_warps", "num_stages", "num_ctas", "launch_pdl", "maxnreg")
compiled: dict = {}
failures: list = []
RESOURCES: set = set()
ONLY: set = set()
SASS_DIR: str = ""


def cuobjdump(cubin: bytes, flag: str) -> subprocess.CompletedProcess:
    """Triton's bundled cuobjdump (else the one on PATH) run with ``flag`` on ``cubin``."""
    exe = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                       "cuobjdump")
    if not os.path.exists(exe):
        exe = shutil.which("cuobjdump") or "cuobjdump"
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([exe, flag, path], capture_output=True, text=True)


def resource_usage(cubin: bytes) -> str:
    """``REG:n STACK:n SHARED:n LOCAL:n`` of the cubin's kernel (LOCAL > 0 means
    spilled registers)."""
    r = cuobjdump(cubin, "--dump-resource-usage")
    m = re.search(r"REG:\d+.*", r.stdout)
    return m.group(0).strip() if m else f"cuobjdump: {(r.stdout + r.stderr).strip()[:200]}"


def _jit_specialization(self: JITFunction, args, kwargs):
    """The signature, constexprs, attributes and options Triton's JIT would compile
    this launch with: its own binder, so integer arguments divisible by 16 and
    16-byte-aligned tensors carry ``tt.divisibility`` as on the GPU (without it
    the compiler cannot vectorize loads, and registers differ from the real ones)."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    backend = make_backend(TARGET)
    binder = create_function_from_signature(self.signature, self.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    return self._pack_args(backend, kwargs, bound_args, specialization, options)


def scalar_16bit_loads(cubin: bytes) -> int:
    """Global loads of one 16- or 8-bit element in the cubin's SASS. Every kernel's
    16-bit tiles (K/V, summaries, keys, pages) must load as vectors: a 2-byte load
    per element (the compiler could not prove 16-byte alignment, e.g. of a pointer
    carried through a loop) costs 8x the load instructions; checked in the variants
    with a 16-bit tensor argument, where the count must be 0."""
    return len(re.findall(r"\bLDG\.E\.[US](?:16|8)\b", cuobjdump(cubin, "-sass").stdout))


def _aot(self: JITFunction, *args, grid, warmup, **kwargs):
    """Stands in for ``JITFunction.run``: compiles instead of launching (a launch
    Triton's binder cannot specialize is reported as a failure)."""
    options = {k: kwargs[k] for k in OPTION_KEYS if k in kwargs}
    try:
        _, sig, consts, attrs = _jit_specialization(self, args, dict(kwargs))
    except Exception as exc:  # reported together at the end
        failures.append((self.__name__, None, options, exc))
        print(f"  FAIL {self.__name__}: JIT specialization: {type(exc).__name__}: {exc}",
              flush=True)
        return None
    named = {self.params[p[0]].name: v for p, v in consts.items() if len(p) == 1}
    key = (self.__name__, tuple(sorted(sig.items())), tuple(sorted(map(str, named.items()))),
           tuple(sorted(map(str, attrs.items()))), tuple(sorted(options.items())))
    return _compile(self, key, ASTSource(fn=self, signature=sig, constexprs=consts,
                                         attrs=attrs), options, named, sig)


def _compile(self: JITFunction, key, src, options: dict, consts: dict, sig: dict):
    if key in compiled or (ONLY and self.__name__ not in ONLY):
        return None
    try:
        k = triton.compile(src, target=TARGET, options=options)
        compiled[key] = len(k.asm["cubin"])
        extra = ""
        if self.__name__ in RESOURCES:
            flags = {n: consts[n] for n in ("WAVE", "PDL", "Q8", "ISO", "ERR", "BAND", "CARRY")
                     if n in consts and consts[n]}
            dt = next((v for n, v in sig.items() if n == "kv_ptr"), "")
            extra = f" {dt} {flags}: {resource_usage(k.asm['cubin'])}"
            if SASS_DIR:
                tag = "_".join(f"{n}{int(consts[n])}" for n in ("WAVE", "PDL", "Q8", "XR",
                                                                  "ISO", "ERR", "MV8", "VC",
                                                                  "EPB", "BAND")
                               if n in consts)
                tag += f"_r{options.get('maxnreg') or 0}"
                path = os.path.join(SASS_DIR, f"{self.__name__}_{dt.strip('*')}_{tag}_"
                                    f"{len(compiled)}.sass")
                with open(path, "w") as f:
                    f.write(cuobjdump(k.asm["cubin"], "-sass").stdout)
                extra += f" -> {path}"
        if any(v in ("*bf16", "*fp16") for v in sig.values()):
            n = scalar_16bit_loads(k.asm["cubin"])
            if n:
                raise RuntimeError(f"{n} scalar 8/16-bit global loads in the SASS (tiles "
                                   f"not vectorised: alignment not provable)")
            extra += " vector loads"
        print(f"  ok  {self.__name__:22s} {options} cubin {compiled[key]} B{extra}", flush=True)
    except Exception as exc:  # reported together at the end
        compiled[key] = None
        failures.append((self.__name__, consts, options, exc))
        cause = f" (cause: ...{str(exc.__cause__)[-700:]})" if exc.__cause__ else ""
        print(f"  FAIL {self.__name__}: {type(exc).__name__}: {str(exc)[:2000]}{cause}",
              flush=True)
    return None


def decode_launches() -> None:
    from vllm_retro.config import RetroConfig
    from vllm_retro.index.paged import (IndexAllocator, IndexPool, PagedIndexLayout,
                                        make_headers, sink_end)
    from vllm_retro.kernels import triton_decode as td
    h, g, d, bs = 8, 4, 128, 16
    for dtype, pdl in ((torch.bfloat16, False), (torch.bfloat16, True),
                       (torch.float32, False)):   # fp16 compiles as bf16 does
        td.PDL = pdl
        lay = PagedIndexLayout(h, d, bs, dtype)
        nb = 64
        kv = lay.make_cache(nb)
        hdr = make_headers(nb, "cpu")
        pool = IndexPool(lay, nb)
        ibt = IndexAllocator(nb, 8, 32).ibt
        for b in (1, 6):
            ws = td.DecodeWorkspace(nb, h, g, d, max(b, 8), "cpu")
            q = torch.zeros(b, h * g, d, dtype=dtype)
            bt = torch.zeros(b, 32, dtype=torch.int32)
            sl = torch.zeros(b, dtype=torch.int32)
            out = torch.zeros(b, h * g, d, dtype=dtype)
            # Both selections (SELECT "bucket": the key and list kernels' BUCKET
            # variants, no candidate kernel), each plain and with the attention
            # kernel's wave-buffer variant (released blocks read from the cluster
            # cache / host arena), the page lookups in the list kernel
            # (RESOLVE_IN_COLLECT, the default) or in their own.
            base, base_select = td.RESOLVE_IN_COLLECT, td.SELECT
            # (The bucket variants once per batch class: bf16, no PDL.)
            for select in (("exact", "bucket") if dtype == torch.bfloat16 and not pdl
                           else ("exact",)):
                td.SELECT = select
                wsel = td.DecodeWorkspace(nb, h, g, d, max(b, 8), "cpu")
                for wave, in_collect in ((False, base), (True, base), (True, not base)):
                    td.RESOLVE_IN_COLLECT = in_collect
                    td.paged_decode_attention_triton(
                        q, kv, lay, bt, sl, hdr, ibt, pool, sink_end(RetroConfig(), bs),
                        0.1, out, wsel, count_stats=True,
                        wave=_wave_view(lay, dtype, pool.num_pages) if wave else None)
            td.SELECT, td.RESOLVE_IN_COLLECT = base_select, base
            # The score kernel's 8-bit summaries (summary_bits 8).
            pool8 = IndexPool(lay, nb, summary_bits=8)
            td.paged_decode_attention_triton(q, kv, lay, bt, sl, hdr, ibt, pool8,
                                             sink_end(RetroConfig(), bs), 0.1, out, ws)
            # ... and the score kernel's plain form (XR off: the element-wise work on
            # the products' 16 rows; the float32 caches' form on a GPU); 8- and 16-bit.
            big, small = dict(td.TUNE["score"]), dict(td.TUNE_SMALL_BATCH["score"])
            try:
                td.TUNE["score"]["XR"] = td.TUNE_SMALL_BATCH["score"]["XR"] = False
                for pl in (pool8, pool):
                    td.paged_decode_attention_triton(q, kv, lay, bt, sl, hdr, ibt, pl,
                                                     sink_end(RetroConfig(), bs), 0.1, out, ws)
            finally:
                td.TUNE["score"], td.TUNE_SMALL_BATCH["score"] = big, small
            # ... and its isotropic variance term (variance_form "isotropic", 8-bit).
            pool8i = IndexPool(lay, nb, summary_bits=8, variance_form="isotropic")
            td.paged_decode_attention_triton(q, kv, lay, bt, sl, hdr, ibt, pool8i,
                                             sink_end(RetroConfig(), bs), 0.1, out, ws)
            # The attention kernel's measurement knob (the sweep's "attend zones"
            # variants: some zones' loops left out), bf16 only.
            if dtype == torch.bfloat16:
                big_a, small_a = dict(td.TUNE["attend"]), dict(td.TUNE_SMALL_BATCH["attend"])
                try:
                    for zones in (0, 1, 2, 3, 4):
                        td.TUNE["attend"]["ZONES"] = td.TUNE_SMALL_BATCH["attend"]["ZONES"] = zones
                        td.paged_decode_attention_triton(q, kv, lay, bt, sl, hdr, ibt, pool8,
                                                         sink_end(RetroConfig(), bs), 0.1,
                                                         out, ws)
                finally:
                    td.TUNE["attend"], td.TUNE_SMALL_BATCH["attend"] = big_a, small_a
            # The attention kernel's 8-bit mean values (mean_value_bits 8).
            pool8v = IndexPool(lay, nb, summary_bits=8, mean_value_bits=8)
            td.paged_decode_attention_triton(q, kv, lay, bt, sl, hdr, ibt, pool8v,
                                             sink_end(RetroConfig(), bs), 0.1, out, ws)
            td.paged_decode_attention_triton(q, kv, lay, bt, sl, hdr, ibt, pool8v,
                                             sink_end(RetroConfig(), bs), 0.1, out, ws,
                                             wave=_wave_view(lay, dtype, pool8v.num_pages))
            # Clusters of a quarter block (entries_per_block 4: every kernel's EPB).
            lay_e4 = PagedIndexLayout(h, d, bs, dtype, entries_per_block=4)
            pool_e4 = IndexPool(lay_e4, 4 * nb, summary_bits=8)
            ws4 = td.DecodeWorkspace(4 * nb, h, g, d, max(b, 8), "cpu")
            td.paged_decode_attention_triton(q, kv, lay_e4, bt, sl, hdr,
                                             IndexAllocator(4 * nb, 8, 128).ibt, pool_e4,
                                             sink_end(RetroConfig(), bs), 0.1, out, ws4)
            # The attention kernel's value correction (value_correction: 5 float rows).
            lay_vc = PagedIndexLayout(h, d, bs, dtype, float_slots=5)
            pool_vc = IndexPool(lay_vc, nb, summary_bits=8)
            td.paged_decode_attention_triton(q, kv, lay_vc, bt, sl, hdr, ibt, pool_vc,
                                             sink_end(RetroConfig(), bs), 0.1, out, ws)
            td.paged_decode_attention_triton(q, kv, lay_vc, bt, sl, hdr, ibt, pool_vc,
                                             sink_end(RetroConfig(), bs), 0.1, out, ws,
                                             wave=_wave_view(lay_vc, dtype, pool_vc.num_pages))
            # The error rank (retrieval_rank "error": the score, key and list kernels'
            # ERR variants and the band kernel), on the default index and on the
            # accuracy stack's (quarter-block clusters, value correction, 8 bits).
            if dtype == torch.bfloat16 and td.SELECT == "bucket":
                lay_s = PagedIndexLayout(h, d, bs, dtype, float_slots=5,
                                         entries_per_block=4)
                for lay_x, pool_x, n in ((lay, pool, nb),
                                         (lay_s, IndexPool(lay_s, 4 * nb, summary_bits=8),
                                          4 * nb)):
                    ws_x = td.DecodeWorkspace(n, h, g, d, max(b, 8), "cpu", error_rank=True)
                    # (with the wave buffer's view too where it applies: one entry
                    # per block; the list kernel then also resolves pages)
                    for wv in ((None, _wave_view(lay_x, dtype, n))
                               if lay_x.entries_per_block == 1 else (None,)):
                        td.paged_decode_attention_triton(
                            q, kv, lay_x, bt, sl, hdr, IndexAllocator(n, 8, 4 * 32).ibt,
                            pool_x, sink_end(RetroConfig(), bs), 0.1, out, ws_x,
                            count_stats=True, wave=wv, retrieval_rank="error")
            # Band re-ranking (rank_interval > 1: the score, key and list kernels'
            # BAND variants, bucket selection), plain and with the wave buffer's view
            # with the engine's shared phase (PHASE), and with the isotropic variance
            # term without it.
            if dtype == torch.bfloat16:
                base_select, td.SELECT = td.SELECT, "bucket"
                pool_b = IndexPool(lay, nb, summary_bits=8, rank_interval=4)
                pool_b.band_phase = torch.zeros(1, dtype=torch.int32)
                pool_bi = IndexPool(lay, nb, summary_bits=8, variance_form="isotropic",
                                    rank_interval=4)
                for pool_x, wv in ((pool_b, None),
                                   (pool_b, _wave_view(lay, dtype, nb)), (pool_bi, None)):
                    td.paged_decode_attention_triton(
                        q, kv, lay, bt, sl, hdr, ibt, pool_x, sink_end(RetroConfig(), bs),
                        0.1, out, ws, count_stats=True, wave=wv)
                # The carried rank reference (rank_reference "carried": the score, key
                # and list kernels' CARRY variants), plain and with the wave view.
                pool_c = IndexPool(lay, nb, summary_bits=8)
                pool_c.rank_ref = torch.zeros(ibt.shape[0], h)
                for wv in (None, _wave_view(lay, dtype, nb)):
                    td.paged_decode_attention_triton(
                        q, kv, lay, bt, sl, hdr, ibt, pool_c, sink_end(RetroConfig(), bs),
                        0.1, out, ws, count_stats=True, wave=wv)
                td.SELECT = base_select


def _wave_view(lay, dtype, num_pages):
    """A small wave buffer view of the layout, keyed by the pool's ``num_pages``
    (CPU tensors: nothing runs)."""
    from vllm_retro.kernels.wave_view import WaveBufferView
    p, nl, slots = num_pages, 2, 8
    h, bs, d = lay.num_kv_heads, lay.block_size, lay.head_dim
    i64 = torch.int64
    return WaveBufferView(
        arena=torch.zeros(64, 2 * d, dtype=dtype),
        page_row=torch.full((p, nl, h), -1, dtype=torch.int32),
        cache_table=torch.full((p * nl * h + 1,), -1, dtype=i64),
        cache_kv=torch.zeros(slots + 1, bs, 2 * d, dtype=dtype),
        cache_stamp=torch.zeros(slots + 1, dtype=i64), clock=torch.zeros((), dtype=i64),
        counters=torch.zeros(4, dtype=i64), miss_keys=torch.zeros(16, dtype=i64),
        miss_count=torch.zeros(1, dtype=i64), layer=1, num_pages=p, num_layers=nl,
        num_kv_heads=h)


def build_launches() -> None:
    from vllm_retro.index.paged import IndexPool, PagedIndexLayout
    from vllm_retro.kernels import triton_kmeans as tk
    from vllm_retro.kernels.triton_cluster_write import (write_clusters_triton,
                                                         write_value_correction_triton)
    for dtype in (torch.bfloat16, torch.float32):   # fp16 compiles as bf16 does
        h, d, bs = 8, 128, 16
        lay = PagedIndexLayout(h, d, bs, dtype)
        kv = lay.make_cache(20)
        m, nbs = 2, 4
        blocks = torch.arange(1, 1 + m * nbs).view(m, nbs)
        sim = torch.bfloat16 if dtype != torch.float32 else torch.float32
        xs = tk.segment_keys(kv, blocks, d, sim)
        c = 4
        cent = torch.zeros(m * h, c, d, dtype=sim)
        sums = torch.zeros(m * h, c, d)
        tk.kmeans_assign(xs, cent, xs, sums)
        tk.kmeans_assign(xs, cent, xs.float(), sums)
        tk.kmeans_assign(xs, cent)
        tk.kmeans_update(sums, cent, zero=True)
        tk.kmeans_update(sums, cent, zero=False)
        # kmeans_value_weight: keys and values concatenated, 2D-wide points (values
        # gathered by segment_keys from the second half of each token row).
        xv = tk.segment_keys(kv[..., d:], blocks, d, sim)
        x2 = torch.cat([xs, xv], dim=-1).contiguous()
        cent2 = torch.zeros(m * h, c, 2 * d, dtype=sim)
        sums2 = torch.zeros(m * h, c, 2 * d)
        tk.kmeans_assign(x2, cent2, x2, sums2)
        tk.kmeans_assign(x2, cent2)
        tk.kmeans_update(sums2, cent2, zero=True)
        n = nbs * bs
        order = torch.zeros(m * h, n, dtype=torch.int32)
        st = torch.zeros(m * h, c, dtype=torch.int32)
        write_clusters_triton(kv, lay, IndexPool(lay, 20), blocks, blocks,
                              torch.zeros(m, dtype=torch.int32), order, st, st)
        # value_correction: the pair's power iterations per cluster.
        lay_vc = PagedIndexLayout(h, d, bs, dtype, float_slots=5)
        write_value_correction_triton(kv, lay_vc, IndexPool(lay_vc, 20), blocks, blocks,
                                      st, st, 10)


def memory_launches() -> None:
    from vllm_retro.memory.triton_page_copy import copy_pages
    for dtype in (torch.bfloat16, torch.float32):
        arena = torch.zeros(64, 256, dtype=dtype)
        cache = torch.zeros(4, 16, 256, dtype=dtype)
        copy_pages(arena, cache, torch.tensor([0, 16]), torch.tensor([1, 3]))


def main() -> None:
    global SASS_DIR
    if "--resources" in sys.argv:
        RESOURCES.update(sys.argv[sys.argv.index("--resources") + 1].split(","))
    if "--only" in sys.argv:
        ONLY.update(sys.argv[sys.argv.index("--only") + 1].split(","))
    if "--sass" in sys.argv:
        SASS_DIR = sys.argv[sys.argv.index("--sass") + 1]
        os.makedirs(SASS_DIR, exist_ok=True)
    JITFunction.run = _aot
    for name, fn in (("decode", decode_launches), ("index build", build_launches),
                     ("wave buffer", memory_launches)):
        print(f"{name}:", flush=True)
        try:
            fn()
        except Exception:
            traceback.print_exc()
            failures.append((name, None, None, "launcher raised"))
    print(f"{len(compiled)} kernel variants for sm_90 (Triton {triton.__version__}), "
          f"{len(failures)} failed")
    if failures:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
