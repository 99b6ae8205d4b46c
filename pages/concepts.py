"""Concepts page: calibration and outliers, static vs dynamic activation quantization on real activations,
PTQ vs QAT trained live, and GPTQ vs round-to-nearest on one layer and on the whole model."""

import dataclasses

import pandas as pd
import streamlit as st

from pages import common
from qlab import charts
from qlab.analyses import activations, explain, qat, rounding
from qlab.analyses.calibration import layer_comparison
from qlab.core.formats import get_format
from qlab.core.quant import QuantScheme
from qlab.models.evaluate import EvalSpec, default_text
from qlab.models.loading import quantizable_linears

SECTIONS = ("Calibration", "Static vs dynamic", "PTQ vs QAT", "GPTQ vs RTN")
GPTQ_SCHEMES = (QuantScheme("int4", "group", 64), QuantScheme("int3", "group", 64))

common.page_setup()
st.title("Concepts")
section = st.radio("Section", SECTIONS, key="concepts_section", horizontal=True, label_visibility="collapsed")


def calibration_section() -> None:
    st.caption("4,096 values drawn from a standard normal distribution, plus one outlier. Min-max calibration "
               "stretches the grid to cover the outlier, so every ordinary value gets fewer levels; a "
               "percentile ignores the top 0.1%; MSE picks the clip range with the least total squared error.")
    for key, default in (("cx_outlier", 20.0), ("cx_outlier_format", "int8"), ("cx_percentile", 99.9)):
        st.session_state.setdefault(key, default)
    left, middle, right = st.columns([3, 1, 1])
    outlier = left.slider("Outlier (in standard deviations; 0 = none)", 0.0, 100.0, step=1.0, key="cx_outlier")
    fmt = middle.selectbox("Format", ["int8", "int4", "fp8_e4m3", "nf4"], key="cx_outlier_format")
    percentile = right.number_input("Percentile", 90.0, 100.0, step=0.1, key="cx_percentile")
    with common.user_errors():
        records = pd.DataFrame(explain.outlier_calibration(outlier, fmt, percentile))
    st.plotly_chart(charts.outlier_histogram(explain.outlier_tensor(outlier), records), key="cx_outlier_chart")
    common.table(records, column_config={c: st.column_config.NumberColumn(format="%.3e")
                                         for c in ("inlier_relative_mse", "relative_mse", "clipped_fraction")})
    st.caption("Inlier relative MSE is the error of the 4,095 ordinary values; 'levels used' counts the distinct "
               "codes they land on. MSE counts the outlier's own squared error too, so with one huge outlier it "
               "keeps most of the range; percentile clipping sacrifices the outlier for everyone else.")


@st.cache_data(max_entries=8, show_spinner="Running the model to capture real activations...")
def captured(model: str, layer: str, tokens: int, calibration_tokens: int, _loaded) -> tuple:
    spec = EvalSpec(tokens)
    calibration = activations.capture_inputs(_loaded, layer, activations.calibration_data(
        _loaded, spec, calibration_tokens))
    evaluation = activations.capture_inputs(_loaded, layer, activations.text_batches(
        _loaded, default_text(), tokens))
    return calibration, evaluation


