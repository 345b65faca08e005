"""Checkpoints quantized already, as users have them: Hugging Face FP8 (128 x 128 blocks, DeepSeek's and
Qwen3-FP8's form) written here by an independent numpy writer, and compressed-tensors checkpoints (FP8 by
channel, int8 by channel, int4 by group in int32 words) written by the `compressed-tensors` package itself.
Each loads to exactly its writer's dequantized weights, whole and per tensor-parallel rank, and the engine on
it generates what the engine on a folder of those dequantized weights does; what is not supported is
refused, naming it."""
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import engine_tokens, make_prompts
from safetensors.torch import load_file, save_file

from pdpipe.config import EngineConfig
from pdpipe.models.make import make_model
from pdpipe.models.make_config import MakeModelConfig
from pdpipe.quant import QuantPlan, checkpoint_format, quant_plan
from pdpipe.quant.weights import dequantize

# ragged: K of 192 and 320 (the last 128-wide block partial), N of 320 too
MODEL = MakeModelConfig(arch="llama", hidden=192, heads=4, kv_heads=2, intermediate=320, seed=10)
PROJECTIONS = QuantPlan("wint8")  # which tensors are projections: what a checkpoint quantizes


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("ckpt") / "llama", MODEL)


def rewrite(base, out, config_extra: dict, convert) -> tuple:
    """A copy of `base` whose projections `convert(name, weight)` turns into (checkpoint tensors, the
    weight they dequantize to); and a second copy holding those dequantized weights, unquantized."""
    shutil.copytree(base, out)
    plain = out.parent / (out.name + "-dequantized")
    shutil.copytree(base, plain)
    for path in out.glob("*.safetensors"):
        tensors, deq = load_file(path), load_file(path)
        for name in [n for n in tensors if n.endswith(".weight")]:
            module = name.removesuffix(".weight")
            if PROJECTIONS.scheme_for(module) and module not in config_extra.get("keep", ()):
                stored, deq[name] = convert(module, tensors.pop(name))
                tensors |= stored
        save_file(tensors, path)
        save_file(deq, plain / path.name)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = config_extra["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    return out, plain


# ---- Hugging Face FP8, by an independent writer ----------------------------------------------------------
def hf_fp8(module, w):
    """128 x 128 blocks (the last ones partial), scale_inv = amax / 448 (float32), e4m3 rounded to nearest
    even; dequantized in numpy as fp8 x scale_inv of the element's block."""
    a = w.numpy().astype(np.float32)
    n, k = a.shape
    rows, cols = -(-n // 128), -(-k // 128)
    scale = np.ones((rows, cols), np.float32)
    for i in range(rows):
        for j in range(cols):
            amax = np.abs(a[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]).max()
            scale[i, j] = amax / np.float32(448) if amax > 0 else 1
    per = np.repeat(np.repeat(scale, 128, 0), 128, 1)[:n, :k]
    codes = torch.from_numpy(a / per).to(torch.float8_e4m3fn)
    deq = codes.float().numpy() * per
    return ({module + ".weight": codes, module + ".weight_scale_inv": torch.from_numpy(scale)},
            torch.from_numpy(deq.astype(np.float32)))


def hf_fp8_folder(base, out):
    keep = ("model.layers.0.mlp.down_proj",)
    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
          "modules_to_not_convert": list(keep)}
    return rewrite(base, out, {"quantization_config": qc, "keep": keep}, hf_fp8)


# ---- compressed-tensors, written by the package -------------------------------------------------------------
CT = {  # name: (weights args, format)
    "fp8-channel": ({"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"}, "float-quantized"),
    "int8-channel": ({"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}, "pack-quantized"),
    "int4-group64": ({"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64},
                     "pack-quantized"),
}


def ct_folder(base, out, which: str):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    args, fmt = CT[which]
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**args))
    compressor = BaseCompressor.get_value_from_registry(fmt)

    def convert(module, w):
        n, k = w.shape
        cells = w.reshape(n, -1, args.get("group_size", k))
        scale, _ = calculate_qparams(cells.amin(-1), cells.amax(-1), scheme.weights)
        stored = compressor.compress({"weight": w, "weight_scale": scale}, scheme)
        deq = compressor.decompress(dict(stored), scheme)["weight"]
        return {f"{module}.{key}": t for key, t in stored.items()}, deq.to(w.dtype)

    qc = QuantizationConfig(config_groups={"group_0": scheme}, format=fmt, ignore=["lm_head"],
                            quantization_status="compressed").model_dump(mode="json")
    qc["quant_method"] = "compressed-tensors"
    return rewrite(base, out, {"quantization_config": qc}, convert)


def folders(base, tmp_path, which: str):
    return hf_fp8_folder(base, tmp_path / which) if which == "hf-fp8" else ct_folder(base, tmp_path / which, which)


KINDS = ["hf-fp8", *CT]


def test_each_writer_names_the_scheme_the_loader_reads(base, tmp_path):
    read = {which: checkpoint_format(folders(base, tmp_path, which)[0]) for which in KINDS}
    assert {w: (f.scheme, f.cell, f.packed) for w, f in read.items()} == {
        "hf-fp8": ("block_wise_fp8", (128, 128), False), "fp8-channel": ("fp8", None, False),
        "int8-channel": ("wint8", None, True), "int4-group64": ("wint4", (1, 64), True)}
    assert read["hf-fp8"].ignore == ("model.layers.0.mlp.down_proj",)


@pytest.mark.parametrize("which", KINDS)
def test_a_quantized_checkpoint_loads_to_its_writers_dequantized_weights(base, tmp_path, which):
    """Whole and on each of two tensor-parallel ranks (a shard cutting a block reads its neighbour's scale):
    exactly the writer's dequantized weights, split the same way; its codes stay quantized."""
    from pdpipe.models.layers import QuantLinear
    from pdpipe.models.loader import load_model
    from pdpipe.models.parallel import TensorParallel

    quantized, plain = folders(base, tmp_path, which)
    for tp in (None, TensorParallel(0, 2), TensorParallel(1, 2)):
        got, want = dict(load_model(quantized, tp=tp).named_modules()), load_model(plain, tp=tp)
        count = 0
        for name, module in want.named_modules():
            if isinstance(module, torch.nn.Linear) and isinstance(got[name], QuantLinear):
                assert torch.equal(dequantize(got[name].quantized), module.weight), (name, tp)
                count += 1
        assert count == (13 if which == "hf-fp8" else 14)  # FP8: one projection left as it was


def greedy(model, **fields) -> list[list[int]]:
    from pdpipe.config import CacheConfig
    from pdpipe.engine.engine import LLMEngine
    from pdpipe.messages import SamplingParams

    engine = LLMEngine(EngineConfig(model=str(model), cache=CacheConfig(block_size=8, num_blocks=64), **fields))
    return engine_tokens(engine, make_prompts(384, lengths=(7, 30), seed=14),
                         SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))


@pytest.mark.parametrize("which", ["hf-fp8", "int4-group64"])
def test_the_engine_on_a_quantized_checkpoint_generates_what_its_dequantized_weights_do(base, tmp_path, which):
    quantized, plain = folders(base, tmp_path, which)
    assert greedy(quantized) == greedy(plain)
    scheme = checkpoint_format(quantized).scheme
    assert greedy(quantized, quantization=scheme) == greedy(plain)  # asking for what it is: the same


def test_a_checkpoint_asked_to_be_what_it_is_not_is_refused_naming_both(base, tmp_path):
    quantized, _ = folders(base, tmp_path, "hf-fp8")
    with pytest.raises(ValueError, match=r"quantization: 'wint8', but .* has a quantization_config of its own "
                                         r"\(fp8, block_wise_fp8\)"):
        quant_plan(EngineConfig(quantization="wint8"), quantized)
    assert quant_plan(EngineConfig(), quantized).name == "fp8:block_wise_fp8:128x128"


@pytest.mark.parametrize("qc,field", [
    ({"quant_method": "gptq", "bits": 4}, "quant_method: 'gptq' is not supported"),
    ({"quant_method": "fp8", "fmt": "e5m2"}, "fmt: 'e5m2' is not supported"),
    ({"quant_method": "compressed-tensors", "format": "marlin-24"}, "format: 'marlin-24' is not supported"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {"weights": {
        "num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 128}}}},
     "symmetric: False is not supported"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"g": {
        "weights": {"num_bits": 8, "type": "float", "strategy": "tensor"},
        "input_activations": {"num_bits": 8, "type": "float", "dynamic": False}}}}, "static scales"),
])
def test_an_unsupported_quantization_config_is_refused_naming_it(base, tmp_path, qc, field):
    """Never loaded as if it were unquantized: the engine refuses before reading a weight."""
    from pdpipe.engine.engine import LLMEngine

    folder = tmp_path / "m"
    shutil.copytree(base, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": qc}))
    with pytest.raises(ValueError, match=field):
        LLMEngine(EngineConfig(model=str(folder)))


@pytest.mark.parametrize("scheme", ["wint8", "wint4", "fp8", "block_wise_fp8"])
def test_make_model_writes_checkpoints_users_have_and_the_package_reads_them(tmp_path, scheme):
    """`pdpipe make-model --quantization`: the folder loads (as a quantized checkpoint, no engine setting)
    to exactly the codes and scales quantizing the same unquantized folder online gives (same seed; wint4
    in groups of 64 both ways: K = 192 or 320); compressed-tensors' own decompressor reads its
    compressed-tensors files to the same weights."""
    from dataclasses import replace

    from pdpipe.models.layers import QuantLinear
    from pdpipe.models.loader import load_model

    made = make_model(tmp_path / "q", replace(MODEL, quantization=scheme))
    plain = make_model(tmp_path / "plain", MODEL)
    fmt = checkpoint_format(made)
    assert fmt.scheme == scheme and fmt.cell == {"wint4": (1, 64), "block_wise_fp8": (128, 128)}.get(scheme)
    loaded = dict(load_model(made).named_modules())
    online = load_model(plain, quant=QuantPlan(scheme))
    count = 0
    for name, module in online.named_modules():
        if isinstance(module, QuantLinear):
            got = loaded[name]
            assert isinstance(got, QuantLinear) and got.cell == module.cell
            assert torch.equal(got.scale, module.scale)
            assert torch.equal(got.codes.view(torch.uint8), module.codes.view(torch.uint8))
            count += 1
    assert count == 14
    if fmt.method == "compressed-tensors":
        from compressed_tensors.compressors import BaseCompressor
        from compressed_tensors.quantization import QuantizationConfig

        qc = QuantizationConfig.model_validate(json.loads((made / "config.json").read_text())["quantization_config"])
        scheme_ct = qc.config_groups["group_0"]
        compressor = BaseCompressor.get_value_from_registry(qc.format)
        tensors = load_file(made / "model.safetensors")
        module = "model.layers.1.mlp.down_proj"
        mine = {k.removeprefix(module + "."): v for k, v in tensors.items() if k.startswith(module + ".")}
        theirs = compressor.decompress(mine, scheme_ct)["weight"].float()
        assert torch.equal(dequantize(loaded[module].quantized), theirs)
