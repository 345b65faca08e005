"""Chained hashes of full KV blocks: the one scheme every engine, the scheduler and external routers use.

A block's hash is SHA-256 over its parent's hash and its token ids (little-endian int32), so a block's
hash names its whole prefix: two requests share a block exactly when they share every token up to
its end. The first block's parent is a root derived from what holds for the whole request and decides
what its KV is — the model, the weights' quantization, the KV cache dtype, the request's `cache_salt`
and a cache epoch (bumped when weights change) — so instances that compute different KV, and requests
with different salts, never share. Partial blocks have no hash and are never shared.
"""
from __future__ import annotations

import hashlib
import sys
from array import array
from collections.abc import Sequence

VERSION = b"pdpipe-kv-v1"


def root_hash(model: str, quantization: str = "", kv_dtype: str = "", cache_salt: str = "", epoch: int = 0) -> bytes:
    """The parent of a request's first block."""
    keys = (VERSION, model.encode(), quantization.encode(), kv_dtype.encode(), cache_salt.encode(), str(epoch).encode())
    return hashlib.sha256(b"\0".join(keys)).digest()


def block_hashes(token_ids: Sequence[int], block_size: int, root: bytes, known: Sequence[bytes] = ()) -> list[bytes]:
    """The hashes of every full block of `token_ids`, the first `len(known)` of them given (extending a
    chain as tokens arrive costs only the new blocks)."""
    hashes = list(known)
    parent = hashes[-1] if hashes else root
    for start in range(len(hashes) * block_size, len(token_ids) - block_size + 1, block_size):
        tokens = array("i", token_ids[start:start + block_size])
        if sys.byteorder != "little":
            tokens.byteswap()
        parent = hashlib.sha256(parent + tokens.tobytes()).digest()
        hashes.append(parent)
    return hashes


def reusable_blocks(num_tokens: int, block_size: int, computes_last: bool) -> int:
    """How many leading blocks of an `num_tokens`-token prompt an instance may take from its cache: all
    full ones where it receives the KV (a decode instance), else those that leave the last token to
    compute (its logits sample the first output token)."""
    return (num_tokens - 1 if computes_last else num_tokens) // block_size
