"""Plotly figure builders: plain data in, Figure out. Used by the pages and, later, the HTML report.

Over 500 lines on purpose: every figure builder is independent and short; one module keeps one visual style
(titles, axis units, number formats) that pages and the HTML report import from one place.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import torch

# Metric name -> (axis title, lower is better). Names match the result-row keys.
METRICS: dict[str, tuple[str, bool]] = {
    "kld_mean": ("KL divergence to the base model (mean, nats/token)", True),
    "kld_p99": ("KL divergence to the base model (99th percentile)", True),
    "ppl": ("Perplexity", True),
    "top1_agreement": ("Top-1 agreement with the base model", False),
    "cosine_mean": ("Cosine similarity to the base model's embeddings (mean)", False),
    "retrieval_agreement": ("Nearest-neighbour agreement with the base model", False),
}
HISTOGRAM_BINS = 200
MAX_RUG_POINTS = 4096  # one tick per weight only for a block-sized input
LOG_FLOOR = 1e-6  # below this a KLD is measurement noise (fp16-stored baseline log-probs)


def metric_title(metric: str) -> str:
    return METRICS.get(metric, (metric, True))[0]


def _titled(figure: go.Figure, title: str) -> go.Figure:
    """The figure's title, room for it, and numbers in scientific notation on every axis that does not choose
    its own format: plotly's default writes 2e-6 as "2µ", which reads as a unit."""
    top = max(figure.layout.margin.t or 0, 50)
    figure.update_layout(title={"text": title, "x": 0, "xanchor": "left"}, margin={"t": top})
    for axis in (*figure.select_xaxes(), *figure.select_yaxes()):
        if axis.exponentformat is None:
            axis.exponentformat = "power"
    return figure


def size_vs_accuracy(rows: pd.DataFrame, metric: str, log_y: bool = False,
                     title: str = "Accuracy against model size") -> go.Figure:
    """One point per scheme: model size (MB) against an accuracy metric, labelled by scheme.

    On a log axis, values at or below ``LOG_FLOOR`` (the FP32 row's 0, fp16's ~1e-7) are drawn on the floor
    and marked as such rather than silently dropped, as plotly does with zeros on log axes.
    """
    frame = rows.assign(size_mb=rows["size_bytes"] / 1e6, measured=rows[metric])
    if log_y:
        frame[metric] = frame[metric].clip(lower=LOG_FLOOR)
        frame["label"] = [f"{label} (≤{LOG_FLOOR:g})" if value <= LOG_FLOOR else label
                          for label, value in zip(frame["label"], frame["measured"], strict=True)]
    figure = px.scatter(frame, x="size_mb", y=metric, text="label", color="format", log_y=log_y,
                        hover_data={"bits_per_weight": ":.3f", "size_mb": ":.1f", "measured": ":.4g",
                                    metric: False},
                        labels={"size_mb": "Model size as stored (MB)", metric: metric_title(metric)})
    figure.update_traces(textposition="top center", marker={"size": 12}, cliponaxis=False)
    figure.update_layout(margin={"t": 30}, legend_title_text="format")
    return _titled(figure, title)


