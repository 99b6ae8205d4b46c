"""Quantize page: run the sidebar's formats through the sweep and compare size against accuracy."""

import json

import pandas as pd
import streamlit as st

from pages import common
from qlab import charts
from qlab.analyses.overview import ANNOUNCE_AFTER_S, sweep_seconds
from qlab.analyses.sweep import check_schemes, run_sweep
from qlab.core.errors import QlabError
from qlab.models.evaluate import DEFAULT_TEXT_NAME, LM_WINDOW, Baseline, EvalSpec, Progress, decode_text
from qlab.models.loading import model_sha256
from qlab.store import Recorder, Store, sweep_meta

TEXT_SOURCES = ("Built-in text", "Paste text", "Upload a file")

common.page_setup()
st.title("Quantize")
loaded = common.current_model()
st.caption("Weight-only post-training quantization, simulated exactly (quantize, then dequantize) on a copy "
           "of the model; the loaded model is never changed. Each scheme is compared with the base model, "
           "run in its own precision, on the same tokens.")
common.show_caveat(loaded)

with st.expander("Evaluation text", expanded=False):
    source = st.radio("Text", TEXT_SOURCES, key="text_source", horizontal=True, label_visibility="collapsed")
    with common.user_errors():
        if source == "Paste text":
            pasted = st.text_area("Your text", key="pasted_text", height=150)
            spec = EvalSpec(st.session_state["tokens"], pasted if pasted.strip() else None,
                            "pasted text" if pasted.strip() else DEFAULT_TEXT_NAME)
        elif source == "Upload a file":
            upload = st.file_uploader("UTF-8 text file", type=["txt", "md", "rst", "py"], key="text_upload")
            spec = (EvalSpec(st.session_state["tokens"], decode_text(upload.getvalue()), upload.name)
                    if upload else EvalSpec(st.session_state["tokens"]))
        else:
            spec = EvalSpec(st.session_state["tokens"])
    st.caption(f"Evaluating on **{spec.text_name}**, {spec.tokens} tokens.")
if spec.text is not None:  # a text shorter than the budget is said now, not after a press
    available = len(loaded.tokenizer(spec.text, add_special_tokens=False, verbose=False).input_ids)
    if available < spec.tokens:
        window = min(LM_WINDOW, spec.tokens)
        used = min(spec.tokens, available) // window * window
        if loaded.kind != "causal-lm":
            st.warning(f"This text has {available:,} tokens, fewer than the budget of {spec.tokens:,}: the "
                       "evaluation uses all of it.")
        elif used:
            st.warning(f"This text has {available:,} tokens, fewer than the budget of {spec.tokens:,}: only "
                       f"{used:,} are evaluated (whole windows of {window}). Lower the budget in the sidebar or "
                       "give a longer text.")
        else:
            st.warning(f"This text has {available:,} tokens, fewer than one evaluation window of {window}: "
                       f"set the sidebar's evaluation tokens to {available:,} or fewer, or give a longer text.")

with common.user_errors():
    schemes = common.schemes()
    # A group size that does not fit the model, or a text too short to calibrate on, is said now, not after a press.
    check_schemes(loaded, schemes, spec)
st.write("Schemes: " + ", ".join(f"`{s.label}`" for s in schemes))

run_key = (loaded.name, spec, spec.text_sha256)
results = st.session_state.setdefault("sweep_results", {})
if run_key not in results:  # a new session or a shared link: show what the run history already holds
    try:
        results[run_key] = Store().stored_schemes(loaded.name, model_sha256(loaded), spec.text_sha256, spec.tokens)
    except QlabError as error:
        results[run_key] = {}
        st.warning(f"Run history unavailable: {error}")
finished = results[run_key]

