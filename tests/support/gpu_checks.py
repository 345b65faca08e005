"""What the GPU kernel tests measure a kernel's output against its reference with."""
import torch


def rel_err(out: torch.Tensor, expected: torch.Tensor) -> float:
    return ((out.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-12)).item()
