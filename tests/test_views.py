"""Shareable views: dashboard choices to URL query parameters and back."""

from urllib.parse import parse_qsl, urlencode

import pytest

from qlab.views import ignored_params, params_to_view, view_to_params

FULL = {"model": "smollm2-135m", "hardware": "h100-sxm-80gb", "formats": ["fp16", "int8", "nf4"],
        "granularity": "group", "group_size": 64, "symmetric": False, "calibration": "mse",
        "algorithm": "gptq-act-order", "static_groups": True, "sparsity": "2:4-sparsegpt", "tokens": 1024,
        "page": "quantize", "runs": ["abcd12345678", "ef0123456789"], "bound": 0.005}


def test_round_trip_through_a_real_url():
    params = view_to_params(FULL)
    url_query = urlencode(params)  # what the browser's address bar holds
    assert params_to_view(dict(parse_qsl(url_query))) == FULL
    assert params == {"model": "smollm2-135m", "hw": "h100-sxm-80gb", "formats": "fp16,int8,nf4", "gran": "group",
                      "group": "64", "sym": "0", "calib": "mse", "algo": "gptq-act-order", "static": "1",
                      "sparse": "2:4-sparsegpt", "tokens": "1024", "page": "quantize",
                      "runs": "abcd12345678,ef0123456789", "bound": "0.005"}


@pytest.mark.parametrize("bound", [0.0, 0.01, 1e-7, 0.1 + 0.2, 12.5, 1e300])
def test_the_accuracy_bound_survives_a_url_exactly(bound):
    assert params_to_view(dict(parse_qsl(urlencode(view_to_params({"bound": bound}))))) == {"bound": bound}


@pytest.mark.parametrize("model", ["minilm-l6", "HuggingFaceTB/SmolLM2-135M", "/data/models/my-model",
                                   "~/models/x", "./local"])
def test_model_ids_and_paths_survive(model):
    assert params_to_view(view_to_params({"model": model})) == {"model": model}


def test_unset_keys_are_left_out_and_partial_views_round_trip():
    assert view_to_params({"model": None, "formats": [], "tokens": 512}) == {"tokens": "512"}
    assert params_to_view({}) == {}
    assert params_to_view(view_to_params({"symmetric": True})) == {"symmetric": True}


def test_bad_values_are_dropped_not_raised():
    view = params_to_view({"model": "<script>alert(1)</script>", "hw": "x" * 500, "formats": "int4,bogus,INT8,int4",
                           "gran": "rows", "group": "-3", "sym": "maybe", "calib": "magic", "tokens": "10e9",
                           "runs": "zz,abcd1234,../etc", "unknown": "1", "algo": "GPTQ;drop", "static": "yes",
                           "sparse": "3:4"})
    assert view == {"formats": ["int4", "int8"], "runs": ["abcd1234"]}
    assert params_to_view({"formats": "bogus", "tokens": "999999", "group": "0"}) == {}


def test_repeated_parameters_take_the_last_value():
    assert params_to_view({"tokens": ["128", "256"], "formats": []}) == {"tokens": 256}


# --- in the dashboard ---------------------------------------------------------------------------------------

def _wired() -> bool:
    from pages import common

    return hasattr(common, "restore_view")


@pytest.mark.skipif(not _wired(), reason="pages/common.py does not call qlab.views yet (the lead wires it)")
def test_a_shared_url_restores_the_sidebar_and_follows_changes():
    from streamlit.testing.v1 import AppTest

    # The Memory page plans a catalog architecture: nothing is loaded, so this stays fast.
    at = AppTest.from_file("../pages/memory.py", default_timeout=120)
    at.query_params.update({"model": "minilm-l6", "formats": "int8,nf4", "gran": "channel", "hw": "l4",
                            "tokens": "256", "sym": "0", "group": "999"})
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    state = at.session_state
    assert (state["model_choice"], state["formats"], state["granularity"], state["hardware"], state["tokens"],
            state["symmetric"]) == ("minilm-l6", ["int8", "nf4"], "channel", "l4", 256, False)
    assert state["group_size"] == 64  # 999 is not a sidebar choice: the default stays
    at.multiselect(key="formats").select("int4").run()
    assert at.query_params["formats"] == "int8,nf4,int4"  # the address follows the sidebar
    at.run()
    assert at.session_state["formats"] == ["int8", "nf4", "int4"]  # and is not re-applied over the user


@pytest.mark.slow
def test_the_quantize_page_shows_stored_results_without_recomputing(minilm, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from qlab.analyses.sweep import run_sweep
    from qlab.core.quant import QuantScheme
    from qlab.models.evaluate import EvalSpec
    from qlab.store import Store, store_rows, sweep_meta

    monkeypatch.setenv("QLAB_DB", str(tmp_path / "runs.sqlite"))
    schemes = [QuantScheme(f, "group", 64) for f in ("int8", "int4")]
    spec = EvalSpec(96)
    stored = [r.to_record() for r in store_rows(None, sweep_meta(minilm, schemes, spec),
                                                run_sweep(minilm, schemes, spec))]
    at = AppTest.from_file("../pages/quantize.py", default_timeout=120)
    for key, value in {"model_choice": "minilm-l6", "formats": ["int8", "int4", "nf4"], "granularity": "group",
                       "group_size": 64, "tokens": 96}.items():
        at.session_state[key] = value
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    table = at.dataframe[0].value
    assert list(table["label"]) == ["int8 g64", "int4 g64"]  # nf4 was never measured
    assert list(table["cosine_mean"]) == [r["cosine_mean"] for r in stored]
    at.button(key="run_sweep").click().run()  # computes only nf4, and stores one run holding all three
    assert list(at.dataframe[0].value["label"]) == ["int8 g64", "int4 g64", "nf4 g64"]
    newest = Store().get(Store().list_runs()[0]["id"])
    assert [r.label for r in newest.results] == ["int8 g64", "int4 g64", "nf4 g64"]
    assert newest.records()[:2] == stored and newest.status == "finished"


def test_ignored_params_name_what_a_link_lost_and_echo_no_markup():
    params = {"tokens": "-5", "formats": "int99,int4,INT4", "hw": "l4", "gran": "row", "model": "<b>x</b>",
              "utm_source": "chat"}
    assert ignored_params(params) == ["model=?b?x?/b?", "formats=int99", "gran=row", "tokens=-5"]
    assert ignored_params({"formats": "int8,int4", "runs": "abcd1234"}) == []
    assert ignored_params({"tokens": "9" * 80}) == ["tokens=" + "9" * 40]
    bad_bounds = {"abc": "abc", "-0.1": "-0.1", "nan": "nan", "inf": "inf", "1e999": "1e999", "0x1": "0x1",
                  "<i>1</i>": "?i?1?/i?"}
    for text, shown in bad_bounds.items():
        assert params_to_view({"bound": text}) == {} and ignored_params({"bound": text}) == [f"bound={shown}"]
