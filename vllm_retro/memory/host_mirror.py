"""The wave buffer's host tier: clustered KV mirrored into a (pinned) host arena.

Once a segment of a request's clustered zone has been indexed in the KV pages
(:mod:`vllm_retro.index.paged`), :meth:`HostMirror.mirror_segment` copies its keys
and values, per layer and KV head, into one host arena **in cluster order**: the
index build has already reordered the segment's K/V per head so that every
cluster occupies consecutive logical positions, so the tokens of a (request,
layer, head, segment) are copied in position order to consecutive arena rows and
every cluster is a contiguous run of rows.
One arena row is one token's ``[K | V]`` of one head (``2 * head_dim`` elements of
the KV dtype), the row of vLLM's page, so a copy moves whole rows.

Two address tables (``[num_pages, num_layers, H]``, indexed like the paged index by
the *index-pool page* of the logical block that holds the entry (``ibt[row, block -
sink_end / bs]``), on the KV cache's device so that decode kernels can read them):

* ``cluster_addr[..., 0:2]``: the arena row of the first token of the cluster whose
  summary lives in that page, and its size (0: empty cluster or not mirrored);
* ``page_row``: the arena row of the 16 (``block_size``) tokens of that page's
  logical block (for that layer and head): a "page" of the cluster-ordered mirror,
  the unit the GPU cluster cache (:mod:`.cluster_cache`) moves (-1: not mirrored).

Keyed by pool page, the tables cost 12 B per (pool page, layer, KV head), whatever
``max_num_seqs`` and ``max_model_len``; a request's pages go back to the pool when
it leaves, so :meth:`HostMirror.free` clears them before they can be reused. The
arena extents are still per *request slot* (the request's index-table row): host
bookkeeping only.

Admission by host memory: a request reserves its arena space before anything is
mirrored (:meth:`HostMirror.reserve`, one contiguous extent, first fit); a request
that cannot get it raises :class:`~vllm_retro.request_store.HostMemoryExceeded`
and nothing is held. Segments are then placed in the request's own extents by a
bump pointer, so a request never fragments the arena by itself; segments beyond
the reservation take a further extent or raise the same error. :meth:`free`
(finish, abort, preemption) returns every byte.

On CUDA the arena is pinned (registered with the driver at its exact size) and
the copies are issued ``non_blocking`` on the current stream: vLLM's later writes into the released blocks are ordered after
them on that stream. On CPU (tests) the arena is a plain tensor.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import os
import weakref
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from ..index.paged import I_SIZE, I_START, IndexPool, PagedIndexLayout
from ..request_store import HostMemoryExceeded
from ..transfer import to_device

__all__ = ["HostMemoryExceeded", "ExtentAllocator", "MirrorShape", "HostMirror",
           "default_host_budget_bytes"]


def default_host_budget_bytes(fraction: float = 0.75) -> int:
    """``fraction`` of the host memory available now (Linux ``MemAvailable``; the
    physical memory where that is unknown): the pinned budget when
    ``host_memory_gib`` is unset. Pinned pages cannot be swapped, so the rest is
    left to the OS, vLLM's own host buffers and the Python processes."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(int(line.split()[1]) * 1024 * fraction)
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * fraction)


