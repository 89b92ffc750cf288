"""The running requests of one worker, as retro's KV connector reports them.

:class:`RequestTable` is fed once per step, before the forward, with the step's
lifecycle events (:class:`RequestUpdate` per scheduled request, plus the finished,
aborted and preempted ids). It names each request's KV blocks (a row of a batch is
identified by its first block: prefix caching is off, so that block is the
request's own) and keeps what the index maintenance needs (computed tokens,
prompt length, the end of the clustered zone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from .logging_utils import warn_once


@dataclass
class RequestUpdate:
    """What one step changes of one scheduled request.

    reset: the request (re)starts from token 0 (new, or resumed after preemption):
        ``blocks`` replace its block list and its index starts over.
    blocks: KV block ids appended (or, with ``reset``, the whole list).
    num_computed: tokens whose KV is in the cache before this step's forward.
    prompt_len: prompt tokens (-1 when unchanged).
    num_scheduled: query tokens scheduled in this step (-1: not known). With the
        wave buffer, a request with released blocks must not get a multi-token
        query: those rows run vLLM's dense FlashAttention over the paged cache.
    """

    req_id: str
    reset: bool
    blocks: List[int]
    num_computed: int
    prompt_len: int = -1
    num_scheduled: int = -1


@dataclass
class RequestEntry:
    """Worker-side state of one running request."""

    req_id: str
    blocks: List[int]
    prompt_len: int
    num_computed: int = 0
    clustered_end: int = 0       # end of the clustered zone (0: no index yet)
    num_clusters: int = 0        # clusters with tokens, over all segments
    is_new: bool = True          # header not yet reset on the device
    ibt_row: int = -1            # GPU: its index-table row (-1: none, no pool pages)
    pool_full_counted: bool = False   # GPU: counted once in index_pool_full
    num_scheduled: int = -1      # query tokens of the current step (-1: unknown)
    # GPU wave buffer: the end of the zone mirrored to host for every layer (the
    # horizon once published: a token position, block-aligned, <= clustered_end;
    # 0: nothing mirrored), and the mirror's state: "" (not tried), "on", "refused"
    # (no host memory at its first clustering: stays resident), "stopped" (a later
    # segment did not fit: the horizon stays where it is).
    mirrored_end: int = 0
    mirror: str = ""


class RequestTable:
    """The running requests of one worker, kept from the connector's metadata."""

    def __init__(self) -> None:
        self.entries: Dict[str, RequestEntry] = {}
        self._by_first_block: Dict[int, str] = {}
        self.preemptions = 0
        self.freed = 0
        # Called with every entry that leaves the table (finished, aborted, preempted,
        # or replaced when it restarts from token 0): the GPU manager frees its index
        # pool pages there.
        self.on_remove: Optional[Callable[[RequestEntry], None]] = None

    def apply(self, meta) -> List[RequestEntry]:
        """Applies one step's ``RetroStepMetadata``; returns the entries scheduled in it."""
        for rid in meta.finished:
            e = self.entries.pop(rid, None)
            if e is not None:
                self.freed += 1
                if self.on_remove is not None:
                    self.on_remove(e)
                if e.blocks and self._by_first_block.get(e.blocks[0]) == rid:
                    del self._by_first_block[e.blocks[0]]
        self.preemptions += meta.num_preempted
        out = []
        for u in meta.updates:
            e = self.entries.get(u.req_id)
            if u.reset or e is None:
                if e is None and not u.reset:
                    warn_once(f"retro: request {u.req_id} scheduled without having "
                              "been announced; it is attended without an index")
                    continue
                plen = u.prompt_len if u.prompt_len >= 0 else u.num_computed
                if e is not None and e.blocks and \
                        self._by_first_block.get(e.blocks[0]) == u.req_id:
                    del self._by_first_block[e.blocks[0]]
                if e is not None and self.on_remove is not None:
                    self.on_remove(e)
                e = RequestEntry(u.req_id, list(u.blocks), plen)
                self.entries[u.req_id] = e
                if e.blocks:
                    self._by_first_block[e.blocks[0]] = u.req_id
            else:
                e.blocks.extend(u.blocks)
            e.num_computed = u.num_computed
            e.num_scheduled = u.num_scheduled
            out.append(e)
        return out



    def request_of_block(self, first_block: int) -> Optional[str]:
        """The running request whose first KV block is ``first_block`` (or None)."""
        return self._by_first_block.get(first_block)
