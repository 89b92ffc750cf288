"""The wave buffer's GPU cluster cache: hot pages of the host mirror kept in HBM.

Unit: a **page** of the cluster-ordered mirror (:mod:`.host_mirror`): the
``block_size`` (16) tokens of one (request, layer, KV head) at the positions of one
logical block (cluster-ordered per head by the index build), i.e. 16 consecutive
rows of the mirror, which is a run of whole and partial clusters. A page is named
by the index-pool page of its logical block (``ibt[row, block - sink_end / bs]``).
A retrieved cluster of ``s`` tokens starting at logical position ``a`` is read from
the pages of blocks ``a // 16 .. (a + s - 1) // 16``. Why pages and not one slot per cluster:

* fixed-size slots with no waste inside them: every mirrored token is in exactly
  one page, whereas cluster sizes vary (k-means gives 1 to hundreds of tokens for a
  mean of 16), so per-cluster slots must be sized for the largest cluster or split
  anyway;
* the key space is the index's own: one page per index-pool page (a clustered
  block of some request), so the lookup table has the shape of the summaries
  (``[num_pages, layers, H]``: 8 B per entry, independent of ``max_num_seqs`` and
  ``max_model_len``) and a key is computed from the pool page, not searched;
* a page is 16 rows x 2D elements (8 KiB in bf16 at D=128): one contiguous copy
  from the pinned arena.
The price: a cluster that straddles a page boundary reads one more page (on
average ``(s + 15) / s`` pages per cluster token: ~1.9x the exact bytes for
``s = 16``); the neighbouring clusters' rows come along and stay cached.

Bookkeeping lives on the device and is updated by fixed-shape batched tensor ops
(gathers, scatters, a sort of the batch, one ``topk``): nothing on the lookup or
admission path reads a value back to the host, so it can run inside CUDA graphs
and overlaps with compute.

Policy: LRU by last-use step stamps. :meth:`ClusterCache.lookup` stamps the slots
it hits with the current step; :meth:`ClusterCache.admit`, called after the step
used the pages (admission after use: the step read its misses from the host
mirror), installs each distinct absent key, in ascending key order, into the
least recently used slot not used in this step (ties: lower slot), while such slots
remain; the others are not admitted this step. Exception, while the cache has
never filled: admission takes never-used slots, in order, from a device counter
(``fill``) instead of running the LRU selection (a ``topk`` over millions of
stamps) every step; it does so while the host's last view of ``fill`` plus the
step's admission bound fits in the cache (slots past the end are not taken).
Slots that :meth:`ClusterCache.invalidate_pages` frees in that phase wait until
the LRU selection takes over.

Admission is best effort, and that keeps it off the host's critical path: a key
not admitted in its step misses again later and is recorded again. So the engine
bounds a step's admission by the miss counts of earlier steps that have already
reached the host (:meth:`ClusterCache.miss_limit`, copied through pinned memory
after each step: no sync), and skips it when those steps had no misses, the
steady state of a warm cache. Keys hold the pool page, and
:meth:`ClusterCache.invalidate_pages` drops every entry (and pending miss) of a
leaving request's pages before the allocator hands them on, so a request never
reads another's pages.

Decode integration (design §8.3 step 2): :meth:`ClusterCache.view` hands a layer's
addresses and bookkeeping tensors to the decode kernels
(:class:`~vllm_retro.kernels.wave_view.WaveBufferView`), which do the lookup on the
device: per retrieved page below a row's horizon the cached page (hit: stamped,
counted) or the arena rows (miss: counted, its key appended to the cache's miss
buffer) is read. Per decode step the caller then runs, after every layer's attention,
:meth:`ClusterCache.admit_misses` (admission after use, all layers at once) and
:meth:`ClusterCache.next_step`. The kernel builds a key from the pool page it
reads in the row's index table (the header's ``HDR_IBT_ROW``) at the position's
logical block.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from ..kernels.wave_view import W_HITS, W_MISSES, WaveBufferView
from ..transfer import to_device
from .host_mirror import HostMirror

def _triton_interpreting() -> bool:
    """Triton's CPU interpreter is on and the page-copy kernel was defined for it."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return False
    try:
        from .triton_page_copy import interpreting
    except ImportError:
        return False
    return interpreting()


