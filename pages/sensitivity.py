"""Sensitivity page: which layers lose the most when quantized, and a mixed-precision plan measured end to end."""

import json

import pandas as pd
import streamlit as st
from streamlit.errors import StreamlitPageNotFoundError

from pages import common
from qlab import charts
from qlab.analyses.mixed import (
    Budget,
    budget_range,
    budget_steps,
    choices_from,
    compare,
    recommend,
    recommendation_record,
)
from qlab.analyses.overview import analysis_seconds
from qlab.analyses.sensitivity import analyze, calibrate, check_calibration, replayed_shares
from qlab.analyses.sweep import check_schemes
from qlab.core.algorithms import needs_calibration
from qlab.core.errors import QlabError
from qlab.models.evaluate import Baseline, EvalSpec, Progress
from qlab.models.loading import model_sha256
from qlab.store import (
    ANALYSIS_RUN,
    Recorder,
    Store,
    save_sensitivity,
    save_summary,
    sensitivity_meta,
    sensitivity_saver,
    stored_sensitivity,
)

UNITS = {"block": "one block at a time", "linear": "one linear at a time", "none": "predict only (fastest)"}
TABLE_COLUMNS = ["layer", "layer_type", "block", "label", "bits_per_weight", "estimated_delta", "block_delta",
                 "linear_delta", "predicted_delta", "relative_mse", "sqnr_db", "weight_relative_mse", "weight_absmax_over_std",
                 "weight_kurtosis", "weight_outlier_rows", "input_absmax", "input_outlier_channels"]
TABLE_LABELS = {"layer_type": "layer type", "label": "scheme", "estimated_delta": "estimated Δ",
                "block_delta": "block Δ (measured)", "linear_delta": "layer Δ (measured)",
                "predicted_delta": "predicted Δ (2nd order)", "relative_mse": "output relative MSE",
                "weight_relative_mse": "weight relative MSE", "weight_absmax_over_std": "weight abs-max / std",
                "weight_kurtosis": "weight kurtosis", "weight_outlier_rows": "weight outlier rows",
                "input_absmax": "input abs-max", "input_outlier_channels": "input outlier channels"}
ERROR_LABELS = {"kld_mean": "error: KLD (nats)", "cosine_mean": "error: 1 - cosine"}
PARETO_POINTS = 4  # mixes measured between the smallest and largest format, besides the slider's budget

common.page_setup()
st.title("Sensitivity")
loaded = common.current_model()
st.caption("Which linear layers lose the most when quantized. **Per linear**: the output error of quantizing "
           "that layer alone, on its real input activations (captured once with hooks). **End to end**: the "
           "model's KL divergence (LMs) or 1 - cosine (embedding models) with one block quantized; each block "
           "replays from its cached input, so the unchanged prefix is never re-run. Then a per-layer format "
           "plan under a size budget, measured against the uniform formats.")
common.show_caveat(loaded)
base = loaded.dtype_label  # what the unquantized layers run in: the model as loaded
views = {"forward": f"quantize one unit, rest {base}", "reverse": "quantize all but one unit"}

with common.user_errors():
    candidates = {s.label: s for s in common.schemes() if s.fmt.scaled or s.sparsity != "none"}
if not candidates:
    st.info("Pick at least one scaled format in the sidebar (int8, int4, nf4, fp8...), or a sparsity: plain "
            "fp32/fp16/bf16 casts have next to no sensitivity to analyse.")
    st.stop()
kept = [label for label in st.session_state.get("sensitivity_schemes", []) if label in candidates]
st.session_state["sensitivity_schemes"] = kept or (
    [label for label, s in candidates.items() if s.format in ("int8", "int4")] or list(candidates)[:2])
formats_column, unit_column, view_column = st.columns([3, 2, 2])
chosen = formats_column.multiselect("Formats to analyse", list(candidates), key="sensitivity_schemes",
                                    help="From the sidebar's scheme. Each format costs one end-to-end "
                                         "measurement per block (the recommender chooses among these).")
unit = unit_column.radio("End to end", list(UNITS), key="sensitivity_unit", format_func=UNITS.get,
                         help="Replays from cached block inputs: one per block, or one per linear (exact per layer, "
                              "many more replays). 'Predict only' skips them: the recommender then relies on "
                              "the second-order estimate alone.")
