"""Weights page: one layer's weights, the grid each format puts over them, and what rounding costs."""

import pandas as pd
import streamlit as st

from pages import common
from qlab import charts
from qlab.core.quant import block_of, error_stats, grid_values, quantize
from qlab.models.loading import quantizable_linears

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
    schemes = [s for s in common.schemes(round_to_nearest=True) if s.fmt.scaled]
if not schemes:
    st.info("Pick a scaled format in the sidebar (int8, int4, nf4, fp8...) to see its grid; fp32/fp16/bf16 "
            "are plain casts with tens of thousands of levels.")
    st.stop()
st.caption(f"`{layer}`: {weight.shape[0]} x {weight.shape[1]} weights. Each block (the whole tensor, one row, or "
           "one group of a row) has its own scale, so its grid is drawn for the block that holds the chosen row.")
common.show_caveat(loaded)

errors, stats = {}, []
with common.user_errors():
    quantized = {scheme.label: (scheme, quantize(weight, scheme)) for scheme in schemes}
for label, (_, qtensor) in quantized.items():
    dequantized = qtensor.dequantize()
    errors[label] = dequantized - weight
    stats.append({"scheme": label, **error_stats(weight, qtensor, dequantized)})

tabs = st.tabs(list(quantized))
for tab, (label, (scheme, qtensor)) in zip(tabs, quantized.items(), strict=True):
    with tab:
        block, columns = block_of(qtensor, row, group)
        values = weight.reshape(qtensor.scale.numel(), -1)[block]
        grid = grid_values(qtensor, block)
        where = f"row {row}" + (f", columns {columns.start}-{columns.stop - 1}" if scheme.granularity == "group"
                                else "" if scheme.granularity == "channel" else " (one scale for the tensor)")
        st.plotly_chart(charts.weight_histogram(values, grid, f"{label}: block {block} ({where}), "
                                                f"{values.numel()} weights, scale {qtensor.scale[block].item():.4g}"),
                        key=f"hist_{label}")

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
