"""Exact prefill attention for a request whose early blocks were released (wave buffer).

A prompt larger than the KV cache (design §8.2: a 1M-token request) is clustered,
mirrored to host memory and released *while* it is prefilled: the tokens more than
``prefill_resident_tokens`` behind the prefill front leave vLLM's GPU blocks. The
later chunks must still attend to every earlier token exactly. Per chunk and layer,
:func:`released_prefill_attention` splits a prefill row's keys into

* the **resident** part: the sinks and everything from the row's horizon on,
  attended causally through a *compacted* block table (the released entries cut
  out, so the kernel never reads a block another request now owns); all prefill
  rows in one call;
* the **released** part ``[sink_end, horizon)``: read back from the host mirror in
  pieces (one copy per mirrored segment), attended without a causal mask (every
  released token precedes the chunk);

and merges the partial results by their log-sum-exp in float32. Bytes over PCIe
per chunk and layer: the released tokens' K/V once (``2 * H * D`` elements per
token), whatever the chunk's length.

The two attention calls are passed in (``paged_attn``, ``dense_attn``): vLLM's
FlashAttention on the GPU (``backend/gpu.py``), torch references in the CPU
tests, which check the result against float64 full attention over the cache
before its release.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Sequence, Tuple

import torch

__all__ = ["ReleasedRow", "compact_block_table", "merge_partial_",
           "released_prefill_attention", "reference_paged_attn",
           "reference_dense_attn"]


@dataclass(frozen=True)
class ReleasedRow:
    """A prefill row whose tokens ``[sink_end, horizon)`` are read from the mirror.

    row: index among the step's prefill rows; slot: the request's mirror slot (its
    index-table row); horizon: block-aligned, at most the row's first query
    position."""

    row: int
    slot: int
    horizon: int


def compact_block_table(block_table: torch.Tensor, seq_lens: torch.Tensor,
                        rows: Sequence[ReleasedRow], sink_end: int,
                        block_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The prefill rows' block table and key counts with each released row's
    blocks ``[sink_end, horizon)`` cut out (its later blocks moved left), so a
    causal kernel sees the sinks followed by the resident tokens: the chunk's
    queries stay aligned with the last keys, as the bottom-right causal mask
    needs. Rows not in ``rows`` are unchanged. Device ops only."""
    bt = block_table.clone()
    sl = seq_lens.clone()
    sb = sink_end // block_size
    width = bt.shape[1]
    for r in rows:
        shift = (r.horizon - sink_end) // block_size
        if shift <= 0:
            continue
        bt[r.row, sb:width - shift] = block_table[r.row, sb + shift:]
        sl[r.row] -= shift * block_size
    return bt, sl


def merge_partial_(acc: torch.Tensor, lse: torch.Tensor, part: torch.Tensor,
                   part_lse: torch.Tensor) -> None:
    """In place: ``acc``/``lse`` (the normalised attention over one key set and its
    log-sum-exp) become those over the union with ``part``'s key set.

    ``acc``: ``[L, Hq, D]`` float32 (float64 in checks); ``lse``: ``[Hq, L]``, the
    same dtype; ``part``: ``[L, Hq, D]`` (any float dtype); ``part_lse``: ``[Hq, L]``.
    Float32 at least:
    vLLM's ``merge_attn_states`` writes in the inputs' dtype, so chaining many
    pieces through it would round to bf16 at every piece."""
    pl = part_lse.to(lse.dtype)
    m = torch.maximum(lse, pl)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    a = torch.exp(lse - m)
    b = torch.exp(pl - m)
    s = a + b
    wa = (a / s).transpose(0, 1).unsqueeze(-1)
    wb = (b / s).transpose(0, 1).unsqueeze(-1)
    acc.mul_(wa).add_(part.to(acc.dtype) * wb)
    lse.copy_(m + torch.log(s))


PagedAttn = Callable[..., Tuple[torch.Tensor, torch.Tensor]]
DenseAttn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]