view = view_column.radio("View", list(views), key="sensitivity_view", format_func=views.get, horizontal=True,
                         help="Reverse: everything quantized except one unit, as AIMET's QuantAnalyzer reports.")
if not chosen:
    st.info("Pick at least one format to analyse.")
    st.stop()

spec = EvalSpec(st.session_state["tokens"])
schemes = tuple(candidates[label] for label in chosen)
with common.user_errors():
    check_schemes(loaded, list(schemes))  # a group size that does not fit is said now, and stores no failed run
    check_calibration(loaded, schemes, spec)  # so is a text too short to calibrate GPTQ or AWQ on
calibrated = needs_calibration(schemes)
if calibrated:
    st.caption("Each layer is rounded by the sidebar's algorithm, calibrated as the Quantize page calibrates it: "
               "on up to 4096 tokens from the end of the text, apart from the tokens evaluated.")
measured_unit = "block" if unit == "none" else unit
run_key = (loaded.name, schemes, spec, spec.text_sha256, unit, view)
reports = st.session_state.setdefault("sensitivity_reports", {})
analysis_runs = st.session_state.setdefault("sensitivity_run_ids", {})  # run_key -> the stored analysis run
analysis_settings = {"schemes": [s.to_dict() for s in schemes], "unit": measured_unit, "view": view,
                     "blocks": unit != "none", "predict": True}


def latest_stored(kind: str, holding: str, statuses: list[str] | None = None, **settings):
    """The newest stored run of this analysis (and ``settings``), or None; a database that cannot be read is
    said once and treated as empty."""
    try:
        return Store().latest_run(kind, loaded.name, model_sha256(loaded), analysis_settings | settings,
                                  text_sha256=spec.text_sha256, tokens=spec.tokens, holding=holding,
                                  statuses=statuses)
    except QlabError as error:
        st.warning(f"Run history unavailable: {error}")
        return None


if run_key not in reports:  # a reload or a shared link: show the analysis the run history already holds
    stored = latest_stored("sensitivity", "sensitivity_linear", ["finished"])
    if stored is not None:
        reports[run_key] = stored_sensitivity(stored)
        analysis_runs[run_key] = stored.id
        st.caption(f"Shown from the analysis stored {stored.created_at[:16].replace('T', ' ')} UTC (History); "
                   "**Analyse** measures it again.")


def baseline() -> Baseline:
    return common.baseline(loaded, loaded.name, spec, spec.text_sha256)


def calibration() -> tuple[dict | None, dict]:
    """The statistics GPTQ or AWQ round each layer with, and their record; collected once per model and text,
    so the mixes measured after the analysis round with the very same ones."""
    if not calibrated:
        return None, {}
    key = (loaded.name, spec, spec.text_sha256)
    kept = st.session_state.get("sensitivity_calibration")
    if kept is None or kept[0] != key:  # one model's statistics at a time: they weigh a copy of its linears
        kept = st.session_state["sensitivity_calibration"] = (key, calibrate(loaded, schemes, spec))
    return kept[1]


def calibration_settings() -> dict:
    """How the run was calibrated, stored with it as the sweep stores its calibration tokens."""
    record = calibration()[1]
    return {"calibration": record} if record else {}


def analysis_run():
    return sensitivity_meta("sensitivity", loaded, schemes, spec, baseline(), unit=measured_unit, view=view,
                            blocks=unit != "none", hardware=st.session_state["hardware"], **calibration_settings())


# analyze reports each step once it is done; the label names the one that starts.
NEXT_STEP = {"rounded every layer": f"capturing activations and block inputs (one {base} pass)",
             "captured activations and block inputs": "estimating the output curvature (one backward pass)",
             "estimated output curvature": "measuring each unit end to end",
             "everything quantized": "capturing the quantized model's block inputs",
             "captured quantized block inputs": f"measuring each unit kept in {base}"}


def running(progress: Progress) -> Progress:
    def named(fraction: float, message: str) -> None:
        scheme, _, done = message.rpartition(": ")
        if done.startswith("rounding "):  # names the layer being rounded already
            progress(fraction, message)
            return
        upcoming = NEXT_STEP.get(done) or f"measuring the unit after {done.removeprefix('all but ')}"
        progress(fraction, f"{scheme}: {upcoming}" if scheme else upcoming)

    return named