def static_dynamic_section() -> None:
    loaded = common.current_model()
    names = [name for name, _ in quantizable_linears(loaded.model)]
    st.session_state.setdefault("cx_act_layer", activations.default_layer(names))
    if st.session_state["cx_act_layer"] not in names:
        st.session_state["cx_act_layer"] = activations.default_layer(names)
    for key, default in (("cx_act_format", "int8"), ("cx_act_calibration", "minmax"), ("cx_act_tokens", 256)):
        st.session_state.setdefault(key, default)
    top = st.columns([3, 1, 1, 1])
    layer = top[0].selectbox("Inputs of layer", names, key="cx_act_layer")
    fmt = top[1].selectbox("Format", ["int8", "int4", "fp8_e4m3"], key="cx_act_format")
    method = top[2].selectbox("Static calibration", ["minmax", "percentile"], key="cx_act_calibration")
    tokens = top[3].number_input("Tokens shown", 32, 2048, step=32, key="cx_act_tokens")
    with common.user_errors():
        calibration, evaluation = captured(common.model_name(), layer, int(tokens), 512, loaded)
        result = activations.static_vs_dynamic(calibration, evaluation, fmt, method)
    per_token = pd.DataFrame(result.per_token)
    limit = get_format(fmt).max_abs * result.static_scale
    st.plotly_chart(charts.token_ranges(per_token, limit), key="cx_token_ranges")
    summary = result.summary
    cols = st.columns(4)
    cols[0].metric("Static relative MSE", f"{summary['static_relative_mse']:.2e}")
    cols[1].metric("Dynamic relative MSE", f"{summary['dynamic_relative_mse']:.2e}")
    cols[2].metric("Tokens clipped (static)", f"{100 * summary['tokens_with_clipping']:.1f}%")
    cols[3].metric("Largest token / static range", f"{summary['largest_token_absmax_over_static_range']:.2f}x")
    st.caption(f"Static: one scale fixed before deployment from {calibration.shape[0]} calibration tokens (the end "
               f"of the text); applied to {evaluation.shape[0]} other tokens (its start). Dynamic: each token's "
               "scale is computed from its own largest value at run time, so nothing clips, at the cost of a "
               "max-reduction per token per layer. Tokens whose range exceeds the static one are clipped; tokens "
               "far below it use few of the levels.")


def qat_section() -> None:
    st.caption("A 64-64-10 classifier on scikit-learn's bundled handwritten digits, trained in FP32, then (PTQ) "
               "its weights rounded to a few bits per channel, or (QAT) fine-tuned for 200 steps with the "
               "rounding in the forward pass and the straight-through estimator in the backward pass. Real "
               "training on this CPU, a few seconds.")
    if st.button("Train FP32, then PTQ and QAT at 2, 3 and 4 bits", key="cx_run_qat"):
        with common.user_errors(), st.spinner("Training..."):
            st.session_state["cx_qat"] = qat.ptq_vs_qat((2, 3, 4))
    results = st.session_state.get("cx_qat")
    if not results:
        return
    table = pd.DataFrame([r.to_record() for r in results])
    history = pd.DataFrame([{**h, "scheme": r.scheme} for r in results for h in r.history])
    common.table(table, column_config={c: st.column_config.NumberColumn(format="%.3f")
                                       for c in ("fp32_accuracy", "ptq_accuracy", "qat_accuracy")})
    st.plotly_chart(charts.qat_curves(history, table), key="cx_qat_chart")
    st.caption("Accuracy on 360 held-out digits. At 2 bits a weight has three levels (-1, 0, +1 times a per-row "
               "scale); QAT lets the other weights move to make up for the rounding, which PTQ cannot.")


@st.cache_data(max_entries=8, show_spinner="Capturing the layer's inputs and running GPTQ...")
def one_layer(model: str, layer: str, tokens: int, _loaded) -> pd.DataFrame:
    return pd.DataFrame(layer_comparison(_loaded, layer, GPTQ_SCHEMES, EvalSpec(tokens)))


