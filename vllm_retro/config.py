"""RetroConfig: every knob of the wave index and tripartite attention, validated.

A bad value raises ``ValueError`` naming the field and its allowed range, so the
same object can validate vLLM's ``additional_config`` at engine start.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, Dict, Mapping, Optional


def _check_int(name: str, value: Any, lo: int, hi: Optional[int] = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"RetroConfig.{name} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"RetroConfig.{name} must be in {rng}, got {value}")


# The accuracy-bounded mode's margin (nats) of its one-sided outside-mass estimate.
_BOUND_MARGIN_DEFAULT = 0.5


def _check_float(name: str, value: Any, lo: float, hi: float,
                 lo_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"RetroConfig.{name} must be a number, got {value!r}")
    v = float(value)
    bad_lo = v <= lo if lo_open else v < lo
    if math.isnan(v) or bad_lo or v > hi:
        left = "(" if lo_open else "["
        raise ValueError(f"RetroConfig.{name} must be in {left}{lo}, {hi}], got {value}")


# RetroConfig.retrieval_rank: how the exact set is chosen inside the candidate band.
RETRIEVAL_RANKS = ("mass", "error", "error_value")
# RetroConfig.variance_form: how the GPU scoring stage reads a cluster's key variance.
VARIANCE_FORMS = ("diagonal", "isotropic")
# RetroConfig.rank_reference: what the GPU rank keys are relative to.
RANK_REFERENCES = ("auto", "step", "carried")
# Named option sets (RetroConfig.from_preset; option "preset" in a dict). "accuracy":
# issue 16's options that every decode path runs (the C++ kernel on CPU, the GPU
# kernels): 4-token clusters, value-aware clustering, the variance cap, the rank-1
# value correction, the error rank, a wider estimated band. On real SmolLM2 attention,
# at 3% of tokens read exactly, through the GPU kernels' twin: median error
# 1.15-1.51% and p90 3.1-5.0% on code, prose, JSON, a table and a multi-needle prompt
# (docs/accuracy.md, "The accuracy preset"), against 2.4-5.5% / 10-22% with the
# defaults. What it costs: about 4.5x the bytes a decode step reads (the 4x centroids,
# the estimated band's values and corrections), ~6.6x the index memory per token (docs/configuration.md), and it does
# not combine with the wave buffer (clusters smaller than a KV block).
PRESETS: Dict[str, Dict[str, Any]] = {
    "default": {},
    "accuracy": dict(cluster_size=4, kmeans_value_weight=0.7, variance_cap=1.0,
                     value_correction=True, retrieval_rank="error",
                     estimation_fraction=0.3),
}
# RetroConfig.adaptive_budget: decode steps of difficulty history kept per KV head.
ADAPTIVE_WINDOW = 64
# Share of the memory vLLM may use (gpu_memory_utilization x device memory) that the
# GPU index pool takes when RetroConfig.index_pool_gib is 0 (auto): about the 9.5% of
# the KV cache the index took in the padding of vLLM's pages before (Llama-3-8B on an
# H200: 0.085 x 0.9 x 141 GB = 10.8 GB against ~10 GB of padding).
INDEX_POOL_AUTO_FRACTION = 0.085
# Share of the memory vLLM may use that the wave buffer's GPU cluster cache takes when
# RetroConfig.cluster_cache_gib is 0 (auto), capped at the host mirror's size (a cache
# larger than what it caches is waste). 10% is what design §8.1 leaves for the cache
# on an H200 with Llama-3-8B after 11 concurrent 128K requests (0.10 x 0.92 x 141 GB =
# 13 GB against 13.1 GiB): the HBM the released blocks free, decided before vLLM
# sizes its KV cache, since the cache is allocated before vLLM profiles memory.
CLUSTER_CACHE_AUTO_FRACTION = 0.10


@dataclass(frozen=True)
class RetroConfig:
    """Knobs of the wave index (per request, per KV head) and of decode attention.

    Attributes:
        segment_size: tokens per prefill segment clustered independently.
        cluster_size: mean tokens per cluster (clusters = ceil(segment / cluster_size)).
            GPU: at least the KV block size, or a half or a quarter of it (2 or 4
            index entries per block: that many times the index pool's pages and the
            score stage's bytes; not with ``wave_buffer``).
        retrieval_fraction: fraction of clusters attended exactly at each decode step.
        min_retrieval_tokens: floor of the exact set in tokens: at least
            ``ceil(min_retrieval_tokens / mean cluster size)`` clusters are retrieved,
            whatever the fraction gives (a fraction of a short context is too few
            tokens to hold the needles a query looks for).
        estimation_fraction: fraction of clusters (after the retrieved ones) whose
            contribution is estimated from centroid, size and value sum.
        sink_tokens: leading tokens always attended exactly.
        recent_tokens: trailing tokens always attended exactly.
        kmeans_iters: spherical k-means iterations per segment.
        kmeans_value_weight: opt-in (0: keys only): k-means clusters the normalised
            concatenation of each token's centred, normalised key and this weight
            times its centred, normalised value, so that a cluster's tokens also
            agree in value and its mean value is a better estimate. Index build
            only; decode and the bytes it reads are unchanged (the GPU build's
            k-means then runs on 2D-wide points: about twice its assignment work).
        update_interval: decode tokens clustered together into a new segment once
            they leave the recent window.
        error_bound: if set, the exact set grows per query until the estimated
            softmax mass outside it is below this bound (accuracy-bounded mode).
        max_retrieval_fraction: cap of the exact set in accuracy-bounded mode
            (never below retrieval_fraction, which stays the floor).
        bound_margin: accuracy-bounded mode only (without ``error_bound`` only the
            default or None, both ignored): the exact set is sized with a one-sided
            estimate of the mass outside it: clusters inside count at their Jensen
            lower bound ``ln size + s q.c`` (never above their true mass), clusters
            outside at the uncapped second-order log-mass plus ``bound_margin``
            nats. Larger values read more and hold the bound for more queries (0.5
            with the cap 0.5: the true outside mass within the bound for >= 99% of
            query heads at eps 0.05-0.2 on SmolLM2, docs/accuracy.md). ``None``
            sizes it with the mean estimate instead (reads about half as much; the
            bound then holds for only 81-95% of query heads). The GPU kernels do
            not implement the bounded mode.
        variance_cap: cap (nats) of the key-variance term of a cluster's log-mass
            ``ln size + s q.c + min(s^2/2 sum_d q_d^2 var_d, variance_cap)``, used for
            ranking and the estimation zone (0: first-order log-mass).
        shared_head_budget: opt-in, fixed-fraction mode only: the layer's retrieved
            clusters (``n_ret`` per KV head, ``n_ret * H`` in all) are shared by its
            KV heads: every head keeps its top cluster and the rest go, across heads,
            to the clusters with the largest estimated share of their own query
            heads' attention (summed over the group), so heads whose attention is
            spread read more and concentrated heads fewer. Same clusters read in
            total; each head reads a prefix of its own ranking. The GPU kernels do
            not implement it yet.
        value_correction: opt-in (False: off): each cluster also stores the leading
            singular pair of its key-value cross-covariance ``(1/n) sum_i (k_i - c)
            (v_i - mean v)^T ~ sigma u w^T`` (2*D more floats per cluster), and an
            estimated cluster stands for ``mean v + s (q . sigma u) w`` instead of its
            mean value: the first-order change of the softmax-weighted mean value
            with the query. CPU: the C++ kernel applies it
            (``ops.decode_attention``). GPU: the index pages get two more
            rows (``kernels.write_value_correction``: power iterations at build,
            +2D elements per cluster and head in the pool) and the attention kernel
            reads them for estimated clusters (+2D elements read per estimated
            cluster and head).
        retrieval_rank: opt-in, fixed-fraction mode only ("mass": the library
            ranking). Which clusters of the candidate band (the top ``n_ret + n_est``
            by estimated mass, the same band as with "mass") are read exactly: the
            ``n_ret`` with the largest expected estimation error instead of the
            largest mass; the rest of the band is estimated. "error": estimated mass
            share times the uncapped key-variance term ``s^2/2 sum_d q_d^2 var_d``
            (no bytes added). "error_value": mass share times ``t |mean v - o| +
            sqrt(2 t) sigma_v`` (``t`` that term, ``o`` the estimated output,
            ``sigma_v`` the cluster's rms value deviation from its mean value: one
            float per cluster stored at build, read for the band). With
            ``shared_head_budget`` the layer's ``n_ret * H`` exact clusters go to the
            largest error proxies of the heads' bands (every head keeps one).
            The torch reference runs all three; the GPU kernels "mass" and "error"
            (their proxy normalises the shares over the clusters alone: they rank
            before they attend the steady zone); the C++ CPU kernel "mass" and "error".
        adaptive_budget: opt-in, fixed-fraction mode only (0, the default: off). Per
            decode query and KV head the exact-set size becomes ``round(n_ret (1 +
            a (2 p - 1)))`` clipped to ``[1, band]``, ``a`` this value and ``p`` the
            percentile of the query's difficulty signal among the head's last
            ``ADAPTIVE_WINDOW`` decode steps (the signal: the ranking score summed
            over the band entries past the top ``n_ret``, i.e. the estimated mass or,
            with ``retrieval_rank``, the error proxy left to estimation). ``p`` is
            uniform on a stationary stream, so the mean read stays at the fixed
            budget's. With ``shared_head_budget`` the sum of the heads' sizes is the
            layer's budget. Reference only; the history lives in the index.
        rest_estimate: opt-in weight in [0, 1] (0, the default: off). The clusters
            neither retrieved nor estimated (skipped) are attended as one
            pseudo-token per KV head: this weight times their summed estimated mass
            (the log-masses the ranking computed) over their size-weighted mean
            value (the head's value sum minus the value sums of the retrieved and
            estimated clusters, over their sizes). Flat attention spreads mass over
            the skipped clusters, which dropping them loses; the weight discounts
            the estimate's upward bias on low-ranked clusters. Reference only.
        dense_below: context length below which the vLLM backend decodes densely
            (0: only the index's own short-sequence fallback applies). CPU build: per
            decode row. GPU: per step, a step of at most two decode rows whose contexts
            average fewer tokens runs vLLM's FlashAttention for all its rows (inside
            the CUDA graphs, through conditional nodes); not with ``wave_buffer``.
        host_memory_gib: CPU build: host memory the vLLM backend's indexes of one
            worker may hold together; a request whose index alone would exceed it is
            refused (None: no limit). GPU: with ``wave_buffer``, the pinned host
            budget of the KV mirrors (a full budget stops a mirror; nothing refused)
            (None there: 3/4 of the host memory available when the worker starts,
            :func:`vllm_retro.memory.host_mirror.default_host_budget_bytes`, split
            evenly between the engine's workers).
        wave_buffer: GPU only, opt-in (issue 14): mirror each request's clustered KV,
            cluster-contiguous per KV head, into pinned host memory so that vLLM can
            release the GPU blocks outside the steady zone (sinks + recent window);
            decode reads retrieved clusters through the GPU cluster cache.
        cluster_cache_gib: GPU memory of the wave buffer's cluster cache; 0 (the
            default) sizes it automatically: :data:`CLUSTER_CACHE_AUTO_FRACTION` of
            the memory vLLM may use (about the HBM that released KV blocks no longer
            need), at most the host mirror's size. Allocated before vLLM sizes its KV
            cache. Only with ``wave_buffer``.
        index_pool_gib: GPU only: device memory (GiB, all layers of one worker) of the
            index pool, retro's own storage of the paged index (6,208 B per clustered
            KV block and layer for Llama-3-8B's shape) and of the decode scratch per
            pool page. 0 (the default) sizes it automatically:
            :data:`INDEX_POOL_AUTO_FRACTION` of the memory vLLM may use
            (``gpu_memory_utilization`` x device memory), about what the former
            in-page index took (9.5% of the KV), plus, with ``wave_buffer``, the index
            of the tokens the host mirror holds (mirrored requests release their KV
            blocks, not their index). Allocated when the attention layers are built,
            before vLLM measures free memory, so vLLM sizes its KV cache around it. A
            request that finds the pool full is not indexed (attended exactly) and
            counted (``index_pool_full``).
        summary_bits: GPU only: 8 (default) stores the clusters' centroids and key
            variances as int8 with one scale per cluster, head and vector, so the
            decode's scoring stage reads about half the bytes (``2D + 8`` instead of
            ``4D`` per cluster and head at bf16; 16 keeps them in the KV dtype);
            the mean values stay 16-bit and the pool's memory is unchanged. On the
            CPU reference 8-bit summaries moved no accuracy cell by more than 0.2
            points (``docs/accuracy.md``); on an H200 the scoring stage takes 26%
            less time (``docs/benchmarks.md``). The CPU backend keeps fp32 summaries.
        mean_value_bits: GPU only: 16 (default) keeps each cluster's mean value in the
            KV dtype; 8 stores it as int8 with one scale per cluster and head (in
            the same slot), so every estimated cluster's value costs ``D + 4``
            bytes instead of ``2D`` at bf16 (the attention stage reads it for ~29%
            of the clusters). Rounding: at most 1/254 of the vector's largest
            element. Opt-in until measured on the GPU.
        variance_form: GPU only, with ``summary_bits`` 8: how the scoring stage
            reads a cluster's key variance for the variance term of its log-mass.
            "diagonal" (default): the per-channel vector, ``s^2/2 sum_d q_d^2
            var_d``; "isotropic": its mean over channels, ``s^2/2 |q|^2 mean_d
            var_d`` (one float per cluster and head, so the stage reads ``D + 12``
            bytes instead of ``2D + 8`` and does half the products). The term also
            sets the estimated clusters' log-mass: on the CPU reference at 3% read
            it costs +0.5 to +1.0 points of median error and up to +3.7 of p90
            (``docs/accuracy.md``, "Fewer bytes per cluster for the score stage",
            corrected in the twenty-eighth session). Per layer on an H100: -6.4 us at
            128K x 1 (-12%), -4 at 128K x 6; +1.6% tok/s at 128K x 3
            (``docs/perf-notes.md``). Opt-in. The CPU backend keeps the vector.
        rank_interval: GPU only: decode steps per full ranking of a request's
            clusters. 1 (the default): every step scores every cluster and selects
            the retrieved and estimated sets from all of them. ``k > 1``: a step
            ranks all clusters when the row's last full ranking is ``k`` or more of
            its steps back (or its index changed since); the steps between re-rank
            only the last full ranking's band (its ``n_retrieve + n_estimate``
            clusters, ~25% of them at the default budget) with the current query:
            they score, rank and select from the band alone, and the clusters
            outside it stay skipped. On real SmolLM2 attention (five kinds of text,
            five layers, every head) re-ranking one to three steps after the full
            ranking moved the median error by at most 0.26 points and the p90 by at
            most 0.7 (``docs/accuracy.md``, "Re-ranking the last band"). A
            re-ranking step's selection kernels take about a quarter of a full
            one's: with 4, 342 against 330 tok/s at 128K x 3 on an H100
            (``docs/perf-notes.md``). Opt-in until its GPU task accuracy is
            measured. Needs ``summary_bits`` 8 (the band lives in the 8-bit
            summaries' spare words: no memory is added) and the "mass" retrieval
            rank; the CPU backend ranks every step.
        rank_reference: GPU only: what a cluster's rank key is relative to. "step":
            each query head's softmax over the clusters of this step, summed over
            the GQA group (its normalization needs every cluster's score first: the
            key kernel, one launch after the scores). "carried": the group's summed
            masses relative to the request's largest log-mass of its previous
            decode step, per layer and KV head (one float each), which the score
            kernel turns into keys and histograms itself; the histogram window's
            top binade is then the group size's. A step after the request's index
            was built or grown has no reference and ranks as "step" does. Needs
            the "mass" retrieval rank and ``rank_interval`` 1. "auto" (the
            default): "carried" where those hold (and the kernels select by
            buckets), else "step". On an H100 at 128K x 6 the decode attention
            took 137.3 against 142.8 us per layer (x 3: 88.6 against 92.7; one
            row unchanged); SmolLM2 task accuracy 0.643 against 0.617 (dense
            0.634), no task and length lower (``docs/perf-notes.md``, forty-third
            session). On real SmolLM2 attention (the CPU twin) it moved the median
            error by at most +0.26 points and the p90 by at most +0.93
            (``docs/accuracy.md``, "Does the ranking need this step's
            normalization?").
        prefill_resident_tokens: with ``wave_buffer``, how many of a prompt's tokens
            may stay in vLLM's GPU blocks while the prompt is still being prefilled
            (chunked prefill). Tokens further behind the prefill front are clustered,
            mirrored to host memory and their blocks released *during* the prefill,
            so a prompt larger than the KV cache (a 1M-token request) fits; the
            later chunks attend to them exactly, read back from the mirror. 0 (the
            default): the KV cache's capacity minus a margin of four scheduled
            chunks and two segments, so prompts that fit the KV cache are never
            released before they are complete.
        log_stats_interval_s: seconds between the vLLM backend's stats log lines
            (decode calls, tokens read, live requests, index memory); 0 turns them off.
    """

    segment_size: int = 8192
    cluster_size: int = 16
    retrieval_fraction: float = 0.018
    min_retrieval_tokens: int = 512
    estimation_fraction: float = 0.232
    sink_tokens: int = 4
    recent_tokens: int = 64
    kmeans_iters: int = 10
    kmeans_value_weight: float = 0.0
    update_interval: int = 1024
    error_bound: Optional[float] = None
    max_retrieval_fraction: float = 0.5
    bound_margin: Optional[float] = _BOUND_MARGIN_DEFAULT
    variance_cap: float = 2.0
    shared_head_budget: bool = False
    value_correction: bool = False
    retrieval_rank: str = "mass"
    adaptive_budget: float = 0.0
    rest_estimate: float = 0.0
    dense_below: int = 0
    host_memory_gib: Optional[float] = None
    log_stats_interval_s: float = 10.0
    wave_buffer: bool = False
    cluster_cache_gib: float = 0.0
    index_pool_gib: float = 0.0
    prefill_resident_tokens: int = 0
    summary_bits: int = 8
    mean_value_bits: int = 16
    variance_form: str = "diagonal"
    rank_interval: int = 1
    rank_reference: str = "auto"

    def __post_init__(self) -> None:
        _check_int("segment_size", self.segment_size, 64, 1 << 20)
        _check_int("cluster_size", self.cluster_size, 1, 4096)
        if self.cluster_size > self.segment_size:
            raise ValueError(
                f"RetroConfig.cluster_size must be <= segment_size ({self.segment_size}),"
                f" got {self.cluster_size}")
        _check_float("retrieval_fraction", self.retrieval_fraction, 0.0, 1.0, lo_open=True)
        _check_int("min_retrieval_tokens", self.min_retrieval_tokens, 0, 1 << 24)
        _check_float("estimation_fraction", self.estimation_fraction, 0.0, 1.0)
        if self.retrieval_fraction + self.estimation_fraction > 1.0 + 1e-12:
            raise ValueError(
                "RetroConfig.retrieval_fraction + estimation_fraction must be <= 1, got "
                f"{self.retrieval_fraction} + {self.estimation_fraction}")
        _check_int("sink_tokens", self.sink_tokens, 0, 1 << 16)
        _check_int("recent_tokens", self.recent_tokens, 1, 1 << 20)
        _check_int("kmeans_iters", self.kmeans_iters, 0, 1000)
        _check_float("kmeans_value_weight", self.kmeans_value_weight, 0.0, 10.0)
        _check_int("update_interval", self.update_interval, 16, 1 << 20)
        if self.update_interval < self.cluster_size:
            raise ValueError(
                f"RetroConfig.update_interval must be >= cluster_size ({self.cluster_size}),"
                f" got {self.update_interval}")
        if self.error_bound is not None:
            _check_float("error_bound", self.error_bound, 0.0, 1.0, lo_open=True)
        _check_float("max_retrieval_fraction", self.max_retrieval_fraction, 0.0, 1.0,
                     lo_open=True)
        if self.bound_margin is not None:
            _check_float("bound_margin", self.bound_margin, 0.0, 20.0)
            # The default (and null) are harmless without error_bound; another value
            # there is a mistake the user should hear about.
            if self.error_bound is None and self.bound_margin != _BOUND_MARGIN_DEFAULT:
                raise ValueError("RetroConfig.bound_margin applies to the accuracy-bounded "
                                 "mode only: set error_bound too (or leave bound_margin at "
                                 f"its default, {_BOUND_MARGIN_DEFAULT})")
        _check_float("variance_cap", self.variance_cap, 0.0, 50.0)
        if not isinstance(self.shared_head_budget, bool):
            raise ValueError("RetroConfig.shared_head_budget must be a bool, got "
                             f"{self.shared_head_budget!r}")
        if self.shared_head_budget and self.error_bound is not None:
            raise ValueError("RetroConfig.shared_head_budget applies to the fixed-fraction "
                             "mode; error_bound already sizes the exact set per KV head")
        if not isinstance(self.value_correction, bool):
            raise ValueError("RetroConfig.value_correction must be a bool, got "
                             f"{self.value_correction!r}")
        if self.retrieval_rank not in RETRIEVAL_RANKS:
            raise ValueError(f"RetroConfig.retrieval_rank must be one of {RETRIEVAL_RANKS}, "
                             f"got {self.retrieval_rank!r}")
        if self.retrieval_rank != "mass" and self.error_bound is not None:
            raise ValueError("RetroConfig.retrieval_rank applies to the fixed-fraction mode; "
                             "error_bound sizes the exact set from the mass ranking (leave "
                             "retrieval_rank 'mass')")
        _check_float("adaptive_budget", self.adaptive_budget, 0.0, 1.0)
        if self.adaptive_budget and self.error_bound is not None:
            raise ValueError("RetroConfig.adaptive_budget applies to the fixed-fraction "
                             "mode; error_bound already sizes the exact set per query")
        _check_float("rest_estimate", self.rest_estimate, 0.0, 1.0)
        _check_int("dense_below", self.dense_below, 0, 1 << 24)
        if self.host_memory_gib is not None:
            _check_float("host_memory_gib", self.host_memory_gib, 0.0, 1 << 20, lo_open=True)
        _check_float("log_stats_interval_s", self.log_stats_interval_s, 0.0, 86400.0)
        if not isinstance(self.wave_buffer, bool):
            raise ValueError(f"RetroConfig.wave_buffer must be a bool, got {self.wave_buffer!r}")
        _check_float("cluster_cache_gib", self.cluster_cache_gib, 0.0, 1 << 20)
        _check_float("index_pool_gib", self.index_pool_gib, 0.0, 1 << 20)
        _check_int("prefill_resident_tokens", self.prefill_resident_tokens, 0, 1 << 40)
        _check_int("summary_bits", self.summary_bits, 8, 16)
        if self.summary_bits not in (8, 16):
            raise ValueError(f"RetroConfig.summary_bits must be 8 or 16, got "
                             f"{self.summary_bits!r}")
        _check_int("mean_value_bits", self.mean_value_bits, 8, 16)
        if self.mean_value_bits not in (8, 16):
            raise ValueError(f"RetroConfig.mean_value_bits must be 8 or 16, got "
                             f"{self.mean_value_bits!r}")
        if self.variance_form not in VARIANCE_FORMS:
            raise ValueError(f"RetroConfig.variance_form must be one of {VARIANCE_FORMS}, "
                             f"got {self.variance_form!r}")
        if self.variance_form == "isotropic" and self.summary_bits != 8:
            raise ValueError("RetroConfig.variance_form 'isotropic' reads the mean key "
                             "variance the 8-bit summaries store: set summary_bits 8")
        _check_int("rank_interval", self.rank_interval, 1, 1024)
        if self.rank_interval > 1 and self.summary_bits != 8:
            raise ValueError("RetroConfig.rank_interval > 1 keeps each request's band in "
                             "the 8-bit summaries' spare words: set summary_bits 8")
        if self.rank_interval > 1 and self.retrieval_rank != "mass":
            raise ValueError("RetroConfig.rank_interval > 1 re-ranks the band by mass: it "
                             "does not combine with retrieval_rank "
                             f"{self.retrieval_rank!r}")
        if self.rank_reference not in RANK_REFERENCES:
            raise ValueError(f"RetroConfig.rank_reference must be one of "
                             f"{RANK_REFERENCES}, got {self.rank_reference!r}")
        if self.rank_reference == "carried" and (self.retrieval_rank != "mass"
                                                 or self.rank_interval > 1):
            raise ValueError("RetroConfig.rank_reference 'carried' ranks every cluster "
                             "by mass each step: it needs retrieval_rank 'mass' and "
                             "rank_interval 1")
        if self.prefill_resident_tokens and not self.wave_buffer:
            raise ValueError("RetroConfig.prefill_resident_tokens bounds the wave "
                             "buffer's release during prefill: set wave_buffer too "
                             "(or leave it 0)")
        if self.cluster_cache_gib and not self.wave_buffer:
            raise ValueError("RetroConfig.cluster_cache_gib sizes the wave buffer's GPU "
                             "cluster cache: set wave_buffer too (or leave it 0)")

    @classmethod
    def from_dict(cls, options: Optional[Mapping[str, Any]]) -> "RetroConfig":
        """Builds a config from a mapping (e.g. vLLM's ``additional_config["retro"]``).

        The key ``"preset"`` names a :data:`PRESETS` entry whose options the other
        keys override (:meth:`from_preset`). Unknown keys raise ``ValueError``
        listing the known ones.
        """
        options = dict(options or {})
        cls._check_known(options, extra=("preset",))
        if "preset" in options:
            return cls.from_preset(options.pop("preset"), **options)
        return cls(**options)

    @classmethod
    def _check_known(cls, names, extra=()) -> None:
        """``ValueError`` listing the known options (the fields and ``extra``) if
        ``names`` has others."""
        known = {f.name for f in fields(cls)} | set(extra)
        unknown = sorted(set(names) - known)
        if unknown:
            raise ValueError(
                f"unknown retro option(s) {unknown}; known options: {sorted(known)}")

    @property
    def carries_rank_reference(self) -> bool:
        """Whether the GPU kernels rank by the carried reference
        (``rank_reference`` "carried", or "auto" with the mass rank and
        ``rank_interval`` 1)."""
        if self.rank_reference == "auto":
            return self.retrieval_rank == "mass" and self.rank_interval == 1
        return self.rank_reference == "carried"

    @classmethod
    def from_preset(cls, name: str, **changes: Any) -> "RetroConfig":
        """The options of preset ``name`` (:data:`PRESETS`), then ``changes`` on top.

        A conflict between the two (e.g. ``error_bound`` with the "accuracy"
        preset's error rank) raises ``ValueError`` naming the preset."""
        if not isinstance(name, str) or name not in PRESETS:
            raise ValueError(f"RetroConfig preset must be one of {sorted(PRESETS)}, got "
                             f"{name!r}")
        cls._check_known(changes)
        try:
            return cls(**{**PRESETS[name], **changes})
        except ValueError as e:
            raise ValueError(f"retro preset {name!r} {PRESETS[name]} with options "
                             f"{changes}: {e}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "RetroConfig":
        return dataclasses.replace(self, **changes)

    @property
    def min_indexed_tokens(self) -> int:
        """Shortest sequence that gets an index; shorter ones decode densely."""
        return self.sink_tokens + self.recent_tokens + self.segment_size