def analyse(progress: Progress, recorder: Recorder) -> None:
    # One stored run per press; per-linear records and each measured unit are saved as they finish.
    saved = st.session_state["sensitivity_saved"] = {"linear": 0, "block": 0}
    save = sensitivity_saver(recorder)

    def on_records(part: str, records: list[dict]) -> None:
        save(part, records)
        saved[part] += len(records)

    stats, record = calibration()
    reports[run_key] = analyze(loaded, schemes, baseline(), blocks=unit != "none", unit=measured_unit, view=view,
                               on_records=on_records, progress=running(progress), calibration=stats,
                               calibration_record=record)
    save_summary(recorder, seconds=reports[run_key].seconds)
    # A recommendation built on this analysis names this run instead of storing it again.
    analysis_runs[run_key] = recorder.run_id if recorder.error is None else None


def analysis_kept() -> str:
    saved = st.session_state.get("sensitivity_saved", {})
    if not saved.get("linear"):
        return "It stopped before the per-layer errors were measured, so nothing new was kept."
    return (f"Kept in History as a stopped run: the per-layer errors ({saved['linear']} records) and "
            f"{common.count(saved['block'], 'end-to-end measurement')}; press **Analyse** for the full analysis.")


common.long_run("Analyse", "run_sensitivity", analyse, prepare=analysis_run, cancel_key="cancel_sensitivity",
                cancel_help="Stops the analysis; what it measured is kept in History.", kept=analysis_kept,
                start_text=("Calibrating on the end of the text, then capturing" if calibrated else "Capturing")
                + f" activations and block inputs (one {base} pass)...")

report = reports.get(run_key)
if report is None:
    seconds = analysis_seconds(loaded, schemes, spec, unit=measured_unit, view=view, blocks=unit != "none")
    replays = (f", {common.count(len(replayed_shares(loaded.model, measured_unit)), 'replay')} end to end per format "
               f"(one per {measured_unit})" if unit != "none" else "")
    took = f"{seconds / 60:.0f} min" if seconds >= 120 else f"{max(seconds, 1):.0f} s"
    st.info(f"Press **Analyse** to measure {common.count(chosen, 'format')} on {spec.tokens} tokens{replays}: "
            f"about {took} here.")
    st.stop()

frame = pd.DataFrame(report.rows())
blocks = pd.DataFrame(report.blocks)
st.caption(f"{len(frame['layer'].unique())} linears x {len(schemes)} format(s) on {report.tokens} tokens; "
           + ", ".join(f"{key.removesuffix('_s').replace('_', ' ')} {value:.1f} s"
                       for key, value in report.seconds.items()))

measures = [m for m in charts.SENSITIVITY_MEASURES if m in frame.columns and frame[m].notna().any()]
measure = st.selectbox("Measure", measures, format_func=lambda m: charts.SENSITIVITY_MEASURES[m][0],
                       key="sensitivity_measure")
heatmap_tab, table_tab, type_tab, block_tab = st.tabs(["Heatmap", "Ranked table", "By layer type", "Blocks"])
with heatmap_tab:
    st.plotly_chart(charts.sensitivity_heatmap(frame, measure), key="sensitivity_heatmap")
with table_tab:
    ascending = measure == "sqnr_db"
    columns = [c for c in TABLE_COLUMNS if c in frame.columns]
    common.table(frame.sort_values(measure, ascending=ascending)[columns], key="sensitivity_table",
                 column_config={c: st.column_config.NumberColumn(TABLE_LABELS[c], format="%.3e") for c in
                                ("relative_mse", "estimated_delta", "predicted_delta", "block_delta",
                                 "linear_delta", "weight_relative_mse")} | {
                     "sqnr_db": st.column_config.NumberColumn("SQNR (dB)", format="%.1f"),
                     "bits_per_weight": st.column_config.NumberColumn("bits/weight", format="%.3f")}
                 | {c: label for c, label in TABLE_LABELS.items() if c not in ("relative_mse", "estimated_delta",
                    "predicted_delta", "block_delta", "linear_delta", "weight_relative_mse")})
    st.caption("Click a column header to sort. Output relative MSE = |X(W_q - W)ᵀ|² / |XWᵀ|² on captured "
               "inputs; predicted Δ = ½ Σ curvature × squared output error (one backward pass); block Δ = the "
               f"measured {report.metric.split('_')[0].upper()} change with the layer's whole block quantized; "
               "estimated Δ = the block's measured Δ shared among its linears by the predicted Δ (what the "
               "recommender minimises). Outliers: channels whose abs-max exceeds 6x the median channel's.")
