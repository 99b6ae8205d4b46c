"""Calibration statistics collected by running a model: each linear's Hessian and mean |x| per input channel."""

import copy
import dataclasses

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qlab.analyses import calibration
from qlab.analyses.activations import calibration_data
from qlab.core.plan import quantizable_linears
from qlab.models.evaluate import EvalSpec
from tests.tiny_models import tiny_llama


class _NewSquareTensors(TorchDispatchMode):
    """Records every op that makes a new square (Hessian-shaped) tensor instead of writing into its input."""

    def __init__(self) -> None:
        super().__init__()
        self.made: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[0] == out.shape[1] > 1 \
                and not name.endswith("_"):
            self.made.append(name)
        return out


def test_hessians_are_scaled_in_place_to_the_same_values(monkeypatch):
    """The averaged statistics are the sums scaled where they lie: no second Hessian-sized tensor at the end
    (twice the memory on a 1B model), and the values of 2 X^T X / n to the bit."""
    loaded = tiny_llama(tied=False)
    data = calibration_data(loaded, EvalSpec(tokens=64), 256)
    names = [name for name, _ in quantizable_linears(loaded.model)]
    inputs: dict[str, list[torch.Tensor]] = {}
    recorder = _NewSquareTensors()
    real = calibration.run_with_input_hooks

    def run_then_watch(loaded, data, names, hook, progress=None, cancel=None):
        def keep(name, x, shared_with):
            if shared_with is None:
                inputs.setdefault(name, []).append(x.clone())
            hook(name, x, shared_with)
        real(loaded, data, names, keep, progress, cancel)
        recorder.__enter__()  # from here on the sums are only averaged

    monkeypatch.setattr(calibration, "run_with_input_hooks", run_then_watch)
    try:
        stats = calibration.collect_layer_stats(loaded, data, names)
    finally:
        recorder.__exit__(None, None, None)
    assert recorder.made == []
    assert set(stats) == set(names) and "lm_head" in inputs
    for name, batches in inputs.items():
        total = torch.zeros(batches[0].shape[1], batches[0].shape[1])
        for x in batches:
            total.addmm_(x.T, x)
        count = sum(x.shape[0] for x in batches)
        assert count == 256
        assert torch.equal(stats[name].hessian, 2 * total / count), name
        assert torch.equal(stats[name].input_abs_mean, sum(x.abs().sum(dim=0) for x in batches) / count), name


def test_a_16_bit_model_is_calibrated_in_what_its_evaluations_compute_in(monkeypatch, cpu_bf16_math):
    """On a CPU without native bf16 math a bf16 model's calibration pass computes in fp32 (emulated bf16 was
    several times slower), so its statistics are those of the same weights held in fp32; the weights stay bf16."""
    from qlab.models.loading import weights_digest

    computes_in = cpu_bf16_math
    loaded = tiny_llama(tied=False)
    loaded.model.to(torch.bfloat16)
    before = weights_digest(loaded.model)
    widened = dataclasses.replace(loaded, model=copy.deepcopy(loaded.model).float())
    data = calibration_data(loaded, EvalSpec(tokens=64), 256)
    names = [name for name, _ in quantizable_linears(loaded.model)]
    seen = set()
    real = calibration.run_with_input_hooks

    def recording(loaded, data, names, hook, progress=None, cancel=None):
        def keep(name, x, shared_with):
            seen.add(x.dtype)
            hook(name, x, shared_with)
        real(loaded, data, names, keep, progress, cancel)

    monkeypatch.setattr(calibration, "run_with_input_hooks", recording)
    stats = calibration.collect_layer_stats(loaded, data, names)
    assert seen == {computes_in}
    assert weights_digest(loaded.model) == before
    reference = calibration.collect_layer_stats(widened, data, names)
    assert set(stats) == set(names)
    for name in names:
        close = torch.allclose(stats[name].hessian, reference[name].hessian, rtol=1e-4, atol=1e-6)
        assert close == (computes_in == torch.float32), name  # bf16 math rounds the activations it measures