# Counter tensor columns (hits and misses are also what the attention kernel adds
# to, through the wave buffer view).
C_HITS, C_MISSES, C_ADMITTED, C_EVICTED = W_HITS, W_MISSES, 2, 3
# Default capacity of the per-step miss buffer (keys, all layers of a step): 512 KiB;
# misses past it are counted but not admitted this step (they miss again later).
# Admission's work scales with the misses the engine bounds it by (miss_limit), not
# with the capacity, and is skipped when a step had none (a warm cache at 128K x 8 on
# the H200: 0 misses per step once every request decodes). A newly mirrored
# request's cold start (~30K missed page visits per step at 128K, each read over PCIe
# until admitted) warms in fewer steps with a larger buffer.
DEFAULT_MISS_CAPACITY = 1 << 16


class _HostCopies:
    """A device scalar's values, copied to the host after the fact without a sync:
    :meth:`record` queues a copy into pinned memory (stream-ordered, with an event on
    CUDA); :meth:`latest` returns the most recent recorded value whose copy has
    completed (0 before any). On the CPU a copy completes at once, so ``latest``
    returns the previous record's value there too: the same one-step lag at least."""

    RING = 4

    def __init__(self, device: torch.device) -> None:
        cuda = device.type == "cuda"
        self._buf = torch.zeros(self.RING, dtype=torch.int64, device="cpu", pin_memory=cuda)
        self._pending: list = []          # (buffer index, event or None), oldest first
        self._next = 0
        self._value = 0

    def _poll(self) -> None:
        while self._pending and (self._pending[0][1] is None or self._pending[0][1].query()):
            j, _ = self._pending.pop(0)
            self._value = int(self._buf[j])

    def latest(self) -> int:
        self._poll()
        return self._value

    def record(self, value: torch.Tensor) -> None:
        self._poll()
        if len(self._pending) == self.RING:
            return          # the device is RING steps behind: keep the older values
        j = self._next % self.RING
        self._next += 1
        self._buf[j:j + 1].copy_(value.reshape(1), non_blocking=value.is_cuda)
        ev = None
        if value.is_cuda:
            ev = torch.cuda.Event()
            ev.record()
        self._pending.append((j, ev))


