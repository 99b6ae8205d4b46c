"""What every backend is: the ``Backend`` record (library, weight format, devices, twin scheme, tolerance), its
activation rounding, and the registry each library's module adds its backends to with ``register``.

Kept apart from the package's ``__init__`` so that the library modules (``ao``, ``bnb``, ...) import this and
not the package that loads them: no import cycle.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from qlab.core.errors import QlabError
from qlab.core.quant import QuantScheme

if TYPE_CHECKING:
    from qlab.core.plan import SchemePlan
    from qlab.models.loading import LoadedModel

DEVICES: tuple[str, ...] = ("cpu", "cuda")


@dataclass(frozen=True)
class Tolerance:
    """How far a backend's accuracy may sit from its simulated twin's and still count as agreeing.

    LMs: ``|kld_backend - kld_twin| <= kld_abs + kld_rel * kld_twin`` (nats). Embedding models, on the cosine
    distance ``d = 1 - cosine_mean``: ``|d_backend - d_twin| <= cosine_abs + cosine_rel * d_twin``. The relative
    part lets coarse formats differ by rounding detail while 8-bit ones must match closely; ``why`` says where
    the gap comes from.
    """

    kld_abs: float = 2e-3
    kld_rel: float = 0.5
    cosine_abs: float = 2e-3
    cosine_rel: float = 0.5
    why: str = "weights round the same way; the kernels sum in another order"

    def agrees(self, backend: dict[str, float], twin: dict[str, float]) -> bool:
        """Whether two metric records (from ``qlab.models.evaluate``) agree within this tolerance."""
        if "kld_mean" in backend and "kld_mean" in twin:
            return abs(backend["kld_mean"] - twin["kld_mean"]) <= self.kld_abs + self.kld_rel * twin["kld_mean"]
        gap = abs(backend["cosine_mean"] - twin["cosine_mean"])
        return gap <= self.cosine_abs + self.cosine_rel * (1.0 - twin["cosine_mean"])


@dataclass(frozen=True)
class ActivationQuant:
    """Run-time activation rounding of a backend: ``bits`` per value, one scale per ``granularity``.

    ``"tensor"`` (fbgemm, ONNX Runtime), ``"token"`` (one per row: torchao, bitsandbytes) or ``"block32"``
    (llama.cpp's Q8 blocks of 32); asymmetric uses an unsigned grid with a zero-point.
    """

    bits: int = 8
    granularity: str = "tensor"
    symmetric: bool = False

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Round ``x`` as the backend's kernels do before their integer matmul, and map it back."""
        shape = x.shape
        rows = {"tensor": x.reshape(1, -1), "token": x.reshape(-1, shape[-1]),
                "block32": x.reshape(-1, 32)}[self.granularity].float()
        if self.symmetric:
            qmax = 2 ** (self.bits - 1) - 1
            scale = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / qmax
            return (torch.round(rows / scale).clamp(-qmax, qmax) * scale).reshape(shape).to(x.dtype)
        qmax = 2 ** self.bits - 1
        low = rows.amin(dim=1, keepdim=True).clamp(max=0)
        high = rows.amax(dim=1, keepdim=True).clamp(min=0)
        scale = ((high - low) / qmax).clamp(min=1e-12)
        zero = torch.round(-low / scale)
        codes = (torch.round(rows / scale) + zero).clamp(0, qmax)
        return ((codes - zero) * scale).reshape(shape).to(x.dtype)


@dataclass(frozen=True)
class Backend:
    """One real quantization path: a kernel library, a weight format, the devices it runs on.

    Args:
        slug: stable name, e.g. ``"torchao-int8wo"``.
        library: the PyPI package that holds the kernels (``"torch"`` for torch itself).
        title: one line for people.
        weight_format: the qlab format the weights are stored in (``qlab.core.formats``), for roofline and sizes.
        compute_dtype: what the matmuls run in: ``"activation"`` for weight-only kernels (the activations'
            dtype: FP32 on a CPU, BF16 on a GPU), ``"fp32"``/``"bf16"`` for the plain references, or
            ``"int8"``/``"fp8"`` when activations are quantized too.
        devices: where its kernels exist (``"cpu"``, ``"cuda"``).
        kinds: model kinds it handles (``"causal-lm"``, ``"embedding"``).
        twin: the qlab scheme (or per-layer plan, built from the model) that simulates what it does.
        note: the kernel fact that decides its speed (why it is fast, or only smaller).
        tolerance: how close its accuracy must stay to the twin's.
        quantizes_activations: activations are quantized at run time.
        activations: how they are, so the twin fake-quantizes each quantized linear's input the same way.
    """

    slug: str
    library: str
    title: str
    weight_format: str
    compute_dtype: str
    devices: tuple[str, ...]
    kinds: tuple[str, ...]
    twin: Callable[[torch.nn.Module], SchemePlan] = field(repr=False)
    note: str
    _apply: Callable[[LoadedModel, str], Any] = field(repr=False)
    _available: Callable[[str], tuple[bool, str]] = field(repr=False)
    tolerance: Tolerance = Tolerance()
    quantizes_activations: bool = False
    activations: ActivationQuant | None = None

    def available(self, device: str = "cpu") -> tuple[bool, str]:
        """Whether this backend can run here on ``device``, and if not, why (one sentence)."""
        if device not in DEVICES:
            return False, f"unknown device '{device}'; use one of {', '.join(DEVICES)}."
        if device not in self.devices:
            return False, f"{self.library} has no {device.upper()} kernels for {self.slug} (runs on " \
                          f"{', '.join(d.upper() for d in self.devices)})."
        if device == "cuda" and not torch.cuda.is_available():
            return False, "no CUDA GPU is visible to torch here."
        return self._available(device)

    def apply(self, loaded: LoadedModel, device: str = "cpu") -> Any:
        """A NEW quantized model built from ``loaded`` (whose weights stay untouched).

        Torch backends return an ``nn.Module`` with the Hugging Face call signature; ONNX Runtime and
        llama.cpp return modules that wrap their sessions behind the same signature.
        """
        if loaded.kind not in self.kinds:
            raise QlabError(f"{self.slug} handles {' and '.join(self.kinds)} models, not '{loaded.name}' "
                            f"({loaded.kind}); pick another backend.")
        ok, reason = self.available(device)
        if not ok:
            raise QlabError(f"{self.slug} is not available: {reason}")
        return self._apply(loaded, device)

    def twin_plan(self, model: torch.nn.Module) -> SchemePlan:
        """The qlab simulation of this backend for ``model`` (a scheme, or a per-layer plan)."""
        return self.twin(model)

    def twin_model(self, loaded: LoadedModel, quantized: Any = None) -> torch.nn.Module:
        """qlab's simulation of this backend: ``quantized_copy`` of its twin plan, plus its activation rounding.

        When the backend's model carries its own weights file (llama.cpp), ``quantized.reference_model`` gives
        those exact weights dequantized by reference code, and only the activation rounding is simulated.
        """
        from qlab.core.plan import quantized_copy
        from qlab.models.loading import quantizable_linears

        names = {name for name, _ in quantizable_linears(loaded.model)}
        if quantized is not None and hasattr(quantized, "reference_model"):
            model = quantized.reference_model(loaded)
        else:
            model = quantized_copy(loaded.model, self.twin(loaded.model))
        if self.activations is not None:
            for name, module in model.named_modules():
                if name in names:
                    module.register_forward_pre_hook(lambda _, args, a=self.activations: (a.fake_quantize(args[0]),))
        return model

    def twin_label(self, model: torch.nn.Module) -> str:
        plan = self.twin(model)
        if isinstance(plan, QuantScheme):
            return plan.label
        labels = sorted({s.label for s in plan.values()})
        return " / ".join(labels)


# The registry, named as every qlab registry is (``FORMATS``, ``BLOCK_FORMATS``): ``register`` here;
# ``get_backend``, ``backend_names`` and ``all_backends`` in the package, which loads the library modules
# (and so fills this dict) on first use: read it through them.
BACKENDS: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Add a backend (explicitly, by each library's module)."""
    if backend.slug in BACKENDS:
        raise ValueError(f"backend {backend.slug} registered twice")
    BACKENDS[backend.slug] = backend
    return backend


def package_available(module: str, pip_name: str) -> tuple[bool, str]:
    """Whether a Python package can be imported, without importing it (imports are slow)."""
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a dotted name ("optimum.quanto") whose parent package is missing raises
        found = False
    if not found:
        return False, f"the package {pip_name} is not installed; `pip install {pip_name} -c requirements.txt`."
    return True, "installed"
