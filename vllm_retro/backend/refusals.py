"""Why a model layer cannot run on retro: one list of readable reasons for both builds.

Each impl passes what its platform supports (KV-cache dtypes, head sizes); the
features retro never supports (non-decoder attention, sliding windows, ALiBi,
soft-capping, learned sinks, cross-layer KV sharing) are named here once.
"""

from __future__ import annotations

from typing import List, Sequence

from .. import compat


def unsupported_reasons(*, head_size: int, head_sizes: Sequence[int], kv_cache_dtype,
                        kv_cache_dtypes: Sequence[str], attn_type, sliding_window,
                        alibi_slopes, logits_soft_cap, sinks,
                        kv_sharing_target_layer_name) -> List[str]:
    """Readable reasons (empty: the layer is supported)."""
    reasons = []
    if attn_type not in (None, compat.attention_type_decoder()):
        reasons.append(f"attention type {attn_type!r} (decoder self-attention only)")
    if sliding_window is not None:
        reasons.append("sliding-window attention")
    if alibi_slopes is not None:
        reasons.append("ALiBi")
    if logits_soft_cap:
        reasons.append("logits soft-capping")
    if sinks is not None:
        reasons.append("learned attention sinks")
    if kv_sharing_target_layer_name is not None:
        reasons.append("cross-layer KV sharing")
    if kv_cache_dtype is not None and kv_cache_dtype not in kv_cache_dtypes:
        reasons.append(f"kv_cache_dtype={kv_cache_dtype!r} (supported: "
                       f"{list(kv_cache_dtypes)})")
    if head_size not in head_sizes:
        reasons.append(f"head size {head_size} (supported: {list(head_sizes)})")
    return reasons


class RetroBackendTraits:
    """What both builds' ``RetroBackend`` declare alike (mixed in before the
    platform's dense backend): the CUSTOM slot's name (a member of vLLM's backend
    enum, which pickles into spawned processes), decoder self-attention only, no
    sliding windows."""

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == compat.attention_type_decoder()


def refuse(reasons: List[str]) -> None:
    if reasons:
        raise ValueError("retro attention backend does not support: " + "; ".join(reasons))
