"""Where Mooncake's writes go: the (source, destination, bytes) triples that move a layer of a job's blocks
between two published pools, runs of contiguous blocks coalesced into single writes."""
from __future__ import annotations

from pdpipe.config import DTYPE_BYTES
from pdpipe.messages import PoolInfo


def coalesce(src_ids: list[int], dst_ids: list[int]) -> list[tuple[int, int, int]]:
    """(src_start, dst_start, count) runs where both sides are contiguous, in order."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src_ids, dst_ids):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs


def block_writes(src: PoolInfo, dst: PoolInfo, layer: int, src_ids: list[int], dst_ids: list[int],
                 src_heads: slice | None = None, dst_heads: slice | None = None) -> list[tuple[int, int, int]]:
    """(source address, destination address, bytes) of the writes that move `layer` of the blocks, K
    and V, between two published pools [layers, 2, blocks, block_size, heads, dim] (addresses from
    their `base_addr`): runs of blocks contiguous on both sides when the heads are whole on both, else
    one write a token of each block for the run of heads (strided in the pool)."""
    itemsize = DTYPE_BYTES[src.dtype]
    page, dim = src.shape[3], src.shape[5]
    s_heads = range(src.shape[4])[src_heads or slice(None)]
    d_heads = range(dst.shape[4])[dst_heads or slice(None)]
    s_row, d_row = src.shape[4] * dim * itemsize, dst.shape[4] * dim * itemsize  # one token's heads
    s_block, d_block = page * s_row, page * d_row
    whole = len(s_heads) == src.shape[4] == dst.shape[4]
    writes = []
    for plane in range(2):
        s_plane = src.base_addr + (layer * 2 + plane) * src.shape[2] * s_block
        d_plane = dst.base_addr + (layer * 2 + plane) * dst.shape[2] * d_block
        if whole:
            writes += [(s_plane + s * s_block, d_plane + d * d_block, n * s_block)
                       for s, d, n in coalesce(src_ids, dst_ids)]
            continue
        run = len(s_heads) * dim * itemsize
        for s, d in zip(src_ids, dst_ids):
            writes += [(s_plane + s * s_block + t * s_row + s_heads.start * dim * itemsize,
                        d_plane + d * d_block + t * d_row + d_heads.start * dim * itemsize, run) for t in range(page)]
    return writes
