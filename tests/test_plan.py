"""A per-layer plan as a file: one format written (``plan_record``), and every older qlab spelling read back."""

import json

import pytest
import torch

from qlab.core.errors import QlabError
from qlab.core.plan import PLAN_FORMAT, plan_record, quantized_copy, read_plan, size_report
from qlab.core.quant import QuantScheme

INT4 = {"format": "int4", "granularity": "group", "group_size": 32, "symmetric": True, "calibration": "minmax",
        "percentile": 99.9, "scale_dtype": "fp16", "targets": ["weights"], "algorithm": "rtn",
        "static_groups": False, "sparsity": "none"}
NF4 = {**INT4, "format": "nf4"}
PLAN = {"0": QuantScheme.from_dict(INT4), "2": QuantScheme.from_dict(NF4)}
# Files as the two writers before ``plan_record`` wrote them: ``runs export-scheme`` / ``export --scheme-json``,
# and the plan inside the Sensitivity page's downloaded mix (``recommend --plan``).
LAYER_SCHEMES_FILE = {"format": "qlab-layer-schemes", "model": "tiny", "model_sha256": "ab" * 32,
                      "unquantized_format": "fp16", "layers": {"0": INT4, "2": NF4}}
MIXED_FILE = {"format": "qlab.mixed/1", "model": "tiny", "modules": {"0": INT4, "2": NF4},
              "torchao": {"FqnToConfig": {"0": None, "2": None}},
              "optimum_quanto": {"0": {"weights": "qint4", "activations": "none"},
                                 "2": {"weights": "none", "activations": "none"}}, "notes": []}


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 64))


def test_plan_record_keeps_provenance_size_and_library_spellings_and_reads_back():
    net = model()
    record = json.loads(json.dumps(plan_record(net, PLAN, "tiny", "cd" * 32, budget={"bits_per_weight": 5.0})))
    size = size_report(net, PLAN)
    assert record["format"] == PLAN_FORMAT and record["model"] == "tiny" and record["model_sha256"] == "cd" * 32
    assert record["unquantized_format"] == "fp16" and record["budget"] == {"bits_per_weight": 5.0}
    assert record["size_bytes"] == size.size_bytes and record["bits_per_weight"] == size.bits_per_weight
    assert record["torchao"]["FqnToConfig"]["0"]["granularity"] == "PerGroup(32)"
    assert record["torchao"]["FqnToConfig"]["2"] is None and any("nf4" in note for note in record["notes"])
    assert record["optimum_quanto"]["2"]["weights"] == "none"
    assert read_plan(record) == PLAN


def test_a_whole_model_scheme_is_written_per_layer():
    record = plan_record(model(), QuantScheme("int8"), "tiny")
    assert read_plan(record) == dict.fromkeys(["0", "2"], QuantScheme("int8"))
    assert record["model_sha256"] is None


@pytest.mark.parametrize("old", [LAYER_SCHEMES_FILE, MIXED_FILE, {"model": "tiny", "plan": MIXED_FILE}],
                         ids=["qlab-layer-schemes", "qlab.mixed/1", "downloaded recommendation"])
def test_older_plan_files_read_back_to_the_same_plan(old):
    net = model()
    restored = read_plan(json.loads(json.dumps(old)))
    assert restored == PLAN == read_plan(plan_record(net, PLAN, "tiny"))
    x = torch.randn(3, 64)
    assert torch.equal(quantized_copy(net, restored)(x), quantized_copy(net, PLAN)(x))


@pytest.mark.parametrize("bad", [{"modules": {}}, {"format": "qlab-layer-schemes", "modules": {}},
                                 {"format": ["qlab.mixed/1"]}, [1, 2], {"format": PLAN_FORMAT}])
def test_anything_else_is_refused_in_one_line(bad):
    with pytest.raises(QlabError, match="not a qlab plan file") as caught:
        read_plan(bad)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(("changes", "missing"), [
    ({"algorithm": "awq"}, "AWQ"), ({"algorithm": "hqq"}, "HQQ"), ({"algorithm": "gptq"}, "GPTQ"),
    ({"algorithm": "gptq-act-order"}, "activation order"), ({"sparsity": "2:4"}, "2:4 pruning"),
    ({"algorithm": "gptq", "sparsity": "2:4-sparsegpt"}, "2:4-sparsegpt pruning")])
def test_library_spellings_say_what_they_do_not_reproduce(changes, missing):
    """torchao and quanto round to nearest: an AWQ, HQQ, GPTQ or 2:4 layer's entry says so instead of passing
    for the plain int scheme it resembles."""
    scheme = QuantScheme.from_dict({**INT4, "symmetric": False, **changes})
    record = json.loads(json.dumps(plan_record(model(), {"0": scheme, "2": QuantScheme.from_dict(INT4)}, "tiny")))
    torchao, quanto = record["torchao"]["FqnToConfig"], record["optimum_quanto"]
    assert torchao["0"]["config"] == "IntxWeightOnlyConfig" and quanto["0"]["weights"] == "qint4"
    assert missing in torchao["0"]["note"] and missing in quanto["0"]["note"]
    assert "note" not in torchao["2"] and "note" not in quanto["2"]  # round-to-nearest is what they do
    assert any("round to nearest" in note for note in record["notes"])


