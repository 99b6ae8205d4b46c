"""Seed claims next to measurements: the micro-benchmark's shape and the loss arithmetic (no timing asserts)."""

import pytest

from qlab.analyses import claims, explain
from qlab.core.errors import QlabError


def test_speed_benchmark_times_every_variant():
    records = claims.measure_cpu_speed(tokens=(1, 4), blocks=1, repeats=3)
    assert [(r["variant"], r["tokens"]) for r in records] == [
        (v, t) for v in claims.SPEED_VARIANTS for t in (1, 4)]
    assert all(r["ms"] > 0 and r["median_ms"] >= r["ms"] for r in records)
    assert all(r["speedup_vs_fp32"] == 1.0 for r in records if r["variant"] == "fp32")
    with pytest.raises(QlabError):
        claims.measure_cpu_speed(tokens=())


def test_claims_compare_perplexity_change_and_list_every_seed_claim():
    sweep = [{"format": "fp32", "label": "fp32", "ppl": 10.0, "top1_agreement": 1.0},
             {"format": "fp16", "label": "fp16", "ppl": 10.01, "top1_agreement": 0.999},
             {"format": "int8", "label": "int8 per-channel", "ppl": 10.1, "top1_agreement": 0.99},
             {"format": "int4", "label": "int4 g32", "ppl": 11.5, "top1_agreement": 0.9}]
    speed = [{"variant": "fp16", "tokens": 1, "speedup_vs_fp32": 0.5},
             {"variant": "int8 dynamic (torch.ao)", "tokens": 1, "speedup_vs_fp32": 2.0}]
    rows = claims.compare_claims(sweep, speed)
    assert [r["claim"] for r in rows] == [c["claim"] for c in explain.presets()["performance_claims"]]
    assert [r["measured_loss_percent"] for r in rows] == pytest.approx([0.1, 1.0, 15.0])
    assert rows[1]["claimed_loss"] == "<2%" and rows[2]["claimed_loss"] == "2-5%"
    assert "2.00x" in rows[1]["measured_speed"] and "no int4 CPU kernel" in rows[2]["measured_speed"]
    embedding = claims.compare_claims([{"format": "int8", "label": "int8", "retrieval_agreement": 0.95,
                                        "cosine_mean": 0.999}], None)
    assert embedding[1]["measured_loss_percent"] == pytest.approx(5.0)
    assert claims.compare_claims(None, None)[0]["measured_loss"] == "run the accuracy sweep"
