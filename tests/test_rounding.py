"""The rounding-methods table read back from the benchmark's results file."""

import json

import pandas as pd
import pytest

from qlab.analyses.rounding import COLUMNS, RESULTS_FILE, rounding_methods
from qlab.core.errors import QlabError

ROW = {"label": "int4 g64 asym", "format": "int4", "group_size": 64, "bits_per_weight": 4.3, "ppl": 18.0,
       "kld_mean": 0.3, "top1_agreement": 0.7, "rounding_seconds": 2.0, "algorithm": "rtn",
       "static_groups": False, "sparsity": "none"}


def write(tmp_path, rows):
    path = tmp_path / "rounding.json"
    path.write_text(json.dumps({"models": [{"model": "tiny", "calibration_seconds": 5.0, "rows": rows}]}))
    return path


def test_the_committed_results_hold_every_method_on_both_models():
    frame = pd.DataFrame(rounding_methods(RESULTS_FILE))
    assert list(frame.columns) == list(COLUMNS)
    assert set(frame["model"]) == {"smollm2-135m", "minilm-l6"}
    assert set(frame["method"]) == {"RTN", "GPTQ", "GPTQ act-order", "AWQ", "HQQ"}
    assert set(frame.loc[frame["model"] == "smollm2-135m", "group_size"]) == {64}  # 128 does not divide 576
    smol = frame[frame["model"] == "smollm2-135m"].set_index(["format", "method"])
    assert smol.loc[("int3", "GPTQ act-order"), "ppl"] < smol.loc[("int3", "RTN"), "ppl"]
    assert frame.loc[frame["model"] == "minilm-l6", "ppl"].isna().all()  # an embedding model has no perplexity


def test_methods_are_named_for_people_with_static_groups_and_sparsity(tmp_path):
    rows = [ROW, {**ROW, "algorithm": "gptq-act-order", "static_groups": True},
            {**ROW, "algorithm": "gptq", "sparsity": "2:4-sparsegpt"}]
    records = rounding_methods(write(tmp_path, rows))
    assert [r["method"] for r in records] == ["RTN", "GPTQ act-order (static groups)", "GPTQ + 2:4 (SparseGPT)"]
    assert records[0]["calibration_seconds"] == 5.0 and records[0]["cosine_mean"] is None


def test_a_missing_file_is_an_empty_table_and_a_foreign_one_is_one_line(tmp_path):
    assert rounding_methods(tmp_path / "absent.json") == []
    with pytest.raises(QlabError, match="not a rounding-methods result"):
        rounding_methods(write(tmp_path, [{"format": "int4"}]))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(QlabError, match="rounding_methods.py"):
        rounding_methods(tmp_path / "bad.json")
