"""bench/tp_speed.py on a CPU: its arguments and its dry run (the plan and the planner's predictions)."""

from __future__ import annotations

import json

import pytest

from bench import tp_speed
from qlab.analyses import placement


def test_dry_run_prints_the_plan_with_predictions(capsys):
    assert tp_speed.main(["--config", "llama-3.1-8b", "--gpus", "2", "--weights", "bf16,int4", "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["measured"] is False and plan["env"] == {"NCCL_NVLS_ENABLE": "0"}
    assert plan["command"].startswith("torchrun --nproc-per-node 2 bench/tp_speed.py")
    assert [(m["weights"], m["batch"]) for m in plan["measurements"]] == [
        ("bf16", 1), ("bf16", 16), ("int4", 1), ("int4", 16)]
    expected = placement.tensor_parallel("llama-3.1-8b", "h200-sxm-141gb", 2, ["bf16", "int4"], 128 + 64, [1, 16])
    assert [{k: v for k, v in row.items() if k != "weights"} for row in plan["predictions"]] == expected
    assert [row["weights"] for row in plan["predictions"]] == ["bf16", "bf16", "int4", "int4"]


def test_gpus_come_from_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    ns = tp_speed.parse_args(["--weights", "fp8", "--batches", "1,8"])
    assert (ns.gpus, ns.weights, ns.batches) == (4, ["fp8"], [1, 8])


@pytest.mark.parametrize("argv", [["--gpus", "2", "--weights", "int3"], ["--gpus", "2", "--batches", "one"],
                                  ["--gpus", "2", "--new-tokens", "1"], []])
def test_bad_arguments_exit_2(monkeypatch, argv):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit) as exit_:
        tp_speed.parse_args(argv)
    assert exit_.value.code == 2
