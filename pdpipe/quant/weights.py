"""Quantized weights (`[engine] quantization`, `moe_quantization`): the online quantizer (round to nearest,
symmetric, no calibration) and the one layout every scheme's weights take in memory.

A quantized weight [N, K] is codes and a grid of float32 scales: the scale of element (n, k) is
`scale[(n + n_offset) // bn, (k + k_offset) // bk]`, with (bn, bk) the scheme's cell in the *whole*
tensor's indices. A tensor-parallel shard is a slice of the codes and of the scale rows or columns it
overlaps, its offsets saying where its first element falls in its first cell, so a shard that cuts
through a group or block reads its neighbour's scale: weights are quantized whole, before they are
sharded, and every split of an instance computes with the same weights.

- `wint8`: int8 codes in [-127, 127]; a cell is a row (1, K); scale amax / 127.
- `wint4`: int4 codes in [-8, 7], two a byte (code + 8, the even k in the low nibble); cells (1, 128), else
  (1, 64) where 128 does not divide K, else a row; scale max(max / 7, -min / 8).
- `fp8`: float8 e4m3 codes (rounded to nearest even); a cell is a row; scale amax / 448.
- `block_wise_fp8`: float8 e4m3 codes; cells (128, 128), the last ones partial; scale amax / 448.

A cell of zeros has scale 1 (its codes are 0). Dequantized, an element is exactly `code * scale` in
float32, then the engine's dtype. All schemes are weight-only here: activations stay in the engine's
dtype.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from . import SCHEMES, CheckpointFormat

FP8_MAX = 448.0  # the largest float8 e4m3 value


def group_size(k: int) -> int:
    """wint4's group along K: 128, else 64, else the whole row."""
    return 128 if k % 128 == 0 else 64 if k % 64 == 0 else k


def cell(scheme: str, shape: tuple[int, int]) -> tuple[int, int]:
    n, k = shape
    if scheme == "wint4":
        return 1, group_size(k)
    if scheme == "block_wise_fp8":
        return 128, 128
    if scheme in ("wint8", "fp8"):
        return 1, k
    raise ValueError(f"quantization: {scheme!r}; allowed: {', '.join(SCHEMES)}")


