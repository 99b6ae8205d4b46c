"""The Overview's verdict on hand-built pieces: the rule, its tie-break, and the edge cases."""

import pytest

from qlab.analyses.verdict import TIE_FRACTION, Candidate, accuracy_loss, candidates, decide, details
from qlab.core.errors import QlabError

GB = 10**9


def row(label: str, fmt: str, kld: float, size: int) -> dict:
    return {"label": label, "format": fmt, "kld_mean": kld, "size_bytes": size, "scale_bytes": size // 20}


def plan(total: int, fits: bool = True, weights: int | None = None) -> dict:
    return {"weights_bytes": weights if weights is not None else total // 2, "scales_bytes": 1_000_000,
            "kv_cache_bytes": total // 4, "total_bytes": total, "fits": fits}


ROWS = [row("fp16", "fp16", 1e-7, 270_000_000), row("int8 g64", "int8", 0.002, 150_000_000),
        row("int4 g64", "int4", 0.03, 90_000_000), row("nf4 g64", "nf4", 0.008, 90_000_000)]
PLANS = {r["label"]: plan(2 * r["size_bytes"] + GB, weights=r["size_bytes"]) for r in ROWS}
GPU_SPEED = {"fp16": 1000.0, "int8 g64": 1800.0, "int4 g64": 3000.0, "nf4 g64": 3000.0}
NATIVE = dict.fromkeys(GPU_SPEED, True)


def gpu_verdict(bound: float = 0.01, **overrides):
    pieces = {"plans": PLANS, "predicted": GPU_SPEED, "native": NATIVE, **overrides}
    return decide(candidates(ROWS, **pieces), bound=bound, kind="causal-lm", target="H100", memory_bytes=80 * GB,
                  baseline_predicted=1000.0)


def test_fastest_within_the_bound_wins_and_the_runner_up_says_why():
    verdict = gpu_verdict()
    # int4 is as fast as nf4 but over the 0.01 bound; nf4 is inside it.
    assert verdict.recommended.label == "nf4 g64"
    assert [c.label for c in verdict.over_bound] == ["int4 g64"]
    assert verdict.runner_up.label == "int8 g64"
    assert "1.7x slower predicted on H100" in verdict.runner_up_why and "more accurate" in verdict.runner_up_why
    assert verdict.headline.startswith("Ship nf4 g64 on H100: it loses 0.008 nats/token (bound 0.01)")
    assert "3.0x the 16-bit speed" in verdict.headline
    assert "0.01" in verdict.rule and "fit H100" in verdict.rule
    assert verdict.warnings == () and verdict.does_not_fit == ()


def test_a_looser_bound_changes_the_answer_and_ties_go_to_the_smaller_then_the_more_accurate():
    assert gpu_verdict(bound=0.05).recommended.label == "nf4 g64"  # same size and speed as int4, lower loss
    speeds = {**GPU_SPEED, "int4 g64": 3000.0 * (1 + TIE_FRACTION / 2)}
    sizes = [*ROWS[:2], row("int4 g64", "int4", 0.03, 80_000_000), ROWS[3]]
    verdict = decide(candidates(sizes, predicted=speeds), bound=0.05, kind="causal-lm", target="H100")
    assert verdict.recommended.label == "int4 g64"  # inside the tie band and smaller
    assert "as fast on H100 but 1.1x larger" in verdict.runner_up_why


def test_a_format_that_does_not_fit_is_named_and_never_recommended():
    plans = {**PLANS, "nf4 g64": plan(90 * GB, fits=False)}
    verdict = gpu_verdict(plans=plans)
    assert [c.label for c in verdict.does_not_fit] == ["nf4 g64"]
    assert verdict.recommended.label == "int8 g64"
    assert any(line.startswith("Does not fit H100: nf4 g64 (90.00 GB)") for line in details(verdict))


def test_nothing_fits():
    plans = {label: plan(100 * GB + i, fits=False) for i, label in enumerate(PLANS)}
    verdict = gpu_verdict(plans=plans)
    assert verdict.recommended is None and verdict.runner_up is None
    assert len(verdict.does_not_fit) == 4
    assert verdict.headline == ("No chosen format fits H100: the smallest, fp16, needs 100.00 GB of 80.00 GB; "
                                "pick a larger target or a smaller format.")


def test_nothing_within_the_bound_names_the_closest():
    verdict = gpu_verdict(bound=1e-9)
    assert verdict.recommended is None
    assert "the most accurate, fp16, loses 1.00e-07" in verdict.headline
    assert len(verdict.over_bound) == 4


def test_one_format_has_no_runner_up():
    verdict = decide(candidates(ROWS[1:2], predicted=GPU_SPEED), bound=0.01, kind="causal-lm", target="L4")
    assert verdict.recommended.label == "int8 g64" and verdict.runner_up is None
    alone_over = decide(candidates(ROWS[2:3]), bound=0.01, kind="causal-lm", target="L4")
    assert alone_over.recommended is None and alone_over.over_bound[0].label == "int4 g64"


def test_without_predictions_the_smallest_within_the_bound_wins():
    verdict = decide(candidates(ROWS), bound=0.01, kind="causal-lm", target="this machine")
    assert verdict.recommended.label == "nf4 g64"
    assert verdict.runner_up.label == "int8 g64" and "1.7x larger" in verdict.runner_up_why


def test_smaller_but_not_faster_warnings_where_the_target_has_no_kernel():
    cpu_speed = {"fp16": 30.0, "int8 g64": 50.0, "int4 g64": 30.0, "nf4 g64": 30.0}
    native = {"fp16": False, "int8 g64": True, "int4 g64": False, "nf4 g64": False}
    verdict = gpu_verdict(predicted=cpu_speed, native=native)
    assert verdict.recommended.label == "int8 g64"  # the only one faster than dense there
    assert len(verdict.warnings) == 3
    assert verdict.warnings[1].startswith("int4 g64 is smaller but not faster on H100: there is no int4 kernel")


def test_accuracy_not_measured_yet():
    verdict = decide(candidates([], plans=PLANS, formats={"fp16": "fp16"}), bound=0.01, kind="causal-lm",
                     target="H100")
    assert verdict.recommended is None and verdict.not_measured == tuple(PLANS)
    assert verdict.headline.startswith("No accuracy measured yet")


def test_embedding_models_use_one_minus_cosine_and_measured_speed_is_reported():
    rows = [{"label": "int8 g64", "format": "int8", "cosine_mean": 0.99999, "size_bytes": 25_000_000},
            {"label": "int4 g64", "format": "int4", "cosine_mean": 0.995, "size_bytes": 15_000_000}]
    measured = {"int8 g64": {"speed": 120.0, "backend": "torchao-int8wo"}}
    verdict = decide(candidates(rows, measured=measured), bound=0.001, kind="embedding", target="this machine",
                     baseline_measured=100.0)
    assert verdict.recommended.label == "int8 g64"
    assert accuracy_loss(rows[1]) == pytest.approx(0.005)
    assert any("measured 120.0 sentences/s on this machine with torchao-int8wo (1.20x 16-bit here)" in line
               for line in details(verdict))
    assert verdict.to_record()["recommended"]["label"] == "int8 g64"


def test_a_negative_bound_or_an_unknown_kind_is_a_user_error():
    with pytest.raises(QlabError, match="non-negative"):
        decide([Candidate("fp16", "fp16", 0.0)], bound=-1, kind="causal-lm", target="H100")
    with pytest.raises(QlabError, match="no accuracy measure"):
        decide([], bound=0.1, kind="seq2seq", target="H100")
