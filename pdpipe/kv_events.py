"""KV cache events: which blocks an engine's prefix cache now holds or dropped, in vLLM's wire shape so
that external routers (Dynamo, llm-d, SGLang's gateway) can read pdpipe's as they read vLLM's.

The shape follows `vllm/distributed/kv_events.py` as vLLM 0.10/0.11 released it (msgspec structs, array-like
and tagged, msgpack, every field encoded): a `KVEventBatch(ts, events, data_parallel_rank)` of
`BlockStored(block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium)`,
`BlockRemoved(block_hashes, medium)` and `AllBlocksCleared()`, each event an array whose first element is
its tag (the class name). Block hashes are pdpipe's 32-byte SHA-256 chain (`kv_hash`), which vLLM's
`ExternalBlockHash` (bytes | int) admits. (vLLM's main branch later appended optional fields and moved to
maps; consumers of the released shape read this one.) On the wire (ZeroMQ PUB) each
batch is three frames: the topic (the instance's name), an 8-byte big-endian sequence number, the payload.
"""
from __future__ import annotations

import msgspec

MEDIUM_GPU = "GPU"  # the tier a block is in (vLLM's name for the device memory tier, on CPU engines too)


class KVCacheEvent(msgspec.Struct, array_like=True, gc=False, tag=True):
    """Base of every KV cache event."""


class BlockStored(KVCacheEvent):
    block_hashes: list[bytes]
    parent_block_hash: bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = MEDIUM_GPU


class BlockRemoved(KVCacheEvent):
    block_hashes: list[bytes]
    medium: str | None = MEDIUM_GPU


class AllBlocksCleared(KVCacheEvent):
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[KVEvent]
    data_parallel_rank: int | None = None


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(KVEventBatch)


def encode_batch(batch: KVEventBatch) -> bytes:
    return _encoder.encode(batch)


def decode_batch(payload: bytes) -> KVEventBatch:
    return _decoder.decode(payload)
