"""Accuracy of a (quantized) model against its own baseline, on the same tokens.

The baseline is the model as loaded, run in its own dtype on its own device (bf16 for a bf16 checkpoint; the
bundled models are FP32); it is computed once per model and evaluation spec and kept, and every scheme is then
compared with it. 16-bit weights on a CPU without native 16-bit math (no AVX512-BF16/AMX) stay 16-bit but
compute in fp32 there: emulated bf16 matmuls would be many times slower, and every scheme computes the same way.
Causal LMs: perplexity, KL divergence of the next-token distribution (mean and p99, as llama.cpp reports it)
and top-1 agreement. Embedding models: mean cosine similarity to the baseline embeddings and agreement of
each text's nearest neighbour.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from qlab.core.errors import Cancelled, QlabError
from qlab.core.plan import weights_dtype
from qlab.models.hardware import cpu_flags, cpu_native_formats
from qlab.models.loading import LoadedModel

Progress = Callable[[float, str], None]
CancelCheck = Callable[[], bool]

DEFAULT_TEXT_NAME = "pydoc_data.topics (Python's built-in help text)"
MAX_TEXT_BYTES = 20_000_000
MAX_TOKENS = 65_536  # a guard against typing one zero too many: 64k tokens already take minutes on a CPU
LM_WINDOW = 512  # tokens per causal-LM evaluation window (SmolLM2 was trained on 2048-token contexts)
LM_TOKENS_PER_FORWARD = 2048  # windows are batched up to this many tokens per forward pass
LOGIT_CHUNK = 256  # positions whose vocabulary-wide log-probs are materialised at once
# A 16-bit weight computing in fp32 is cast this many values at a time: a Llama-3.2-1B's tied vocabulary head cast
# whole is a 1.05 GB temporary, which took a sweep's peak on an AVX2-only CPU from 4.38 to 5.45 GB (goal 4.74).
CAST_CHUNK_VALUES = 1 << 24
EMBED_MAX_TOKENS = 128  # per text, as all-MiniLM-L6-v2 was trained
EMBED_BATCH = 32
MIN_EMBED_TEXTS = 4


def default_text() -> str:
    """CPython's bundled help topics: real English prose and code, no download needed."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def decode_text(data: bytes) -> str:
    """Validate uploaded evaluation text: size-capped, UTF-8, not binary, not empty."""
    if len(data) > MAX_TEXT_BYTES:
        raise QlabError(f"the text is {len(data) / 1e6:.1f} MB; the limit is {MAX_TEXT_BYTES / 1e6:.0f} MB, "
                        "and a few hundred kB are plenty.")
    if b"\x00" in data[:65536]:
        raise QlabError("the file looks binary (it holds NUL bytes); upload plain UTF-8 text.")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise QlabError(f"the text is not valid UTF-8 (byte {error.start}); save it as UTF-8 and retry.") from None
    if not text.strip():
        raise QlabError("the text is empty; paste or upload some prose, or use the built-in text.")
    return text


@dataclass(frozen=True)
class EvalSpec:
    """What to evaluate on: a token budget and a text (None means the built-in text)."""

    tokens: int = 512
    text: str | None = field(default=None, repr=False)
    text_name: str = DEFAULT_TEXT_NAME

    def __post_init__(self) -> None:
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 16:
            raise QlabError(f"the token budget must be an integer of at least 16, got {self.tokens!r}.")
        if self.tokens > MAX_TOKENS:
            raise QlabError(f"a budget of {self.tokens} tokens exceeds the cap of {MAX_TOKENS}; use fewer.")
        if self.text is not None and not self.text.strip():
            raise QlabError("the evaluation text is empty; paste some text or use the built-in one.")

    def resolved_text(self) -> str:
        return default_text() if self.text is None else self.text

    @property
    def text_sha256(self) -> str:
        return hashlib.sha256(self.resolved_text().encode()).hexdigest()


