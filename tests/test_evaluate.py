import math

import pytest
import torch

from qlab.core.errors import QlabError
from qlab.models import evaluate as evaluate_module
from qlab.models.evaluate import (
    ComputeLinear,
    EvalSpec,
    compute_baseline,
    decode_text,
    default_text,
    embedding_metrics,
    evaluate,
    lm_baseline,
    lm_metrics,
)


def test_default_text_is_cpythons_help():
    text = default_text()
    assert len(text) > 100_000 and "for" in text


@pytest.mark.parametrize("data, needle", [
    (b"", "empty"),
    (b"   \n ", "empty"),
    (b"\x00\x01\x02binary", "binary"),
    (b"caf\xe9", "UTF-8"),
    (b"x" * 20_000_001, "limit"),
])
def test_bad_uploaded_text(data, needle):
    with pytest.raises(QlabError, match=needle):
        decode_text(data)


@pytest.mark.parametrize("tokens", [0, 15, -5, 10**9, 2.5, True])
def test_bad_token_budgets(tokens):
    with pytest.raises(QlabError):
        EvalSpec(tokens=tokens)


def test_embedding_metrics_from_first_principles():
    reference = torch.nn.functional.normalize(torch.randn(20, 8), dim=-1)
    same = embedding_metrics(reference.clone(), reference)
    assert same["cosine_mean"] == pytest.approx(1.0, abs=1e-6) and same["retrieval_agreement"] == 1.0
    rotated = torch.nn.functional.normalize(reference + 0.3 * torch.randn(20, 8), dim=-1)
    moved = embedding_metrics(rotated, reference)
    assert moved["cosine_mean"] < 0.999
    expected = (rotated * reference).sum(-1).mean().item()
    assert moved["cosine_mean"] == pytest.approx(expected)


def test_kld_resolves_an_eight_bit_sized_divergence_over_a_full_vocabulary():
    """KL ~1e-5 nats/token over SmolLM2's 49k vocabulary: a difference of two float32 vocabulary sums (entropy
    minus cross-entropy) rounds by more than that; the term-by-term sum stays within a percent of float64."""
    generator = torch.Generator().manual_seed(0)
    vocab, positions = 49_152, 64
    logits = 4 * torch.randn(positions, vocab, generator=generator)  # ~4 nats of entropy, like an LM's
    log_p = torch.log_softmax(logits, dim=-1)
    log_q = torch.log_softmax(logits + 4.5e-3 * torch.randn(positions, vocab, generator=generator), dim=-1)
    baseline = lm_baseline(torch.zeros(1, positions, dtype=torch.long), [(0, log_p)], vocab)
    true_rows = (log_p.double().exp() * (log_p.double() - log_q.double())).sum(-1)
    true = true_rows.mean().item()
    assert 5e-6 < true < 2e-5
    # An engine's own chunking (llama.cpp hands over whole windows, torch LOGIT_CHUNK rows) changes nothing.
    measured = lm_metrics([(0, log_q[:40]), (40, log_q[40:])], baseline)["kld_mean"]
    assert measured == pytest.approx(true, rel=0.02)
    assert lm_metrics([(0, log_p)], baseline)["kld_mean"] == 0.0  # the reference against itself
    # What lm_metrics computed before: negative entropy minus a cross-entropy taken as a batched dot product.
    log_p16 = torch.log_softmax(baseline.reference.float(), dim=-1)
    p16 = baseline.reference.float().exp()
    cross = torch.bmm(p16.unsqueeze(1), log_q.unsqueeze(2)).reshape(-1) / p16.sum(-1)
    entropy_minus_cross = (log_p16.exp() * log_p16).sum(-1) - cross
    assert (entropy_minus_cross.double() - true_rows).abs().mean() > true


@pytest.mark.slow
def test_lm_baseline_matches_a_direct_perplexity(smollm):
    spec = EvalSpec(tokens=64)
    baseline = compute_baseline(smollm, spec)
    windows = baseline.inputs["windows"]
    with torch.inference_mode():
        logits = smollm.model(windows).logits.float()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                            windows[:, 1:].reshape(-1))
    assert baseline.metrics["ppl"] == pytest.approx(math.exp(nll.item()), rel=1e-4)
    same = evaluate(smollm.model, baseline)
    assert same["kld_mean"] == 0.0 and same["top1_agreement"] == 1.0
    assert same["ppl"] == pytest.approx(baseline.metrics["ppl"], rel=1e-5)


