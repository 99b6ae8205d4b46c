"""qlab.backends.export_compressed: qlab's own RTN / GPTQ / AWQ written as compressed-tensors (pack-quantized),
reloaded by transformers' own loader to qlab's weights bit for bit and its simulated model's logits; schemes the
layout cannot hold refused in one line before anything is written."""

import json

import pytest
import torch
from safetensors.torch import load_file

from qlab import cli
from qlab.analyses.activations import calibration_data
from qlab.analyses.calibration import collect_layer_stats
from qlab.backends import export
from qlab.backends import export_compressed as ec
from qlab.core.errors import QlabError
from qlab.core.plan import quantizable_linears, quantized_copy
from qlab.core.quant import QuantScheme
from qlab.models.evaluate import EvalSpec
from qlab.models.loading import weights_digest
from tests.tiny_models import tiny_bert, tiny_llama

G32 = {"granularity": "group", "group_size": 32}


def unpack(packed: torch.Tensor, bits: int, count: int, dim: int = 1) -> torch.Tensor:
    """Reference unpacker written from the format's description (not compressed-tensors' code): value i of a
    row sits at bits ``bits * (i % per_word)`` of int32 word ``i // per_word``, offset by ``2**(bits-1)``."""
    words = packed.T if dim == 0 else packed
    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    values = (words.to(torch.int64)[..., None] >> shifts) & ((1 << bits) - 1)
    values = values.reshape(words.shape[0], -1)[:, :count] - (1 << (bits - 1))
    return values.T if dim == 0 else values


def file_weight(tensors: dict, name: str, bits: int) -> torch.Tensor:
    """A linear's weight dequantized in float32 from the file alone: (code - zero) * scale per group."""
    rows, columns = tensors[f"{name}.weight_shape"].tolist()
    scale = tensors[f"{name}.weight_scale"].to(torch.float32)
    codes = unpack(tensors[f"{name}.weight_packed"], bits, columns).to(torch.float32)
    group = columns // scale.shape[1]
    if f"{name}.weight_zero_point" in tensors:
        zero = unpack(tensors[f"{name}.weight_zero_point"], bits, rows, dim=0).to(torch.float32)
        codes = codes - zero.repeat_interleave(group, dim=1)
    return codes * scale.repeat_interleave(group, dim=1)


def calibrate(loaded, tokens: int = 512):
    names = [name for name, _ in quantizable_linears(loaded.model)]
    return collect_layer_stats(loaded, calibration_data(loaded, EvalSpec(), tokens), names)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def tiny():
    loaded = tiny_llama(seed=3)
    return loaded, calibrate(loaded)


@pytest.mark.parametrize("fields", [
    dict(format="int4", **G32),
    dict(format="int8", granularity="channel"),
    dict(format="int4", algorithm="gptq", **G32),
    dict(format="int4", algorithm="gptq-act-order", static_groups=True, **G32),
    dict(format="int4", algorithm="awq", **G32),
], ids=["int4-rtn", "int8-channel", "gptq", "gptq-act-order", "awq"])
def test_tiny_llama_reloads_in_float32_to_the_simulation_exactly(tiny, tmp_path, fields):
    from transformers import AutoModelForCausalLM

    loaded, stats = tiny
    scheme = QuantScheme(**fields)
    before = weights_digest(loaded.model)
    plan = ec.quantize_for_export(loaded, scheme, stats)
    result = ec.write_compressed(loaded, scheme, plan, tmp_path / "out")
    assert weights_digest(loaded.model) == before  # the shared model is untouched
    assert set(result.files) == {"config.json", "model.safetensors", "qlab_scheme.json"}
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    quant = config["quantization_config"]
    weights = quant["config_groups"]["group_0"]["weights"]
    assert (quant["quant_method"], quant["format"], quant["ignore"]) == ("compressed-tensors", "pack-quantized",
                                                                        ["lm_head"])
    assert (weights["num_bits"], weights["symmetric"]) == (scheme.fmt.bits, True)
    assert weights["strategy"] == ("group" if scheme.granularity == "group" else "channel")
    assert weights.get("actorder") == ("weight" if scheme.algorithm == "gptq-act-order" else None)
    assert sorted(plan.qtensors) == sorted(n for n, _ in quantizable_linears(loaded.model))  # the tied head is not
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    assert "lm_head.weight" not in tensors and tensors["model.embed_tokens.weight"].dtype == torch.float16
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    ids = torch.arange(40).reshape(2, 20) % 90
    # Same weights, same transformers classes, float32 on both sides: identical, not merely close.
    assert torch.equal(logits(reloaded, ids), logits(ec.simulated_model(loaded, plan), ids))
    for name, qtensor in plan.qtensors.items():  # (compressed-tensors decompresses on the first forward)
        assert torch.equal(file_weight(tensors, name, scheme.fmt.bits), qtensor.dequantize())
        assert torch.equal(reloaded.get_submodule(name).weight, qtensor.dequantize())
    if scheme.algorithm in ("rtn", "gptq"):  # and the simulation is the sweep's own model
        sweep = quantized_copy(loaded.model, dict.fromkeys(plan.qtensors, scheme), stats)
        assert torch.equal(logits(sweep, ids), logits(reloaded, ids))
    assert (scheme.algorithm == "awq") == bool(plan.replaced)  # AWQ folded its scales into the two norms
    assert export.read_scheme(tmp_path / "out")["library"] == "compressed-tensors"