@dataclass
class Baseline:
    """Inputs and the model's own reference outputs, computed once and compared against by every scheme."""

    kind: str
    inputs: dict[str, torch.Tensor]
    reference: torch.Tensor  # LM: fp16 next-token log-probs (positions x vocab); embedding: unit vectors
    metrics: dict[str, float]
    tokens: int
    seconds: float = 0.0
    dtype: torch.dtype = torch.float32  # the reference model's weights
    compute_dtype: torch.dtype = torch.float32  # what its matmuls ran in (and every scheme's run in)
    # Work later analyses derive from these inputs once and reuse (the streamed sweep's block inputs).
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def reference_dtype(self) -> str:
        """The reference as result rows record it: "bfloat16", or "bfloat16 (fp32 compute)" on a slow CPU."""
        name = str(self.dtype).removeprefix("torch.")
        computes_in = str(self.compute_dtype).removeprefix("torch.")
        return name if computes_in == name else f"{name} ({computes_in} compute)"


_NATIVE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype a model's matmuls run in: its weights' own, except 16-bit weights on a CPU whose flags
    (/proc/cpuinfo) show no native math for them, which compute in fp32."""
    dtype = weights_dtype(model)
    if dtype not in _NATIVE_NAMES or input_device(model).type != "cpu":
        return dtype
    return dtype if _NATIVE_NAMES[dtype] in cpu_native_formats(cpu_flags()) else torch.float32


class ComputeLinear(torch.nn.Linear):
    """A linear computing in ``dtype`` whatever its weight is stored in (no cast when they agree): weights kept
    16-bit on a CPU that computes in fp32, or a quantized weight materialised once in the compute dtype. A large
    weight is cast ``CAST_CHUNK_VALUES`` at a time, each part's outputs written in place; under autograd only the
    16-bit weight is kept for the backward pass (``_WidenedLinear``)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        torch.nn.Module.__init__(self)  # nn.Linear's own __init__ would allocate and initialise a weight
        self.out_features, self.in_features = weight.shape
        self.weight = weight if isinstance(weight, torch.nn.Parameter) else torch.nn.Parameter(weight, False)
        self.bias = bias if bias is None or isinstance(bias, torch.nn.Parameter) else torch.nn.Parameter(bias, False)
        self.compute_dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype, weight = self.compute_dtype, self.weight
        bias = None if self.bias is None else self.bias.to(dtype)
        x = x.to(dtype)
        if weight.dtype == dtype:
            return torch.nn.functional.linear(x, weight, bias)
        if x.requires_grad and not weight.requires_grad and (bias is None or not bias.requires_grad):
            return _WidenedLinear.apply(x, weight, bias, dtype)
        return _widened_linear(x, weight, bias, dtype)


def _widened_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
                    ) -> torch.Tensor:
    """``linear(x, weight.to(dtype), bias)``, a large weight cast ``CAST_CHUNK_VALUES`` at a time."""
    if weight.numel() <= CAST_CHUNK_VALUES:
        return torch.nn.functional.linear(x, weight.to(dtype), bias)
    out = x.new_empty(*x.shape[:-1], weight.shape[0])
    for part in _row_parts(weight):
        out[..., part] = torch.nn.functional.linear(x, weight[part].to(dtype), None if bias is None else bias[part])
    return out


