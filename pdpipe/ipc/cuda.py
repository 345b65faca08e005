"""GPU KV pools for cross-process transfer: allocated with plain cudaMalloc (never an expandable
segment), exported with cuda-python IPC memory handles (with the true offset inside the
allocation), and opened once per peer and device, then cached. Integer CUDA error codes become
`CudaError` naming the call and its arguments."""
from __future__ import annotations

import ctypes
import math

import torch

try:
    from cuda.bindings import driver as cuda_driver
    from cuda.bindings import runtime as cudart
except ImportError:  # older cuda-python layout
    try:
        from cuda import cuda as cuda_driver  # type: ignore[no-redef]
        from cuda import cudart  # type: ignore[no-redef]
    except ImportError:  # pragma: no cover - CPU-only installs
        cuda_driver = cudart = None


class CudaError(RuntimeError):
    """A CUDA call that failed: the call, what it was given, and the error name."""


def _check(result, call: str, detail: str = ""):
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise CudaError(f"{call}({detail}) failed: {getattr(err, 'name', err)}")
    return values[0] if len(values) == 1 else values


def _require():
    if cudart is None:
        raise CudaError("cuda-python (cuda-bindings) is not installed; GPU transfer needs it")


_HANDLE_BYTES = 64  # cudaIpcMemHandle_t and cudaIpcEventHandle_t are 64 opaque bytes


def _handle_bytes(handle) -> bytes:
    return ctypes.string_at(handle.getPtr(), _HANDLE_BYTES)


def _handle_from(cls, data: bytes):
    if len(data) != _HANDLE_BYTES:
        raise CudaError(f"an IPC handle is {_HANDLE_BYTES} bytes, got {len(data)}")
    handle = cls()
    ctypes.memmove(handle.getPtr(), data, _HANDLE_BYTES)
    return handle


class _DeviceArray:
    """Raw device memory as something torch.as_tensor understands (zero copy)."""

    def __init__(self, ptr: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False),
                                         "version": 3, "strides": None}


def tensor_at(ptr: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    return torch.as_tensor(_DeviceArray(ptr, nbytes)).view(dtype).view(*shape)


class CudaPool:
    """One cudaMalloc'd pool on the current device, exportable to other processes."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: int):
        _require()
        self.shape, self.dtype, self.device = tuple(shape), dtype, device
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        with torch.cuda.device(device):
            self.ptr = int(_check(cudart.cudaMalloc(nbytes), "cudaMalloc", f"{nbytes} bytes on GPU {device}"))
            _check(cudart.cudaMemset(self.ptr, 0, nbytes), "cudaMemset")
            self.tensor = tensor_at(self.ptr, self.shape, dtype)
        self.nbytes = nbytes

    def export(self) -> tuple[bytes, int]:
        """(IPC handle, offset of the pool inside the allocation the handle names)."""
        with torch.cuda.device(self.device):  # the driver looks the address up in the current context
            handle = _check(cudart.cudaIpcGetMemHandle(self.ptr), "cudaIpcGetMemHandle", hex(self.ptr))
            base, _size = _check(cuda_driver.cuMemGetAddressRange(self.ptr), "cuMemGetAddressRange", hex(self.ptr))
        return _handle_bytes(handle), self.ptr - int(base)

    def close(self) -> None:
        if self.ptr:
            with torch.cuda.device(self.device):
                _check(cudart.cudaFree(self.ptr), "cudaFree", hex(self.ptr))
            self.ptr = 0


_opened: dict[tuple[bytes, int], int] = {}


def open_pool(handle: bytes, offset: int, shape: tuple[int, ...], dtype: torch.dtype, device: int) -> torch.Tensor:
    """Maps a peer's pool into this process on `device` (peer access enabled lazily); cached, since
    opening a handle costs ~10 ms."""
    _require()
    key = (handle, device)
    with torch.cuda.device(device):
        if key not in _opened:
            h = _handle_from(cudart.cudaIpcMemHandle_t, handle)
            _opened[key] = int(_check(cudart.cudaIpcOpenMemHandle(h, cudart.cudaIpcMemLazyEnablePeerAccess),
                                      "cudaIpcOpenMemHandle", f"device {device}"))
        return tensor_at(_opened[key] + offset, tuple(shape), dtype)


def visible_ordinal(physical_gpu: int) -> int:
    """This process's device ordinal for a physical GPU id (CUDA_VISIBLE_DEVICES renumbers them)."""
    import os

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not visible:
        return physical_gpu
    ids = [int(x) for x in visible.split(",") if x.strip()]
    if physical_gpu not in ids:
        raise CudaError(f"GPU {physical_gpu} is not visible to this process (CUDA_VISIBLE_DEVICES={visible})")
    return ids.index(physical_gpu)


def physical_gpu(ordinal: int) -> int:
    import os

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return int(visible.split(",")[ordinal]) if visible else ordinal