@pytest.mark.slow
def test_kld_against_a_direct_computation_on_a_perturbed_model(smollm):
    import copy

    spec = EvalSpec(tokens=32)
    baseline = compute_baseline(smollm, spec)
    noisy = copy.deepcopy(smollm.model)
    with torch.no_grad():
        noisy.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    metrics = evaluate(noisy, baseline)
    windows = baseline.inputs["windows"]
    with torch.inference_mode():
        log_p = torch.log_softmax(smollm.model(windows).logits.float(), -1).reshape(-1, 49152)
        log_q = torch.log_softmax(noisy(windows).logits.float(), -1).reshape(-1, 49152)
    kld = (log_p.exp() * (log_p - log_q)).sum(-1)
    assert metrics["kld_mean"] == pytest.approx(kld.mean().item(), rel=0.01, abs=1e-5)
    assert metrics["kld_mean"] > 1e-3


def test_text_shorter_than_one_window_is_refused(minilm):
    with pytest.raises(QlabError, match="paragraph"):
        compute_baseline(minilm, EvalSpec(tokens=64, text="too short"))


@pytest.mark.slow
def test_lm_text_shorter_than_one_window_is_refused(smollm):
    with pytest.raises(QlabError, match="fewer than one evaluation window"):
        compute_baseline(smollm, EvalSpec(tokens=512, text="Only a handful of tokens here."))


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    for param in other.parameters():
        param.add_(torch.randn(param.shape, generator=generator) * 0.02)
    return other


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_gpu_models_metrics_are_computed_on_the_gpu_and_equal_the_cpus():
    import dataclasses

    from tests.tiny_models import tiny_llama

    loaded = tiny_llama()
    spec = EvalSpec(tokens=256)
    other = _perturbed(loaded.model)
    on_cpu = evaluate(other, compute_baseline(loaded, spec))
    on_gpu = dataclasses.replace(loaded, model=loaded.model.cuda())
    baseline = compute_baseline(on_gpu, spec)
    # The reference stays in host memory, pinned so that each evaluation reads it back without waiting.
    assert baseline.reference.device.type == "cpu" and baseline.reference.is_pinned()
    assert evaluate(on_gpu.model, baseline)["kld_mean"] == 0
    metrics = evaluate(other.cuda(), baseline)
    assert metrics["kld_mean"] > 1e-4
    for key, value in on_cpu.items():
        assert metrics[key] == pytest.approx(value, rel=1e-3), key


class _CastRecorder(torch.overrides.TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.cast_sizes: list[int] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.to:
            self.cast_sizes.append(args[0].numel())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("leading", [(5,), (2, 3)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_a_large_16_bit_weight_is_cast_part_by_part_and_computes_what_the_whole_cast_does(monkeypatch, leading,
                                                                                          with_bias):
    monkeypatch.setattr(evaluate_module, "CAST_CHUNK_VALUES", 24)  # 3 rows of 8 at a time: 10 rows in 4 parts
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(10, 8, generator=generator).to(torch.bfloat16)
    bias = torch.randn(10, generator=generator).to(torch.bfloat16) if with_bias else None
    x = torch.randn(*leading, 8, generator=generator)
    linear = ComputeLinear(weight, bias, torch.float32)
    with _CastRecorder() as recorder:
        out = linear(x)
    expected = torch.nn.functional.linear(x, weight.float(), None if bias is None else bias.float())
    assert out.dtype == torch.float32 and out.shape == (*leading, 10)
    torch.testing.assert_close(out, expected)
    assert max(size for size in recorder.cast_sizes if size != x.numel()) == 24


def test_a_weight_already_in_the_compute_dtype_is_used_as_it_is(monkeypatch):
    monkeypatch.setattr(evaluate_module, "CAST_CHUNK_VALUES", 24)
    weight = torch.randn(10, 8)
    x = torch.randn(4, 8)
    with _CastRecorder() as recorder:
        out = ComputeLinear(weight, None, torch.float32)(x)
    torch.testing.assert_close(out, x @ weight.T)
    assert 80 not in recorder.cast_sizes and max(recorder.cast_sizes, default=0) <= x.numel()


@pytest.mark.parametrize("chunk", [24, 1 << 24])
def test_the_backward_pass_keeps_the_16_bit_weight_not_its_widened_copy(monkeypatch, chunk):
    monkeypatch.setattr(evaluate_module, "CAST_CHUNK_VALUES", chunk)
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(10, 8, generator=generator).to(torch.bfloat16)
    bias = torch.randn(10, generator=generator).to(torch.bfloat16)
    x = torch.randn(2, 3, 8, generator=generator, requires_grad=True)
    direction = torch.randn(2, 3, 10, generator=generator)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = ComputeLinear(weight, bias, torch.float32)(x)
    (out * direction).sum().backward()
    wide = x.detach().clone().requires_grad_()
    expected = torch.nn.functional.linear(wide, weight.float(), bias.float())
    (expected * direction).sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(x.grad, wide.grad)
    assert saved and all(t.dtype == torch.bfloat16 for t in saved)  # no fp32 copy kept for the backward pass
