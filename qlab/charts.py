"""Plotly figure builders: plain data in, Figure out. Used by the pages and, later, the HTML report."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import torch

# Metric name -> (axis title, lower is better). Names match the result-row keys.
METRICS: dict[str, tuple[str, bool]] = {
    "kld_mean": ("KL divergence to FP32 (mean, nats/token)", True),
    "kld_p99": ("KL divergence to FP32 (99th percentile)", True),
    "ppl": ("Perplexity", True),
    "top1_agreement": ("Top-1 agreement with FP32", False),
    "cosine_mean": ("Cosine similarity to FP32 embeddings (mean)", False),
    "retrieval_agreement": ("Nearest-neighbour agreement with FP32", False),
}
MAX_HISTOGRAM_POINTS = 200_000
LOG_FLOOR = 1e-6  # below this a KLD is measurement noise (fp16-stored baseline log-probs)


def metric_title(metric: str) -> str:
    return METRICS.get(metric, (metric, True))[0]


def size_vs_accuracy(rows: pd.DataFrame, metric: str, log_y: bool = False) -> go.Figure:
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
    return figure


def weight_histogram(values: torch.Tensor, grid: torch.Tensor | None, title: str,
                     clip_low: float | None = None, clip_high: float | None = None) -> go.Figure:
    """Histogram of weights with the quantization grid drawn as vertical lines.

    A single block holds only tens of weights, so small inputs get fewer bins and a rug of the individual
    values: each tick is one weight, and the nearest red line is where rounding sends it.
    """
    flat = _sample(values)
    bins = int(min(200, max(20, flat.numel() // 3)))
    figure = go.Figure(go.Histogram(x=flat.numpy(), nbinsx=bins, name="weights", marker_color="#4c78a8"))
    if flat.numel() <= 4096:
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
    figure.update_layout(title=title, xaxis_title="weight value", yaxis_title="count", bargap=0.05,
                         margin={"t": 40}, legend={"orientation": "h", "y": -0.2})
    return figure


def error_histogram(errors: dict[str, torch.Tensor]) -> go.Figure:
    """Overlaid histograms of quantization error (dequantized - original), one per scheme."""
    figure = go.Figure()
    for label, error in errors.items():
        figure.add_trace(go.Histogram(x=_sample(error).numpy(), nbinsx=200, name=label, opacity=0.6))
    figure.update_layout(barmode="overlay", xaxis_title="dequantized - original", yaxis_title="count",
                         margin={"t": 30}, legend={"orientation": "h", "y": -0.2})
    return figure


def channel_ranges(weight: torch.Tensor) -> go.Figure:
    """Per-output-channel min, max and absmax: why one scale per tensor wastes levels."""
    frame = pd.DataFrame({
        "channel": range(weight.shape[0]),
        "max": weight.amax(dim=1).numpy(),
        "min": weight.amin(dim=1).numpy(),
        "absmax": weight.abs().amax(dim=1).numpy(),
    })
    figure = px.line(frame, x="channel", y=["max", "min", "absmax"],
                     labels={"value": "weight value", "channel": "output channel", "variable": ""})
    figure.update_layout(margin={"t": 30}, legend={"orientation": "h", "y": -0.2})
    return figure


def _sample(values: torch.Tensor) -> torch.Tensor:
    """At most MAX_HISTOGRAM_POINTS values so the browser stays fast. Random (seeded) rather than strided:
    a stride that divides the row length would keep the same input columns of every row."""
    flat = values.detach().reshape(-1).float()
    if flat.numel() <= MAX_HISTOGRAM_POINTS:
        return flat
    generator = torch.Generator().manual_seed(0)
    return flat[torch.randint(flat.numel(), (MAX_HISTOGRAM_POINTS,), generator=generator)]


# --- memory planner ---------------------------------------------------------------------------------------

# Stacked in this order, bottom to top; keys are MemoryPlan.to_record() fields.
MEMORY_COMPONENTS: dict[str, str] = {
    "weights_before_scales_bytes": "weights",
    "scales_bytes": "scales + zero-points",
    "kv_cache_bytes": "KV cache",
    "activations_bytes": "activations",
    "overhead_bytes": "runtime overhead",
}


def _device_line(figure: go.Figure, memory_bytes: int, target_name: str) -> None:
    figure.add_hline(y=memory_bytes / 1e9, line_dash="dash", line_color="#e45756",
                     annotation_text=f"{target_name}: {memory_bytes / 1e9:.0f} GB",
                     annotation_position="top left")


def memory_stack(records: pd.DataFrame, memory_bytes: int, target_name: str) -> go.Figure:
    """One stacked bar per scheme (weights, scales, KV, activations, overhead, in GB) against the device."""
    figure = go.Figure()
    for column, label in MEMORY_COMPONENTS.items():
        figure.add_trace(go.Bar(x=records["scheme"], y=records[column] / 1e9, name=label,
                                hovertemplate="%{x}: %{y:.3f} GB<extra>" + label + "</extra>"))
    _device_line(figure, memory_bytes, target_name)
    figure.update_layout(barmode="stack", yaxis_title="memory (GB, 1e9 bytes)", xaxis_title="weight scheme",
                         margin={"t": 30}, legend={"orientation": "h", "y": -0.25})
    return figure


def memory_vs_context(curve: pd.DataFrame, memory_bytes: int, target_name: str) -> go.Figure:
    """Total memory against context length, one line per scheme, with the device's memory as a line."""
    frame = curve.assign(total_gb=curve["total_bytes"] / 1e9)
    figure = px.line(frame, x="context_tokens", y="total_gb", color="scheme", markers=True, log_x=True,
                     labels={"context_tokens": "context length (tokens per sequence)",
                             "total_gb": "total memory (GB)", "scheme": "scheme"})
    _device_line(figure, memory_bytes, target_name)
    figure.update_layout(margin={"t": 30}, legend={"orientation": "h", "y": -0.25})
    return figure


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
    return figure


# --- run history ------------------------------------------------------------------------------------------


def compare_runs(rows: pd.DataFrame, metric: str, log_y: bool = False) -> go.Figure:
    """Several runs' size-vs-accuracy points overlaid: one colour and one line (by size) per run.

    ``rows`` holds sweep records with a ``run`` column naming the run each came from.
    """
    ordered = rows.sort_values(["run", "size_bytes"])
    figure = size_vs_accuracy(ordered.assign(format=ordered["run"]), metric, log_y)
    figure.update_traces(mode="lines+markers+text", line={"width": 1})
    figure.for_each_trace(lambda trace: trace.update(hovertemplate=trace.hovertemplate.replace("format=", "run=")))
    figure.update_layout(legend_title_text="run", legend={"orientation": "h", "y": -0.25})
    return figure