todo = [s for s in schemes if s not in finished]
if todo and (seconds := sweep_seconds(loaded, todo, spec)) > ANNOUNCE_AFTER_S:
    st.caption(f"Measuring {common.count([s.label for s in todo], 'scheme')} takes about "
               + (f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s")
               + " here (the reference outputs, any calibration pass, then each scheme's rounding and evaluation).")


def baseline() -> Baseline:
    return common.baseline(loaded, loaded.name, spec, spec.text_sha256)


def sweep_run():
    baseline()  # a text too short for one window is said now, before a run is stored
    return sweep_meta(loaded, schemes, spec, st.session_state["hardware"])


def sweep(progress: Progress, recorder: Recorder) -> None:
    # One stored run per press, holding every scheme shown: reused ones first, each new one as it finishes.
    for scheme in schemes:
        if scheme in finished:
            recorder.save(finished[scheme], "sweep", scheme)
    named = common.step_names(progress, [s.label for s in todo])
    for row in run_sweep(loaded, todo, spec, baseline=baseline(), progress=named):
        finished[row.scheme] = row.to_record()  # saved before the next scheme starts
        results[run_key] = finished
        recorder.save(row)


def kept() -> str:
    done = [s.label for s in schemes if s in finished]
    if not done:
        return "No scheme had finished, so none was kept."
    return (f"Kept {common.count(done, 'finished scheme')} ({', '.join(done)}), shown below and in History; "
            "press **Run sweep** to measure the rest.")


common.long_run("Run sweep", "run_sweep", sweep, prepare=sweep_run, ready=bool(todo), cancel_key="cancel_sweep",
                cancel_help="Stops after the current batch; schemes that finished are kept.", kept=kept,
                start_text="Computing the base model's reference outputs...",
                nothing_to_do="Every chosen scheme is already measured for this model, text and budget (shown "
                              "below).")

rows = [finished[s] for s in schemes if s in finished]
if not rows:
    st.info("Press **Run sweep** to quantize the model at each chosen format.")
    st.stop()

frame = pd.DataFrame(rows)
metric_options = [m for m in charts.METRICS if m in frame.columns]
metric_column, scale_column = st.columns([4, 1])
metric = metric_column.selectbox("Accuracy metric", metric_options, format_func=charts.metric_title,
                                 key="sweep_metric")
log_y = scale_column.checkbox("Log scale", value=metric.startswith("kld"), key=f"log_{metric}",
                              help="KL divergence spans orders of magnitude between fp16 and 3-bit formats.")
st.plotly_chart(charts.size_vs_accuracy(frame, metric, log_y), key="size_vs_accuracy")

table_columns = ["label", "bits_per_weight", "size_bytes", *metric_options, "seconds"]
common.table(
    frame[table_columns].assign(size_bytes=frame["size_bytes"] / 1e6).rename(columns={"size_bytes": "size (MB)"}),
    column_config={"bits_per_weight": st.column_config.NumberColumn("bits/weight", format="%.3f"),
                   "size (MB)": st.column_config.NumberColumn(format="%.1f"),
                   "seconds": st.column_config.NumberColumn("time (s)", format="%.1f"),
                   **{m: st.column_config.NumberColumn(format="%.4g") for m in metric_options}},
)
st.caption("bits/weight: storage of the quantized linear weights including scales and zero-points. "
           "Size: the whole model as stored, other tensors (embeddings, norms, biases) at "
           f"{', '.join(sorted(set(frame['unquantized_format'])))}. "
           + ("KLD: mean over tokens of KL(base ‖ quantized) next-token distributions, in nats; "
              "the baseline's log-probs are kept in fp16 and the KL that storage adds is subtracted, so the "
              "baseline against itself scores exactly 0."
              if "kld_mean" in frame else
              "Cosine: embedding similarity to the base model; retrieval: share of texts whose nearest neighbour is "
              "unchanged."))
download_left, download_right = st.columns(2)
download_left.download_button("Download CSV", frame.to_csv(index=False), "qlab-sweep.csv", "text/csv",
                              key="download_csv")
download_right.download_button("Download JSON", json.dumps(rows, indent=2), "qlab-sweep.json",
                               "application/json", key="download_json")