def gptq_section() -> None:
    loaded = common.current_model()
    names = [name for name, _ in quantizable_linears(loaded.model)]
    st.session_state.setdefault("cx_gptq_layer", names[min(len(names) - 1, 3)])
    if st.session_state["cx_gptq_layer"] not in names:
        st.session_state["cx_gptq_layer"] = names[min(len(names) - 1, 3)]
    st.caption("GPTQ rounds one input column at a time and pushes each column's rounding error onto the columns "
               "not yet rounded, weighted by the inverse Hessian of the layer's output error (H = 2XᵀX from "
               "calibration inputs X). Round-to-nearest (RTN) rounds every weight on its own.")
    common.show_caveat(loaded)
    layer = st.selectbox("Layer", names, key="cx_gptq_layer")
    with common.user_errors():
        records = one_layer(common.model_name(), layer, int(st.session_state["tokens"]), loaded)
    st.plotly_chart(charts.rtn_vs_gptq(records, "output_error_held_out", "relative output error, held-out tokens",
                                       figure_title=f"{layer}: RTN against GPTQ"), key="cx_gptq_layer_chart")
    common.table(records, column_config={c: st.column_config.NumberColumn(format="%.3e")
                                         for c in ("weight_relative_mse", "output_error_calibration",
                                                   "output_error_held_out")})
    st.caption("GPTQ's *weights* are further from the originals than RTN's (it moves them on purpose); its "
               "*outputs* are closer, on the calibration tokens and on tokens it never saw.")
    st.subheader("Whole model")
    st.caption(f"A sweep of {', '.join(s.label for s in GPTQ_SCHEMES)} with RTN and with GPTQ (Hessians from "
               "4,096 calibration tokens at the end of the evaluation text, collected once). On SmolLM2 on two "
               "CPU cores this takes several minutes; MiniLM about a minute.")

    spec = EvalSpec(st.session_state["tokens"])
    schemes = [dataclasses.replace(s, algorithm=a) for s in GPTQ_SCHEMES for a in ("rtn", "gptq")]
    finished, sweep_run, sweep, kept = common.stored_sweep(loaded, schemes, spec, "cx_gptq_model",
                                                            "shown below and in History")

    # Any press reruns the page, which stops the sweep at its next progress update.
    common.long_run("Run RTN vs GPTQ on the whole model", "cx_run_gptq_model", sweep, primary=False,
                    prepare=sweep_run, kept=kept, cancel_key="cx_cancel_gptq_model",
                    start_text="Computing the FP32 reference outputs...", columns=st.columns([1, 3]),
                    cancel_help="Stops after the current batch; schemes that finished are kept.")
    done = [finished[s] for s in schemes if s in finished]
    if done:
        rows = pd.DataFrame(done).assign(scheme=lambda f: f["label"].str.replace(" gptq", ""))
        metric = "kld_mean" if "kld_mean" in rows else "cosine_mean"
        st.plotly_chart(charts.rtn_vs_gptq(rows, metric, charts.metric_title(metric), log_y=metric == "kld_mean",
                                           figure_title="Whole model: RTN against GPTQ"), key="cx_gptq_model_chart")
        shown = [c for c in ("label", "bits_per_weight", "ppl", "kld_mean", "top1_agreement", "cosine_mean",
                             "retrieval_agreement", "calibration_tokens", "quantize_seconds") if c in rows]
        common.table(rows[shown], column_config={"quantize_seconds": st.column_config.NumberColumn(
            "quantize time (s)", format="%.1f")})
    measured_methods()


def measured_methods() -> None:
    st.subheader("Every rounding method, measured")
    with common.user_errors():
        table = pd.DataFrame(rounding.rounding_methods())
    if table.empty:
        st.caption("The measured table comes with qlab's source (its benchmark results); this copy has none.")
        return
    st.caption("RTN, GPTQ, GPTQ act-order, AWQ and HQQ on both bundled models, measured once on a shared two-core "
               "CPU (times are inflated; compare them only within the table). SmolLM2's baseline is already a "
               "4-bit (Q4_1) model, and it uses groups of 64 because 128 does not divide its width of 576.")
    smol = table[table["model"] == "smollm2-135m"].assign(scheme=lambda f: f["format"] + " g" +
                                                          f["group_size"].astype(str), algorithm=lambda f: f["method"])
    if not smol.empty:
        st.plotly_chart(charts.rtn_vs_gptq(smol, "ppl", "perplexity (lower is better; log scale)",
                                           figure_title="SmolLM2-135M: perplexity per rounding method"),
                        key="cx_rounding_chart")
    common.table(table.dropna(axis="columns", how="all"),
                 column_config={"rounding_seconds": st.column_config.NumberColumn("rounding time (s)", format="%.1f"),
                                "calibration_seconds": st.column_config.NumberColumn("calibration inputs (s)",
                                                                                     format="%.1f")})
    st.caption("Rounding time leaves out collecting the calibration inputs, done once per model and shared by the "
               "calibrated methods (its own column). Act-order is the one method that rescues SmolLM2 at int3; "
               "HQQ lowers the weights' error but makes both int3 models worse.")


{"Calibration": calibration_section, "Static vs dynamic": static_dynamic_section, "PTQ vs QAT": qat_section,
 "GPTQ vs RTN": gptq_section}[section]()
