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


def metric_title(metric: str) -> str:
    return METRICS.get(metric, (metric, True))[0]


def size_vs_accuracy(rows: pd.DataFrame, metric: str) -> go.Figure:
    """One point per scheme: model size (MB) against an accuracy metric, labelled by scheme."""
    frame = rows.assign(size_mb=rows["size_bytes"] / 1e6)
    figure = px.scatter(frame, x="size_mb", y=metric, text="label", color="format",
                        hover_data={"bits_per_weight": ":.3f", "size_mb": ":.1f", metric: ":.5g"},
                        labels={"size_mb": "Model size as stored (MB)", metric: metric_title(metric)})
    figure.update_traces(textposition="top center", marker={"size": 12})
    if metric.startswith("kld"):
        # KLD spans orders of magnitude between fp16 and 3-bit; a log axis keeps every point readable.
        positive = frame[metric][frame[metric] > 0]
        if len(positive):
            figure.update_yaxes(type="log")
    figure.update_layout(margin={"t": 30}, legend_title_text="format")
    return figure


def weight_histogram(values: torch.Tensor, grid: torch.Tensor | None, title: str,
                     clip_low: float | None = None, clip_high: float | None = None) -> go.Figure:
    """Histogram of weights with the quantization grid drawn as vertical lines."""
    flat = _sample(values)
    figure = go.Figure(go.Histogram(x=flat.numpy(), nbinsx=200, name="weights", marker_color="#4c78a8"))
    if grid is not None and 0 < grid.numel() <= 512:
        shapes = [{"type": "line", "x0": v, "x1": v, "y0": 0, "y1": 1, "yref": "paper",
                   "line": {"color": "#e45756", "width": 1}} for v in grid.tolist()]
        figure.update_layout(shapes=shapes)
        figure.add_trace(go.Scatter(x=[None], y=[None], mode="lines", line={"color": "#e45756"},
                                    name=f"grid ({grid.numel()} levels)"))
    for edge, label in ((clip_low, "clip"), (clip_high, "clip")):
        if edge is not None:
            figure.add_vline(x=edge, line_dash="dash", line_color="black", annotation_text=label)
    figure.update_layout(title=title, xaxis_title="weight value", yaxis_title="count", bargap=0,
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
