"""The sensitivity analyses and the rounding algorithms make every tensor on the device of the data it meets (the
H200 run stopped on CPU tensors beside GPU ones). No GPU here, so two checks stand in: every tensor factory in those
modules names its device, and under a default device of "meta" (where anything made without one lands) the analyses
of a CPU model still run and give the same records. Backward hooks run outside the default-device mode, hence the
first check.
"""

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

from qlab.analyses.sensitivity import analyze
from qlab.analyses.sensitivity_quick import quick_sensitivity
from qlab.core.quant import QuantScheme
from qlab.models.evaluate import EvalSpec, compute_baseline, default_text
from tests.tiny_models import tiny_bert, tiny_llama

QLAB = Path(__file__).resolve().parents[1] / "qlab"
# The analyses, and what the sweep runs on a GPU model's weights and calibration inputs.
FILES = ("analyses/sensitivity.py", "analyses/sensitivity_quick.py", "analyses/mixed.py", "analyses/calibration.py",
         "analyses/activations.py", "core/algorithms/gptq.py", "core/algorithms/awq.py", "core/algorithms/hqq.py",
         "core/algorithms/sparsity.py")
FACTORIES = {"zeros", "ones", "empty", "full", "arange", "tensor", "as_tensor", "Generator", "randn", "rand",
             "randint", "randperm", "linspace", "eye"}
# (file, function, factory) made on the CPU on purpose, each for a reason:
CPU_ON_PURPOSE = {
    ("analyses/sensitivity.py", "_output_curvature", "Generator"),  # an embedding's probe is the CPU run's anywhere
    ("analyses/sensitivity.py", "_output_curvature", "randn"),  # drawn by that generator, then moved to the device
    ("analyses/sensitivity_quick.py", "_token_inputs", "empty"),  # a baseline's (empty) reference lives on the CPU
    ("analyses/sensitivity_quick.py", "spearman", "tensor"),  # ranks of Python floats
}
TEXT = default_text()[:20_000]
SCHEMES = [QuantScheme("int4", group_size=16)]


def _factory_calls():
    """(file, enclosing function, factory, device keyword node or None) of every torch factory call."""
    for file in FILES:
        tree = ast.parse((QLAB / file).read_text())
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef):
                continue
            for node in ast.walk(function):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                        and node.func.attr in FACTORIES):
                    device = next((k.value for k in node.keywords if k.arg == "device"), None)
                    yield file, function.name, node.func.attr, device


def test_every_tensor_factory_names_its_device_and_only_listed_ones_the_cpu():
    calls = list(_factory_calls())
    assert calls  # the walk found the factories at all
    missing = [c[:3] for c in calls if c[3] is None]
    assert not missing, f"tensor factories without device=: {missing}"
    cpu = {c[:3] for c in calls if isinstance(c[3], ast.Constant) and c[3].value == "cpu"}
    # Functions can hold several calls of one factory; each pair is named once.
    assert cpu == CPU_ON_PURPOSE


@pytest.mark.parametrize("make, spec", [(lambda: tiny_llama(layers=2), EvalSpec(tokens=128, text=TEXT)),
                                        (tiny_bert, EvalSpec(tokens=256, text=TEXT))], ids=["llama", "bert"])
def test_analyses_make_nothing_on_the_default_device(make, spec):
    loaded = make()
    baseline = compute_baseline(loaded, spec)
    quick = quick_sensitivity(loaded, SCHEMES, spec, baseline).records
    full = analyze(loaded, SCHEMES, baseline, blocks=False).linears
    with torch.device("meta"):
        assert quick_sensitivity(loaded, SCHEMES, spec, baseline).records == quick
        assert analyze(loaded, SCHEMES, baseline, blocks=False).linears == full


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_an_lm_probe_on_a_gpu_is_drawn_there_the_same_for_one_seed(monkeypatch):
    drawn_on = []
    multinomial = torch.multinomial

    def recording(probabilities, *args, **kwargs):
        drawn_on.append(probabilities.device.type)
        return multinomial(probabilities, *args, **kwargs)

    monkeypatch.setattr(torch, "multinomial", recording)
    cpu = tiny_llama()
    loaded = dataclasses.replace(cpu, model=cpu.model.to("cuda"), device="cuda:0")
    spec = EvalSpec(tokens=128, text=TEXT)
    first, again = (quick_sensitivity(loaded, SCHEMES, spec).records for _ in range(2))
    assert drawn_on and set(drawn_on) == {"cuda"}
    assert [r["score"] for r in first] == pytest.approx([r["score"] for r in again], rel=1e-5)
