"""The engine's KV pool: one tensor `[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]`; an
FP8 pool (`kv_cache_dtype = "fp8"`) is bytes `[..., num_kv_heads, head_dim + 4]`, each (token, head) row its
e4m3 codes then their float32 scale (`kernels.reference.to_fp8_rows`), so every byte of a block moves with it.

Keeping the whole pool in one allocation lets a transfer backend export it once (shared memory on
CPU, one CUDA IPC handle on GPU) and address any block of any layer by offset. Block-granular
export/import moves a request's KV between engines.
"""
from __future__ import annotations

import torch

from pdpipe import kernels
from pdpipe.config import FP8_KV_SCALE_BYTES
from pdpipe.models.spec import ModelSpec


class KVCache:
    def __init__(self, spec: ModelSpec, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: str | torch.device = "cpu", buffer: torch.Tensor | None = None, kv_cache_dtype: str = "auto"):
        shape = self.shape(spec, num_blocks, block_size, kv_cache_dtype)
        dtype = torch.uint8 if kv_cache_dtype == "fp8" else dtype
        if buffer is None:
            buffer = torch.zeros(shape, dtype=dtype, device=device)
        elif tuple(buffer.shape) != shape or buffer.dtype != dtype:
            raise ValueError(f"KV buffer is {tuple(buffer.shape)} {buffer.dtype}, expected {shape} {dtype}")
        self.data = buffer
        self.num_blocks = num_blocks
        self.block_size = block_size

    @staticmethod
    def shape(spec: ModelSpec, num_blocks: int, block_size: int, kv_cache_dtype: str = "auto") -> tuple[int, ...]:
        row = spec.head_dim + (FP8_KV_SCALE_BYTES if kv_cache_dtype == "fp8" else 0)
        return (spec.num_layers, 2, num_blocks, block_size, spec.num_kv_heads, row)

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.data[i, 0], self.data[i, 1]) for i in range(self.data.shape[0])]

    def export_blocks(self, block_ids: list[int], layer: int | None = None) -> torch.Tensor:
        """A copy of the blocks: `[num_layers, 2, n, block_size, kv_heads, head_dim]`, or one layer's
        `[2, n, …]`."""
        ids = torch.tensor(block_ids, dtype=torch.long)
        if layer is not None:
            return kernels.gather_blocks(self.data[layer].transpose(0, 1), ids).transpose(0, 1)
        return torch.stack([self.export_blocks(block_ids, i) for i in range(self.data.shape[0])])

    def import_blocks(self, block_ids: list[int], blocks: torch.Tensor, layer: int | None = None) -> None:
        """Writes what `export_blocks` returned into `block_ids` of this pool."""
        ids = torch.tensor(block_ids, dtype=torch.long)
        if layer is None:
            for i in range(self.data.shape[0]):
                self.import_blocks(block_ids, blocks[i], i)
            return
        dst = self.data[layer].transpose(0, 1)  # [num_blocks, 2, block_size, …] view
        kernels.scatter_blocks(dst, ids, blocks.transpose(0, 1).to(dst.device))
