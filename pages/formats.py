"""Formats page: every precision format bit by bit, number lines, the affine mapping step by step, what
per-tensor / per-channel / group / GGUF block scales cost and buy, hardware support, and the common claims."""

import pandas as pd
import streamlit as st

from pages import common
from qlab import charts
from qlab.analyses import claims, explain
from qlab.core.errors import QlabError
from qlab.core.formats import FORMATS
from qlab.core.quant import CALIBRATIONS
from qlab.models.evaluate import EvalSpec
from qlab.models.loading import quantizable_linears

SECTIONS = ("Bits of a value", "Number lines", "Affine mapping", "Granularity", "Hardware", "Claims")
VALUE_PRESETS = {
    "example weight 0.87654321": 0.87654321, "70000 (beyond FP16)": 70000.0, "1e-6 (FP16 subnormal)": 1e-6,
    "500 (E4M3 saturates at 448)": 500.0, "3.3e38 (BF16 keeps FP32's range)": 3.3e38, "-2.45": -2.45,
}
INTEGER_FORMATS = [name for name, fmt in FORMATS.items() if fmt.kind == "integer"]

common.page_setup()
st.title("Formats")
preset = explain.presets()
section = st.radio("Section", SECTIONS, key="formats_section", horizontal=True, label_visibility="collapsed")


def bits_section() -> None:
    st.session_state.setdefault("fx_value", preset["single_weight"]["value"])
    st.session_state.setdefault("fx_absmax", preset["single_weight"]["range_absmax"])
    st.caption("Type a number: it is stored as FP32 first (as a weight is), then in each format. Integer grids "
               "and NF4 need a scale: the value is assumed to live in a tensor whose largest magnitude is "
               "**absmax** (symmetric scale absmax / qmax). FP8 and FP4 are shown as raw encodings (scale 1).")
    chosen = st.pills("Presets", list(VALUE_PRESETS), key="fx_value_preset")
    if chosen and st.session_state.get("fx_last_preset") != chosen:
        st.session_state["fx_value"] = VALUE_PRESETS[chosen]
        st.session_state["fx_last_preset"] = chosen
    left, right = st.columns(2)
    value = left.number_input("Value", key="fx_value", format="%.10g")
    absmax = right.number_input("absmax of the tensor (integer and NF4 scale)", min_value=1e-12,
                                key="fx_absmax", format="%.6g")
    with common.user_errors():
        layouts = pd.DataFrame([layout.to_record() for layout in explain.bit_layouts(value, absmax=absmax)])
    st.plotly_chart(charts.bit_strips(layouts), key="fx_bit_strips")
    common.table(layouts[["format", "bits", "stored", "error", "relative_error", "code", "scale", "flags"]],
                 column_config={"stored": st.column_config.NumberColumn(format="%.10g"),
                                "error": st.column_config.NumberColumn(format="%.3e"),
                                "relative_error": st.column_config.NumberColumn(format="%.2e"),
                                "scale": st.column_config.NumberColumn(format="%.6g")})
    if value == preset["single_weight"]["value"] and absmax == preset["single_weight"]["range_absmax"]:
        stored = layouts.set_index("format")
        example = preset["single_weight"]
        rows = [{"format": fmt, "the example says": claim,
                 "qlab stores": f"{stored.loc[fmt, 'stored']:.8g}"
                 + (f" (code {stored.loc[fmt, 'code']})" if fmt.startswith("int") else ""),
                 "bytes": FORMATS[fmt].bits / 8}
                for fmt, claim in example["claimed"].items()]
        st.markdown("**A single-weight example, as guides tell it**: " + example["claim"])
        common.table(pd.DataFrame(rows), width="content")
        st.caption(f"The example does not say which range the integer grids cover; here the weight lives in a "
                   f"tensor whose largest magnitude is {example['range_absmax']:g} (a symmetric abs-max scale). "
                   "With that range the abs-max INT8 code is 111, not the example's 'maybe "
                   "112' (which is 0.8765 x 128, a scale of 1/128), and signed INT4 gives 6 (its codes stop at "
                   "7, so '9' is not a signed 4-bit code at all). FP16 keeps 0.87646484375 (0.876 to three decimals); "
                   "the example's 0.877 is the original value rounded, not what FP16 stores.")


