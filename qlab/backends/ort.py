"""ONNX Runtime (PyPI ``onnxruntime``): the embedding model exported with ``torch.onnx``, then dynamic INT8."""

from __future__ import annotations

import contextlib
import io
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from qlab.backends.base import ActivationQuant, Backend, Tolerance, package_available, register
from qlab.backends.native import shadow
from qlab.core.errors import QlabError
from qlab.core.quant import QuantScheme
from qlab.models.loading import LoadedModel

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


class OrtEncoder(torch.nn.Module):
    """An ONNX Runtime session behind the Hugging Face encoder call: ``model(**batch).last_hidden_state``."""

    def __init__(self, session, config) -> None:
        super().__init__()
        self.session = session
        self.config = config
        self.input_names = [i.name for i in session.get_inputs()]
        # Callers place token ids on the input embedding's device; ONNX Runtime's CPU session takes CPU tensors.
        self._embedding_stub = torch.nn.Embedding(1, 1)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self._embedding_stub

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, **_):
        from transformers.modeling_outputs import BaseModelOutput

        given = {"input_ids": input_ids,
                 "attention_mask": torch.ones_like(input_ids) if attention_mask is None else attention_mask,
                 "token_type_ids": torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids}
        feeds = {name: given[name].to(torch.int64).numpy() for name in self.input_names}
        (hidden,) = self.session.run(["last_hidden_state"], feeds)
        return BaseModelOutput(last_hidden_state=torch.from_numpy(hidden))


class _HiddenOnly(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state


def _available(device: str) -> tuple[bool, str]:
    ok, reason = package_available("onnxruntime", "onnxruntime")
    if ok:
        ok, reason = package_available("onnx", "onnx")
    return ok, reason


def export_onnx(loaded: LoadedModel, path: Path) -> None:
    """Export the encoder (input ids, mask, token types -> last hidden state) with dynamic batch and length."""
    sample = torch.ones(2, 16, dtype=torch.long)
    batch, length = "batch", "sequence"
    axes = {name: {0: batch, 1: length} for name in (*INPUT_NAMES, "last_hidden_state")}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        # The TorchScript exporter: one pass, no onnxscript rewrite of BERT's attention mask logic.
        # A shadow in eval mode: the exporter restores the wrapper's training flag recursively afterwards,
        # which on the shared model itself would switch its dropout on.
        torch.onnx.export(_HiddenOnly(shadow(loaded.model)).eval(), (sample, sample, torch.zeros_like(sample)), str(path),
                          input_names=list(INPUT_NAMES), output_names=["last_hidden_state"],
                          dynamic_axes=axes, opset_version=17, dynamo=False)


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    # Same thread count as torch, so the comparison is kernels against kernels.
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _builder(quantize: bool) -> Callable[[LoadedModel, str], torch.nn.Module]:
    def apply(loaded: LoadedModel, device: str) -> torch.nn.Module:
        with tempfile.TemporaryDirectory(prefix="qlab-onnx-") as tmp:
            fp32_path = Path(tmp) / "model.onnx"
            try:
                export_onnx(loaded, fp32_path)
            except Exception as error:  # exporter failures come in many types; all mean "not exportable"
                raise QlabError(f"torch.onnx could not export {loaded.name} ({type(error).__name__}); "
                                "use a torch backend for this model.") from error
            path = fp32_path
            if quantize:
                from onnxruntime.quantization import QuantType, quantize_dynamic

                path = Path(tmp) / "model.int8.onnx"
                quantize_dynamic(str(fp32_path), str(path), weight_type=QuantType.QInt8, per_channel=True,
                                 op_types_to_quantize=["MatMul"])
            # The session holds the graph in memory; the files can go with the directory.
            return OrtEncoder(_session(path), loaded.model.config)

    return apply


register(Backend(
    slug="onnxruntime-fp32", library="onnxruntime", title="ONNX Runtime FP32 (the exported graph, unquantized)",
    weight_format="fp32", compute_dtype="fp32", devices=("cpu",), kinds=("embedding",),
    twin=lambda model: QuantScheme("fp32"),
    note="Separates the runtime's own speed-up (graph fusions) from quantization's.",
    _apply=_builder(quantize=False), _available=_available,
    tolerance=Tolerance(cosine_abs=1e-4, why="the same FP32 weights; fused kernels sum in another order")))

register(Backend(
    slug="onnxruntime-int8", library="onnxruntime",
    title="ONNX Runtime dynamic INT8 (per-channel weights, UINT8 activations)",
    weight_format="int8", compute_dtype="int8", devices=("cpu",), kinds=("embedding",),
    twin=lambda model: QuantScheme("int8", "channel"), quantizes_activations=True,
    note="MLAS INT8 GEMM (VNNI/AVX2 paths); activations quantized per tensor at run time.",
    _apply=_builder(quantize=True), _available=_available,
    activations=ActivationQuant(bits=8, granularity="tensor", symmetric=False),
    tolerance=Tolerance(cosine_abs=5e-3, why="the twin rounds activations like MLAS (UINT8 per tensor)")))