def weight_histogram(values: torch.Tensor, grid: torch.Tensor | None, title: str,
                     clip_low: float | None = None, clip_high: float | None = None) -> go.Figure:
    """Histogram of weights with the quantization grid drawn as vertical lines.

    A single block holds only tens of weights, so small inputs get fewer bins and a rug of the individual
    values: each tick is one weight, and the nearest red line is where rounding sends it.
    """
    flat = values.detach().reshape(-1).float()
    bins = int(min(HISTOGRAM_BINS, max(20, flat.numel() // 3)))
    figure = go.Figure(_histogram_bars(flat, _bin_edges(flat, bins), name="weights", marker_color="#4c78a8"))
    if flat.numel() <= MAX_RUG_POINTS:
        figure.add_trace(go.Scatter(x=flat.numpy(), y=[0] * flat.numel(), mode="markers", name="each weight",
                                    marker={"symbol": "line-ns-open", "size": 14, "color": "#1f2d3d"}))
    if grid is not None and 0 < grid.numel() <= 512:
        opacity = 0.9 if grid.numel() <= 64 else 0.35
        shapes = [{"type": "line", "x0": v, "x1": v, "y0": 0, "y1": 1, "yref": "paper", "opacity": opacity,
                   "line": {"color": "#e45756", "width": 1}} for v in grid.tolist()]
        figure.update_layout(shapes=shapes)
        figure.add_trace(go.Scatter(x=[None], y=[None], mode="lines", line={"color": "#e45756"},
                                    name=f"grid ({grid.numel()} levels)"))
    for edge, label in ((clip_low, "clip"), (clip_high, "clip")):
        if edge is not None:
            figure.add_vline(x=edge, line_dash="dash", line_color="black", annotation_text=label)
    figure.update_layout(xaxis_title="weight value", yaxis_title="weights per bin", bargap=0.05,
                         margin={"t": 40}, legend={"orientation": "h", "y": -0.2})
    return _titled(figure, title)


def error_histogram(errors: dict[str, torch.Tensor]) -> go.Figure:
    """Overlaid histograms of quantization error (dequantized - original), one per scheme, on shared bins."""
    flats = {label: error.detach().reshape(-1).float() for label, error in errors.items()}
    extremes = torch.stack([torch.stack([f.min(), f.max()]) for f in flats.values()])
    edges = _bin_edges(extremes, HISTOGRAM_BINS)
    figure = go.Figure([_histogram_bars(flat, edges, name=label, opacity=0.6) for label, flat in flats.items()])
    figure.update_layout(barmode="overlay", xaxis_title="rounding error: dequantized - original weight",
                         yaxis_title="weights per bin", margin={"t": 30}, legend={"orientation": "h", "y": -0.2})
    return _titled(figure, "Rounding error, whole layer")


def channel_ranges(weight: torch.Tensor) -> go.Figure:
    """Per-output-channel min, max and absmax: why one scale per tensor wastes levels."""
    frame = pd.DataFrame({
        "channel": range(weight.shape[0]),
        "max": weight.amax(dim=1).numpy(),
        "min": weight.amin(dim=1).numpy(),
        "absmax": weight.abs().amax(dim=1).numpy(),
    })
    figure = px.line(frame, x="channel", y=["max", "min", "absmax"],
                     labels={"value": "weight value", "channel": "output channel (row)", "variable": ""})
    figure.update_layout(margin={"t": 30}, legend={"orientation": "h", "y": -0.2})
    return _titled(figure, "Weight range per output channel")


def _bin_edges(values: torch.Tensor, bins: int) -> torch.Tensor:
    """``bins`` equal-width edges over the values' range (a constant tensor gets a unit-wide range)."""
    low, high = values.min().item(), values.max().item()
    if high <= low:
        low, high = low - 0.5, high + 0.5
    return torch.linspace(low, high, bins + 1, dtype=torch.float64)


def _histogram_bars(values: torch.Tensor, edges: torch.Tensor, **trace) -> go.Bar:
    """Counts of *every* value per bin, binned here: the browser gets one bar per bin, not millions of points."""
    low, high = edges[0].item(), edges[-1].item()
    counts = torch.histc(values.float().clamp(low, high), bins=edges.numel() - 1, min=low, max=high)
    centers = ((edges[:-1] + edges[1:]) / 2).numpy()
    return go.Bar(x=centers, y=counts.numpy(), width=(edges[1] - edges[0]).item(), **trace)


# --- memory planner ---------------------------------------------------------------------------------------

# Stacked in this order, bottom to top; keys are MemoryPlan.to_record() fields.
MEMORY_COMPONENTS: dict[str, str] = {
    "weights_before_scales_bytes": "weights",
    "scales_bytes": "scales + zero-points",
    "kv_cache_bytes": "KV cache",
    "activations_bytes": "activations",
    "overhead_bytes": "runtime overhead",
}
# Parts only some schemes store (2:4, GPTQ act-order, AWQ), stacked above the scales where a plan holds them.
MEMORY_ALGORITHM_PARTS: dict[str, str] = {
    "metadata_bytes": "2:4 positions",
    "index_bytes": "act-order group index",
    "awq_scale_bytes": "AWQ input scales",
}


def _device_line(figure: go.Figure, memory_bytes: int, target_name: str) -> None:
    figure.add_hline(y=memory_bytes / 1e9, line_dash="dash", line_color="#e45756",
                     annotation_text=f"{target_name}: {memory_bytes / 1e9:.0f} GB",
                     annotation_position="top left")


def memory_stack(records: pd.DataFrame, memory_bytes: int, target_name: str) -> go.Figure:
    """One stacked bar per scheme (weights, scales, what an algorithm adds where a plan has it, KV, activations,
    overhead, in GB) against the device."""
    figure = go.Figure()
    present = {c: label for c, label in MEMORY_ALGORITHM_PARTS.items() if c in records and records[c].fillna(0).any()}
    components = list(MEMORY_COMPONENTS.items())
    components[2:2] = present.items()  # after weights and scales
    for column, label in components:
        figure.add_trace(go.Bar(x=records["scheme"], y=records[column] / 1e9, name=label,
                                hovertemplate="%{x}: %{y:.3f} GB<extra>" + label + "</extra>"))
    _device_line(figure, memory_bytes, target_name)
    figure.update_layout(barmode="stack", yaxis_title="memory (GB, 1e9 bytes)", xaxis_title="weight scheme",
                         margin={"t": 30}, legend={"orientation": "h", "y": -0.25})
    return _titled(figure, f"Memory per scheme against {target_name}")


def memory_vs_context(curve: pd.DataFrame, memory_bytes: int, target_name: str) -> go.Figure:
    """Total memory against context length, one line per scheme, with the device's memory as a line."""
    frame = curve.assign(total_gb=curve["total_bytes"] / 1e9)
    figure = px.line(frame, x="context_tokens", y="total_gb", color="scheme", markers=True, log_x=True,
                     labels={"context_tokens": "context length (tokens per sequence)",
                             "total_gb": "total memory (GB)", "scheme": "scheme"})
    _device_line(figure, memory_bytes, target_name)
    figure.update_layout(margin={"t": 30}, legend={"orientation": "h", "y": -0.25})
    figure.update_xaxes(exponentformat="none", separatethousands=True)
    return _titled(figure, "Total memory against context length")


def memory_estimate_vs_measured(rows: pd.DataFrame) -> go.Figure:
    """qlab's estimate against torch.cuda.max_memory_allocated per benchmark row, with the y = x line."""
    frame = rows.assign(estimate_gb=rows["estimated_allocated_bytes"] / 1e9,
                        measured_gb=rows["measured_peak_allocated_bytes"] / 1e9)
    figure = px.scatter(frame, x="estimate_gb", y="measured_gb", color="model", symbol="format",
                        hover_data={"context_tokens": True, "total_error": ":.1%"},
                        labels={"estimate_gb": "qlab estimate: weights + KV + activations (GB)",
                                "measured_gb": "measured peak allocated (GB)"})
    top = float(max(frame["estimate_gb"].max(), frame["measured_gb"].max())) * 1.05
    figure.add_trace(go.Scatter(x=[0, top], y=[0, top], mode="lines", name="estimate = measured",
                                line={"color": "gray", "dash": "dot"}))
    figure.update_layout(margin={"t": 30}, legend={"orientation": "h", "y": -0.25})
    return _titled(figure, "Estimated against measured GPU memory")


# --- run history ------------------------------------------------------------------------------------------


def compare_runs(rows: pd.DataFrame, metric: str, log_y: bool = False) -> go.Figure:
    """Several runs' size-vs-accuracy points overlaid: one colour and one line (by size) per run.

    ``rows`` holds sweep records with a ``run`` column naming the run each came from.
    """
    ordered = rows.sort_values(["run", "size_bytes"])
    figure = size_vs_accuracy(ordered.assign(format=ordered["run"]), metric, log_y,
                              "Accuracy against model size, runs compared")
    figure.update_traces(mode="lines+markers+text", line={"width": 1})
    figure.for_each_trace(lambda trace: trace.update(hovertemplate=trace.hovertemplate.replace("format=", "run=")))
    figure.update_layout(legend_title_text="run", legend={"orientation": "h", "y": -0.25})
    return figure


# --- sensitivity -------------------------------------------------------------------------------------------

# Per-linear sensitivity columns (qlab.analyses.sensitivity records) -> (axis title, drawn on a log scale).
SENSITIVITY_MEASURES: dict[str, tuple[str, bool]] = {
    "estimated_delta": ("End-to-end delta of the layer (its measured unit's, shared by curvature)", True),
    "block_delta": ("Measured end-to-end delta of the layer's block", True),
    "linear_delta": ("Measured end-to-end delta of the layer alone", True),
    "predicted_delta": ("Predicted end-to-end delta of the layer alone (2nd order)", True),
    "sqnr_db": ("Output SQNR (dB, higher is better)", False),
    "relative_mse": ("Output relative MSE", True),
    "weight_relative_mse": ("Weight relative MSE", True),
}
LAYER_TYPE_ORDER = ("q", "k", "v", "o", "qkv", "gate", "up", "down", "other")
ERROR_TITLES = {"kld_mean": "KL divergence to the base model (mean, nats/token)",
                "cosine_mean": "1 - cosine similarity to the base model (mean)"}


def _log_values(values: pd.Series | np.ndarray) -> np.ndarray:
    """log10 of positive values; zeros and negatives (exact or noise) become NaN, drawn as gaps."""
    array = np.asarray(values, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(array > 0, np.log10(array), np.nan)


def sensitivity_heatmap(rows: pd.DataFrame, measure: str) -> go.Figure:
    """Linear layers (model order, top to bottom) by scheme, coloured by one sensitivity measure."""
    title, log = SENSITIVITY_MEASURES.get(measure, (measure, False))
    layers = list(dict.fromkeys(rows["layer"]))
    labels = list(dict.fromkeys(rows["label"]))
    table = rows.pivot_table(index="layer", columns="label", values=measure, aggfunc="first")
    table = table.reindex(index=layers, columns=labels)
    z = _log_values(table.to_numpy()) if log else table.to_numpy(dtype=float)
    figure = go.Figure(go.Heatmap(
        z=z, x=labels, y=layers, colorscale="Viridis", reversescale=measure == "sqnr_db",
        colorbar={"title": f"log10 {measure}" if log else measure},
        customdata=table.to_numpy(), hovertemplate="%{y}<br>%{x}: %{customdata:.4g}<extra></extra>"))
    # Scheme labels sit on top, under the title, so they stay in view above a tall (one row per layer) map.
    figure.update_layout(title={"text": title, "y": 1.0, "yanchor": "top", "pad": {"t": 8}},
                         height=max(400, 14 * len(layers) + 140), margin={"t": 90},
                         yaxis={"autorange": "reversed", "tickfont": {"size": 9}, "title": "linear layer (model order)"},
                         xaxis={"side": "top", "title": "scheme"})
    figure.update_yaxes(exponentformat="power")
    figure.update_xaxes(exponentformat="power")
    return figure


def sensitivity_by_type(rows: pd.DataFrame, measure: str) -> go.Figure:
    """The measure per layer type (q/k/v/o/gate/up/down), one box per scheme: which roles are fragile."""
    title, log = SENSITIVITY_MEASURES.get(measure, (measure, False))
    present = [t for t in LAYER_TYPE_ORDER if t in set(rows["layer_type"])]
    figure = px.box(rows.dropna(subset=[measure]), x="layer_type", y=measure, color="label", log_y=log,
                    points="all", hover_data=["layer"], category_orders={"layer_type": present},
                    labels={"layer_type": "layer type", measure: title, "label": "scheme"})
    figure.update_layout(margin={"t": 30}, legend={"orientation": "h", "y": -0.2})
    return _titled(figure, "Sensitivity by layer type")


def sensitivity_ranking(rows: pd.DataFrame, measure: str, top: int = 20) -> go.Figure:
    """The ``top`` most sensitive (layer, scheme) pairs as horizontal bars; click a bar to pick its layer."""
    title, log = SENSITIVITY_MEASURES.get(measure, (measure, False))
    ascending = measure == "sqnr_db"  # low SQNR is the sensitive end
    ranked = rows.dropna(subset=[measure]).sort_values(measure, ascending=ascending).head(top)
    figure = px.bar(ranked, x=measure, y="layer", color="label", orientation="h", log_x=log,
                    hover_data=["layer_type", "block"], labels={measure: title, "layer": "layer", "label": "scheme"})
    figure.update_layout(height=max(300, 22 * len(ranked) + 100), margin={"t": 30},
                         yaxis={"autorange": "reversed", "categoryorder": "array",
                                "categoryarray": list(dict.fromkeys(ranked["layer"]))},
                         legend={"orientation": "h", "y": -0.2})
    return _titled(figure, f"The {len(ranked)} most sensitive (layer, scheme) pairs")


def block_deltas(blocks: pd.DataFrame, metric: str) -> go.Figure:
    """End-to-end delta per measured unit (block or linear), one line per scheme, on a log axis."""
    frame = blocks.assign(shown=blocks["delta"].clip(lower=LOG_FLOOR),
                          unit_index=blocks.groupby("label").cumcount())
    reverse = (blocks["view"] == "reverse").any()
    y_title = ("error removed by keeping it in FP32" if reverse else "error added by quantizing it alone")
    figure = px.line(frame, x="unit_index", y="shown", color="label", markers=True, log_y=True,
                     hover_data={"name": True, "delta": ":.4g", "shown": False, "unit_index": False},
                     labels={"unit_index": "unit (model order)", "shown": f"{ERROR_TITLES.get(metric, metric)}: "
                             f"{y_title}", "label": "scheme"})
    figure.update_layout(margin={"t": 30}, legend={"orientation": "h", "y": -0.2})
    return _titled(figure, "End-to-end error per unit")


def mix_pareto(rows: pd.DataFrame, metric: str) -> go.Figure:
    """Size against measured error: uniform schemes as labelled points, recommended mixes as a line."""
    frame = rows.assign(size_mb=rows["size_bytes"] / 1e6, shown=rows["error"].clip(lower=LOG_FLOOR))
    figure = go.Figure()
    mixes = frame[frame["kind"] == "mix"].sort_values("size_bytes")
    uniform = frame[frame["kind"] == "uniform"]
    hover = "%{text}<br>%{x:.1f} MB, %{customdata[0]:.3f} bits/weight<br>error %{customdata[1]:.4g}<extra></extra>"
    figure.add_trace(go.Scatter(x=uniform["size_mb"], y=uniform["shown"], mode="markers+text", name="uniform",
                                text=uniform["label"], textposition="top center", marker={"size": 13},
                                customdata=uniform[["bits_per_weight", "error"]].to_numpy(), hovertemplate=hover))
    figure.add_trace(go.Scatter(x=mixes["size_mb"], y=mixes["shown"], mode="lines+markers", name="recommended mix",
                                text=mixes["label"], marker={"size": 10, "symbol": "diamond"},
                                customdata=mixes[["bits_per_weight", "error"]].to_numpy(), hovertemplate=hover))
    figure.update_layout(xaxis_title="Model size as stored (MB)", yaxis_title=ERROR_TITLES.get(metric, metric),
                         yaxis_type="log", margin={"t": 30}, legend={"orientation": "h", "y": -0.2})
    figure.update_traces(cliponaxis=False)
    return _titled(figure, "Mixed precision against uniform formats: error against size")


# --- speed ---

SPEED_TITLES = {"decode_tokens_per_s": "Decode throughput (tokens/s)", "sentences_per_s": "Throughput (sentences/s)"}


def speed_tradeoff(rows: pd.DataFrame, speed: str, error_title: str, target_name: str = "the target") -> go.Figure:
    """Error (log) against throughput, one point per (format, backend), size as marker area: measured on this
    machine and predicted for the target in two panels with their own throughput axes (a CPU's tens of
    tokens/s and a GPU's thousands on one axis would squash one of them to zero).

    ``rows`` has ``label``, ``speed``, ``error``, ``size_bytes``, ``library``, ``source`` ("measured" or
    "predicted") and ``pareto`` (bool); the Pareto front of measured points is drawn as a line.
    """
    from plotly.subplots import make_subplots

    frame = rows.assign(size_mb=rows["size_bytes"] / 1e6, shown=rows["error"].clip(lower=LOG_FLOOR))
    largest = max(float(frame["size_mb"].max()), 1e-9)
    sources = [s for s in ("measured", "predicted") if (frame["source"] == s).any()]
    where = {"measured": "measured on this machine", "predicted": f"predicted on {target_name}"}
    figure = make_subplots(rows=1, cols=len(sources), shared_yaxes=True, horizontal_spacing=0.08,
                           subplot_titles=[where[s] for s in sources] if len(sources) > 1 else None)
    for column, source in enumerate(sources, start=1):
        predicted = source == "predicted"
        for library, part in frame[frame["source"] == source].groupby("library", sort=False):
            figure.add_trace(go.Scatter(
                x=part["speed"], y=part["shown"], mode="markers+text", text=part["label"],
                textposition="top center", name=f"{library} ({source})", legendgroup=library,
                marker={"size": 10 + 30 * np.sqrt(part["size_mb"] / largest),
                        "symbol": "circle-open" if predicted else "circle", "line": {"width": 2}},
                customdata=part[["size_mb", "error"]].to_numpy(),
                hovertemplate="%{text}<br>%{x:,.1f}<br>error %{customdata[1]:.4g}<br>%{customdata[0]:.1f} MB"
                              "<extra>" + source + "</extra>"), row=1, col=column)
        figure.update_xaxes(title=f"{SPEED_TITLES.get(speed, speed)}, {where[source]}", exponentformat="none",
                            separatethousands=True, row=1, col=column)
    front = frame[frame["pareto"] & (frame["source"] == "measured")].sort_values("speed")
    if len(front) > 1:
        figure.add_trace(go.Scatter(x=front["speed"], y=front["shown"], mode="lines", name="Pareto front (measured)",
                                    line={"dash": "dot", "color": "black"}, hoverinfo="skip"), row=1, col=1)
    figure.update_yaxes(type="log", exponentformat="power")
    figure.update_yaxes(title=error_title, row=1, col=1)
    figure.update_layout(margin={"t": 30}, legend={"orientation": "h", "y": -0.3})
    figure.update_traces(cliponaxis=False)
    return _titled(figure, "Accuracy against speed, marker area by size")


def gpu_decode_bars(rows: pd.DataFrame, predicted: pd.DataFrame | None = None) -> go.Figure:
    """Measured GPU decode tokens/s per format (``format``), one bar per code path (``code path``); roofline
    predictions as markers. Bars run across, so the formats' names never collide."""
    formats = list(dict.fromkeys(rows["format"]))
    figure = px.bar(rows, y="format", x="decode_tokens_per_s", color="code path", barmode="group", orientation="h",
                    category_orders={"format": formats},
                    labels={"format": "format (weights, kernel)", "decode_tokens_per_s": "decode tokens/s (batch 1)",
                            "decode_tokens_per_s_spread_pct": "spread over repetitions (%)"},
                    hover_data=[c for c in ("backend", "gpu", "decode_tokens_per_s_spread_pct") if c in rows])
    figure.update_xaxes(exponentformat="none", separatethousands=True)
    if predicted is not None and len(predicted):
        figure.add_trace(go.Scatter(y=predicted["format"], x=predicted["decode_tokens_per_s"], mode="markers",
                                    name="roofline (bandwidth bound)", marker={"symbol": "line-ns-open", "size": 24,
                                                                               "line": {"width": 3}}))
    bars = len(rows[["format", "code path"]].drop_duplicates())
    figure.update_layout(margin={"t": 30}, legend={"orientation": "h", "y": -0.2}, height=max(380, 160 + 24 * bars))
    return _titled(figure, "GPU decode speed per format and code path")


# --- formats explorer ---------------------------------------------------------------------------------------

FIELD_COLORS = {"sign": "#e45756", "exponent": "#4c78a8", "mantissa": "#54a24b", "code": "#9d755d"}


def bit_strips(layouts: pd.DataFrame) -> go.Figure:
    """One row of coloured squares per format: sign, exponent and mantissa bits (or an integer/table code),
    most significant bit on the left, each labelled with its digit."""
    xs, ys, texts, colors, hovers = [], [], [], [], []
    for row in layouts.itertuples():
        fields = ([("sign", row.sign), ("exponent", row.exponent), ("mantissa", row.mantissa)] if row.sign
                  else [("code", row.code_bits)])
        position = 0
        for field_name, digits in fields:
            for digit in digits:
                xs.append(position)
                ys.append(row.format)
                texts.append(digit)
                colors.append(FIELD_COLORS[field_name])
                hovers.append(f"{row.format} bit {row.bits - 1 - position}: {field_name}")
                position += 1
    figure = go.Figure(go.Scatter(x=xs, y=ys, mode="markers+text", text=texts, hovertext=hovers,
                                  hoverinfo="text", marker={"symbol": "square", "size": 18, "color": colors},
                                  textfont={"color": "white", "size": 11}, showlegend=False))
    for field_name, color in FIELD_COLORS.items():
        figure.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=field_name,
                                    marker={"symbol": "square", "size": 12, "color": color}))
    figure.update_yaxes(autorange="reversed", title="format")
    figure.update_xaxes(title="bit (most significant first)", showgrid=False, zeroline=False)
    figure.update_layout(height=100 + 34 * layouts.shape[0], margin={"t": 10, "l": 10},
                         legend={"orientation": "h", "y": -0.25})
    return _titled(figure, "Bits of the value in each format")


def number_lines(values: pd.DataFrame) -> go.Figure:
    """Representable values of each format as ticks on its own line: where the levels are dense or sparse."""
    figure = px.scatter(values, x="value", y="format", labels={"value": "representable value", "format": "format"})
    figure.update_traces(marker={"symbol": "line-ns-open", "size": 16, "line": {"width": 1}})
    figure.update_layout(height=120 + 45 * values["format"].nunique(), margin={"t": 10})
    return _titled(figure, "Values each format can represent")


def rounding_error_curves(records: pd.DataFrame) -> go.Figure:
    """Rounding error against value: relative for floats (top), absolute for integer/table grids (bottom)."""
    frame = records.assign(shown=records["shown_error"].clip(lower=1e-12))
    figure = px.line(frame, x="value", y="shown", color="format", facet_row="error_kind", log_y=True,
                     labels={"value": "value", "shown": "error"})
    figure.for_each_annotation(lambda a: a.update(text=a.text.split("=")[-1] + " error"))
    figure.update_yaxes(matches=None, title="rounding error")
    figure.update_xaxes(title="value")
    figure.update_layout(height=540, margin={"t": 30}, legend={"orientation": "h", "y": -0.15})
    return _titled(figure, "Rounding error against value")


def outlier_histogram(values: torch.Tensor, records: pd.DataFrame) -> go.Figure:
    """The tensor's histogram with each calibration's clipping point (±) as a dashed line."""
    flat = values.detach().reshape(-1).float()
    figure = go.Figure(_histogram_bars(flat, _bin_edges(flat, HISTOGRAM_BINS), name="values",
                                       marker_color="#4c78a8"))
    palette = ("#e45756", "#f58518", "#54a24b")
    for color, row in zip(palette, records.itertuples(), strict=False):
        for sign in (-1, 1):
            figure.add_vline(x=sign * row.clip_at, line_dash="dash", line_color=color)
        figure.add_trace(go.Scatter(x=[None], y=[None], mode="lines", line={"color": color, "dash": "dash"},
                                    name=f"{row.calibration}: clip at ±{row.clip_at:.3g}"))
    figure.update_layout(xaxis_title="value (standard deviations)", yaxis_title="values per bin", yaxis_type="log",
                         bargap=0, margin={"t": 30}, legend={"orientation": "h", "y": -0.25})
    return _titled(figure, "Where each calibration clips")


def granularity_tradeoff(records: pd.DataFrame) -> go.Figure:
    """Bits per weight actually stored (scales included) against relative MSE, one point per way to scale.

    An exact reconstruction (error 0: e.g. Q4_1 on weights that were Q4_1 already) is drawn on a floor of
    ``LOG_FLOOR`` x the smallest non-zero error and labelled, instead of vanishing from the log axis."""
    positive = records["relative_mse"][records["relative_mse"] > 0]
    floor = (positive.min() if len(positive) else 1.0) * LOG_FLOOR
    records = records.assign(
        relative_mse=records["relative_mse"].clip(lower=floor),
        variant=[f"{v} (exact: 0)" if e <= 0 else v for v, e in zip(records["variant"], records["relative_mse"],
                                                                     strict=True)])
    figure = px.scatter(records, x="bits_per_weight", y="relative_mse", color="family", text="variant",
                        log_y=True, hover_data={"overhead_bits_per_weight": ":.3f", "sqnr_db": ":.1f"},
                        labels={"bits_per_weight": "bits per weight, scales and zero-points included",
                                "relative_mse": "relative MSE (log)", "family": "scaling"})
    figure.update_traces(textposition="top center", marker={"size": 11}, cliponaxis=False)
    figure.update_layout(margin={"t": 30}, legend={"orientation": "h", "y": -0.25})
    return _titled(figure, "Error against storage, per way to scale")


def token_ranges(per_token: pd.DataFrame, static_limit: float) -> go.Figure:
    """Per-token largest |activation| (bars) against the static scale's range (line), and the relative error
    of static and dynamic quantization per token (lower panel, log)."""
    from plotly.subplots import make_subplots

    figure = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                           subplot_titles=("largest |activation| per token", "relative MSE per token"))
    figure.add_trace(go.Bar(x=per_token["token"], y=per_token["absmax"], name="token absmax",
                            marker_color="#4c78a8"), row=1, col=1)
    figure.add_hline(y=static_limit, line_dash="dash", line_color="#e45756", row=1, col=1,
                     annotation_text=f"static range ±{static_limit:.3g}")
    for column, name, color in (("static_relative_mse", "static (calibrated) scale", "#e45756"),
                                ("dynamic_relative_mse", "dynamic per-token scale", "#54a24b")):
        figure.add_trace(go.Scatter(x=per_token["token"], y=per_token[column].clip(lower=1e-12), name=name,
                                    mode="lines", line={"color": color}), row=2, col=1)
    # Log bars need an explicit range: plotly's automatic one starts far below the smallest bar.
    low = float(min(per_token["absmax"].clip(lower=1e-12).min(), static_limit))
    high = float(max(per_token["absmax"].max(), static_limit))
    figure.update_yaxes(type="log", range=[np.log10(low) - 0.3, np.log10(high) + 0.3], row=1, col=1)
    figure.update_yaxes(type="log", row=2, col=1)
    figure.update_xaxes(title="token position", row=2, col=1)
    figure.update_yaxes(title="|activation|", row=1, col=1)
    figure.update_yaxes(title="relative MSE", row=2, col=1)
    figure.update_layout(height=580, margin={"t": 60}, legend={"orientation": "h", "y": -0.15}, bargap=0)
    return _titled(figure, "Static against dynamic activation scales, per token")


def qat_curves(history: pd.DataFrame, results: pd.DataFrame) -> go.Figure:
    """QAT test accuracy over fine-tuning steps per bit width, with PTQ (dotted) and FP32 (grey) as lines."""
    figure = px.line(history, x="step", y="qat_accuracy", color="scheme", markers=True,
                     labels={"step": "QAT fine-tuning step", "qat_accuracy": "test accuracy", "scheme": ""})
    colors = {trace.name: trace.line.color for trace in figure.data}
    for row in results.itertuples():
        figure.add_hline(y=row.ptq_accuracy, line_dash="dot", line_color=colors.get(row.scheme),
                         annotation_text=f"PTQ {row.scheme}", annotation_position="bottom right")
    figure.add_hline(y=results["fp32_accuracy"].iloc[0], line_color="grey", annotation_text="FP32")
    figure.update_layout(margin={"t": 30}, legend={"orientation": "h", "y": -0.25})
    return _titled(figure, "Test accuracy during QAT, against PTQ and FP32")


def rtn_vs_gptq(records: pd.DataFrame, value: str, title: str, log_y: bool = True,
                figure_title: str = "RTN against GPTQ") -> go.Figure:
    """Grouped bars: one group per scheme, RTN and GPTQ side by side; ``title`` names the bars' axis."""
    figure = px.bar(records, x="scheme", y=value, color="algorithm", barmode="group", log_y=log_y,
                    text_auto=".3g", labels={"scheme": "scheme", value: title, "algorithm": ""},
                    color_discrete_map={"rtn": "#e45756", "gptq": "#54a24b"})
    figure.update_layout(margin={"t": 30}, legend={"orientation": "h", "y": -0.2})
    return _titled(figure, figure_title)


def speedups(records: pd.DataFrame, claims: pd.DataFrame) -> go.Figure:
    """Measured speed-up over fp32 per variant and token count, with each quoted claim as a dashed line."""
    frame = records.assign(tokens=records["tokens"].astype(str) + " token(s)")
    figure = px.bar(frame, x="variant", y="speedup_vs_fp32", color="tokens", barmode="group", text_auto=".2f",
                    labels={"variant": "variant", "speedup_vs_fp32": "speed-up over fp32 (this CPU)", "tokens": ""})
    for row in claims.itertuples():
        figure.add_hline(y=row.claimed_speedup, line_dash="dash", line_color="grey",
                         annotation_text=f"claimed: {row.claim.split(':')[0]} {row.claimed_speedup:g}x")
    figure.add_hline(y=1.0, line_color="black", line_width=1)
    figure.update_layout(margin={"t": 30}, legend={"orientation": "h", "y": -0.2})
    return _titled(figure, "Measured speed-up against the claimed ratios")


# --- History: speed and sensitivity runs side by side ---


def compare_bench_runs(rows: pd.DataFrame, column: str, title: str, log_y: bool = False) -> go.Figure:
    """Grouped bars: one group per backend, one bar per run (``rows`` are bench records with a ``run`` column)."""
    shown = rows[pd.to_numeric(rows[column], errors="coerce").notna()] if column in rows else rows.iloc[:0]
    figure = px.bar(shown, x="backend", y=column, color="run", barmode="group", log_y=log_y, text_auto=".3g",
                    labels={"backend": "backend", column: title, "run": "run"})
    figure.update_layout(margin={"t": 30}, legend={"orientation": "h", "y": -0.25})
    return _titled(figure, f"{title}, per backend and run")


def compare_sensitivity_runs(rows: pd.DataFrame, measure: str, title: str, log_y: bool = True) -> go.Figure:
    """Per-linear sensitivity of several runs overlaid: linears in model order on x, one line per run and scheme."""
    order = list(dict.fromkeys(rows["layer"]))
    frame = rows.assign(series=rows["run"] + " · " + rows["label"].astype(str))
    if log_y:
        frame = frame.assign(**{measure: frame[measure].clip(lower=LOG_FLOOR)})
    figure = px.line(frame, x="layer", y=measure, color="run", line_dash="label", markers=True, log_y=log_y,
                     category_orders={"layer": order}, hover_data=["series"],
                     labels={"layer": "linear (model order)", measure: title, "run": "run", "label": "scheme"})
    figure.update_layout(margin={"t": 30}, legend={"orientation": "h", "y": -0.35}, xaxis_showticklabels=False)
    return _titled(figure, f"{title}, per linear and run")


# --- Overview ------------------------------------------------------------------------------------------------

OVERVIEW_HEIGHT = 360  # four panels in a 2x2 grid fit one 1280x720 screen at two rows per scroll
GRID_COLORS = ("#e45756", "#f58518", "#54a24b", "#b279a2", "#9d755d", "#4c78a8")


def _overview_layout(figure: go.Figure, title: str, height: int = OVERVIEW_HEIGHT) -> go.Figure:
    figure.update_layout(title={"text": title, "x": 0, "xanchor": "left", "font": {"size": 15}}, height=height,
                         margin={"t": 50, "b": 10, "l": 10, "r": 10}, legend={"orientation": "h", "y": -0.3})
    return figure


def accuracy_size_front(rows: pd.DataFrame, loss_title: str, bound: float, log_y: bool = True) -> go.Figure:
    """Loss against size per scheme, the Pareto front (no other scheme smaller and more accurate) as a line and
    the accuracy bound as a dashed line. ``rows``: ``label``, ``size_bytes``, ``loss``, ``pareto``."""
    frame = rows.assign(size_mb=rows["size_bytes"] / 1e6,
                        shown=rows["loss"].clip(lower=LOG_FLOOR) if log_y else rows["loss"])
    text = [f"{label} (≤{LOG_FLOOR:g})" if log_y and loss <= LOG_FLOOR else label
            for label, loss in zip(frame["label"], frame["loss"])]
    figure = go.Figure(go.Scatter(
        x=frame["size_mb"], y=frame["shown"], mode="markers+text", text=text, textposition="top center",
        name="format", marker={"size": 11, "color": np.where(frame["pareto"], "#4c78a8", "#bab0ac")},
        customdata=frame[["loss"]].to_numpy(), cliponaxis=False,
        hovertemplate="%{text}<br>%{x:.1f} MB<br>loss %{customdata[0]:.3e}<extra></extra>"))
    front = frame[frame["pareto"]].sort_values("size_mb")
    if len(front) > 1:
        figure.add_trace(go.Scatter(x=front["size_mb"], y=front["shown"], mode="lines", name="Pareto front",
                                    line={"dash": "dot", "color": "#4c78a8"}, hoverinfo="skip"))
    if not log_y or bound > 0:
        shown = max(bound, LOG_FLOOR) if log_y else bound
        figure.add_hline(y=shown, line_dash="dash", line_color="#e45756")
        # Annotations on a log axis take the exponent, not the value (shapes take the value).
        figure.add_annotation(text=f"bound {bound:g}", x=1, xref="paper", xanchor="right", yanchor="bottom",
                              y=np.log10(shown) if log_y else shown, showarrow=False,
                              font={"color": "#e45756", "size": 11})
    low, high = float(frame["size_mb"].min()), float(frame["size_mb"].max())
    pad = 0.12 * (high - low or high or 1.0)  # room for the end points' labels
    figure.update_xaxes(title="model size as stored, scales included (MB)", range=[low - pad, high + pad])
    figure.update_yaxes(title=loss_title, type="log" if log_y else "linear", exponentformat="e")
    return _overview_layout(figure, "Accuracy against size")


def memory_on_target(records: pd.DataFrame, memory_bytes: int, target_name: str) -> go.Figure:
    """``memory_stack`` for the Overview: when every plan is far below the device, the device line would squash
    the bars flat, so the axis follows the bars and the title states the device's memory instead."""
    figure = memory_stack(records, memory_bytes, target_name)
    tallest = float(records["total_bytes"].max())
    if tallest < 0.2 * memory_bytes:
        figure.layout.shapes, figure.layout.annotations = [], []
        figure.update_yaxes(range=[0, 1.2 * tallest / 1e9])
        figure.add_annotation(text=f"{target_name}: {memory_bytes / 1e9:.0f} GB, far above the bars",
                              xref="paper", yref="paper", x=1, y=1.02, xanchor="right", yanchor="bottom",
                              showarrow=False, font={"size": 11, "color": "#e45756"})
    figure.update_yaxes(exponentformat="none")
    return _overview_layout(figure, f"Memory per format on {target_name}")


def speed_predicted_and_measured(rows: pd.DataFrame, unit: str, target_name: str) -> go.Figure:
    """Throughput per scheme in two facets with their own axes, never one: predicted on the target (bars; grey
    where the target has no kernel for the format) and measured on this machine (bars with min-max whiskers).
    The 16-bit reference is a dashed line in each facet. ``rows``: ``label``, ``where`` ("predicted" or
    "measured"), ``speed``, ``low``, ``high``, ``native``, ``reference``."""
    from plotly.subplots import make_subplots

    figure = make_subplots(rows=1, cols=2, horizontal_spacing=0.2,
                           subplot_titles=(f"predicted on<br>{target_name}", "measured on<br>this machine"))
    figure.update_annotations(font={"size": 12})
    for column, where in enumerate(("predicted", "measured"), start=1):
        part = rows[rows["where"] == where]
        shown = part[~part["reference"]] if (~part["reference"]).any() else part
        if part.empty:
            figure.add_annotation(text="not measured yet" if where == "measured" else "not predicted yet",
                                  x=0.5, y=0.5, xref=f"x{column if column > 1 else ''} domain",
                                  yref=f"y{column if column > 1 else ''} domain", showarrow=False)
            continue
        colors = ["#bab0ac" if native is False else ("#4c78a8" if where == "predicted" else "#54a24b")
                  for native in shown["native"]]
        error = None
        if where == "measured" and shown["high"].notna().any():
            error = {"type": "data", "symmetric": False, "array": (shown["high"] - shown["speed"]).to_numpy(),
                     "arrayminus": (shown["speed"] - shown["low"]).to_numpy()}
        figure.add_trace(go.Bar(x=shown["label"], y=shown["speed"], marker_color=colors, error_y=error,
                                name=where, showlegend=False, customdata=shown[["note"]].to_numpy(),
                                hovertemplate="%{x}: %{y:,.1f} " + unit + "<br>%{customdata[0]}<extra></extra>"),
                         row=1, col=column)
        reference = part[part["reference"]]
        if len(reference):
            figure.add_hline(y=float(reference["speed"].iloc[0]), line_dash="dash", line_color="black",
                             annotation_text="16-bit", annotation_position="top left", row=1, col=column)
        figure.update_yaxes(title=unit, exponentformat="none", separatethousands=True, rangemode="tozero",
                            row=1, col=column)
        figure.update_xaxes(title="format", row=1, col=column)
    if (rows["native"] == False).any():  # noqa: E712 (a column of True/False/None)
        figure.add_trace(go.Bar(x=[None], y=[None], marker_color="#bab0ac", name="no kernel there: not faster"))
    figure = _overview_layout(figure, "Speed per format (two separate axes)")
    figure.update_layout(margin={"t": 90})
    return figure


def sensitivity_top_layers(rows: pd.DataFrame) -> go.Figure:
    """The most sensitive layers (rows already ranked, ``rank`` 0 first) as horizontal bars per scheme on a log
    axis: the estimated loss increase when that layer alone is quantized."""
    frame = rows.assign(shown=rows["score"].clip(lower=LOG_FLOOR ** 2))
    order = list(dict.fromkeys(frame.sort_values("rank")["layer"]))
    figure = px.bar(frame, x="shown", y="layer", color="scheme", orientation="h", barmode="group", log_x=True,
                    category_orders={"layer": order},
                    labels={"shown": "loss increase, layer alone (log)", "layer": "layer", "scheme": "format"})
    figure.update_xaxes(exponentformat="e")
    figure.update_yaxes(tickfont={"size": 10})
    return _overview_layout(figure, "Most sensitive layers (quick estimate)")


def weight_grids(values: torch.Tensor, grids: dict[str, torch.Tensor], title: str) -> go.Figure:
    """Histogram of one block of weights with each format's grid over it, one colour per format."""
    flat = values.detach().reshape(-1).float()
    bins = int(min(HISTOGRAM_BINS, max(20, flat.numel() // 3)))
    figure = go.Figure(_histogram_bars(flat, _bin_edges(flat, bins), name="weights", marker_color="#9ecae9"))
    # One trace of NaN-separated vertical segments per format, not one layout shape per level: an int8 grid
    # alone would be 256 shapes, slow to build here and to draw in the browser.
    for color, (label, grid) in zip(GRID_COLORS * 4, grids.items()):
        levels = grid.detach().float().cpu().numpy().astype(np.float64)
        x = np.repeat(levels, 3)
        x[2::3] = np.nan
        figure.add_trace(go.Scatter(x=x, y=np.tile([0.0, 1.0, np.nan], len(levels)), yaxis="y2", mode="lines",
                                    line={"color": color, "width": 1}, opacity=0.9 if len(levels) <= 64 else 0.3,
                                    hoverinfo="skip", name=f"{label} ({len(levels)} levels)"))
    figure.update_layout(bargap=0.05, yaxis2={"overlaying": "y", "range": [0, 1], "visible": False})
    low, high = float(flat.min()), float(flat.max())
    pad = 0.05 * (high - low or 1.0)
    figure.update_xaxes(title="weight value", range=[low - pad, high + pad], exponentformat="e")
    figure.update_yaxes(title="weights per bin")
    return _overview_layout(figure, title)
