"""What the decode kernels see of the wave buffer (design §8.1, §8.3 step 2).

Role: one layer's read-only addresses of the host mirror and the GPU cluster
cache, plus the cache's bookkeeping tensors the decode kernels update, handed
across the ``kernels/`` boundary as plain tensors. ``kernels/`` never imports
``memory/``; the memory side builds the view (``ClusterCache.view``).

Below a row's mirrored horizon (header word ``HDR_HORIZON``), vLLM may have
released the row's blocks and handed them to another request, so the attention
kernel reads a retrieved cluster's token at logical position ``pos`` from:

1. the cluster cache slot ``cache_table[key]`` (``>= 0``: a hit), token
   ``cache_kv[slot, pos % bs]``;
2. else the pinned host arena row ``page_row.view(-1)[key] + pos % bs`` (a miss,
   read zero-copy);
3. else nowhere: the page was not mirrored (a broken promise), the token is left
   out rather than read from a released block.

with the flat key ``key = (page * num_layers + layer) * H + head``, where ``page =
ibt[row, pos // bs - sink_end // bs]`` is the index-pool page of the position's
logical block (``row``: the header's ``HDR_IBT_ROW``; a page outside ``[0, P)``:
no page, read as not mirrored). Keyed by pool page, not by (request slot, logical
block): every mirrored block below a horizon has a pool page of its own, so the
tables cost 20 B per (pool page, layer, KV head), independent of ``max_num_seqs``
and ``max_model_len``. A pool page goes to another request once its own leaves,
so the owner clears a leaving request's pages in the mirror and the cache before
the allocator can hand them on (``ClusterCache.invalidate_pages``).

Bookkeeping (in the resolve kernel before attention, once per visit of a page by a retrieved
cluster of a (row, KV head), i.e. per distinct (row, head, cluster, page) with at
least one token of the cluster below the horizon in that page): a hit stamps its
slot with ``clock`` (LRU) and adds one to ``counters[W_HITS]``; a miss on a
mirrored page adds one to ``counters[W_MISSES]`` and appends its key to
``miss_keys`` (atomically reserved index ``miss_count``; keys past the capacity
are dropped, ``miss_count`` keeps counting). Pages not mirrored count as neither.
The owner admits the recorded keys after the step (``ClusterCache.admit_misses``)
and advances ``clock`` once per decode step (``ClusterCache.next_step``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Columns of ``counters`` the attention kernel adds to (the cluster cache's
# C_HITS, C_MISSES; it owns the others).
W_HITS, W_MISSES = 0, 1


@dataclass
class WaveBufferView:
    """One layer's view of the wave buffer (see the module doc).

    Tensors (fixed addresses: a CUDA graph captures them):

    * ``arena`` ``[rows, 2D]``: the host mirror, pinned and mapped on CUDA (read
      through its UVA address), a plain CPU tensor in tests; KV dtype.
    * ``page_row`` ``[P, L, H]`` int32: arena row of the ``bs`` tokens (of one
      layer and head) of the logical block whose index lives at pool page ``p``;
      -1: not mirrored.
    * ``cache_table`` ``[P*L*H + 1]`` int64: cache slot of a page key, -1.
    * ``cache_kv`` ``[slots + 1, bs, 2D]``: the cached pages (KV dtype).
    * ``cache_stamp`` ``[slots + 1]`` int64: last step a slot was used.
    * ``clock`` ``[]`` int64: the current step. ``counters`` ``[>=2]`` int64.
    * ``miss_keys`` ``[cap]`` int64, ``miss_count`` ``[1]`` int64: this step's
      missed page keys (shared by every layer's view of one cache).

    ``layer``: the layer this view serves; ``num_pages``, ``num_layers``,
    ``num_kv_heads``: the key shape (P, L, H), P the index pool's page count.
    """

    arena: torch.Tensor
    page_row: torch.Tensor
    cache_table: torch.Tensor
    cache_kv: torch.Tensor
    cache_stamp: torch.Tensor
    clock: torch.Tensor
    counters: torch.Tensor
    miss_keys: torch.Tensor
    miss_count: torch.Tensor
    layer: int
    num_pages: int
    num_layers: int
    num_kv_heads: int

    @property
    def num_keys(self) -> int:
        return self.num_pages * self.num_layers * self.num_kv_heads

    @property
    def miss_capacity(self) -> int:
        return self.miss_keys.numel()

    def key(self, page: int, head: int) -> int:
        """Flat key of (index-pool page, this layer, head)."""
        return (page * self.num_layers + self.layer) * self.num_kv_heads + head

    def check(self, kv_cache: torch.Tensor, num_kv_heads: int, block_size: int,
              head_dim: int, pool_pages: int, devices: bool = True) -> None:
        """Raises ValueError unless the view fits a layer of this layout (dtypes,
        shapes, contiguity the kernels assume, layer range, keys over the index
        pool's ``pool_pages``) and, with ``devices``,
        lives where a kernel over ``kv_cache`` can read it (the twin, which copies
        what it reads to the host, skips that)."""
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"wave buffer view: {what}")

        p, nl, h = self.num_pages, self.num_layers, self.num_kv_heads
        need(min(p, nl, h) > 0, f"key shape {(p, nl, h)} must be positive")
        need(h == num_kv_heads, f"{h} KV heads, the layer has {num_kv_heads}")
        need(0 <= self.layer < nl, f"layer {self.layer} outside [0, {nl})")
        dt, row = kv_cache.dtype, 2 * head_dim
        a = self.arena
        need(a.dim() == 2 and a.shape[1] == row and a.stride(1) == 1,
             f"arena must be [rows, {row}] with unit stride along dim 1, got "
             f"{tuple(a.shape)} strides {a.stride()}")
        need(a.dtype == dt, f"arena dtype {a.dtype} != KV cache dtype {dt}")
        need(not devices or a.is_cuda or not kv_cache.is_cuda or a.is_pinned(),
             "a CUDA KV cache needs the arena on the GPU or pinned (mapped) host memory")
        pr = self.page_row
        need(pr.dtype == torch.int32 and tuple(pr.shape) == (p, nl, h)
             and pr.is_contiguous(),
             f"page_row must be contiguous int32 {(p, nl, h)}, got {pr.dtype} "
             f"{tuple(pr.shape)}")
        ct = self.cache_table
        need(ct.dtype == torch.int64 and ct.dim() == 1 and ct.numel() == self.num_keys + 1
             and ct.is_contiguous(),
             f"cache_table must be contiguous int64 [{self.num_keys + 1}], got {ct.dtype} "
             f"{tuple(ct.shape)}")
        ck = self.cache_kv
        need(ck.dim() == 3 and ck.shape[1:] == (block_size, row) and ck.stride(2) == 1
             and ck.shape[0] >= 1,
             f"cache_kv must be [slots + 1, {block_size}, {row}] with unit stride along "
             f"dim 2, got {tuple(ck.shape)}")
        need(ck.dtype == dt, f"cache_kv dtype {ck.dtype} != KV cache dtype {dt}")
        st = self.cache_stamp
        need(st.dtype == torch.int64 and st.dim() == 1 and st.numel() == ck.shape[0]
             and st.is_contiguous(), f"cache_stamp must be contiguous int64 "
             f"[{ck.shape[0]}], got {st.dtype} {tuple(st.shape)}")
        for name, t, n in (("clock", self.clock, 1), ("miss_count", self.miss_count, 1)):
            need(t.dtype == torch.int64 and t.numel() == n, f"{name} must be one int64")
        need(self.counters.dtype == torch.int64 and self.counters.dim() == 1
             and self.counters.numel() > W_MISSES and self.counters.is_contiguous(),
             "counters must be contiguous int64 [>= 2]")
        need(self.miss_keys.dtype == torch.int64 and self.miss_keys.dim() == 1
             and self.miss_keys.numel() >= 1 and self.miss_keys.is_contiguous(),
             "miss_keys must be contiguous int64 [cap >= 1]")
        need(p == pool_pages, f"keyed by {p} pool pages, the pool has {pool_pages}")
        need(kv_cache.dim() == 4 and kv_cache.stride(3) == 1,
             "the KV cache needs unit stride along its last dim (the decode kernels "
             "load K/V from the cache, the cluster cache and the arena alike)")
        if not devices:
            return
        dev = kv_cache.device
        for name in ("page_row", "cache_table", "cache_kv", "cache_stamp", "clock",
                     "counters", "miss_keys", "miss_count"):
            need(getattr(self, name).device == dev,
                 f"{name} on {getattr(self, name).device}, the KV cache on {dev}")
