"""The GPU benchmark's CPU-side parts on a tiny config: the lead runs it once on a lent GPU, so it must not
fail there for a reason a CPU could have shown."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from qlab import gpu_bench

REPO = Path(__file__).resolve().parent.parent


def tiny_args(**overrides) -> gpu_bench.Args:
    ns = gpu_bench.parser().parse_args(["--dry-run", "--device", "cpu", "--dtype", "fp32"])
    args = gpu_bench.args_from(ns)
    return gpu_bench.Args(**{**args.__dict__, **overrides})


def test_dry_run_shrinks_the_catalog_config():
    args = tiny_args()
    assert args.config_name == "llama-3.1-8b"
    assert args.config["num_hidden_layers"] == 2 and args.config["hidden_size"] == 256
    assert args.config["num_attention_heads"] % args.config["num_key_value_heads"] == 0


def test_compact_model_decodes_like_a_full_forward():
    args = tiny_args()
    torch.manual_seed(0)
    model = gpu_bench.build_compact(args)
    model.setup_caches(1, 32, torch.float32, "cpu")
    ids = torch.randint(0, args.config["vocab_size"], (1, 10))
    with torch.no_grad():
        full = model(ids, torch.arange(10))[:, -1]
        model(ids[:, :9], torch.arange(9))
        stepped = model(ids[:, 9:], torch.tensor([9]))[:, -1]
    # The static KV cache makes one decode step equal to the last position of a full forward.
    torch.testing.assert_close(stepped, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("fmt", "path"), [("bf16", "eager-loop"), ("bf16", "hf-generate"),
                                           ("int8wo", "eager-loop")])
def test_steps_measure_on_cpu(fmt, path):
    if fmt != "bf16" and importlib.util.find_spec("torchao") is None:
        pytest.skip("torchao is not installed")
    row = gpu_bench.run_step(tiny_args(), fmt, path)
    assert row["error"] is None, row["error"]
    assert row["decode_tokens_per_s"] > 0 and row["prefill_ms"] > 0
    assert row["backend"] == gpu_bench.BACKEND_OF[fmt] and row["path"] == path and row["device"] == "cpu"


def test_a_failing_recipe_becomes_an_error_row():
    row = gpu_bench.run_step(tiny_args(), "int4wo", "eager-loop")  # tinygemm INT4 needs CUDA and BF16
    assert row["error"] and row["decode_tokens_per_s"] is None


@pytest.mark.slow  # two subprocesses, each importing torch and transformers
def test_orchestrator_keeps_steps_apart_and_writes_json(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    import gpu_speed

    out = tmp_path / "gpu.json"
    argv = ["--dry-run", "--device", "cpu", "--dtype", "fp32", "--formats", "bf16,nf4", "--paths", "eager-loop",
            "--json", str(out), "--budget-s", "200"]
    assert gpu_speed.step_arguments(argv) == ["--dry-run", "--device", "cpu", "--dtype", "fp32"]
    assert gpu_speed.main(argv) == 0
    rows = json.loads(out.read_text())
    assert [(r["format_slug"], r["path"]) for r in rows] == [("nf4", "eager-loop"), ("bf16", "eager-loop")]
    nf4, bf16 = rows
    assert bf16["decode_tokens_per_s"] > 0 and bf16["error"] is None
    if importlib.util.find_spec("bitsandbytes") is None:
        assert "bitsandbytes" in nf4["error"]
    assert not list(tmp_path.glob(".*.json"))  # per-step files are cleaned up
    # Each step's output streams into one log beside the JSON, and its last lines travel with the row.
    log = (tmp_path / "gpu.log").read_text()
    assert "=== nf4:eager-loop ===" in log and "=== bf16:eager-loop ===" in log
    assert any("repetition 1" in line for line in bf16["log_tail"])


def test_explicit_steps_and_merging_runs(tmp_path):
    assert gpu_bench.steps_for([], [], "float8wo:compiled-loop, nf4:eager-loop") == [
        ("float8wo", "compiled-loop"), ("nf4", "eager-loop")]
    assert gpu_bench.steps_for(["int4wo", "bf16"], ["compiled-loop"])[:2] == [
        ("bf16", "compiled-loop"), ("int4wo", "compiled-loop")]
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps([
        {"format_slug": "int8wo", "path": "compiled-loop", "decode_tokens_per_s": 190.0},
        {"format_slug": "float8wo", "path": "compiled-loop", "decode_tokens_per_s": None, "error": "skipped"}]))
    second.write_text(json.dumps([
        {"format_slug": "float8wo", "path": "compiled-loop", "decode_tokens_per_s": 170.0},
        {"format_slug": "bf16", "path": "compiled-loop", "decode_tokens_per_s": 120.0}]))
    merged = gpu_bench.merge([str(first), str(second)], str(tmp_path / "out.json"))
    assert [(r["format_slug"], r["decode_tokens_per_s"]) for r in merged] == [
        ("bf16", 120.0), ("int8wo", 190.0), ("float8wo", 170.0)]
    assert json.loads((tmp_path / "out.json").read_text()) == merged


def test_missing_wheels_are_reported_not_fatal(tmp_path):
    message, extra = gpu_bench.install_wheels(tmp_path)
    assert extra is None and ("nothing to install" in message or "no wheels" in message)


def test_bytes_per_token_counts_what_a_decode_step_reads():
    args = tiny_args()
    model = gpu_bench.build_compact(args)
    model.setup_caches(1, 24, torch.float32, "cpu")
    c = args.config
    counted = gpu_bench.bytes_per_token(model)
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
    counted = gpu_bench.tensor_bytes(linear.weight)
    assert 128 * 256 < counted <= 128 * 256 + 128 * 8
    assert counted < 128 * 256 * 4 / 3


def test_compile_variants_name_their_own_path():
    args = tiny_args()
    assert gpu_bench._path_name(args, "int8wo", "compiled-loop") == "compiled-loop"
    assert gpu_bench._path_name(args, "int8wo", "hf-generate") == "hf-generate"
    tuned = gpu_bench.Args(**{**args.__dict__, "compile_mode": "max-autotune", "skip_guards": True})
    assert gpu_bench._path_name(tuned, "int8wo", "compiled-loop") == "compiled-loop:max-autotune:skip-guards"
    assert gpu_bench._path_name(tuned, "int8wo", "eager-loop") == "eager-loop"
    # the variants measured in bench/results/gpu_speed.json must not overwrite the default recipe's rows
    wrapped = gpu_bench.Args(**{**args.__dict__, "unwrap_subclasses": False, "quantize_head": False})
    assert gpu_bench._path_name(wrapped, "int4wo", "compiled-loop") == "compiled-loop:subclass-weights:head-bf16"
    assert gpu_bench._path_name(wrapped, "bf16", "compiled-loop") == "compiled-loop"
    assert gpu_bench._path_name(wrapped, "nf4", "compiled-loop") == "compiled-loop:head-bf16"


def test_command_line_reaches_the_recipe_switches():
    ns = gpu_bench.parser().parse_args(["--dry-run", "--device", "cpu", "--dtype", "fp32", "--keep-head-bf16",
                                        "--keep-subclasses", "--skip-guards", "--profile-steps", "5"])
    args = gpu_bench.args_from(ns)
    assert not args.quantize_head and not args.unwrap_subclasses and args.skip_guards and args.profile_steps == 5
    defaults = tiny_args()
    assert defaults.quantize_head and defaults.unwrap_subclasses and not defaults.skip_guards
    with gpu_bench._guard_stance(False), gpu_bench._guard_stance(True):
        pass  # both are context managers on this torch
