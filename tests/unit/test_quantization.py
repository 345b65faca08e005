"""Weight quantization on CPU: the online quantizer against an independent numpy one (the same codes and
scales, bit for bit), int4 packing, shards that cut through groups and blocks, the loader (a quantized model
equals the same model's dequantized weights loaded plain, whole and per tensor-parallel rank), the engine's
tokens against the dequantized folder's, the plan's choices and the configuration's refusals."""
import numpy as np
import pytest
import torch
from conftest import engine_tokens, make_prompts
from quant_reference import to_e4m3

from pdpipe.config import EngineConfig
from pdpipe.kv_hash import root_hash
from pdpipe.models.make import make_model
from pdpipe.models.make_config import MakeModelConfig
from pdpipe.quant import QuantPlan, plan_for
from pdpipe.quant.weights import QuantizedWeight, dequantize, dequantized_copy, pack_int4, quantize, unpack_int4

SCHEMES = ("wint8", "wint4", "fp8", "block_wise_fp8")


# ---- an independent reference, in numpy ------------------------------------------------------------
def np_quantize(w: np.ndarray, scheme: str) -> tuple[np.ndarray, np.ndarray]:
    """(codes as float64 [N, K], scales float32 [rows, cols]) by the documented rules, cell by cell."""
    n, k = w.shape
    bn, bk = {"wint8": (1, k), "fp8": (1, k), "block_wise_fp8": (128, 128),
              "wint4": (1, 128 if k % 128 == 0 else 64 if k % 64 == 0 else k)}[scheme]
    rows, cols = -(-n // bn), -(-k // bk)
    scales = np.zeros((rows, cols), np.float32)
    codes = np.zeros((n, k))
    for i in range(rows):
        for j in range(cols):
            block = w[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk]
            if scheme == "wint4":
                top, bottom = np.float32(max(block.max(), 0)), np.float32(max(-block.min(), 0))
                s = max(top / np.float32(7), bottom / np.float32(8))
            else:
                s = np.float32(np.abs(block).max()) / np.float32(127 if scheme == "wint8" else 448)
            s = np.float32(s) if s > 0 else np.float32(1)
            scales[i, j] = s
            x = (block / s).astype(np.float32)
            if scheme == "wint8":
                q = np.clip(np.round(x), -127, 127)
            elif scheme == "wint4":
                q = np.clip(np.round(x), -8, 7)
            else:
                q = to_e4m3(np.clip(x, -448, 448))
            codes[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] = q
    return codes, scales


def weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    w[0, :5] = 0.0  # a partly zero row; and a zero cell where the cells are small
    w[-1, :] = 0.0
    return w


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("shape", [(8, 256), (6, 576), (5, 100), (200, 300)])
def test_the_quantizer_gives_the_reference_codes_and_scales(scheme, shape):
    """K = 256: groups of 128; 576 (SmolLM2's hidden size): of 64; 100: a row; 200 x 300: partial blocks."""
    w = weight(*shape)
    qw = quantize(w, scheme)
    codes, scales = np_quantize(w.numpy(), scheme)
    assert np.array_equal(qw.scale.numpy(), scales)
    got = unpack_int4(qw.codes, shape[1]) if scheme == "wint4" else qw.codes
    assert np.array_equal(got.float().numpy().astype(np.float64), codes)
    expected = (codes * np.repeat(np.repeat(scales, qw.cell[0], 0), qw.cell[1], 1)[:shape[0], :shape[1]]
                .astype(np.float64)).astype(np.float32)
    assert np.array_equal(dequantize(qw).numpy(), expected)


def test_int4_codes_pack_two_a_byte_offset_by_8_the_even_column_low():
    q = torch.tensor([[-8, 7, 0, -1, 3]], dtype=torch.int8)
    packed = pack_int4(q)
    # by hand: (-8+8) | (7+8) << 4 = 0xF0; (0+8) | (-1+8) << 4 = 0x78; (3+8) | (0+8) << 4 (padding) = 0x8B
    assert packed.tolist() == [[0xF0, 0x78, 0x8B]] and unpack_int4(packed, 5).tolist() == q.tolist()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_shard_cutting_through_groups_and_blocks_reads_its_neighbours_scales(scheme):
    """Rows and columns split as tensor parallelism splits them (not at group or block edges): each shard
    dequantizes to exactly the slice of the whole, and a shard of a shard too."""
    w = weight(200, 384, seed=1)
    qw = quantize(w, scheme)
    whole = dequantize(qw)
    for rows in (slice(0, 100), slice(100, 200), slice(50, 150)):
        assert torch.equal(dequantize(qw[rows]), whole[rows])
    for cols in (slice(0, 192), slice(192, 384), slice(64, 320)):
        assert torch.equal(dequantize(qw[:, cols]), whole[:, cols])
    assert torch.equal(dequantize(qw[50:150][:, 64:320][:, 100:200]), whole[50:150, 164:264])
    if scheme == "wint4":
        with pytest.raises(ValueError, match="even"):
            qw[:, 3:9]


# ---- the loader and the engine -------------------------------------------------------------------
QUANT_MODEL = MakeModelConfig(arch="llama", hidden=192, heads=4, kv_heads=2, intermediate=384, seed=9)


@pytest.fixture(scope="module")
def quant_model(tmp_path_factory):
    """A model whose projections have several groups a row (K = 192: groups of 64; 384: of 128) and
    partial 128 x 128 blocks."""
    return make_model(tmp_path_factory.mktemp("quant") / "llama", QUANT_MODEL)


def dequantized_folder(model, plan: QuantPlan, out):
    return dequantized_copy(model, plan, out)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_quantized_model_holds_its_dequantized_weights_whole_and_per_rank(quant_model, tmp_path, scheme):
    """Quantized whole, then split: every rank's projections (and the whole model's) dequantize to exactly
    the dequantized folder's, loaded plain and split the same way (so a TP2 prefill instance and a TP1
    decode instance compute with the same weights); the codes stay quantized in memory."""
    from pdpipe.models.layers import QuantLinear
    from pdpipe.models.loader import load_model
    from pdpipe.models.parallel import TensorParallel

    plan = QuantPlan(scheme, scheme)
    reference = dequantized_folder(quant_model, plan, tmp_path / "deq")
    for tp in (None, TensorParallel(0, 2), TensorParallel(1, 2)):
        quantized, plain = load_model(quant_model, tp=tp, quant=plan), load_model(reference, tp=tp)
        layers = dict(quantized.named_modules())
        found = 0
        for name, module in plain.named_modules():
            if plan.scheme_for(name) and isinstance(module, torch.nn.Linear):
                q = layers[name]
                assert isinstance(q, QuantLinear) and q.codes.dtype != torch.float32
                assert torch.equal(dequantize(q.quantized), module.weight), (name, tp)
                found += 1
        assert found == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
        assert torch.equal(quantized.model.embed_tokens.weight, plain.model.embed_tokens.weight)


def greedy_tokens(model, **fields) -> list[list[int]]:
    from pdpipe.config import CacheConfig
    from pdpipe.engine.engine import LLMEngine
    from pdpipe.messages import SamplingParams
    from pdpipe.models.layers import QuantLinear

    config = EngineConfig(model=str(model), cache=CacheConfig(block_size=8, num_blocks=64), **fields)
    engine = LLMEngine(config)
    assert any(isinstance(m, QuantLinear) for m in engine.model.modules()) == bool(config.quantization)
    tokens = engine_tokens(engine, make_prompts(384, lengths=(5, 23, 40), seed=12),
                           SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    assert engine.leak_free()
    return tokens


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_quantized_engine_generates_what_the_dequantized_folder_does(quant_model, tmp_path, scheme):
    """Greedy, float32, prompts batched: token for token (weight-only: the same weights, dequantized at use)."""
    reference = dequantized_folder(quant_model, QuantPlan(scheme), tmp_path / "deq")
    assert greedy_tokens(quant_model, quantization=scheme) == greedy_tokens(reference)


def test_wint4_on_an_ernie_moe_model_is_dense_wint8_with_wint4_experts(model_dir, tmp_path):
    """As FastDeploy reads it; the experts quantized on CPU, and the engine's tokens equal the dequantized
    folder's. Asked apart, moe_quantization wins."""
    from pdpipe.models.spec import load_spec

    model = model_dir("ernie4_5_moe")
    spec = load_spec(model)
    plan = plan_for(EngineConfig(quantization="wint4"), spec.architecture, True)
    assert (plan.dense, plan.moe) == ("wint8", "wint4")
    assert plan.scheme_for("model.layers.1.mlp.experts.3.up_proj") == "wint4"
    assert plan.scheme_for("model.layers.1.mlp.shared_experts.up_proj") == "wint8"
    assert plan.scheme_for("model.layers.1.mlp.gate") == "" and plan.scheme_for("lm_head") == ""
    apart = plan_for(EngineConfig(quantization="wint4", moe_quantization="fp8"), spec.architecture, True)
    assert (apart.dense, apart.moe) == ("wint4", "fp8")
    assert plan_for(EngineConfig(quantization="wint4"), "LlamaForCausalLM", False) == QuantPlan("wint4", "")
    reference = dequantized_folder(model, plan, tmp_path / "deq")
    assert greedy_tokens(model, quantization="wint4") == greedy_tokens(reference)


def test_ignored_modules_stay_as_they_are(quant_model):
    from pdpipe.models.layers import QuantLinear
    from pdpipe.models.loader import load_model

    plan = QuantPlan("wint8", ignore=("model.layers.0.*", "*.down_proj"))
    model = load_model(quant_model, quant=plan)
    kinds = {name: isinstance(m, QuantLinear) for name, m in model.named_modules() if name.endswith("_proj")}
    assert kinds["model.layers.1.self_attn.q_proj"] and kinds["model.layers.1.mlp.up_proj"]
    assert not kinds["model.layers.0.self_attn.q_proj"] and not kinds["model.layers.1.mlp.down_proj"]


def test_the_cache_root_names_the_weights_quantization():
    assert QuantPlan().name == "" and QuantPlan("wint8", "wint4").name == "wint8/wint4"
    roots = {root_hash("m", q) for q in ("", "wint8/none", "wint4/none", "fp8/none")}
    assert len(roots) == 4


@pytest.mark.parametrize("field", ["quantization", "moe_quantization"])
def test_an_unknown_scheme_is_refused_naming_the_field_and_the_allowed_ones(field):
    with pytest.raises(ValueError, match=f"{field}: 'int3'; allowed: wint8, wint4, fp8, block_wise_fp8"):
        EngineConfig(**{field: "int3"})


def test_patterns_to_ignore_given_as_one_string_are_refused():
    """A TOML string where a list belongs would otherwise become one-character patterns, '*' among them,
    and silently leave every projection unquantized."""
    from pdpipe.config import config_from_dict

    with pytest.raises(ValueError, match="quantization_ignore: a list of module name patterns"):
        config_from_dict(EngineConfig, {"quantization": "wint8", "quantization_ignore": "model.layers.0.*"})


def test_a_weight_of_other_than_two_dimensions_is_refused():
    with pytest.raises(ValueError, match="two dimensions"):
        quantize(torch.zeros(2, 3, 4), "wint8")
    assert isinstance(quantize(torch.zeros(4, 8), "fp8"), QuantizedWeight)  # all zeros: scale 1, codes 0


def test_the_engine_flags_take_a_scheme_and_patterns_to_ignore():
    import argparse

    from pdpipe.cli_args import add_dataclass_args, dataclass_from_args

    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, EngineConfig)
    args = parser.parse_args(["--quantization", "wint4", "--quantization-ignore", "model.layers.0.*", "*.o_proj"])
    cfg = dataclass_from_args(EngineConfig, args)
    assert (cfg.quantization, cfg.quantization_ignore) == ("wint4", ("model.layers.0.*", "*.o_proj"))
    assert dataclass_from_args(EngineConfig, parser.parse_args([])).quantization_ignore == ()
    with pytest.raises(SystemExit):
        parser.parse_args(["--quantization", "int3"])


def test_instances_of_differently_quantized_weights_do_not_exchange_kv(quant_model):
    """Their KV is not the same KV: the first copy between their pools fails, naming both."""
    from pdpipe.engine.engine import LLMEngine
    from pdpipe.engine.process import pool_info
    from pdpipe.messages import PoolInfo
    from pdpipe.transfer.base import TransferError, check_pair

    engine = LLMEngine(EngineConfig(model=str(quant_model), quantization="wint8"))
    info = pool_info("prefill-0", engine, quant_model / "pool", None)
    assert info.weights == "wint8/none"
    plain = PoolInfo(instance="decode-0", path="", shape=info.shape, dtype=info.dtype)
    heads = set(range(info.shape[4]))
    with pytest.raises(TransferError, match="prefill-0 and decode-0 cannot exchange KV: weight quantization "
                                            "wint8/none against none"):
        check_pair(info, plain, heads, heads)
    check_pair(info, PoolInfo(instance="decode-1", path="", shape=info.shape, dtype=info.dtype,
                              weights="wint8/none"), heads, heads)


def test_experts_split_by_id_are_quantized_where_kept(model_dir, tmp_path):
    """Expert parallelism: each rank holds whole experts (renumbered from 0), quantized as they were whole;
    the same weights as the dequantized folder split the same way."""
    from pdpipe.models.layers import QuantLinear
    from pdpipe.models.loader import load_model
    from pdpipe.models.parallel import TensorParallel

    model = model_dir("ernie4_5_moe")
    plan = QuantPlan("wint8", "wint4")
    reference = dequantized_folder(model, plan, tmp_path / "deq")
    for rank in (0, 1):
        tp = TensorParallel(rank, 2, expert_parallel=True)
        got, want = dict(load_model(model, tp=tp, quant=plan).named_modules()), load_model(reference, tp=tp)
        experts = [n for n, m in want.named_modules() if ".experts." in n and isinstance(m, torch.nn.Linear)]
        assert experts and all(isinstance(got[n], QuantLinear) and got[n].scheme == "wint4" for n in experts)
        for n in experts:
            assert torch.equal(dequantize(got[n].quantized), want.get_submodule(n).weight), (n, rank)


def test_the_loader_quantizes_each_tensor_before_reading_the_next(quant_model, monkeypatch):
    """Read, quantize, read, ...: what is held is the quantized model and one tensor, never the whole
    checkpoint in its own dtype."""
    from pdpipe.models import loader

    events: list[str] = []
    reads, quantizes = loader.read_tensors, loader.quantize

    def reading(model_dir):
        for name, t in reads(model_dir):
            events.append("read")
            yield name, t

    monkeypatch.setattr(loader, "read_tensors", reading)
    monkeypatch.setattr(loader, "quantize", lambda w, s: events.append("quantize") or quantizes(w, s))
    loader.load_model(quant_model, quant=QuantPlan("wint4"))
    assert events.count("quantize") == 14
    for i, event in enumerate(events):  # every quantization follows the read of its own tensor
        if event == "quantize":
            assert events[i - 1] == "read"


@pytest.mark.parametrize("scheme", ["wint4", "block_wise_fp8"])
def test_dummy_weights_are_made_quantized_one_projection_at_a_time(quant_model, scheme):
    """load_format = "dummy": no file read, every projection quantized, the rest as made; it generates."""
    from pdpipe.models.layers import QuantLinear
    from pdpipe.models.loader import load_model

    model = load_model(quant_model, load_format="dummy", quant=QuantPlan(scheme))
    projections = {n: m for n, m in model.named_modules() if n.endswith("_proj")}
    assert len(projections) == 14 and all(isinstance(m, QuantLinear) and m.scheme == scheme
                                          for m in projections.values())
    assert not any(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    assert len(greedy_tokens(quant_model, load_format="dummy", quantization=scheme)[0]) == 10


def test_dummy_weights_hold_one_projection_in_bf16_at_a_time(quant_model, monkeypatch):
    """Each projection's bf16 weights are freed once quantized, before the next is made (the 70B shape in
    int4 fits one GPU only so; its bf16 weights would take 140 GB)."""
    import weakref

    from pdpipe.models import loader

    made: list[weakref.ref] = []
    alive_at_each: list[int] = []

    def quantizing(weight, scheme):
        alive_at_each.append(sum(ref() is not None for ref in made))
        made.append(weakref.ref(weight))
        return quantize(weight, scheme)

    monkeypatch.setattr(loader, "quantize", quantizing)
    loader.load_model(quant_model, load_format="dummy", quant=QuantPlan("wint8"))
    assert len(made) == 14 and alive_at_each == [0] * 14


def test_quantized_experts_stack_for_the_fused_kernels_where_one_grid_holds_them():
    """Gate and up rows joined (a row- or group-wise scale grid joins anywhere, a 128-row block only at a
    whole block), every held expert stacked; anything else refused, naming the setting."""
    from pdpipe.models.layers import QuantLinear
    from pdpipe.models.moe import quant_stack

    def expert(scheme, inter, hidden=128):
        return [QuantLinear(quantize(torch.randn(inter, hidden), scheme)) for _ in range(2)]

    experts = [expert("wint4", 96) for _ in range(3)]
    stack = quant_stack(experts)
    assert stack.shape == (3, 192, 128) and stack.codes.shape == (3, 192, 64) and stack.scale.shape == (3, 192, 1)
    assert torch.equal(stack.codes[1], torch.cat([experts[1][0].codes, experts[1][1].codes]))
    assert quant_stack([expert("block_wise_fp8", 256) for _ in range(2)]).scale.shape == (2, 4, 1)
    with pytest.raises(ValueError, match="moe_quantization: the experts' gate and up rows cannot share"):
        quant_stack([expert("block_wise_fp8", 96) for _ in range(2)])
    with pytest.raises(ValueError, match="moe_quantization: some experts' projections are quantized"):
        quant_stack([[experts[0][0], torch.nn.Linear(128, 96)]])


def test_fp8_activations_take_fp8_products_for_prompt_sized_batches_only():
    """W8A8: from 65 rows the input is quantized per row to e4m3 (its scale amax / 448) and multiplied with
    the FP8 codes in one scaled GEMM; fewer rows (decode) stay weight-only, exactly as without it; a block
    scaled weight does not take it."""
    from pdpipe import kernels
    from pdpipe.models.layers import QuantLinear, use_fp8_activations

    gen = torch.Generator().manual_seed(4)
    qw = quantize(torch.randn(48, 96, generator=gen) * 0.05, "fp8")
    bias = torch.randn(48, generator=gen)
    plain, w8a8 = QuantLinear(qw, bias), QuantLinear(qw, bias)
    assert use_fp8_activations(w8a8) == 1
    for rows in (1, 64):
        x = torch.randn(rows, 96, generator=gen)
        assert torch.equal(w8a8(x), plain(x))
    x = torch.randn(kernels.W8A8_MIN_ROWS, 96, generator=gen)
    x[3] = 0  # a row of zeros: scale 1
    scale = torch.where(x.abs().amax(-1, keepdim=True) > 0, x.abs().amax(-1, keepdim=True) / 448, 1.0)
    xq = torch.from_numpy(to_e4m3((x / scale).numpy())).float() * scale  # rounded by an independent reference
    want = xq @ dequantize(qw).T + bias
    got = w8a8(x)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, plain(x), rtol=1e-3, atol=1e-3)  # the activations were quantized
    with pytest.raises(ValueError, match="activation_quantization: fp8 needs FP8 weights of a scale per output"):
        use_fp8_activations(QuantLinear(quantize(torch.randn(256, 256, generator=gen), "block_wise_fp8")))


def test_fp8_activations_are_refused_without_fp8_weights_naming_the_field(quant_model):
    from pdpipe.engine.engine import LLMEngine

    with pytest.raises(ValueError, match="activation_quantization: 'int8'; allowed: fp8"):
        EngineConfig(activation_quantization="int8")
    with pytest.raises(ValueError, match="activation_quantization: fp8 needs FP8 weights .* quantization is 'wint8'"):
        EngineConfig(quantization="wint8", activation_quantization="fp8")
    with pytest.raises(ValueError, match="this model has no such projection"):
        LLMEngine(EngineConfig(model=str(quant_model), activation_quantization="fp8"))


def test_an_engine_with_fp8_activations_predicts_what_fp8_weight_only_does_for_most_prompts(quant_model):
    """The first token after each of 40 prompts of 65-199 tokens (one batch: W8A8), against weight-only
    FP8: the same for at least 36 (39 when measured)."""
    import random

    from pdpipe.config import CacheConfig
    from pdpipe.engine.engine import LLMEngine
    from pdpipe.messages import SamplingParams

    prompts = make_prompts(384, lengths=tuple(random.Random(1).randrange(65, 200) for _ in range(40)), seed=5)
    firsts = []
    for activations in ("", "fp8"):
        engine = LLMEngine(EngineConfig(model=str(quant_model), quantization="fp8",
                                        activation_quantization=activations,
                                        cache=CacheConfig(block_size=8, num_blocks=1200)))
        firsts.append(engine_tokens(engine, prompts, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)))
        assert engine.leak_free()
    assert sum(a == b for a, b in zip(*firsts)) >= 36
