"""Weights page: one layer's weights, the grid each format puts over them, and what rounding costs."""

import pandas as pd
import streamlit as st

from pages import common
from qlab import charts
from qlab.analyses import layer_rounding
from qlab.analyses.activations import CALIBRATION_TOKENS
from qlab.core.algorithms import LayerStats, needs_calibration
from qlab.core.quant import QuantScheme, block_of, error_stats, grid_values
from qlab.models.evaluate import EvalSpec
from qlab.models.loading import LoadedModel, quantizable_linears


@st.cache_resource(show_spinner="Calibrating the layer (the model runs over the end of the text)...", max_entries=4)
def calibrated(_loaded: LoadedModel, model: str, device: str, layer: str, schemes: tuple[QuantScheme, ...],
               spec: EvalSpec) -> LayerStats | None:
    """One layer's calibration statistics, shared by sessions (a cached model's weights never change)."""
    return layer_rounding.layer_stats(_loaded, layer, schemes, spec)


common.page_setup()
st.title("Weights")
loaded = common.current_model()
linears = dict(quantizable_linears(loaded.model))
names = list(linears)
st.session_state.setdefault("layer", names[0])
if st.session_state["layer"] not in linears:
    st.session_state["layer"] = names[0]
layer_column, row_column = st.columns([3, 2])
layer = layer_column.selectbox("Layer", names, key="layer")
weight = linears[layer].weight.detach()
row = row_column.number_input("Output channel (row) to zoom into", 0, weight.shape[0] - 1, 0, key="weight_row")
group = 0
if st.session_state["granularity"] == "group":
    groups_per_row = -(-weight.shape[1] // st.session_state["group_size"])
    group = row_column.number_input("Group within the row", 0, groups_per_row - 1, 0, key="weight_group")

with common.user_errors():
    schemes = [s for s in common.schemes() if s.fmt.scaled]
if not schemes:
    st.info("Pick a scaled format in the sidebar (int8, int4, nf4, fp8...) to see its grid; fp32/fp16/bf16 "
            "are plain casts with tens of thousands of levels.")
    st.stop()
st.caption(f"`{layer}`: {weight.shape[0]} x {weight.shape[1]} weights. Each block (the whole tensor, one row, or "
           "one group of a row) has its own scale, so its grid is drawn for the block that holds the chosen row.")
common.show_caveat(loaded)

algorithm = schemes[0].algorithm
layer_stats = None
if needs_calibration(schemes):
    asked = st.session_state.setdefault("weights_calibrated", [])
    if (loaded.name, layer) not in asked:
        st.info(f"{algorithm} rounds a layer with statistics of its inputs: the model first runs over the end of "
                f"the text (up to {CALIBRATION_TOKENS:,} tokens) to collect them for this layer.")
        if not st.button(f"Round this layer with {algorithm}", key="weights_calibrate", type="primary"):
            st.stop()
        asked.append((loaded.name, layer))
    with common.user_errors():
        layer_stats = calibrated(loaded, loaded.name, loaded.device, layer, tuple(schemes),
                                 EvalSpec(st.session_state["tokens"]))
if algorithm != "rtn":
    st.caption(f"Every figure below shows the weights rounded by the sidebar's algorithm, {algorithm}"
               + (", with this layer's calibration statistics." if layer_stats is not None else "."))

errors, stats = {}, []
with common.user_errors():
    rounded = layer_rounding.round_layer(loaded, layer, schemes, layer_stats)
for scheme, qtensor in rounded.items():
    dequantized = qtensor.dequantize()
    errors[scheme.label] = dequantized - weight
    stats.append({"scheme": scheme.label, **error_stats(weight, qtensor, dequantized)})

tabs = st.tabs([scheme.label for scheme in rounded])
for tab, (scheme, qtensor) in zip(tabs, rounded.items(), strict=True):
    with tab:
        block, columns = block_of(qtensor, row, group)
        values = weight if scheme.granularity == "tensor" else weight[row, columns]
        input_scales = qtensor.input_scales()
        if input_scales is not None:  # the grid is on the weights as AWQ rounds them
            values = values / input_scales[columns].float()
            st.caption("AWQ rounds each weight times its input's scale s: the histogram shows those values.")
        where = ("one scale for the tensor" if scheme.granularity == "tensor" else f"row {row}" + (
            f", {layer_rounding.columns_label(columns)}" if scheme.granularity == "group" else ""))
        st.plotly_chart(charts.weight_histogram(values, grid_values(qtensor, block),
                                                f"{scheme.label}: block {block} ({where}), {values.numel()} weights, "
                                                f"scale {qtensor.scale[block].item():.4g}"),
                        key=f"hist_{scheme.label}")

st.subheader("Error per scheme")
common.table(pd.DataFrame(stats), column_config={"relative_mse": st.column_config.NumberColumn(format="%.3e"),
                            "sqnr_db": st.column_config.NumberColumn("SQNR (dB)", format="%.1f"),
                            "clipped_fraction": st.column_config.NumberColumn(format="%.2e"),
                            "bits_per_weight": st.column_config.NumberColumn(format="%.3f")})
st.caption("Relative MSE = mean((dequantized - w)²) / mean(w²); SQNR = -10·log10(relative MSE); clipped = share "
           "of weights outside their block's grid range (non-zero only when calibration clips).")
left, right = st.columns(2)
with left:
    st.markdown("**Rounding error**: how far each weight moves")
    st.plotly_chart(charts.error_histogram(errors), key="error_histogram")
with right:
    st.markdown("**Per-channel ranges**: why one scale per tensor wastes levels")
    st.plotly_chart(charts.channel_ranges(weight), key="channel_ranges")
st.markdown("**Whole layer**")
st.plotly_chart(charts.weight_histogram(weight, None, f"{layer}: all {weight.numel():,} weights"),
                key="layer_histogram")