def test_act_order_with_static_groups_keeps_its_groups_in_order():
    scheme = QuantScheme.from_dict({**INT4, "algorithm": "gptq-act-order", "static_groups": True})
    note = plan_record(model(), scheme, "tiny")["torchao"]["FqnToConfig"]["0"]["note"]
    assert "act-order" in note and "activation order" not in note


SPLIT_SCHEMES = [
    QuantScheme("int4", "group", 32),
    QuantScheme("int4", "group", 32, algorithm="gptq-act-order"),
    QuantScheme("int4", "group", 32, algorithm="gptq-act-order", static_groups=True),
    QuantScheme("int4", "group", 32, symmetric=False, algorithm="awq"),
    QuantScheme("int8", "channel", sparsity="2:4"),
    QuantScheme("fp16", sparsity="2:4-sparsegpt"),
]


@pytest.mark.parametrize("scheme", SPLIT_SCHEMES, ids=lambda s: s.label)
def test_size_report_names_what_algorithms_add_and_keeps_every_total(scheme):
    """2:4 positions, act-order's group index and AWQ's input scales are parts of their own: each equals its
    formula from the layout (and the bytes the packed tensors really hold), the totals stay what they were."""
    from qlab.core.algorithms import LayerStats, quantize_weight
    from qlab.core.algorithms.gptq import hessian_from_inputs

    net = model()
    report = size_report(net, scheme)
    linears = [net[0], net[2]]
    parts = [scheme.storage_bytes(tuple(m.weight.shape)) for m in linears]
    # Totals as the report counted them before the split: every part, and scales with zero-points.
    assert report.quantized_bytes == sum(sum(p.values()) for p in parts)
    assert report.scale_bytes == sum(p["scales"] + p["zero_points"] for p in parts)
    assert report.size_bytes == report.quantized_bytes + (32 + 64) * 2  # the biases, at fp16
    numel = [m.weight.numel() for m in linears]
    inputs = [m.in_features for m in linears]
    sparse = scheme.sparsity != "none"
    assert report.metadata_bytes == (sum(n // 2 * 2 // 8 for n in numel) if sparse else 0)  # 2 bits per kept value
    indexed = scheme.algorithm == "gptq-act-order" and not scheme.static_groups
    assert report.index_bytes == (sum(4 * i for i in inputs) if indexed else 0)  # an int32 per input
    assert report.awq_scale_bytes == (sum(2 * i for i in inputs) if scheme.algorithm == "awq" else 0)  # fp16
    stored = [n // 2 if sparse else n for n in numel]
    assert report.code_bytes == sum(s * scheme.fmt.bits // 8 for s in stored)
    assert (report.code_bytes + report.scale_bytes + report.metadata_bytes + report.index_bytes
            + report.awq_scale_bytes) == report.quantized_bytes
    # The layout's formula is what the packed tensors hold.
    torch.manual_seed(1)
    x = torch.randn(256, 64)
    packed = quantize_weight(net[0].weight, scheme, LayerStats(hessian_from_inputs(x), x.abs().mean(0))).packed()
    held = {"metadata": "metadata", "group_index": "group_index", "input_scales": "input_scales"}
    for part, key in held.items():
        expected = parts[0].get(part, 0)
        assert (packed[key].numel() * packed[key].element_size() if key in packed else 0) == expected, part


@pytest.mark.parametrize(("dtype", "rest"), [(torch.float32, "fp16"), (torch.bfloat16, "bf16"),
                                             (torch.float16, "fp16")])
def test_the_tensors_a_plan_leaves_keep_a_16_bit_models_own_dtype_and_fp32_goes_to_fp16(dtype, rest):
    net = model().to(dtype)
    with torch.no_grad():  # a bias below fp16's smallest subnormal (6e-8): torch's cast to fp16 flushes it to 0
        net[0].bias[0] = 1e-8
    assert plan_record(net, PLAN, "tiny", "cd" * 32)["unquantized_format"] == rest
    shadow = quantized_copy(net, PLAN)
    expected = net[0].bias if dtype != torch.float32 else net[0].bias.to(torch.float16).to(dtype)
    assert torch.equal(shadow[0].bias, expected)
    assert (shadow[0].bias[0] == 0) == (dtype != torch.bfloat16)  # fp16 holds no 1e-8 to begin with
    # plain casts cast everything, whatever the model's dtype
    assert plan_record(net, {"0": QuantScheme("fp32"), "2": QuantScheme("fp32")}, "tiny", "cd" * 32)[
        "unquantized_format"] == "fp32"