with type_tab:
    st.plotly_chart(charts.sensitivity_by_type(frame, measure), key="sensitivity_by_type")
    grouped = frame.groupby(["layer_type", "label"], sort=False)[measure].agg(["mean", "median", "max", "count"])
    common.table(grouped.reset_index(), key="sensitivity_types",
                 column_config={"layer_type": "layer type", "label": "scheme", "count": "layers",
                                **{c: f"{c} of {charts.SENSITIVITY_MEASURES[measure][0]}"
                                   for c in ("mean", "median", "max")}})
with block_tab:
    if blocks.empty:
        st.info("No end-to-end measurements in this analysis.")
    else:
        st.plotly_chart(charts.block_deltas(blocks, report.metric), key="sensitivity_blocks")
        common.table(blocks[["name", "label", "value", "delta", "seconds"]], key="sensitivity_block_table",
                     column_config={"name": "unit", "label": "scheme", "value": common.header(report.metric),
                                    "delta": st.column_config.NumberColumn("error added", format="%.3e"),
                                    "seconds": st.column_config.NumberColumn("time (s)", format="%.2f")})

st.subheader("Open a layer on the Weights page")
pick = st.plotly_chart(charts.sensitivity_ranking(frame, measure), key="sensitivity_pick", on_select="rerun",
                       selection_mode="points")
ranked_layers = list(dict.fromkeys(frame.sort_values(measure, ascending=measure == "sqnr_db")["layer"]))
points = (pick.get("selection", {}) or {}).get("points", []) if pick else []
if points and points[0].get("y") in ranked_layers:
    st.session_state["sensitivity_layer"] = points[0]["y"]
if st.session_state.get("sensitivity_layer") not in ranked_layers:
    st.session_state["sensitivity_layer"] = ranked_layers[0]
layer = st.selectbox("Layer (most sensitive first; or click a bar above)", ranked_layers, key="sensitivity_layer")
st.session_state["layer"] = layer  # the Weights page's layer choice
try:
    st.page_link("pages/weights.py", label=f"Open `{layer}` on the Weights page (histogram and grid)",
                 icon=":material/bar_chart:")
except StreamlitPageNotFoundError:  # run standalone (AppTest, `streamlit run pages/...`): no navigation to link
    st.caption(f"Open the Weights page to see `{layer}`: it is selected there.")

st.subheader("Mixed precision under a budget")
if report.view != "forward":
    st.info("The recommender uses the forward view (each unit quantized alone); switch the view to run it.")
    st.stop()
with common.user_errors():
    choices = choices_from(loaded, report)
low, high = budget_range(choices)
if high - low < 0.01:
    st.info("All analysed formats have the same size; add a format with more or fewer bits to mix.")
    st.stop()
st.session_state.setdefault("mix_budget_bits", min(max(4.5, low), high))
st.session_state["mix_budget_bits"] = min(max(float(st.session_state["mix_budget_bits"]), low), high)
budget_bits = st.slider("Budget: average bits per quantized weight (scales included)", low, high,
                        key="mix_budget_bits", step=0.01, format="%.2f")
st.caption(f"Choice among {', '.join(s.label for s in schemes)} per linear, minimising total predicted error "
           f"({choices.predictor}) with a knapsack over exact storage bytes; then every mix is quantized and "
           "evaluated end to end next to the uniform formats.")
budgets = budget_steps(low, high, budget_bits, PARETO_POINTS)
mix_key = (run_key, tuple(budgets))
mixes_done = st.session_state.setdefault("mix_results", {})
partial_mixes = st.session_state.setdefault("mix_partial", {})  # plans measured by a press that was stopped
if mix_key not in mixes_done and mix_key not in partial_mixes:  # a reload: the mixes the history holds
    stored = latest_stored("recommend", "mix", budgets=budgets)
    if stored is not None and stored.records("recommendation"):  # every plan measured: the plans are redrawn
        mixes_done[mix_key] = [recommend(loaded, choices, Budget(b)) for b in budgets], stored.records("mix")
    elif stored is not None:
        partial_mixes[mix_key] = stored.records("mix")