def _pinned_arena(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """A page-locked host tensor of exactly this size. Not ``pin_memory=True``:
    torch's pinned allocator rounds every allocation up to a power of two (a
    100 GiB budget would pin 128 GiB, more than the H200 host's 125 GiB). An
    anonymous mapping is registered with the driver instead, portable and mapped,
    so kernels can also read it through its device (UVA) address. The mapping is
    page-aligned: the heap's large blocks start a few bytes into a page, and some
    drivers refuse to map such a range for the device (cudaErrorInvalidValue)."""
    es = torch.empty(0, dtype=dtype).element_size()
    nbytes = rows * cols * es
    page = mmap.PAGESIZE
    buf = mmap.mmap(-1, max(page, -(-nbytes // page) * page),
                    flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    # The tensor keeps the mapping alive (frombuffer holds a reference to it).
    t = torch.frombuffer(buf, dtype=torch.uint8, count=nbytes).view(dtype).view(rows, cols)
    flags = 1 | 2                      # cudaHostRegisterPortable | cudaHostRegisterMapped
    rc = int(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), nbytes, flags))
    if rc != 0:
        _clear_cuda_error()
        raise RuntimeError(f"HostMirror: pinning {nbytes} B of host memory failed "
                           f"(cudaError {rc}); lower host_memory_gib")
    return t


def _clear_cuda_error() -> None:
    """Reset the CUDA runtime's last error after a refused registration: it is
    sticky per thread until read, and the next kernel launch anywhere in the
    process (vLLM's, torch's) would report it as its own failure."""
    path = None
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                name = line.rsplit(None, 1)[-1]
                if "libcudart.so" in os.path.basename(name):
                    path = name
                    break
    except OSError:
        pass
    if path is not None:
        try:
            ctypes.CDLL(path).cudaGetLastError()
            return
        except OSError:
            pass
    # No shared runtime found (statically linked): a launch check reads and clears it.
    try:
        torch.zeros(1, device="cuda").add_(1)
    except Exception:                                  # noqa: BLE001 (the stale error)
        pass


def _unregister(ptr: int) -> None:
    # Runs before the mirror's arena tensor is released (weakref callbacks run
    # before the instance's attributes are cleared).
    torch.cuda.cudart().cudaHostUnregister(ptr)


class ExtentAllocator:
    """First-fit allocator of contiguous row ranges in ``[0, capacity)``.

    Free extents are kept sorted by start and coalesced with their neighbours on
    free, so freeing everything always restores one extent of the full capacity.
    Host-side Python: it runs once per admitted request (and rarely per segment),
    never in a decode step.
    """

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self._starts: List[int] = [0] if capacity > 0 else []
        self._lens: List[int] = [self.capacity] if capacity > 0 else []
        self.in_use = 0
        self._live: Dict[int, int] = {}     # start -> rows of each allocated extent

    def alloc(self, n: int) -> Optional[int]:
        """Start of a free range of ``n`` rows (first fit), or None."""
        if n <= 0:
            raise ValueError(f"ExtentAllocator.alloc: n must be positive, got {n}")
        for i, ln in enumerate(self._lens):
            if ln >= n:
                s = self._starts[i]
                if ln == n:
                    del self._starts[i], self._lens[i]
                else:
                    self._starts[i] += n
                    self._lens[i] -= n
                self.in_use += n
                self._live[s] = n
                return s
        return None

    def free(self, start: int, n: int) -> None:
        # Only whole extents handed out by alloc: a double or partial free would
        # hand rows of a live mirror to another request.
        if self._live.get(start) != n:
            raise ValueError(f"ExtentAllocator.free: [{start}, {start + n}) is not an "
                             "allocated extent")
        del self._live[start]
        i = bisect.bisect_left(self._starts, start)
        self._starts.insert(i, start)
        self._lens.insert(i, n)
        self.in_use -= n
        # Coalesce with the next, then the previous extent.
        if i + 1 < len(self._starts) and start + n == self._starts[i + 1]:
            self._lens[i] += self._lens.pop(i + 1)
            self._starts.pop(i + 1)
        if i > 0 and self._starts[i - 1] + self._lens[i - 1] == start:
            self._lens[i - 1] += self._lens.pop(i)
            self._starts.pop(i)

    @property
    def largest_free(self) -> int:
        return max(self._lens, default=0)

    @property
    def num_free_extents(self) -> int:
        return len(self._lens)


@dataclass(frozen=True)
class MirrorShape:
    """Dimensions of the mirror's address tables and rows."""

    max_requests: int          # request slots (index-table rows): host extents only
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    num_pages: int             # index-pool pages: the device tables' first dimension
    dtype: torch.dtype

    @property
    def row_elems(self) -> int:
        return 2 * self.head_dim

    @property
    def row_bytes(self) -> int:
        return self.row_elems * torch.empty((), dtype=self.dtype).element_size()

    def bytes_per_token(self) -> int:
        """Mirror bytes per clustered token, all layers and KV heads."""
        return self.num_layers * self.num_kv_heads * self.row_bytes

    @classmethod
    def for_layout(cls, layout: PagedIndexLayout, max_requests: int, num_layers: int,
                   num_pages: int) -> "MirrorShape":
        return cls(max_requests, num_layers, layout.num_kv_heads, layout.head_dim,
                   layout.block_size, num_pages, layout.dtype)


@dataclass
class _Request:
    extents: List[Tuple[int, int]]     # (start row, rows), in allocation order
    cursor: int                        # next free row in the last extent
    reserved_rows: int
    used_rows: int = 0
    # Per layer, the mirrored segments in position order: (arena row, p0, p1).
    # Host bookkeeping for reading a released zone back in bulk (prefill), and for
    # refusing a repeated or overlapping segment (rows that would leak until free)
    # without reading the tables back: a segment must start at or after the end of
    # the last one.
    layer_segments: Dict[int, List[Tuple[int, int, int]]] = field(default_factory=dict)

    def layer_end(self, layer: int) -> int:
        segs = self.layer_segments.get(layer)
        return segs[-1][2] if segs else 0


class HostMirror:
    """Per-worker host tier of the wave buffer (see the module doc).

    Args:
        shape: table and row dimensions.
        capacity_bytes: the pinned budget (``host_memory_gib``); the arena holds
            ``capacity_bytes // row_bytes`` rows.
        device: where the address tables live (the KV cache's device).
        pin: pin the arena (default: when CUDA is available).
    """

    def __init__(self, shape: MirrorShape, capacity_bytes: int, device="cpu",
                 pin: Optional[bool] = None):
        self.shape = shape
        self.device = torch.device(device)
        rows = int(capacity_bytes) // shape.row_bytes
        if rows <= 0:
            raise ValueError(f"HostMirror: capacity {capacity_bytes} B holds no row of "
                             f"{shape.row_bytes} B")
        if rows >= 1 << 31:
            raise ValueError(f"HostMirror: {rows} arena rows do not fit the int32 tables")
        if pin is None:
            pin = torch.cuda.is_available()
        if pin:
            self.arena = _pinned_arena(rows, shape.row_elems, shape.dtype)
            weakref.finalize(self, _unregister, self.arena.data_ptr())
        else:
            self.arena = torch.empty(rows, shape.row_elems, dtype=shape.dtype)
        self.alloc = ExtentAllocator(rows)
        s = shape
        tshape = (s.num_pages, s.num_layers, s.num_kv_heads)
        self.cluster_addr = torch.zeros(*tshape, 2, dtype=torch.int32, device=self.device)
        # int32 row numbers: 12 B per table entry (per 16 tokens of a head), and 2^31
        # rows of 512 B (bf16, D=128) are 1 TiB, far above any host's pinned budget.
        self.page_row = torch.full(tshape, -1, dtype=torch.int32, device=self.device)
        self._requests: Dict[int, _Request] = {}

    # ---------------------------------------------------------------- accounting
    @property
    def capacity_bytes(self) -> int:
        return self.alloc.capacity * self.shape.row_bytes

    def bytes_reserved(self) -> int:
        """Arena bytes held by requests (reserved, mirrored or not)."""
        return self.alloc.in_use * self.shape.row_bytes

    def bytes_mirrored(self) -> int:
        return sum(r.used_rows for r in self._requests.values()) * self.shape.row_bytes

    def request_slots(self) -> Tuple[int, ...]:
        return tuple(self._requests)

    def rows_for_tokens(self, num_tokens: int) -> int:
        """Arena rows a request with ``num_tokens`` clustered tokens needs."""
        return num_tokens * self.shape.num_layers * self.shape.num_kv_heads

    def _extent_or_raise(self, slot: int, rows: int, what: str) -> int:
        start = self.alloc.alloc(rows)
        if start is None:
            rb = self.shape.row_bytes
            free = (self.alloc.capacity - self.alloc.in_use) * rb
            raise HostMemoryExceeded(
                f"retro wave buffer: request slot {slot} needs {rows * rb} B of pinned "
                f"host memory ({what}); {free} B of the {self.capacity_bytes} B budget "
                f"are free, the largest free extent is {self.alloc.largest_free * rb} B "
                "(host_memory_gib)")
        return start

    def reserve(self, slot: int, num_tokens: int) -> None:
        """Admits request ``slot`` with room for ``num_tokens`` clustered tokens (all
        layers and KV heads). Raises HostMemoryExceeded, holding nothing, if the
        arena has no free extent that large."""
        if not 0 <= slot < self.shape.max_requests:
            raise ValueError(f"HostMirror: request slot {slot} outside "
                             f"[0, {self.shape.max_requests})")
        if slot in self._requests:
            raise ValueError(f"HostMirror: request slot {slot} is already reserved")
        rows = self.rows_for_tokens(num_tokens)
        if rows == 0:
            self._requests[slot] = _Request([], 0, 0)
            return
        start = self._extent_or_raise(slot, rows, f"{num_tokens} tokens")
        self._requests[slot] = _Request([(start, rows)], start, rows)

    def free(self, slot: int, pages) -> int:
        """Returns every arena row of request ``slot`` and clears the addresses of
        its index-pool ``pages`` (finish, abort, preemption; all the pages its
        index-table row holds, a sequence or tensor of ints). Returns the bytes
        freed (0 if none held). Call it, and invalidate the cluster cache's
        entries of the same pages (:meth:`ClusterCache.invalidate_pages`), before
        the pages go back to the allocator: the next owner of a page must find
        it unmirrored."""
        pg = to_device(pages, torch.long, self.device).reshape(-1)
        if pg.numel():
            # Cleared even for a slot that holds nothing (refused): cheap, and no
            # page leaves here with an address.
            self.cluster_addr.index_fill_(0, pg, 0)
            self.page_row.index_fill_(0, pg, -1)
        req = self._requests.pop(slot, None)
        if req is None:
            return 0
        for start, rows in req.extents:
            self.alloc.free(start, rows)
        return sum(r for _, r in req.extents) * self.shape.row_bytes

    def can_place(self, slot: int, rows: int, times: int) -> bool:
        """Whether ``times`` placements of ``rows`` rows for request ``slot`` (one
        zone of every layer) are likely to fit: the room left in its reservation,
        then free extents (an estimate: fragmentation can still refuse one, which
        :meth:`mirror_segment` reports as HostMemoryExceeded)."""
        req = self._requests.get(slot)
        room = 0
        if req is not None and req.extents and rows > 0:
            s, n = req.extents[-1]
            room = (s + n - req.cursor) // rows
        need = max(0, times - room)
        if need == 0:
            return True
        free = self.alloc.capacity - self.alloc.in_use
        return self.alloc.largest_free >= rows and free >= need * rows

    def _place(self, slot: int, rows: int) -> int:
        """Arena row where ``rows`` consecutive rows of request ``slot`` go."""
        req = self._requests.get(slot)
        if req is None:
            raise ValueError(f"HostMirror: request slot {slot} was not reserved")
        if req.extents:
            s, n = req.extents[-1]
            if req.cursor + rows <= s + n:
                at = req.cursor
                req.cursor += rows
                req.used_rows += rows
                return at
        # Past the reservation (or a tail too short for one segment): a new extent,
        # exactly this segment's size. The unused tail of the previous extent stays
        # with the request until it is freed.
        at = self._extent_or_raise(slot, rows, "a segment beyond its reservation")
        req.extents.append((at, rows))
        req.cursor = at + rows
        req.used_rows += rows
        return at

    # ------------------------------------------------------------------ mirroring
    def mirror_segment(self, slot: int, layer: int, kv_cache: torch.Tensor,
                       layout: PagedIndexLayout, block_ids: torch.Tensor, p0: int,
                       p1: int, pool: IndexPool,
                       seg_pages: torch.Tensor) -> Optional["torch.cuda.Event"]:
        """Copies the clustered segment ``[p0, p1)`` of one layer to the arena.

        ``kv_cache``: the layer's vLLM view ``(NB, H, bs, 2D)``; ``block_ids``: the
        request's physical blocks (a tensor on the cache's device covering ``p1``);
        ``pool`` / ``seg_pages``: the layer's index pool and the segment's pool
        pages (``[(p1 - p0) / bs]``), where
        :func:`~vllm_retro.index.paged.build_segments` has written its index; they
        are also the address tables' keys. Per head, the tokens at logical
        positions ``[p0, p1)`` (cluster-ordered by the build) are read through the
        block table and written to ``H * n`` consecutive rows, head after head;
        then the address tables are written on the device (no host sync). Returns a CUDA event recorded after
        the copy (None on CPU): the GPU blocks may be released once it completed,
        or right away when the release is ordered after it on the same stream.
        """
        s = self.shape
        bs, h, d = s.block_size, s.num_kv_heads, s.head_dim
        n = p1 - p0
        if n <= 0 or p0 % bs or p1 % bs:
            raise ValueError(f"HostMirror.mirror_segment: [{p0}, {p1}) is not a non-empty "
                             f"block-aligned segment")
        if pool.num_pages != s.num_pages:
            raise ValueError(f"HostMirror.mirror_segment: the pool has {pool.num_pages} "
                             f"pages, the mirror's tables {s.num_pages}")
        if len(seg_pages) != n // bs:
            raise ValueError(f"HostMirror.mirror_segment: {len(seg_pages)} pool pages for "
                             f"{n // bs} blocks")
        if (layout.num_kv_heads, layout.head_dim, layout.block_size, layout.dtype) != \
                (h, d, bs, s.dtype):
            raise ValueError("HostMirror.mirror_segment: layout does not match the mirror")
        if not 0 <= layer < s.num_layers:
            raise ValueError(f"HostMirror.mirror_segment: layer {layer} outside "
                             f"[0, {s.num_layers})")
        req = self._requests.get(slot)
        if req is not None and p0 < req.layer_end(layer):
            raise ValueError(f"HostMirror.mirror_segment: [{p0}, {p1}) of layer {layer} "
                             f"starts before the end of its mirrored zone "
                             f"{req.layer_end(layer)} (segments go in position order, once)")
        at = self._place(slot, h * n)
        self._requests[slot].layer_segments.setdefault(layer, []).append((at, p0, p1))
        seg_pb = block_ids.long()[p0 // bs: p1 // bs]                        # [nb]
        kv = kv_cache[seg_pb].permute(1, 0, 2, 3)                            # [H, nb, bs, 2D]
        dst = self.arena[at: at + h * n].view(h, n // bs, bs, 2 * d)
        on_cuda = kv.is_cuda
        dst.copy_(kv, non_blocking=on_cuda)
        # Addresses, at the segment's pool pages. Cluster j of the segment lives in
        # logical block p0/bs + j (its index at the segment's j-th pool page); its
        # tokens start at logical position ``start``, i.e. at row
        # ``at + h*n + start - p0``.
        ent = pool.ipart[seg_pages.long().to(pool.device)].to(kv_cache.device)   # [nb, H, 2]
        sizes = ent[:, :, I_SIZE].T.to(torch.int32)                          # [H, nb]
        starts = ent[:, :, I_START].T.long()                                 # [H, nb]
        head_base = at + torch.arange(h, device=kv_cache.device).unsqueeze(1) * n
        tdev = self.device
        pg = seg_pages.long().to(tdev)
        first = torch.where(sizes > 0, head_base + starts - p0, 0)            # [H, nb]
        addr = torch.stack([first.to(torch.int32), sizes], -1).transpose(0, 1)  # [nb, H, 2]
        self.cluster_addr[pg, layer] = addr.to(tdev)
        rows = head_base + torch.arange(n // bs, device=kv_cache.device) * bs  # [H, nb]
        self.page_row[pg, layer] = rows.T.to(torch.int32).to(tdev)
        if on_cuda:
            ev = torch.cuda.Event()
            ev.record()
            return ev
        return None

    # ------------------------------------------------------------------- reading
    def zone_pieces(self, slot: int, layer: int, start: int, end: int,
                    max_tokens: int) -> List[List[Tuple[int, int, int, int]]]:
        """Request ``slot``'s mirrored tokens ``[start, end)`` of one layer as pieces
        of at most ``max_tokens`` tokens, in position order: each piece a list of
        parts ``(arena row, segment tokens, t0, t1)``, tokens ``[t0, t1)`` of a
        mirrored segment whose rows start at that arena row (head after head). A
        segment longer than a piece is split. Raises ValueError when the mirror does
        not hold all of that zone: a caller reading released tokens back must never
        read a hole."""
        if max_tokens <= 0:
            raise ValueError(f"HostMirror.zone_pieces: max_tokens must be positive, "
                             f"got {max_tokens}")
        req = self._requests.get(slot)
        segs = [] if req is None else req.layer_segments.get(layer, [])
        out: List[List[Tuple[int, int, int, int]]] = []
        pos, cur, cur_n = start, [], 0
        for at, p0, p1 in segs:
            if p1 <= start:
                continue
            if p0 >= end:
                break
            if p0 != pos or p1 > end:
                raise ValueError(f"HostMirror.zone_pieces: request slot {slot}, layer "
                                 f"{layer}: the mirror does not tile [{start}, {end}) "
                                 f"(segment [{p0}, {p1}) at position {pos})")
            n, t = p1 - p0, 0
            while t < n:
                take = min(n - t, max_tokens - cur_n)
                cur.append((at, n, t, t + take))
                cur_n += take
                t += take
                if cur_n == max_tokens:
                    out.append(cur)
                    cur, cur_n = [], 0
            pos = p1
        if pos != end:
            raise ValueError(f"HostMirror.zone_pieces: request slot {slot}, layer "
                             f"{layer}: the mirror holds [{start}, {pos}) of "
                             f"[{start}, {end})")
        if cur:
            out.append(cur)
        return out

    def load_piece(self, piece: List[Tuple[int, int, int, int]], raw: torch.Tensor,
                   k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Copies one piece of :meth:`zone_pieces` from the arena to the device and
        returns its keys and values ``[n, H, D]`` (views of ``k`` / ``v``).

        ``raw``: a flat staging buffer of at least ``n * H * 2D`` elements of the
        mirror's dtype; ``k``, ``v``: ``[>= n, H, D]`` contiguous. A whole segment's
        rows (``[H, n, 2D]``, contiguous in the arena) cross with one copy, a part of
        one with a copy per head (the copy engine; asynchronous from pinned memory);
        then they are split into K and V token-major on the device. Tokens come in
        the mirror's (cluster) order, per head: fine for attention without a causal
        mask, whose result does not depend on the order of the keys."""
        s = self.shape
        h, d = s.num_kv_heads, s.head_dim
        n_all = sum(t1 - t0 for _, _, t0, t1 in piece)
        if raw.numel() < n_all * h * 2 * d or k.shape[0] < n_all or v.shape[0] < n_all:
            raise ValueError(f"HostMirror.load_piece: staging holds fewer than {n_all} "
                             "tokens")
        nb = raw.is_cuda
        off = 0
        for at, n, t0, t1 in piece:
            m = t1 - t0
            part = raw[:m * h * 2 * d].view(h, m, 2 * d)
            src = self.arena[at: at + h * n].view(h, n, 2 * d)
            if m == n:
                part.copy_(src, non_blocking=nb)
            else:
                for hh in range(h):
                    part[hh].copy_(src[hh, t0:t1], non_blocking=nb)
            k[off: off + m].copy_(part[..., :d].transpose(0, 1))
            v[off: off + m].copy_(part[..., d:].transpose(0, 1))
            off += m
        return k[:n_all], v[:n_all]

    def cluster_rows(self, page: int, layer: int, head: int) -> torch.Tensor:
        """``[size, 2D]`` arena rows of the cluster whose summary lives at pool page
        ``page`` (host-side read, for tests and checks; synchronises)."""
        off, size = (int(x) for x in self.cluster_addr[page, layer, head].tolist())
        return self.arena[off: off + size]