def number_line_section() -> None:
    for key, default in (("fx_line_formats", ["fp16", "bf16", "fp8_e4m3", "fp8_e5m2", "int8", "int4", "nf4"]),
                         ("fx_line_low", -1.0), ("fx_line_high", 1.0), ("fx_line_absmax", 1.0)):
        st.session_state.setdefault(key, default)
    left, middle, right = st.columns([3, 1, 1])
    names = left.multiselect("Formats", list(explain.BIT_FORMATS), key="fx_line_formats")
    low = middle.number_input("From", key="fx_line_low", format="%.6g")
    high = right.number_input("To", key="fx_line_high", format="%.6g")
    absmax = st.number_input("absmax for integer and NF4 grids", min_value=1e-12, key="fx_line_absmax")
    if not names:
        st.info("Pick at least one format.")
        return
    with common.user_errors():
        lines = [explain.number_line(name, low, high, absmax, limit=600) for name in names]
        errors = pd.DataFrame(explain.rounding_errors(tuple(names), low, high, absmax))
    values = pd.DataFrame([{"format": f"{line.format} ({line.count:,}{', sample drawn' if line.sampled else ''})",
                            "value": v} for line in lines for v in line.values.tolist()])
    st.plotly_chart(charts.number_lines(values), key="fx_number_lines")
    counts = pd.DataFrame([{"format": line.format, "values in range": line.count,
                            "per unit": line.count / (high - low),
                            "drawn": "an even sample" if line.sampled else "all"} for line in lines])
    common.table(counts, width="content", column_config={"per unit": st.column_config.NumberColumn(format="%.4g")})
    st.caption("Floats put as many values between 0.5 and 1 as between 1 and 2: their steps grow with the "
               "value, so their *relative* error is flat. Integer grids have one step everywhere: a flat "
               "*absolute* error, and large relative errors near zero.")
    st.plotly_chart(charts.rounding_error_curves(errors), key="fx_rounding_errors")


def affine_section() -> None:
    example = preset["affine_example"]
    st.markdown(f"**A worked example, as guides tell it**: {example['claim']}")
    st.session_state.setdefault("fx_affine_values", ", ".join(str(v) for v in example["values"]))
    for key, default in (("fx_affine_manual", True), ("fx_affine_scale", example["scale"]),
                         ("fx_affine_format", "int8"),
                         ("fx_affine_symmetric", True), ("fx_affine_calibration", "minmax"), ("fx_affine_zero", 0)):
        st.session_state.setdefault(key, default)
    buttons = st.columns(3)
    if buttons[0].button("Preset: the example's scale 0.019", key="fx_preset_seed"):
        st.session_state.update(fx_affine_values=", ".join(str(v) for v in example["values"]),
                                fx_affine_manual=True, fx_affine_scale=example["scale"], fx_affine_format="int8",
                                fx_affine_symmetric=True)
    if buttons[1].button("Preset: abs-max scale 2.45 / 127", key="fx_preset_absmax"):
        st.session_state.update(fx_affine_values=", ".join(str(v) for v in example["values"]),
                                fx_affine_manual=False,
                                fx_affine_format="int8", fx_affine_symmetric=True, fx_affine_calibration="minmax")
    text = st.text_input("Values", key="fx_affine_values")
    cols = st.columns(4)
    fmt = cols[0].selectbox("Format", INTEGER_FORMATS, key="fx_affine_format")
    symmetric = cols[1].checkbox("Symmetric", key="fx_affine_symmetric")
    calibration = cols[2].selectbox("Calibration", CALIBRATIONS, key="fx_affine_calibration")
    manual = cols[3].checkbox("Type the scale by hand", key="fx_affine_manual")
    scale = zero_point = None
    if manual:
        left, right = st.columns(2)
        scale = left.number_input("Scale", min_value=1e-12, key="fx_affine_scale", format="%.6g")
        if not symmetric:
            zero_point = right.number_input("Zero-point", step=1, key="fx_affine_zero")
    with common.user_errors():
        try:
            values = [float(v) for v in text.replace(";", ",").split(",") if v.strip()]
        except ValueError:
            raise QlabError("values must be numbers separated by commas, e.g. -2.45, 1.32.") from None
        mapping = explain.affine_mapping(values, fmt, symmetric, calibration, scale=scale,
                                         zero_point=None if zero_point is None else int(zero_point))
    st.markdown(f"{mapping.how}; grid **[{mapping.qmin}, {mapping.qmax}]**, zero-point **{mapping.zero_point}**. "
                "Steps: q = clamp(round(x / scale + zero-point), qmin, qmax); x̂ = (q - zero-point) x scale.")
    common.table(pd.DataFrame(mapping.rows),
                 column_config={"value / scale": st.column_config.NumberColumn(format="%.4f"),
                                "+ zero-point": st.column_config.NumberColumn(format="%.4f"),
                                "dequantized": st.column_config.NumberColumn(format="%.6g"),
                                "error": st.column_config.NumberColumn(format="%.3g")})
    for row in mapping.rows:
        if row["clamped"]:
            st.warning(f"{row['value']:g} / {mapping.scale:.6g} = {row['value / scale']:.1f} rounds to "
                       f"{row['rounded']}, outside [{mapping.qmin}, {mapping.qmax}]: clamped to {row['code']}, "
                       f"so it comes back as {row['dequantized']:.6g} (error {row['error']:.3g}). A scale from "
                       "the abs-max (here max|x| / 127) never clamps.")
    storage = mapping.storage
    metrics = st.columns(4)
    metrics[0].metric("FP32", f"{storage['fp32_bytes']} bytes")
    metrics[1].metric("Codes", f"{storage['code_bytes']} bytes")
    metrics[2].metric("+ scale (fp32) and zero-point", f"{storage['scale_bytes'] + storage['zero_point_bytes']} bytes")
    metrics[3].metric("Stored", f"{storage['total_bytes']} bytes",
                      f"{storage['fp32_bytes'] / storage['total_bytes']:.2f}x smaller", delta_color="off")
    st.caption("The example's '16 bytes -> 4 bytes' counts the codes only. The scale has to be stored too: for four "
               "values it doubles the size. One scale per 4096 x 4096 matrix costs 4 bytes per 16.8 M weights "
               "(nothing); one fp16 scale per group of 32 costs 0.5 bits per weight (see Granularity).")