def recommendation_run():
    partial_mixes[mix_key] = []
    # A stored recommendation names the analysis run it was built on, so History redraws its analysis without a
    # second copy; only an analysis that is not in the store (not saved, or deleted since) is copied into it.
    analysis_id = analysis_runs.get(run_key)
    try:
        analysis_id = analysis_id and Store().resolve_id(analysis_id)
    except QlabError:
        analysis_id = None
    return sensitivity_meta("recommend", loaded, schemes, spec, baseline(), unit=measured_unit, view=view,
                            blocks=unit != "none", budget_bits=budget_bits, budgets=budgets,
                            hardware=st.session_state["hardware"], **calibration_settings(),
                            **({ANALYSIS_RUN: analysis_id} if analysis_id else {}))


def measure_mixes(progress: Progress, recorder: Recorder) -> None:
    if ANALYSIS_RUN not in recorder.meta.settings:
        save_sensitivity(recorder, report)
    mixes, rows = compare(loaded, choices, [Budget(b) for b in budgets], baseline(), progress,
                          on_row=lambda row: (partial_mixes[mix_key].append(row), recorder.save(row, "mix")),
                          calibration=calibration()[0])
    mixes_done[mix_key] = mixes, rows
    partial_mixes.pop(mix_key, None)
    closest = min(mixes, key=lambda mix: abs(mix.budget.bits_per_weight - budget_bits))
    recorder.save({**recommendation_record(loaded, report, choices, closest, rows), "label": closest.label},
                  "recommendation")
    save_summary(recorder, seconds=report.seconds)


# Any press reruns the page, which stops the measurement at its next progress update.
common.long_run("Recommend and measure", "run_mix", measure_mixes, prepare=recommendation_run,
                start_text="Measuring...", cancel_key="cancel_mix", columns=st.columns([1, 4]),
                cancel_help="Stops after the current batch; plans already measured are kept (here and in History).")
if mix_key in mixes_done:
    mixes, rows = mixes_done[mix_key]
elif partial_mixes.get(mix_key):
    mixes, rows = None, partial_mixes[mix_key]
    st.info(f"Stopped after {len(rows)} evaluation(s) (shown below, and stored in History); press **Recommend "
            "and measure** to measure every plan.")
else:
    st.info(f"Press **Recommend and measure** to evaluate mixes at {', '.join(f'{b:.2f}' for b in budgets)} "
            f"bits per weight and the {len(schemes)} uniform format(s): {len(budgets) + len(schemes)} evaluations.")
    st.stop()

measured = pd.DataFrame(rows)
st.plotly_chart(charts.mix_pareto(measured, report.metric), key="mix_pareto")
common.table(measured[["label", "kind", "bits_per_weight", "size_bytes", report.metric, "error",
                       "predicted_error"]].assign(size_bytes=measured["size_bytes"] / 1e6)
             .rename(columns={"size_bytes": "size (MB)"}),
             column_config={"kind": "plan", "bits_per_weight": st.column_config.NumberColumn("bits/weight",
                                                                                           format="%.3f"),
                            "size (MB)": st.column_config.NumberColumn(format="%.2f"),
                            "error": st.column_config.NumberColumn(ERROR_LABELS[report.metric], format="%.4g"),
                            "predicted_error": st.column_config.NumberColumn("predicted error", format="%.4g")},
             key="mix_table")
if mixes is None:  # stopped part-way: the recommendation needs every plan measured
    st.stop()
chosen_mix = min(mixes, key=lambda mix: abs(mix.budget.bits_per_weight - budget_bits))
record = recommendation_record(loaded, report, choices, chosen_mix, rows)
counts = pd.Series(record["assignment"]).value_counts()
st.write(f"**{chosen_mix.label}**: {chosen_mix.bits_per_weight:.3f} bits/weight, "
         f"{chosen_mix.size_bytes / 1e6:.2f} MB; " + ", ".join(f"{n} layers {fmt}" for fmt, n in counts.items())
         + f". Measured {report.metric}: mix {record['measured']['mix']:.4g}; "
         + "; ".join(f"uniform {fmt} {value:.4g}" for fmt, value in record["measured"].items() if fmt != "mix"))
st.download_button("Download the mix (JSON: qlab schemes, torchao FqnToConfig, optimum-quanto map)",
                   json.dumps(record, indent=2, default=float), f"qlab-mix-{loaded.name}.json", "application/json",
                   key="download_mix")
