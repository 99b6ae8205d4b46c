"""Placement over fake GPUs on the meta device: accelerate's device map with the memory planner's budgets."""

from __future__ import annotations

import json

import pytest

from qlab.analyses import memory, placement
from qlab.cli import main
from qlab.core.errors import QlabError
from qlab.models import architectures, hardware

MODEL = "llama-3.1-8b"  # 16 GB in bf16: two or four 16 GB T4s hold it, one does not
GPU = "t4"


@pytest.fixture(scope="module", params=[2, 4])
def placed(request) -> placement.Placement:
    return placement.place(MODEL, GPU, request.param)


def test_every_layer_is_placed_on_one_of_the_gpus(placed):
    arch = architectures.get(MODEL)
    assert sum(g.decoder_layers for g in placed.per_gpu) == arch.num_layers
    assert set(placed.device_map.values()) <= set(range(placed.gpus))
    assert len({v for k, v in placed.device_map.items() if k.startswith("model.layers.")}) >= 2
    # Every decoder layer appears in the map, itself or through a parent module.
    layer_gpus = [g for g in placed.per_gpu if g.decoder_layers]
    assert layer_gpus[0].first_layer == "model.layers.0"
    assert layer_gpus[-1].last_layer == f"model.layers.{arch.num_layers - 1}"


def test_each_gpu_estimate_is_within_its_budget_and_memory(placed):
    plan = memory.plan(MODEL, memory.QuantScheme("bf16"), 2048, 1, "bf16", GPU)
    assert sum(g.weights_bytes for g in placed.per_gpu) == pytest.approx(plan.weights_bytes, rel=1e-6)
    for gpu in placed.per_gpu:
        assert gpu.weights_bytes <= gpu.max_memory_bytes == placed.max_memory[gpu.gpu]
        assert gpu.total_bytes <= hardware.get(GPU).memory_bytes
        assert gpu.total_bytes == gpu.weights_bytes + gpu.kv_bytes + plan.activations_bytes + plan.overhead_bytes
        assert gpu.kv_bytes == placed.kv_bytes_per_layer * gpu.decoder_layers


def test_a_model_too_large_for_all_gpus_is_one_line():
    with pytest.raises(QlabError, match="does not fit on 1 x .*use 2 or more GPUs") as error:
        placement.place(MODEL, GPU, 1)
    assert "\n" not in str(error.value)


def test_tensor_parallel_splits_weights_and_scales_the_roofline():
    one, two = (placement.tensor_parallel(MODEL, "h200-sxm-141gb", n, ["bf16", "int4"], 2048, [1]) for n in (1, 2))
    for a, b in zip(one, two, strict=True):
        assert b["weights_per_gpu_bytes"] == -(-a["weights_bytes"] // 2)
        assert b["per_gpu_bytes"] < a["per_gpu_bytes"]
        assert b["roofline_decode_tokens_per_s"] == pytest.approx(2 * a["roofline_decode_tokens_per_s"], rel=1e-3)
    assert two[1]["weights_bytes"] < two[0]["weights_bytes"] / 2  # int4 blocks; embeddings and head stay bf16
    with pytest.raises(QlabError, match="do not divide"):
        placement.tensor_parallel(MODEL, "h200-sxm-141gb", 3, ["bf16"])


def test_mla_kv_per_token_is_the_latent_for_engines_and_transformers():
    arch = architectures.get("deepseek-v3")
    per_token = placement.kv_bytes_per_token(arch)
    assert per_token["vllm"] == arch.num_layers * (arch.kv_lora_rank + arch.qk_rope_head_dim) * 2
    assert per_token["transformers"] == per_token["vllm"]  # transformers 5.x caches the latent too


def test_cli_placement_json(capsys):
    assert main(["placement", "--model", MODEL, "--hardware", GPU, "--gpus", "2", "--tp-batches", "1",
                 "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["measured"] is False and record["gpus"] == 2
    assert [row["batch"] for row in record["tensor_parallel"]] == [1, 1, 1]


def test_cli_placement_too_large_exits_2_with_one_line(capsys):
    assert main(["placement", "--model", MODEL, "--hardware", GPU, "--gpus", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qlab: error:") and "\n" not in err