@dataclass
class QuantizedWeight:
    """Codes and their scale grid (see the module's docstring). `shape` is the logical [N, K]."""

    scheme: str
    codes: torch.Tensor
    scale: torch.Tensor
    shape: tuple[int, int]
    cell: tuple[int, int]
    offset: tuple[int, int] = (0, 0)

    def __getitem__(self, index) -> QuantizedWeight:
        """Rows (`w[a:b]`) or columns (`w[:, a:b]`), as a tensor-parallel split takes them."""
        if isinstance(index, slice):
            return self._rows(index)
        rows, cols = index
        if rows != slice(None):
            raise IndexError(f"{self.scheme} weight: take rows or columns, not both ({index})")
        return self._cols(cols)

    def _rows(self, sl: slice) -> QuantizedWeight:
        a, b, _ = sl.indices(self.shape[0])
        bn, off = self.cell[0], self.offset[0]
        first, last = (a + off) // bn, -(-(b + off) // bn)
        return QuantizedWeight(self.scheme, self.codes[a:b], self.scale[first:last], (b - a, self.shape[1]),
                               self.cell, ((a + off) % bn, self.offset[1]))

    def _cols(self, sl: slice) -> QuantizedWeight:
        a, b, _ = sl.indices(self.shape[1])
        bk, off = self.cell[1], self.offset[1]
        first, last = (a + off) // bk, -(-(b + off) // bk)
        if self.scheme == "wint4":
            if a % 2 or (b % 2 and b != self.shape[1]):
                raise ValueError(f"wint4: columns {a}:{b} split a byte of two codes; splits must be even")
            codes = self.codes[:, a // 2:-(-b // 2)]
        else:
            codes = self.codes[:, a:b]
        return QuantizedWeight(self.scheme, codes, self.scale[:, first:last], (self.shape[0], b - a), self.cell,
                               (self.offset[0], (a + off) % bk))

    def clone(self) -> QuantizedWeight:
        return QuantizedWeight(self.scheme, self.codes.clone(), self.scale.clone(), self.shape, self.cell,
                               self.offset)

    def to(self, device) -> QuantizedWeight:
        return QuantizedWeight(self.scheme, self.codes.to(device), self.scale.to(device), self.shape, self.cell,
                               self.offset)

    @property
    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scale.numel() * self.scale.element_size()


def _grid(w: torch.Tensor, cell_: tuple[int, int], reduce) -> torch.Tensor:
    """`reduce` (amax, max or min) over each cell of w [N, K] (edge cells partial): [⌈N/bn⌉, ⌈K/bk⌉]."""
    n, k = w.shape
    bn, bk = cell_
    rows, cols = -(-n // bn), -(-k // bk)
    if (rows * bn, cols * bk) == (n, k):  # whole cells: a view, no copy
        padded = w
    else:
        fill = {"amax": 0.0, "max": float("-inf"), "min": float("inf")}[reduce]
        padded = torch.full((rows * bn, cols * bk), fill, dtype=torch.float32, device=w.device)
        padded[:n, :k] = w
    cells = padded.reshape(rows, bn, cols, bk)
    if reduce == "amax":
        return cells.abs().amax(dim=(1, 3))
    return cells.amax(dim=(1, 3)) if reduce == "max" else cells.amin(dim=(1, 3))


def expand(scale: torch.Tensor, shape: tuple[int, int], cell_: tuple[int, int],
           offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Each element's scale, [N, K]."""
    n, k = shape
    rows = (torch.arange(n, device=scale.device) + offset[0]) // cell_[0]
    cols = (torch.arange(k, device=scale.device) + offset[1]) // cell_[1]
    return scale[rows][:, cols]


def quantize(weight: torch.Tensor, scheme: str, cell_: tuple[int, int] | None = None) -> QuantizedWeight:
    """The whole weight [N, K], quantized (computed in float32); `cell_` in place of the scheme's."""
    if weight.dim() != 2:
        raise ValueError(f"quantization: weights of two dimensions only, got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    shape = (w.shape[0], w.shape[1])
    cell_ = cell_ or cell(scheme, shape)
    if scheme == "wint4":
        top, bottom = _grid(w, cell_, "max"), _grid(w, cell_, "min")
        scale = torch.maximum(top.clamp(min=0) / 7, (-bottom).clamp(min=0) / 8)
    else:
        scale = _grid(w, cell_, "amax") / (127 if scheme == "wint8" else FP8_MAX)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    rows, cols = scale.shape
    if (rows * cell_[0], cols * cell_[1]) == shape:  # whole cells: each scale broadcast over its cell
        scaled = (w.reshape(rows, cell_[0], cols, cell_[1]) / scale[:, None, :, None]).reshape(shape)
    else:
        scaled = w / expand(scale, shape, cell_)
    if scheme == "wint8":
        codes = scaled.round().clamp(-127, 127).to(torch.int8)
    elif scheme == "wint4":
        codes = pack_int4(scaled.round().clamp(-8, 7).to(torch.int8))
    else:
        codes = scaled.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return QuantizedWeight(scheme, codes, scale, shape, cell_)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7] [N, K] → uint8 [N, ⌈K/2⌉]: code + 8, the even k in the low nibble."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    if u.shape[1] % 2:
        u = torch.cat([u, torch.full((u.shape[0], 1), 8, dtype=torch.uint8, device=u.device)], dim=1)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of pack_int4: int8 codes [N, k]."""
    low = (packed & 0xF).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)[:, :k]


def codes_of(qw: QuantizedWeight) -> torch.Tensor:
    """The codes as float32 [N, K]."""
    if qw.scheme == "wint4":
        return unpack_int4(qw.codes, qw.shape[1]).float()
    return qw.codes.float()


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """code × scale in float32, then `dtype`: [N, K]."""
    rows, cols = qw.scale.shape
    (n, k), (bn, bk) = qw.shape, qw.cell
    if qw.offset == (0, 0) and (rows * bn, cols * bk) == (n, k):  # whole cells: each scale broadcast over its cell
        return (codes_of(qw).reshape(rows, bn, cols, bk) * qw.scale[:, None, :, None]).reshape(n, k).to(dtype)
    return (codes_of(qw) * expand(qw.scale, qw.shape, qw.cell, qw.offset)).to(dtype)


# ---- checkpoints quantized already ------------------------------------------------------------------
SCALE_SUFFIXES = (".weight_scale_inv", ".weight_scale", ".weight_packed", ".weight_shape", ".weight_zero_point",
                  ".input_scale")


def keep_as_stored(name: str, tensor: torch.Tensor) -> bool:
    """A checkpoint tensor the loader must not cast to the model's dtype: quantized codes and their scales."""
    return name.endswith(SCALE_SUFFIXES) or tensor.dtype in (torch.float8_e4m3fn, torch.int8, torch.int32,
                                                             torch.uint8)


def gather_checkpoint(state: dict, fmt: CheckpointFormat) -> dict:
    """A checkpoint's quantized projections (codes and scales under their own names) as one QuantizedWeight
    each, under `<module>.weight`; the rest as it is."""
    for name in [n for n in state if n.endswith((".weight_scale_inv", ".weight_scale"))]:
        module = name.rpartition(".")[0]
        for extra in (".weight_zero_point", ".input_scale"):
            if module + extra in state:
                raise ValueError(f"{module}{extra}: the checkpoint has {extra[1:]} tensors; pdpipe loads "
                                 "symmetric weight-only checkpoints (dynamic activations at most)")
        scale = state.pop(name)
        if fmt.packed:
            packed, shape = state.pop(module + ".weight_packed"), state.pop(module + ".weight_shape")
            state[module + ".weight"] = _from_packed(fmt, packed, (int(shape[0]), int(shape[1])), scale)
        else:
            state[module + ".weight"] = _from_codes(fmt, state[module + ".weight"], scale)
    return state


def _cell(fmt: CheckpointFormat, shape: tuple[int, int]) -> tuple[int, int]:
    if fmt.cell is None:
        return 1, shape[1]
    if fmt.cell == (0, 0):
        return shape
    return fmt.cell


def _checked(fmt: CheckpointFormat, codes: torch.Tensor, scale: torch.Tensor,
             shape: tuple[int, int]) -> QuantizedWeight:
    cell_ = _cell(fmt, shape)
    grid = (-(-shape[0] // cell_[0]), -(-shape[1] // cell_[1]))
    scale = scale.float().reshape(grid) if scale.numel() == grid[0] * grid[1] else scale
    if tuple(scale.shape) != grid:
        raise ValueError(f"a {fmt.method} weight of shape {list(shape)} has scales of shape {list(scale.shape)}; "
                         f"its cells of {cell_[0]} x {cell_[1]} make {list(grid)}")
    return QuantizedWeight(fmt.scheme, codes, scale.contiguous(), shape, cell_)


def _from_codes(fmt: CheckpointFormat, codes: torch.Tensor, scale: torch.Tensor) -> QuantizedWeight:
    want = torch.int8 if fmt.scheme == "wint8" else torch.float8_e4m3fn
    if codes.dtype != want or codes.dim() != 2:
        raise ValueError(f"a {fmt.method} {fmt.scheme} weight must be {want} of two dimensions, got {codes.dtype} "
                         f"of shape {list(codes.shape)}")
    return _checked(fmt, codes, scale, (codes.shape[0], codes.shape[1]))


def _from_packed(fmt: CheckpointFormat, packed: torch.Tensor, shape: tuple[int, int],
                 scale: torch.Tensor) -> QuantizedWeight:
    """compressed-tensors' pack-quantized int32 words (element i at bit i x bits, code + 2^(bits-1)): as bytes
    (little-endian) those are pdpipe's int4 bytes, or int8 codes offset by 128."""
    words = packed.contiguous()
    if sys.byteorder != "little":
        words = words.view(torch.uint8).reshape(*words.shape, 4).flip(-1).reshape(words.shape[0], -1)
    raw = words.view(torch.uint8).reshape(shape[0], -1)
    if fmt.scheme == "wint4":
        return _checked(fmt, raw[:, :-(-shape[1] // 2)].contiguous(), scale, shape)
    return _checked(fmt, (raw[:, :shape[1]].to(torch.int16) - 128).to(torch.int8), scale, shape)


# ---- writing checkpoints as users have them (pdpipe make-model --quantization) -----------------------------
def write_format(scheme: str, ks: list[int]) -> tuple[dict, tuple[int, int] | None]:
    """How `make-model` stores a scheme, for projections of these input sizes: the config.json
    `quantization_config` and the one cell every projection takes (None: a row; wint4's group is the
    largest of 128 and 64 that divides every K, else a row)."""
    if scheme == "block_wise_fp8":
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": [128, 128]}, (128, 128)
    group = next((g for g in (128, 64) if all(k % g == 0 for k in ks)), 0) if scheme == "wint4" else 0
    weights = {"num_bits": 4 if scheme == "wint4" else 8, "type": "float" if scheme == "fp8" else "int",
               "symmetric": True, "strategy": "group" if group else "channel", "group_size": group or None,
               "dynamic": False, "observer": "minmax"}
    fmt = "float-quantized" if scheme == "fp8" else "pack-quantized"
    config = {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
              "ignore": ["lm_head"],
              "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None}}}
    return config, (1, group) if group else None


def checkpoint_tensors(module: str, qw: QuantizedWeight, config: dict) -> dict[str, torch.Tensor]:
    """`qw` as its checkpoint stores it (see write_format), under `module`'s names."""
    if config["quant_method"] == "fp8":
        return {f"{module}.weight": qw.codes, f"{module}.weight_scale_inv": qw.scale}
    if config["format"] == "float-quantized":
        return {f"{module}.weight": qw.codes, f"{module}.weight_scale": qw.scale}
    raw = qw.codes if qw.scheme == "wint4" else (qw.codes.to(torch.int16) + 128).to(torch.uint8)
    pad = -raw.shape[1] % 4  # whole int32 words, the rest zero bits
    raw = torch.cat([raw, torch.zeros(raw.shape[0], pad, dtype=torch.uint8)], dim=1) if pad else raw
    words = raw.contiguous().view(torch.int32)
    if sys.byteorder != "little":
        words = raw.reshape(raw.shape[0], -1, 4).flip(-1).contiguous().view(torch.int32).reshape(raw.shape[0], -1)
    return {f"{module}.weight_packed": words, f"{module}.weight_scale": qw.scale,
            f"{module}.weight_shape": torch.tensor(qw.shape)}


def dequantized_copy(model_dir, plan, out):
    """A copy of the folder `model_dir` at `out` whose projections `plan` (a QuantPlan) quantizes online hold
    their dequantized weights instead, in their own dtype: the fake-quant reference the quantized engine
    computes exactly as (weight-only schemes)."""
    import shutil
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    out = Path(out)
    shutil.copytree(model_dir, out, dirs_exist_ok=True)
    for path in out.glob("*.safetensors"):
        tensors = load_file(path)
        for name, t in tensors.items():
            scheme = plan.scheme_for(name.removesuffix(".weight")) if name.endswith(".weight") else ""
            if scheme:
                tensors[name] = dequantize(quantize(t, scheme), t.dtype)
        save_file(tensors, path, metadata={"format": "pt"})
    return out