def released_prefill_attention(query: torch.Tensor, query_start: Sequence[int],
                               block_table: torch.Tensor, seq_lens: torch.Tensor,
                               rows: Sequence[ReleasedRow], mirror, layer: int,
                               sink_end: int, block_size: int, paged_attn: PagedAttn,
                               dense_attn: DenseAttn, staging, out: torch.Tensor,
                               compacted=None) -> torch.Tensor:
    """Prefill attention of the step's prefill rows, some with released tokens.

    query: ``[T, Hq, D]`` the prefill rows' queries; query_start: ``[R + 1]`` host
    ints (row ``r``'s queries are ``query[query_start[r]:query_start[r + 1]]``);
    block_table ``[R, W]`` / seq_lens ``[R]``: vLLM's, on the device; rows: the
    released rows; mirror: the :class:`~vllm_retro.memory.host_mirror.HostMirror`
    holding them; layer: the mirror's layer index; staging: ``(raw, k, v)`` device
    buffers for one piece (:meth:`HostMirror.load_piece`); out: ``[T, Hq, D]``.
    ``paged_attn(query, block_table, seq_lens)`` -> ``(o [T, Hq, D], lse [Hq, T])``
    is causal attention over the paged cache; ``dense_attn(q, k, v)`` -> ``(o, lse)``
    attention of ``q [L, Hq, D]`` to all of ``k``/``v [n, H, D]``. compacted: the
    step's :func:`compact_block_table` result (computed here if None; the caller
    computes it once per step for all layers).
    """
    if compacted is None:
        compacted = compact_block_table(block_table, seq_lens, rows, sink_end, block_size)
    bt, sl = compacted
    o, lse_all = paged_attn(query, bt, sl)
    out.copy_(o)
    raw, kbuf, vbuf = staging
    acc_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    piece_tokens = kbuf.shape[0]
    for r in rows:
        q0, q1 = int(query_start[r.row]), int(query_start[r.row + 1])
        if q1 <= q0 or r.horizon <= sink_end:
            continue
        q = query[q0:q1]
        acc = o[q0:q1].to(acc_dtype)
        lse = lse_all[:, q0:q1].to(acc_dtype).contiguous()
        for piece in mirror.zone_pieces(r.slot, layer, sink_end, r.horizon, piece_tokens):
            k, v = mirror.load_piece(piece, raw, kbuf, vbuf)
            po, plse = dense_attn(q, k, v)
            merge_partial_(acc, lse, po, plse)
        out[q0:q1].copy_(acc)
    return out


# ------------------------------------------------------------ torch references
def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
            mask=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """q ``[L, Hq, D]``, k/v ``[n, H, D]`` -> (o ``[L, Hq, D]``, lse ``[Hq, L]``), in
    q's dtype's precision (float64 for checks)."""
    hq, h = q.shape[1], k.shape[1]
    g = hq // h
    kk = k.to(q.dtype).repeat_interleave(g, dim=1)            # [n, Hq, D]
    vv = v.to(q.dtype).repeat_interleave(g, dim=1)
    s = torch.einsum("lhd,nhd->hln", q, kk) * scale          # [Hq, L, n]
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)                          # [Hq, L]
    p = torch.exp(s - lse.unsqueeze(-1))
    o = torch.einsum("hln,nhd->lhd", p, vv)
    return o, lse


def reference_paged_attn(kv_cache: torch.Tensor, query_start: Sequence[int],
                         scale: float, dtype=torch.float64):
    """A torch twin of the paged causal call: ``kv_cache`` ``[NB, H, bs, 2D]``
    (vLLM's FlashAttention layout); bottom-right causal per row."""
    d = kv_cache.shape[-1] // 2
    bs = kv_cache.shape[2]

    def attn(query, block_table, seq_lens):
        outs, lses = [], []
        sl = seq_lens.tolist()
        for r in range(len(sl)):
            q0, q1 = int(query_start[r]), int(query_start[r + 1])
            n = int(sl[r])
            nb = -(-n // bs)
            blocks = kv_cache[block_table[r, :nb].long()]          # [nb, H, bs, 2D]
            kv = blocks.permute(0, 2, 1, 3).reshape(nb * bs, -1, 2 * d)[:n]
            q = query[q0:q1].to(dtype)
            L = q1 - q0
            qpos = torch.arange(n - L, n).unsqueeze(1)
            mask = torch.arange(n).unsqueeze(0) <= qpos             # [L, n]
            o, lse = _attend(q, kv[..., :d], kv[..., d:], scale, mask.unsqueeze(0))
            outs.append(o)
            lses.append(lse)
        return torch.cat(outs), torch.cat(lses, dim=1)
    return attn


def reference_dense_attn(scale: float, dtype=torch.float64):
    """A torch twin of the dense, non-causal call."""
    def attn(q, k, v):
        return _attend(q.to(dtype), k, v, scale)
    return attn
