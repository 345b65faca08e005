"""Kernels for the engine's hot paths, each beside the torch reference it is tested against.

On CPU (and wherever a kernel does not apply) the wrappers run the references in `reference.py`.
"""
from .reference import copy_blocks, gather_blocks, paged_attention, scatter_blocks, store_kv

__all__ = ["copy_blocks", "gather_blocks", "paged_attention", "scatter_blocks", "store_kv"]