@st.cache_data(max_entries=16, show_spinner="Quantizing the matrix every way...")
def granularity_records(model: str, layer: str, bits: int, _weight) -> pd.DataFrame:
    return pd.DataFrame(explain.granularity_comparison(_weight, bits))


def granularity_section() -> None:
    loaded = common.current_model()
    linears = dict(quantizable_linears(loaded.model))
    names = list(linears)
    st.session_state.setdefault("fx_layer", names[len(names) // 2])
    if st.session_state["fx_layer"] not in linears:
        st.session_state["fx_layer"] = names[len(names) // 2]
    left, right = st.columns([3, 1])
    layer = left.selectbox("Weight matrix", names, key="fx_layer")
    bits = right.radio("Bits", (4, 3, 8), key="fx_granularity_bits", horizontal=True,
                       help="Integer width of the per-tensor, per-channel and group variants; the GGUF and NF4 "
                            "rows keep their own widths.")
    weight = linears[layer].weight.detach()
    common.show_caveat(loaded)
    with common.user_errors():
        records = granularity_records(common.model_name(), layer, bits, weight)
    st.plotly_chart(charts.granularity_tradeoff(records), key="fx_granularity_chart")
    exact = records.loc[records["relative_mse"] == 0, "variant"].tolist()
    if exact:
        st.info(f"{', '.join(exact)} reproduce this matrix exactly: its weights were stored in that very format "
                "(see the note above), so re-quantizing them finds the same blocks. Real FP16 weights would "
                "not come back exactly.")
    common.table(records, column_config={
        "relative_mse": st.column_config.NumberColumn(format="%.3e"),
        "sqnr_db": st.column_config.NumberColumn("SQNR (dB)", format="%.1f"),
        "bits_per_weight": st.column_config.NumberColumn(format="%.4f"),
        "overhead_bits_per_weight": st.column_config.NumberColumn("scale overhead (bits/weight)", format="%.4f")})
    st.caption(f"`{layer}`: {weight.shape[0]} x {weight.shape[1]}. One scale for the whole matrix is set by its "
               "single largest weight and wastes levels on every row with smaller weights; a scale per row or "
               "per block tracks local ranges for a fraction of a bit per weight. That trade is why GGUF, GPTQ "
               "and AWQ store blocks of 32-128 weights with their own scale. GGUF K formats (Q4_K, Q6_K) need "
               "rows that are multiples of 256 and are left out otherwise; llama.cpp itself falls back to other "
               "types for such tensors.")


def hardware_section() -> None:
    table = pd.DataFrame(explain.hardware_support())
    st.caption("From qlab's hardware catalog (sources per entry) and this machine's detected CPU flags: which "
               "formats each target runs natively or has mainstream kernels for.")
    common.table(table.drop(columns=["notes", "id"]))
    st.markdown("**Common hardware claims, checked against the catalog**")
    common.table(pd.DataFrame(explain.seed_hardware_claims()))
    speed = st.session_state.get("fx_speed")
    if speed:
        st.markdown("**Measured on this machine** (Claims section): " + "; ".join(
            f"{r['variant']} {r['speedup_vs_fp32']:.2f}x at {r['tokens']} token(s)" for r in speed))
    else:
        st.caption("Speed measured on this machine appears here after the Claims section's benchmark; "
                   "whole-model decode speed per backend is on the Speed page.")


def claims_section() -> None:
    st.caption("Quantization guides often quote three headline ratios. qlab measures accuracy with the sweep "
               "(fp16; int8 per channel; int4 in groups of 32, like GGUF's Q4 blocks) on the sidebar's model, and "
               "speed with a labelled micro-benchmark on this CPU.")
    loaded = common.current_model()
    common.show_caveat(loaded)
    left, middle, right = st.columns(3)
    spec = EvalSpec(st.session_state["tokens"])
    schemes = list(claims.CLAIM_SCHEMES)
    finished, sweep_run, sweep, kept = common.stored_sweep(loaded, schemes, spec, "fx_accuracy", "shown below")

    # Any press reruns the page, which stops the sweep at its next progress update.
    common.long_run("Measure accuracy (sweep)", "fx_run_accuracy", sweep, prepare=sweep_run, kept=kept,
                    cancel_key="fx_cancel_accuracy", cancel_help="Stops the accuracy sweep after the current batch.",
                    primary=False, start_text="Computing the FP32 reference outputs...", columns=(left, middle))
    if right.button("Measure speed on this CPU", key="fx_run_speed"):
        with common.user_errors(), st.spinner("Timing fp32, bf16, fp16 and int8 dynamic..."):
            st.session_state["fx_speed"] = claims.measure_cpu_speed()
    rows = [finished[s] for s in schemes if s in finished]
    speed = st.session_state.get("fx_speed")
    table = pd.DataFrame(claims.compare_claims(rows, speed))
    common.table(table.drop(columns=["measured_loss_percent"]), column_config={
        "claimed_speedup": "claimed speed-up (x)"})
    if rows:
        st.caption(f"Accuracy measured on {loaded.name} with {spec.tokens} evaluation tokens.")
    if speed:
        st.plotly_chart(charts.speedups(pd.DataFrame(speed), table), key="fx_speed_chart")
        st.caption(f"Micro-benchmark: {speed[0]['workload']}, best of {speed[0]['repeats']} runs, "
                   f"{speed[0]['threads']} thread(s), on this CPU. Not a whole model, not a GPU.")
    published = claims.published_speedups()
    if published:
        st.markdown("**Published decode speed-ups** (references, not measured here)")
        common.table(pd.DataFrame(published))
    st.markdown(
        "**Why the numbers differ.** The quoted 2x / 4x / 8x are ratios of bits: 32/16, 32/8, 32/4. They hold "
        "only where time is spent moving weights *and* a kernel computes directly on the narrow type. With one "
        "token a matmul is memory-bound, so fewer bytes per weight win even when the math is converted back to "
        "fp32; with many tokens it is compute-bound, and a CPU without native fp16 arithmetic makes fp16 "
        "*slower* than fp32, while bf16 (AVX512-BF16, AMX) and int8 (VNNI) gain from real instructions. "
        "torch.ao's dynamic int8 also pays to quantize the activations on every call. Published GPU decode gains "
        "for int8/int4 weight-only "
        "kernels are 1.5-1.9x, not 4-8x, because scales, dequantization and the KV cache still cost time. "
        "Accuracy: '<2% loss' depends on the metric and the model. A small model like SmolLM2-135M loses "
        "more at 4 bits than a 7B one, and perplexity moves more than top-1 agreement.")


{"Bits of a value": bits_section, "Number lines": number_line_section, "Affine mapping": affine_section,
 "Granularity": granularity_section, "Hardware": hardware_section, "Claims": claims_section}[section]()
