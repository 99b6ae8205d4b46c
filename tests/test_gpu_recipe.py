"""The GPU benchmark's recipe (``qlab.backends.gpu_recipe``) on a tiny config, on the CPU: the lead runs it once
on a lent GPU, so it must not fail there for a reason a CPU could have shown."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from qlab.backends import gpu_recipe

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
import gpu_speed  # noqa: E402  (the program's dry run shapes the tiny config)


def tiny_args(*options: str, **overrides) -> gpu_recipe.Args:
    ns = gpu_speed.parser().parse_args(["--dry-run", "--device", "cpu", "--dtype", "fp32", *options])
    args = gpu_speed.args_from(ns)
    return gpu_recipe.Args(**{**args.__dict__, **overrides})


def test_compact_model_decodes_like_a_full_forward():
    args = tiny_args()
    torch.manual_seed(0)
    model = gpu_recipe.build_compact(args)
    model.setup_caches(1, 32, torch.float32, "cpu")
    ids = torch.randint(0, args.config["vocab_size"], (1, 10))
    with torch.no_grad():
        full = model(ids, torch.arange(10))[:, -1]
        model(ids[:, :9], torch.arange(9))
        stepped = model(ids[:, 9:], torch.tensor([9]))[:, -1]
    # The static KV cache makes one decode step equal to the last position of a full forward.
    torch.testing.assert_close(stepped, full, rtol=1e-4, atol=1e-4)


def test_fused_projections_compute_what_the_separate_ones_do():
    args = tiny_args()
    torch.manual_seed(0)
    separate = gpu_recipe.build_compact(args)
    fused = gpu_recipe.build_compact(gpu_recipe.Args(**{**args.__dict__, "fuse_projections": True}))
    state = separate.state_dict()
    for layer in range(len(separate.layers)):
        for fused_name, parts in (("wqkv", ("wq", "wk", "wv")), ("w13", ("w1", "w3"))):
            state[f"layers.{layer}.{fused_name}.weight"] = torch.cat(
                [state.pop(f"layers.{layer}.{part}.weight") for part in parts])
    fused.load_state_dict(state)  # strict: every fused weight given, no separate one left over
    assert len([m for m in fused.modules() if isinstance(m, torch.nn.Linear)]) == 4 * len(fused.layers) + 1
    ids = torch.randint(0, args.config["vocab_size"], (1, 10))
    for model in (separate, fused):
        model.setup_caches(1, 16, torch.float32, "cpu")
    with torch.no_grad():
        torch.testing.assert_close(fused(ids, torch.arange(10)), separate(ids, torch.arange(10)))
    row = gpu_recipe.run_step(args, "bf16", "eager-loop:fused-projections")
    assert row["error"] is None and row["path"] == "eager-loop:fused-projections"


def test_each_gpu_format_is_told_apart_and_names_its_library():
    formats = gpu_recipe.FORMATS.values()
    # The dashboard offers the formats by label, and merged results are keyed by backend: neither may repeat.
    assert len({f.label for f in formats}) == len({f.backend for f in formats}) == len(gpu_recipe.FORMATS)
    # The recipe picks a library's quantizer and compile switches from ``library``; the stored rows name it in
    # ``backend``, so the two must agree.
    prefix = {"torch": "bf16", "torchao": "torchao-", "bitsandbytes": "bnb-", "gemlite": "gemlite-", "qlab": "qlab-"}
    assert all(f.backend.startswith(prefix[f.library]) for f in formats)
    assert [slug for slug, f in gpu_recipe.FORMATS.items() if not f.bytes_bound] == ["int8dq"]


@pytest.mark.parametrize(("fmt", "path"), [("bf16", "eager-loop"), ("bf16", "hf-generate"),
                                           ("int8wo", "eager-loop")])
def test_steps_measure_on_cpu(fmt, path):
    if fmt != "bf16" and importlib.util.find_spec("torchao") is None:
        pytest.skip("torchao is not installed")
    row = gpu_recipe.run_step(tiny_args(), fmt, path)
    assert row["error"] is None, row["error"]
    assert row["decode_tokens_per_s"] > 0 and row["prefill_ms"] > 0
    assert row["backend"] == gpu_recipe.FORMATS[fmt].backend and row["path"] == path and row["device"] == "cpu"


def test_int4_groups_for_gemlite_dequantize_to_the_sweep_s_int4():
    from qlab.core.quant import fake_quantize

    torch.manual_seed(0)
    weight = torch.randn(96, 256, dtype=torch.bfloat16)
    codes, scales, zeros = gpu_recipe.int4_groups(weight, 64)
    assert codes.dtype == torch.uint8 and codes.shape == (96, 256) and 0 <= int(codes.min()) <= int(codes.max()) <= 15
    assert scales.shape == zeros.shape == (96, 4)
    rebuilt = (codes.float().reshape(96, 4, 64) - zeros[..., None]) * scales[..., None]
    expected = fake_quantize(weight, gpu_recipe.FORMATS["int4gl"].scheme, dtype=torch.float32)
    torch.testing.assert_close(rebuilt.reshape(96, 256), expected, rtol=0, atol=0)


def test_a_failing_recipe_becomes_an_error_row():
    row = gpu_recipe.run_step(tiny_args(), "int4wo", "eager-loop")  # tinygemm INT4 needs CUDA and BF16
    assert row["error"] and row["decode_tokens_per_s"] is None


def test_bytes_per_token_counts_what_a_decode_step_reads():
    args = tiny_args()
    model = gpu_recipe.build_compact(args)
    model.setup_caches(1, 24, torch.float32, "cpu")
    c = args.config
    counted = gpu_recipe.bytes_per_token(model)
    everything = sum(p.numel() for p in model.parameters()) * 4
    assert counted["weight_bytes_per_token"] == everything - c["vocab_size"] * c["hidden_size"] * 4  # no embedding
    kv_heads, head_dim = c["num_key_value_heads"], c["head_dim"]
    assert counted["kv_cache_bytes"] == 2 * c["num_hidden_layers"] * kv_heads * 24 * head_dim * 4


def test_tensor_bytes_counts_a_quantized_weight_inner_tensors():
    if importlib.util.find_spec("torchao") is None:
        pytest.skip("torchao is not installed")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    linear = torch.nn.Linear(256, 128, bias=False)
    quantize_(linear, Int8WeightOnlyConfig())
    # int8 codes (1 byte each) plus per-row metadata (a scale, and a zero point even when symmetric): more
    # than the codes, at most 8 bytes a row more, and about a quarter of the FP32 weight's 4 bytes a value.
    counted = gpu_recipe.tensor_bytes(linear.weight)
    assert 128 * 256 < counted <= 128 * 256 + 128 * 8
    assert counted < 128 * 256 * 4 / 3


def test_compile_variants_name_their_own_path():
    args = tiny_args()
    assert gpu_recipe._path_name(args, "int8wo", "compiled-loop") == "compiled-loop"
    assert gpu_recipe._path_name(args, "int8wo", "hf-generate") == "hf-generate"
    tuned = gpu_recipe.Args(**{**args.__dict__, "compile_mode": "max-autotune", "skip_guards": True})
    assert gpu_recipe._path_name(tuned, "int8wo", "compiled-loop") == "compiled-loop:max-autotune:skip-guards"
    assert gpu_recipe._path_name(tuned, "int8wo", "eager-loop") == "eager-loop"
    # the variants measured in bench/results/gpu_speed.json must not overwrite the default recipe's rows
    wrapped = gpu_recipe.Args(**{**args.__dict__, "unwrap_subclasses": False, "quantize_head": False})
    assert gpu_recipe._path_name(wrapped, "int4wo", "compiled-loop") == "compiled-loop:subclass-weights:head-bf16"
    assert gpu_recipe._path_name(wrapped, "bf16", "compiled-loop") == "compiled-loop"
    assert gpu_recipe._path_name(wrapped, "nf4", "compiled-loop") == "compiled-loop:head-bf16"
    fused = gpu_recipe.Args(**{**args.__dict__, "fuse_projections": True})
    assert gpu_recipe._path_name(fused, "int8gl", "compiled-loop") == "compiled-loop:fused-projections"