def test_asymmetric_zero_points_are_packed_along_rows_and_reload(tiny, tmp_path):
    loaded, _ = tiny
    scheme = QuantScheme("int4", symmetric=False, **G32)
    result = ec.export_compressed(loaded, scheme, tmp_path / "out")
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    name = "model.layers.0.mlp.down_proj"
    qtensor = ec.quantize_for_export(loaded, scheme).qtensors[name]
    assert tensors[f"{name}.weight_zero_point"].shape == (64 // 8, 128 // 32)  # 8 rows per int32 word
    assert torch.equal(file_weight(tensors, name, 4), qtensor.dequantize())
    # transformers 5.23 reads packed zero-points only when it dequantizes at load, in the scale's dtype (fp16).
    reloaded = export.load_exported(result.out_dir)
    assert torch.equal(reloaded.get_submodule(name).weight, qtensor.dequantize(torch.float16))


def test_awq_folds_into_v_when_attention_is_not_grouped(tmp_path):
    """With one v row per o input, o's scale goes into v's rows: the folded int8 model stays as close to the
    base model as round-to-nearest int8 (a fold applied the wrong way round would be far off)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlab.models.loading import LoadedModel, ModelSource
    from tests.tiny_models import ByteTokenizer

    torch.manual_seed(4)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
    loaded = LoadedModel(ModelSource("tiny-mha", "causal-lm", "."), LlamaForCausalLM(config).eval(), ByteTokenizer())
    stats = calibrate(loaded)
    scheme = QuantScheme("int8", "channel", algorithm="awq")
    plan = ec.quantize_for_export(loaded, scheme, stats)
    # Only the norms change as parameters; up's and v's rows are scaled before they are rounded.
    assert sorted(plan.replaced) == sorted(f"model.layers.{i}.{norm}.weight" for i in range(2)
                                           for norm in ("input_layernorm", "post_attention_layernorm"))
    ids = torch.arange(40).reshape(2, 20) % 90
    base = logits(quantized_copy(loaded.model, {}), ids)
    rtn = QuantScheme("int8", "channel")
    rtn_error = (logits(quantized_copy(loaded.model, dict.fromkeys(plan.qtensors, rtn)), ids) - base).abs().max()
    awq_error = (logits(ec.simulated_model(loaded, plan), ids) - base).abs().max()
    assert awq_error < 2 * rtn_error
    from transformers import AutoModelForCausalLM

    ec.write_compressed(loaded, scheme, plan, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert torch.equal(logits(reloaded, ids), logits(ec.simulated_model(loaded, plan), ids))


@pytest.mark.parametrize("fields, message", [
    (dict(format="nf4", **G32), "holds int4 or int8 weights, not nf4"),
    (dict(format="int3", **G32), "holds int4 or int8 weights, not int3"),
    (dict(format="int4", granularity="tensor"), "one scale per output channel or per group"),
    (dict(format="int4", granularity="group", group_size=16), "group size 16 is not one vLLM"),
    (dict(format="int4", algorithm="hqq", **G32), "hqq fits a float zero-point"),
    (dict(format="int4", algorithm="gptq-act-order", **G32), "no longer reads a group index"),
    (dict(format="int4", sparsity="2:4", **G32), "is dense"),
    (dict(format="int4", granularity="group", group_size=128), "group size 128 does not divide the 64 inputs"),
])
def test_what_the_layout_cannot_hold_is_refused_in_one_line_before_writing(tmp_path, fields, message):
    with pytest.raises(QlabError) as error:
        ec.export_compressed(tiny_llama(), QuantScheme(**fields), tmp_path / "out")
    assert message in str(error.value) and "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_awq_needs_llama_style_layers(tmp_path):
    with pytest.raises(QlabError, match="Llama-style decoder layers"):
        ec.export_compressed(tiny_bert(), QuantScheme("int4", algorithm="awq", **G32), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_a_checkpoint_and_refuses_in_one_line(tmp_path, capsys, monkeypatch):
    from qlab.models import loading as models

    loaded = tiny_llama(seed=2)
    monkeypatch.setattr(models, "load", lambda name: loaded)
    out = tmp_path / "out"
    argv = ["export", "--model", "tiny", "--compressed-tensors", "--format", "int4", "--group-size", "32",
            "--out", str(out)]
    assert cli.main([*argv, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["backend"] == "compressed-tensors" and record["scheme"]["group_size"] == 32
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
    for bad in (argv,  # out is not empty now
                [*argv[:-2], "--out", str(tmp_path / "b"), "--group-size", "128"],
                [*argv[:-2], "--out", str(tmp_path / "c"), "--format", "nf4"],
                [*argv[:-2], "--out", str(tmp_path / "d"), "--algorithm", "gptq-act-order"]):
        assert cli.main(bad) == 2
        err = capsys.readouterr().err
        assert err.startswith("qlab: error: ") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert cli.main([*argv, "--force"]) == 0  # --force replaces an earlier export


@pytest.fixture(scope="module")
def smollm_stats(smollm):
    return calibrate(smollm)


@pytest.mark.slow
@pytest.mark.parametrize("fields", [
    dict(format="int4", granularity="group", group_size=64, algorithm="gptq-act-order", static_groups=True),
    dict(format="int4", granularity="group", group_size=64, algorithm="awq"),
], ids=["gptq-act-order", "awq"])
def test_smollm_reloads_with_transformers_to_qlabs_weights_and_logits(smollm, smollm_stats, tmp_path, fields):
    """SmolLM2 at int4 g64 (128 does not divide its 576-wide layers), reloaded by a plain
    ``AutoModelForCausalLM.from_pretrained(dir)``: at the checkpoint's fp16, as a user would."""
    from transformers import AutoModelForCausalLM

    scheme = QuantScheme(**fields)
    plan = ec.quantize_for_export(smollm, scheme, smollm_stats)
    ec.write_compressed(smollm, scheme, plan, tmp_path / "out")
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.dtype == torch.float16
    ids = smollm.tokenizer("A quantized model, saved and reloaded, gives the simulation's logits.",
                           return_tensors="pt")["input_ids"]
    mine = logits(reloaded, ids).float()
    for name, qtensor in plan.qtensors.items():  # (compressed-tensors decompresses on the first forward)
        assert torch.equal(file_weight(tensors, name, 4), qtensor.dequantize())  # float32, from the file
        assert torch.equal(reloaded.get_submodule(name).weight, qtensor.dequantize(torch.float16))
    simulated = logits(ec.simulated_model(smollm, plan), ids)
    # The only difference left is fp16 arithmetic in 30 layers (the simulation runs float32): measured 0.085 of
    # a logit standard deviation of 5.1 with GPTQ; 0.25 is three times that, far below a wrong weight's error.
    assert (mine - simulated).abs().max() < 0.25
    assert torch.equal(mine.argmax(-1), simulated.argmax(-1))