def _row_parts(weight: torch.Tensor) -> Iterator[slice]:
    """``weight``'s rows in parts of at most ``CAST_CHUNK_VALUES`` values (one row at least)."""
    rows = max(1, CAST_CHUNK_VALUES // weight.shape[1])
    for start in range(0, weight.shape[0], rows):
        yield slice(start, start + rows)


class _WidenedLinear(torch.autograd.Function):
    """``_widened_linear`` keeping the 16-bit weight for the backward pass, not its widened copy: autograd kept every
    linear's fp32 cast until the backward, and a 1B bf16 model's quick sensitivity peaked at 12 GB on an AVX2 CPU.
    Only the input's gradient is made (the weights are frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
                ) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.dtype = dtype
        return _widened_linear(x, weight, bias, dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        grad_x = None
        for part in _row_parts(weight):
            term = grad[..., part] @ weight[part].to(ctx.dtype)
            grad_x = term if grad_x is None else grad_x.add_(term)
        return grad_x, None, None, None


class ComputeEmbedding(torch.nn.Embedding):
    """An embedding table kept as stored whose looked-up rows enter the network in ``dtype``."""

    def __init__(self, embedding: torch.nn.Embedding, dtype: torch.dtype) -> None:
        torch.nn.Module.__init__(self)
        for name in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                     "scale_grad_by_freq", "sparse"):
            setattr(self, name, getattr(embedding, name))
        self.weight = embedding.weight
        self.compute_dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).to(self.compute_dtype)


def compute_view(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``model`` itself when it already computes in ``dtype``; else a structural copy sharing every linear and
    embedding weight, whose linears and embeddings compute in ``dtype`` and whose small tensors (norms, biases
    outside linears) are cast. ``model`` is only read."""
    converted = (ComputeLinear, ComputeEmbedding)
    stored = {p.dtype for m in model.modules() if not isinstance(m, converted)
              for p in m.parameters(recurse=False) if p.is_floating_point()}
    if stored <= {dtype}:
        return model
    memo: dict[int, object] = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    for module in model.modules():  # a quantized layer's codes are shared too, never copied
        if (qweight := getattr(module, "qweight", None)) is not None:
            memo[id(qweight)] = qweight
    view = copy.deepcopy(model, memo)
    for name, module in list(view.named_modules()):
        if type(module) is torch.nn.Linear:
            view.set_submodule(name, ComputeLinear(module.weight, module.bias, dtype))
        elif type(module) is torch.nn.Embedding:
            view.set_submodule(name, ComputeEmbedding(module, dtype))
        elif not isinstance(module, converted):
            for key, param in list(module.named_parameters(recurse=False)):
                if param.is_floating_point() and param.dtype != dtype:
                    setattr(module, key, torch.nn.Parameter(param.detach().to(dtype), requires_grad=False))
    return view


def _check_cancel(cancel: CancelCheck | None) -> None:
    if cancel is not None and cancel():
        raise Cancelled("cancelled; results finished so far are kept.")


def _lm_windows(loaded: LoadedModel, spec: EvalSpec) -> torch.Tensor:
    ids = loaded.tokenizer(spec.resolved_text(), return_tensors="pt", add_special_tokens=False,
                           verbose=False).input_ids[0]
    window = min(LM_WINDOW, spec.tokens)
    n_windows = min(spec.tokens, ids.numel()) // window
    if n_windows < 1:
        raise QlabError(f"the text has only {ids.numel()} tokens, fewer than one evaluation window of "
                        f"{window}; give a longer text or a smaller budget.")
    return ids[: n_windows * window].view(n_windows, window)


def input_batches(kind: str, inputs: dict[str, torch.Tensor]) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """(first row, inputs of one forward pass) over a baseline's inputs, in the order every evaluation uses."""
    if kind == "causal-lm":
        windows = inputs["windows"]
        per_forward = max(1, LM_TOKENS_PER_FORWARD // windows.shape[1])
        for start in range(0, windows.shape[0], per_forward):
            yield start, {"input_ids": windows[start: start + per_forward]}
        return
    for start in range(0, inputs["input_ids"].shape[0], EMBED_BATCH):
        yield start, {k: v[start: start + EMBED_BATCH] for k, v in inputs.items()}


def run_batch(model: torch.nn.Module, kind: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The last hidden state of one batch: an LM's decoder without its vocabulary head, an encoder whole."""
    batch = {k: v.to(input_device(model)) for k, v in batch.items()}
    with torch.inference_mode():
        if kind == "causal-lm":
            # No KV cache: one pass over each window needs none, and a 2048-token cache of an 8B model is 0.3 GB.
            return model.base_model(**batch, use_cache=False).last_hidden_state
        return model(**batch).last_hidden_state


def _lm_log_probs(model: torch.nn.Module, windows: torch.Tensor, progress: Progress | None,
                  cancel: CancelCheck | None):
    """Yield (window slice, log-probs chunk as (positions, vocab)) so the full logits never sit in memory."""
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    total = windows.shape[0]
    for start, batch in input_batches("causal-lm", {"windows": windows}):
        _check_cancel(cancel)
        hidden = run_batch(model, "causal-lm", batch).reshape(-1, head.in_features)
        with torch.inference_mode():
            for offset in range(0, hidden.shape[0], LOGIT_CHUNK):
                logits = head(hidden[offset: offset + LOGIT_CHUNK]).float()
                if softcap:
                    logits = torch.tanh(logits / softcap) * softcap
                # Left on the model's device: the metrics are computed there, and only one value per position
                # comes back (an 8B model's 2048 positions of 128k log-probs are 1 GB, which took a GPU's
                # evaluation from about 0.1 s to 1.5-2 s through the CPU).
                yield start * windows.shape[1] + offset, torch.log_softmax(logits, dim=-1)
        done = start + batch["input_ids"].shape[0]
        if progress:
            progress(min(1.0, done / total), f"window {done}/{total}")


def input_device(model: torch.nn.Module) -> torch.device:
    """Where token ids must go: the input embedding's device (a model spread by ``device_map="auto"`` over
    GPUs moves activations between its own layers; on the CPU this is the CPU and nothing moves)."""
    return model.get_input_embeddings().weight.device


def _next_token_targets(windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per flattened position: the next token id, and whether it exists inside the same window."""
    targets = torch.roll(windows, -1, dims=1)
    valid = torch.ones_like(windows, dtype=torch.bool)
    valid[:, -1] = False
    return targets.reshape(-1), valid.reshape(-1)


def lm_baseline(windows: torch.Tensor, log_prob_chunks: Iterable[tuple[int, torch.Tensor]], vocab: int) -> Baseline:
    """An LM baseline from the reference engine's (flat position offset, next-token log-probs) chunks over
    ``windows``: what ``lm_metrics`` compares every later run with."""
    targets, valid = _next_token_targets(windows)
    n = windows.numel()
    # The next-token distribution is kept as fp16 log-probs (half the memory of fp32; fp16 probabilities would
    # lose the tail to subnormals), renormalised when read. That rounding alone is a KL of ~1e-7 nats from the
    # model's own distribution; it is kept per position and subtracted, so the reference scores exactly 0
    # against itself and the storage's rounding never counts as damage.
    log_probs16 = storage_kld = nll = top1 = None
    for offset, log_probs in log_prob_chunks:
        device = log_probs.device
        if log_probs16 is None:  # the per-position results where the chunks are; the reference on the host,
            # pinned when the chunks come from a GPU, so that every later evaluation reads it back asynchronously
            storage_kld, nll, top1 = _results(n, device, torch.float32, torch.float32, torch.long)
            targets = targets.to(device)  # once, not a small copy that waits for the device in every chunk
            with torch.inference_mode(False):
                log_probs16 = torch.empty(n, vocab, dtype=torch.float16, pin_memory=device.type == "cuda")
        rows = slice(offset, offset + log_probs.shape[0])
        chunk16 = log_probs.to(torch.float16)
        storage_kld[rows] = _kld_rows(chunk16, log_probs)
        top1[rows] = log_probs.argmax(dim=-1)
        nll[rows] = -log_probs.gather(1, targets[rows, None])[:, 0]
        # Queued behind the kernels that made it; the blocking copies below wait for it.
        log_probs16[rows].copy_(chunk16, non_blocking=True)
    storage_kld, nll, top1 = storage_kld.cpu(), nll.cpu(), top1.cpu()
    inputs = {"windows": windows, "storage_kld": storage_kld, "top1": top1}
    return Baseline("causal-lm", inputs, log_probs16, {"ppl": math.exp(nll[valid].mean().item())}, n)


def compute_baseline(loaded: LoadedModel, spec: EvalSpec, progress: Progress | None = None,
                     cancel: CancelCheck | None = None) -> Baseline:
    """Run the model once, in its own dtype, on the spec's tokens and keep what later comparisons need."""
    import time

    started = time.perf_counter()
    dtype, computes_in = weights_dtype(loaded.model), compute_dtype(loaded.model)
    model = compute_view(loaded.model, computes_in)
    if loaded.kind == "causal-lm":
        windows = _lm_windows(loaded, spec)
        vocab = loaded.model.get_output_embeddings().out_features
        baseline = lm_baseline(windows, _lm_log_probs(model, windows, progress, cancel), vocab)
        baseline.dtype, baseline.compute_dtype = dtype, computes_in
    else:
        batch = _embedding_inputs(loaded, spec)
        reference = _embed(model, batch, progress, cancel)
        baseline = Baseline("embedding", batch, reference, {}, int(batch["attention_mask"].sum()), dtype=dtype,
                            compute_dtype=computes_in)
    baseline.seconds = time.perf_counter() - started
    return baseline


def evaluate(model: torch.nn.Module, baseline: Baseline, progress: Progress | None = None,
             cancel: CancelCheck | None = None) -> dict[str, float]:
    """Metrics of ``model`` (e.g. a quantized copy) against the baseline, on the baseline's own inputs, computed
    in the baseline's compute dtype."""
    model = compute_view(model, baseline.compute_dtype)
    if baseline.kind == "causal-lm":
        return _evaluate_lm(model, baseline, progress, cancel)
    embeddings = _embed(model, baseline.inputs, progress, cancel)
    return embedding_metrics(embeddings, baseline.reference)


def _evaluate_lm(model: torch.nn.Module, baseline: Baseline, progress: Progress | None,
                 cancel: CancelCheck | None) -> dict[str, float]:
    return lm_metrics(_lm_log_probs(model, baseline.inputs["windows"], progress, cancel), baseline)


def lm_metrics(log_prob_chunks: Iterable[tuple[int, torch.Tensor]], baseline: Baseline) -> dict[str, float]:
    """LM metrics from (flat position offset, next-token log-probs) chunks covering the baseline's windows.

    Any engine's log-probs fit here (llama.cpp's too), so every backend is scored by the same arithmetic.
    """
    windows = baseline.inputs["windows"]
    targets, valid = _next_token_targets(windows)
    n = windows.numel()
    nll = kld = agree = None
    for offset, log_q in log_prob_chunks:
        device = log_q.device
        if nll is None:  # computed where the log-probs are (another engine's come on the CPU)
            nll, kld, agree = _results(n, device, torch.float32, torch.float32, torch.bool)
            # once, not small copies that wait for the device in every chunk
            targets, top1 = targets.to(device), baseline.inputs["top1"].to(device)
        rows = slice(offset, offset + log_q.shape[0])
        reference = baseline.reference[rows].to(device, non_blocking=True)
        kld[rows] = _kld_rows(reference, log_q)
        agree[rows] = log_q.argmax(dim=-1) == top1[rows]
        nll[rows] = -log_q.gather(1, targets[rows, None])[:, 0]
    nll, kld, agree = nll.cpu(), kld.cpu(), agree.cpu()
    kld = kld.sub_(baseline.inputs["storage_kld"]).clamp_(min=0)
    return {
        "ppl": math.exp(nll[valid].mean().item()),
        "kld_mean": kld.mean().item(),
        "kld_p99": torch.quantile(kld, 0.99).item(),
        "top1_agreement": agree.float().mean().item(),
    }


def _results(n: int, device: torch.device, *dtypes: torch.dtype) -> list[torch.Tensor]:
    """One per-position tensor per dtype on ``device``: ordinary tensors even while a chunk generator holds
    inference mode on (a generator's ``with`` stays entered while it is suspended), so they can be changed later."""
    with torch.inference_mode(False):
        return [torch.empty(n, dtype=dtype, device=device) for dtype in dtypes]


def _kld_rows(reference16: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per row, KL(p || q) of the renormalised fp16 reference p, summed term by term as p (log p - log q).

    Never as sum p log p - sum p log q: each of those float32 sums over a 49k vocabulary rounds by ~1e-4 nats,
    the size of a whole 8-bit block's effect, and their difference keeps all of it. Rows go LOGIT_CHUNK at a
    time, so whatever chunks an engine hands over, the temporaries stay two (chunk x vocab) tensors.
    """
    kld = torch.empty(log_q.shape[0], device=log_q.device)
    for start in range(0, log_q.shape[0], LOGIT_CHUNK):
        rows = slice(start, start + LOGIT_CHUNK)
        log_p = torch.log_softmax(reference16[rows].float(), dim=-1)
        p = log_p.exp()
        # A batched dot product: no third temporary for the elementwise product.
        kld[rows] = torch.bmm(p.unsqueeze(1), log_p.sub_(log_q[rows]).unsqueeze(2)).reshape(-1)
    return kld


def _paragraphs(text: str) -> list[str]:
    parts = (re.sub(r"\s+", " ", part).strip() for part in re.split(r"\n\s*\n", text))
    return [part for part in parts if len(part) >= 40]


def _embedding_inputs(loaded: LoadedModel, spec: EvalSpec) -> dict[str, torch.Tensor]:
    texts, used = [], 0
    for paragraph in _paragraphs(spec.resolved_text()):
        count = min(EMBED_MAX_TOKENS, len(loaded.tokenizer(paragraph, verbose=False).input_ids))
        if used + count > spec.tokens and len(texts) >= MIN_EMBED_TEXTS:
            break
        texts.append(paragraph)
        used += count
    if len(texts) < MIN_EMBED_TEXTS:
        raise QlabError(f"the text yields {len(texts)} paragraph(s) of 40+ characters; embedding metrics need "
                        f"at least {MIN_EMBED_TEXTS} (separate paragraphs with blank lines).")
    encoded = loaded.tokenizer(texts, padding=True, truncation=True, max_length=EMBED_MAX_TOKENS,
                               return_tensors="pt")
    return dict(encoded)


def _embed(model: torch.nn.Module, batch: dict[str, torch.Tensor], progress: Progress | None,
           cancel: CancelCheck | None) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (the sentence-transformers recipe of MiniLM)."""
    n = batch["input_ids"].shape[0]
    outputs = []
    for start, part in input_batches("embedding", batch):
        _check_cancel(cancel)
        hidden = run_batch(model, "embedding", part)
        mask = part["attention_mask"].unsqueeze(-1).to(hidden.device, hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        outputs.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu())
        done = start + part["input_ids"].shape[0]
        if progress:
            progress(min(1.0, done / n), f"text {done}/{n}")
    return torch.cat(outputs)


def embedding_metrics(embeddings: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Mean cosine to the baseline, and how often each text keeps the same nearest neighbour."""
    cosine = (embeddings * reference).sum(dim=-1)

    def nearest(e: torch.Tensor) -> torch.Tensor:
        similarity = e @ e.T
        similarity.fill_diagonal_(-float("inf"))
        return similarity.argmax(dim=1)

    return {
        "cosine_mean": cosine.mean().item(),
        "cosine_min": cosine.min().item(),
        "retrieval_agreement": (nearest(embeddings) == nearest(reference)).float().mean().item(),
    }
