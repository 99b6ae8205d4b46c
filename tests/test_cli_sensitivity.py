"""`qlab sensitivity` and `qlab recommend`, parsed the way qlab.cli.build_parser wires them, on a tiny model."""

import json

import pytest

from qlab.cli.common import Parser
from qlab.cli.sensitivity import add_parser
from qlab.core.errors import QlabError
from qlab.models import loading as models
from tests.tiny_models import tiny_llama


def run(argv: list[str]) -> None:
    parser = Parser(prog="qlab")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    add_parser(sub)
    args = parser.parse_args(argv)
    args.func(args)


@pytest.fixture()
def tiny(monkeypatch, tmp_path):
    loaded = tiny_llama(seed=3)
    monkeypatch.setattr(models, "load", lambda name: loaded)
    text = tmp_path / "text.txt"
    from qlab.models.evaluate import default_text

    text.write_text(default_text()[:20_000])
    return ["--model", "tiny", "--tokens", "128", "--text-file", str(text), "--quiet", "--group-size", "32"]


def test_sensitivity_writes_one_row_per_layer_and_format(tiny, tmp_path):
    out = tmp_path / "rows.json"
    run(["sensitivity", *tiny, "--formats", "int8,int4", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert len(rows) == 2 * 21
    assert {r["label"] for r in rows} == {"int8 g32", "int4 g32"}
    for key in ("layer", "layer_type", "relative_mse", "sqnr_db", "predicted_delta", "block_delta", "estimated_delta", "metric",
                "weight_kurtosis", "weight_absmax_over_std", "input_outlier_channels", "bits_per_weight"):
        assert key in rows[0], key
    assert rows[0]["metric"] == "kld_mean"


def test_recommend_prints_the_assignment_and_the_measurements(tiny, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    run(["recommend", *tiny, "--budget-bits", "5", "--plan", str(plan), "--json"])
    record = json.loads(capsys.readouterr().out)
    assert set(record["assignment"].values()) <= {"int8", "int4"} and len(record["assignment"]) == 21
    assert record["bits_per_weight"] <= 5 and record["size_bytes"] > 0
    assert record["metric"] == "kld_mean"
    assert set(record["measured"]) == {"mix", "int8", "int4"}
    assert record["measured"]["int8"] <= record["measured"]["mix"] <= record["measured"]["int4"]
    exported = json.loads(plan.read_text())
    assert exported == record["plan"] and set(exported["layers"]) == set(record["assignment"])
    assert exported["format"] == "qlab-plan/1" and exported["budget"]["bits_per_weight"] == 5
    assert exported["bits_per_weight"] == record["bits_per_weight"] and exported["measured"] == record["measured"]["mix"]


def test_recommend_needs_a_budget_and_a_feasible_one(tiny):
    with pytest.raises(QlabError, match="budget"):
        run(["recommend", *tiny])
    with pytest.raises(QlabError, match="smallest formats need"):
        run(["recommend", *tiny, "--budget-bits", "2"])


def test_sensitivity_and_recommend_store_their_runs_with_db(tiny, tmp_path):
    from qlab.store import Store, stored_sensitivity

    db = tmp_path / "runs.sqlite"
    out = tmp_path / "rows.json"
    run(["sensitivity", *tiny, "--formats", "int8,int4", "--db", str(db), "--json", str(out)])
    run(["recommend", *tiny, "--budget-bits", "5", "--db", str(db), "--json", str(tmp_path / "mix.json")])
    store = Store(db)
    recommend, sensitivity = (store.get(r["id"]) for r in store.list_runs())
    assert (sensitivity.kind, sensitivity.status, recommend.kind, recommend.status) == \
        ("sensitivity", "finished", "recommend", "finished")
    # What the CLI printed is what the store gives back, rebuilt without recomputing.
    assert stored_sensitivity(sensitivity).rows() == json.loads(out.read_text())
    assert sensitivity.meta.settings["unit"] == "block" and sensitivity.meta.tokens == 128
    record = json.loads((tmp_path / "mix.json").read_text())
    assert recommend.records("mix") == record["rows"]
    assert recommend.records("recommendation")[0]["assignment"] == record["assignment"]
    assert recommend.meta.settings["budget_bits"] == 5.0


def test_without_db_or_qlab_db_nothing_is_stored(tiny, tmp_path, monkeypatch):
    from qlab.store import Store

    monkeypatch.delenv("QLAB_DB", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    run(["sensitivity", *tiny, "--formats", "int8", "--no-blocks", "--json", str(tmp_path / "rows.json")])
    assert not (tmp_path / "data").exists()
    monkeypatch.setenv("QLAB_DB", str(tmp_path / "env.sqlite"))
    run(["sensitivity", *tiny, "--formats", "int8", "--no-blocks", "--json", str(tmp_path / "rows.json")])
    [stored] = Store(tmp_path / "env.sqlite").list_runs()
    assert stored["kind"] == "sensitivity" and stored["labels"] == "int8 g32"


def test_recommend_with_gptq_stores_a_plan_of_gptq_schemes_and_its_calibration(tiny, tmp_path):
    from qlab.store import Store, stored_sensitivity

    db = tmp_path / "runs.sqlite"
    run(["recommend", *tiny, "--algorithm", "gptq", "--budget-bits", "5", "--db", str(db),
         "--json", str(tmp_path / "mix.json")])
    (stored,) = (Store(db).get(r["id"]) for r in Store(db).list_runs())
    assert {r["label"] for r in stored.records("sensitivity_linear")} == {"int8 g32 gptq", "int4 g32 gptq"}
    plan = stored.records("recommendation")[0]["plan"]
    assert len(plan["layers"]) == 21 and {s["algorithm"] for s in plan["layers"].values()} == {"gptq"}
    assert stored.meta.settings["calibration"]["calibration_tokens"] == 4096
    assert stored_sensitivity(stored).calibration == stored.meta.settings["calibration"]  # rebuilt with the run
    assert json.loads((tmp_path / "mix.json").read_text())["calibration"]["calibration_tokens"] == 4096


def test_too_little_calibration_text_is_refused_before_the_baseline(tiny, tmp_path, monkeypatch):
    from qlab.models import evaluate

    monkeypatch.setattr(evaluate, "compute_baseline", lambda *a, **k: pytest.fail("work started"))
    short = tmp_path / "short.txt"
    short.write_text("A few words of text, far fewer tokens than a layer has inputs. " * 1)
    for command in (["sensitivity"], ["recommend", "--budget-bits", "5"]):
        with pytest.raises(QlabError, match="fewer than the 128 inputs") as error:
            run([*command, *tiny, "--text-file", str(short), "--algorithm", "gptq"])
        assert "\n" not in str(error.value)
