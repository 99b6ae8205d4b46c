"""`qlab sweep` through qlab.cli.main on a tiny untied Llama: calibrated algorithms, and a text too short for them."""

import json

import pytest

from qlab.analyses import sweep
from qlab.cli import main
from qlab.models import loading as models
from qlab.models.evaluate import default_text
from qlab.store import Store
from tests.tiny_models import tiny_llama


@pytest.fixture()
def tiny(monkeypatch, tmp_path):
    loaded = tiny_llama(seed=3, tied=False)  # an untied head, as Llama-3.1-8B has: quantized, so calibrated too
    monkeypatch.setattr(models, "load", lambda name, **_: loaded)
    text = tmp_path / "text.txt"
    text.write_text(default_text()[:20_000])
    return ["sweep", "--model", "tiny", "--tokens", "128", "--quiet", "--granularity", "group", "--group-size", "32",
            "--db", str(tmp_path / "runs.sqlite"), "--text-file", str(text)]


def test_gptq_and_awq_sweep_a_model_with_an_untied_head(tiny, tmp_path):
    for algorithm in ("gptq", "awq"):
        out = tmp_path / f"{algorithm}.json"
        assert main([*tiny, "--formats", "int4", "--algorithm", algorithm, "--json", str(out)]) == 0
        [row] = json.loads(out.read_text())
        assert row["label"] == f"int4 g32 {algorithm}" and row["calibration_tokens"] == 4096
        assert 0 < row["kld_mean"] < 1
    assert len(Store(tmp_path / "runs.sqlite").list_runs()) == 2


def test_a_text_too_short_to_calibrate_on_is_one_line_and_exit_2_before_any_work(tiny, tmp_path, monkeypatch,
                                                                                  capsys):
    monkeypatch.setattr(sweep, "compute_baseline", lambda *a, **k: pytest.fail("work started"))
    short = tmp_path / "short.txt"
    short.write_text("A few words of text, far fewer tokens than a layer has inputs.")
    code = main([*tiny, "--formats", "int8,int4", "--algorithm", "gptq", "--text-file", str(short),
                 "--json", str(tmp_path / "rows.json")])
    assert code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "fewer than the 128 inputs" in line and "rtn or hqq" in line
    assert not (tmp_path / "rows.json").exists()
    db = tmp_path / "runs.sqlite"
    assert not db.exists() or Store(db).list_runs() == []