class ClusterCache:
    """Fixed slots of one page each, a device lookup table and LRU stamps.

    Args:
        num_slots: pages the cache holds (``slots_for_bytes`` turns GiB into slots).
        key_shape: ``(num_pages, num_layers, num_kv_heads)``, the mirror's table
            shape (``num_pages``: the index pool's); a key is the flat index into it.
        page_tokens: tokens per page (the KV block size).
        head_dim, dtype, device: of the cached K/V.
        miss_capacity: keys the per-step miss buffer holds (the attention kernel's
            misses of one step, all layers; see :meth:`view`).
    """

    def __init__(self, num_slots: int, key_shape: Tuple[int, int, int],
                 page_tokens: int, head_dim: int, dtype: torch.dtype, device="cpu",
                 miss_capacity: int = DEFAULT_MISS_CAPACITY):
        if num_slots <= 0:
            raise ValueError(f"ClusterCache: num_slots must be positive, got {num_slots}")
        self.num_slots = int(num_slots)
        self.key_shape = tuple(int(x) for x in key_shape)
        if len(self.key_shape) != 3:
            raise ValueError(f"ClusterCache: key_shape must be (pages, layers, heads), got "
                             f"{self.key_shape}")
        self.num_keys = 1
        for x in self.key_shape:
            self.num_keys *= x
        self.page_tokens = page_tokens
        self.device = torch.device(device)
        s = self.num_slots
        # One extra slot and one extra table entry absorb the scatters of rows that
        # must not write (padding, hits, keys not admitted): fixed shapes, no masks
        # that would need their count on the host.
        self.kv = torch.zeros(s + 1, page_tokens, 2 * head_dim, dtype=dtype, device=device)
        self.table = torch.full((self.num_keys + 1,), -1, dtype=torch.int64, device=device)
        self.slot_key = torch.full((s + 1,), -1, dtype=torch.int64, device=device)
        self.stamp = torch.full((s + 1,), -1, dtype=torch.int64, device=device)
        self.clock = torch.zeros((), dtype=torch.int64, device=device)
        self.counters = torch.zeros(4, dtype=torch.int64, device=device)
        self._slot_ids = torch.arange(s, dtype=torch.int64, device=device)
        if miss_capacity <= 0:
            raise ValueError(f"ClusterCache: miss_capacity must be positive, got "
                             f"{miss_capacity}")
        # Allocated once (fixed addresses for CUDA graphs), shared by every layer's view.
        self.miss_keys = torch.full((int(miss_capacity),), -1, dtype=torch.int64,
                                    device=device)
        self.miss_count = torch.zeros(1, dtype=torch.int64, device=device)
        self._miss_ids = torch.arange(int(miss_capacity), dtype=torch.int64, device=device)
        self._miss_counts = _HostCopies(self.device)
        # Slots [0, fill) have been handed out in order (never-used slots come from
        # here while the cache has never filled); _fills: its values on the host.
        self._fill = torch.zeros((), dtype=torch.int64, device=device)
        self._fills = _HostCopies(self.device)
        self._lru = False       # the LRU selection has taken over (for good)

    @classmethod
    def for_mirror(cls, mirror: HostMirror, num_slots: int,
                   miss_capacity: int = DEFAULT_MISS_CAPACITY) -> "ClusterCache":
        sh = mirror.shape
        return cls(num_slots, (sh.num_pages, sh.num_layers, sh.num_kv_heads), sh.block_size,
                   sh.head_dim, sh.dtype, mirror.device, miss_capacity)

    @staticmethod
    def slots_for_bytes(nbytes: int, page_tokens: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        """Slots that ``nbytes`` of HBM hold (page data only; the bookkeeping adds
        16 B per slot and 8 B per key)."""
        es = torch.empty((), dtype=dtype).element_size()
        return int(nbytes) // (page_tokens * 2 * head_dim * es)

    @property
    def page_bytes(self) -> int:
        return self.kv[0].numel() * self.kv.element_size()

    # ------------------------------------------------------------------ keys
    def keys(self, page, layer, head) -> torch.Tensor:
        """Flat keys of (pool page, layer, head) (broadcasting tensors or ints)."""
        _, nl, nh = self.key_shape
        t = lambda x: torch.as_tensor(x, dtype=torch.int64, device=self.device)  # noqa: E731
        return (t(page) * nl + t(layer)) * nh + t(head)

    def next_step(self) -> None:
        """Advances the LRU clock (once per decode step, on the device)."""
        self.clock += 1

    # ------------------------------------------------------------ decode view
    def view(self, mirror: HostMirror, layer: int) -> WaveBufferView:
        """Layer ``layer``'s view for the decode attention kernel
        (:func:`vllm_retro.kernels.paged_decode_attention`'s ``wave``): the
        mirror's arena and page table, this cache's table, pages, stamps, clock,
        counters and miss buffer (no copies: the kernel updates the bookkeeping
        in place). Keys are pool pages. Per decode step, after every layer:
        :meth:`admit_misses`, then :meth:`next_step`."""
        sh = mirror.shape
        ks = (sh.num_pages, sh.num_layers, sh.num_kv_heads)
        if ks != self.key_shape:
            raise ValueError(f"ClusterCache.view: mirror key shape {ks} != cache "
                             f"{self.key_shape}")
        if not 0 <= layer < sh.num_layers:
            raise ValueError(f"ClusterCache.view: layer {layer} outside "
                             f"[0, {sh.num_layers})")
        return WaveBufferView(
            arena=mirror.arena, page_row=mirror.page_row, cache_table=self.table,
            cache_kv=self.kv, cache_stamp=self.stamp, clock=self.clock,
            counters=self.counters, miss_keys=self.miss_keys, miss_count=self.miss_count,
            layer=int(layer), num_pages=ks[0], num_layers=ks[1], num_kv_heads=ks[2])

    def admit_misses(self, mirror: HostMirror, limit: Optional[int] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Admits the page keys the attention kernels recorded as misses this step
        (all layers), then empties the buffer. No host sync: entries at index
        ``>= miss_count`` are masked to -1 before :meth:`admit` (which drops
        duplicates, hits and unmirrored pages).

        ``limit``: the buffer entries considered (the rest are dropped: those pages
        miss again and are recorded again); None: the whole buffer. The engine
        passes :meth:`miss_limit`. Returns :meth:`admit`'s (empty when ``limit``
        is 0)."""
        cap = self.miss_keys.numel()
        n = cap if limit is None else max(0, min(int(limit), cap))
        if n:
            keys = torch.where(self._miss_ids[:n] < self.miss_count, self.miss_keys[:n], -1)
            out = self.admit(keys, mirror)
        else:
            out = (self.miss_keys[:0].clone(), self.miss_keys[:0].clone())
        self._miss_counts.record(self.miss_count)
        self.miss_count.zero_()
        return out

    def miss_limit(self, floor: int = 256) -> int:
        """A bound for :meth:`admit_misses` that needs no host sync: the miss count
        of the latest step whose count has reached the host (one or two steps back
        on a GPU with asynchronous scheduling), rounded up to a power of two of at
        least ``floor``, at most the buffer's capacity; 0 when that step had no
        misses (or no step has been recorded yet)."""
        last = self._miss_counts.latest()
        if last <= 0:
            return 0
        return min(self.miss_keys.numel(), max(floor, 1 << (int(last) - 1).bit_length()))

    # ---------------------------------------------------------------- lookup
    def lookup(self, keys: torch.Tensor) -> torch.Tensor:
        """Slots holding ``keys`` (``[N]`` int64, -1: padding), -1 for misses.
        Stamps the hit slots with the current step and counts hits and misses
        (padding is not counted)."""
        keys = keys.reshape(-1)
        valid = keys >= 0
        slot = torch.where(valid, self.table[keys.clamp_min(0)], -1)
        hit = slot >= 0
        self.stamp.scatter_(0, torch.where(hit, slot, self.num_slots),
                            self.clock.expand_as(slot))
        self.stamp[self.num_slots:].fill_(-1)
        self.counters[C_HITS] += hit.sum()
        self.counters[C_MISSES] += (valid & ~hit).sum()
        return slot

    # ------------------------------------------------------------- admission
    def admit(self, keys: torch.Tensor, mirror: HostMirror,
              copy: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
        """Admits the distinct absent ``keys`` (after the step used them) and copies
        their pages from the mirror.

        Returns ``(slots, rows)``, ``[N]`` int64 each, per position of the sorted
        keys: the slot a key was installed in and the arena row of its page, -1
        where nothing was installed (hits, duplicates, padding, unmirrored pages,
        no LRU slot left this step). With ``copy=False`` the pages are *not* copied:
        the caller fills ``kv[slots[i]]`` from ``arena[rows[i]:]`` before any lookup
        reads them (fused admission: the kernel that reads a missed page from the
        arena also writes it into its slot, so a miss crosses PCIe once)."""
        keys = keys.reshape(-1).to(self.table.device)
        n, s = keys.numel(), self.num_slots
        if n == 0:
            return keys.clone(), keys.clone()
        none = self.num_keys                 # sorts after every real key
        kc = keys.clamp_min(0)
        # Candidates: valid, absent, and mirrored (a page the mirror does not hold
        # yet cannot be filled; it is read from the KV pages).
        want = (keys >= 0) & (self.table[kc] < 0) & (mirror.page_row.view(-1)[kc] >= 0)
        mk = torch.where(want, keys, none)
        srt, _ = torch.sort(mk)
        first = srt != torch.roll(srt, 1)
        first[:1].fill_(True)   # (an element assignment copies from the host: a sync)
        first &= srt != none
        rank = torch.cumsum(first.to(torch.int64), 0) - 1
        k = min(n, s)
        fresh = not self._lru and self._fills.latest() + k <= s
        self._lru = not fresh
        if fresh:
            # Never-used slots, in order. The host's fill may be stale (lower): past
            # the end nothing is taken this step.
            cand = self._fill + self._slot_ids[:k]
            ok = cand < s
            cand = cand.clamp_max(s - 1)
        else:
            # LRU order: stamp, then slot. Stamps are unique per slot once combined
            # with the slot id, so topk's order is deterministic.
            order_key = self.stamp[:s] * s + self._slot_ids
            cand = torch.topk(order_key, k, largest=False, sorted=True).indices
            ok = self.stamp[cand] < self.clock          # a prefix: stamps ascend
        r = rank.clamp(0, k - 1)
        rows = mirror.page_row.view(-1)[srt.clamp(0, self.num_keys - 1)].to(torch.int64)
        take = first & (rank < k) & ok[r]
        victim = torch.where(take, cand[r], s)
        old = self.slot_key[victim]
        self.table.scatter_(0, torch.where(take & (old >= 0), old, none),
                            torch.full_like(old, -1))
        self.table.scatter_(0, torch.where(take, srt, none), victim)
        self.table[none:].fill_(-1)
        self.slot_key.scatter_(0, victim, torch.where(take, srt, -1))
        self.stamp.scatter_(0, victim, self.clock.expand_as(victim))
        self.slot_key[s:].fill_(-1)
        self.stamp[s:].fill_(-1)
        n_take = take.sum()
        self.counters[C_ADMITTED] += n_take
        self.counters[C_EVICTED] += (take & (old >= 0)).sum()
        if fresh:
            # The taken keys' ranks are 0 .. n_take - 1: slots fill .. fill + n_take - 1.
            self._fill += n_take
            self._fills.record(self._fill)
        if copy:
            self._copy_pages(mirror, torch.where(take, rows, 0), victim, take)
        return torch.where(take, victim, -1), torch.where(take, rows, -1)

    def _copy_pages(self, mirror: HostMirror, rows: torch.Tensor, victim: torch.Tensor,
                    take: torch.Tensor) -> None:
        """``kv[victim[i]] = arena[rows[i] : rows[i] + page_tokens]`` where ``take``.

        A CUDA cache reads the pinned arena from a Triton kernel (zero-copy: the
        rows were computed on the device and are never read back); so does a CPU
        cache while Triton's interpreter is on (tests). Otherwise torch ops, with
        the scratch slot taking the entries not admitted."""
        if self.kv.is_cuda or _triton_interpreting():
            from .triton_page_copy import copy_pages
            copy_pages(mirror.arena, self.kv, rows, torch.where(take, victim, -1))
            return
        arena = mirror.arena
        idx = rows.unsqueeze(1) + torch.arange(self.page_tokens, device=rows.device)
        self.kv.index_copy_(0, victim, arena[idx.reshape(-1)].view(
            -1, self.page_tokens, self.kv.shape[-1]))

    # -------------------------------------------------------------- isolation
    def invalidate_pages(self, pages) -> None:
        """Drops every entry of the index-pool ``pages`` (all layers and heads; a
        sequence or tensor of ints): a leaving request's pages (finish, abort,
        preemption), before the allocator hands them to another request. Their
        slots become the least recently used. Device ops, no host sync."""
        pg = to_device(pages, torch.int64, self.device).reshape(-1)
        if pg.numel() == 0:
            return
        num_pages = self.key_shape[0]
        per_page = self.num_keys // num_pages
        # A page mask looked up per key (torch.isin would sort and read a size back):
        # a key's page is key // per_page; -1 (empty slot, padding) reads the extra
        # entry, which stays False.
        drop = torch.zeros(num_pages + 1, dtype=torch.bool, device=self.device)
        drop.index_fill_(0, pg, True)

        def of_freed(keys: torch.Tensor) -> torch.Tensor:
            page = torch.div(keys, per_page, rounding_mode="floor")
            return drop[torch.where(keys >= 0, page, num_pages)]
        mine = of_freed(self.slot_key)
        self.slot_key.masked_fill_(mine, -1)
        self.stamp.masked_fill_(mine, -1)
        self.table[:-1].view(num_pages, per_page).index_fill_(0, pg, -1)
        # Pending misses of the freed pages must not be admitted for their next owner.
        self.miss_keys.masked_fill_(of_freed(self.miss_keys), -1)

    # ---------------------------------------------------------------- reading
    def read_pages(self, keys: torch.Tensor, mirror: HostMirror,
                   slots: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[N, page_tokens, 2D]``: each key's page from its cache slot where it is
        cached (``slots`` from :meth:`lookup`, looked up here if None), else from
        the mirror: what the decode kernels read for a retrieved cluster's pages.
        Same-device arena only (CPU tests)."""
        keys = keys.reshape(-1)
        if slots is None:
            slots = torch.where(keys >= 0, self.table[keys.clamp_min(0)], -1)
        rows = mirror.page_row.view(-1)[keys.clamp_min(0)].to(torch.int64)
        idx = rows.clamp_min(0).unsqueeze(1) + torch.arange(self.page_tokens,
                                                            device=rows.device)
        host = mirror.arena[idx.reshape(-1)].view(-1, self.page_tokens, self.kv.shape[-1])
        cached = self.kv[slots.clamp_min(0)]
        return torch.where((slots >= 0).view(-1, 1, 1), cached, host)

    def stats(self) -> dict:
        """Counters read back to the host (for the stats line; synchronises)."""
        h, m, a, e = (int(x) for x in self.counters.tolist())
        return {"hits": h, "misses": m, "admitted": a, "evicted": e,
                "hit_rate": h / (h + m) if h + m else 0.0}
