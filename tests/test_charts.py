"""Chart builders: histograms count every value exactly (checked against numpy) and stay small for the browser."""

import numpy as np
import plotly.io as pio
import torch

from qlab import charts


def test_weight_histogram_counts_every_weight_like_numpy():
    weights = torch.randn(576, 1536, generator=torch.Generator().manual_seed(0))
    figure = charts.weight_histogram(weights, None, "layer")
    bars = figure.data[0]
    expected, edges = np.histogram(weights.numpy(), bins=len(bars.y))
    assert bars.y.sum() == weights.numel()
    np.testing.assert_allclose(bars.x, (edges[:-1] + edges[1:]) / 2, rtol=1e-6, atol=1e-6)
    # float32 binning may move a value lying exactly on an edge into the neighbouring bin
    assert np.abs(bars.y - expected).sum() <= 2e-5 * weights.numel()
    assert len(pio.to_json(figure)) < 50_000  # 885k weights, yet a few kB go to the browser


def test_block_histogram_keeps_a_rug_of_each_weight_and_the_grid():
    block = torch.linspace(-1, 1, 64)
    figure = charts.weight_histogram(block, torch.linspace(-1, 1, 16), "block")
    assert figure.data[0].y.sum() == 64
    assert len(figure.data[1].x) == 64  # one tick per weight
    assert len(figure.layout.shapes) == 16  # one line per grid level


def test_weight_grids_draw_each_format_as_one_trace_of_level_lines():
    grids = {"int8": torch.linspace(-1, 1, 256), "int4": torch.linspace(-1, 1, 16)}
    figure = charts.weight_grids(torch.randn(4096) * 0.3, grids, "grids")
    lines = {trace.name: trace for trace in figure.data[1:]}
    assert sorted(lines) == ["int4 (16 levels)", "int8 (256 levels)"]
    int4 = lines["int4 (16 levels)"]
    np.testing.assert_array_equal(np.asarray(int4.x, dtype=float)[0::3], grids["int4"].numpy())
    assert np.isnan(np.asarray(int4.x, dtype=float)[2::3]).all() and int4.yaxis == "y2"
    assert not figure.layout.shapes and figure.layout.yaxis2.range == (0, 1)


def test_constant_tensor_gets_one_full_bin():
    figure = charts.weight_histogram(torch.full((100,), 0.5), None, "constant")
    counts = np.asarray(figure.data[0].y)
    assert counts.sum() == 100 and (counts > 0).sum() == 1


def test_error_histograms_share_bins_across_schemes():
    base = torch.randn(10_000, generator=torch.Generator().manual_seed(1))
    figure = charts.error_histogram({"int8": base * 0.01, "int4": base * 0.2})
    first, second = figure.data
    np.testing.assert_array_equal(first.x, second.x)
    assert first.y.sum() == second.y.sum() == 10_000
    # the narrower error distribution piles into fewer bins around zero
    assert (np.asarray(first.y) > 0).sum() < (np.asarray(second.y) > 0).sum()
