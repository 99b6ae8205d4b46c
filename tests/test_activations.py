"""Calibration text, captured linear inputs, and static vs dynamic activation quantization."""

import pytest
import torch

from qlab.analyses import activations
from qlab.core.errors import QlabError


def test_static_scale_clips_a_wide_token_that_dynamic_scaling_keeps():
    generator = torch.Generator().manual_seed(0)
    calibration = torch.randn(64, 32, generator=generator)
    evaluation = torch.randn(16, 32, generator=generator)
    evaluation[3] *= 20  # one token far wider than anything seen in calibration
    evaluation[7] *= 0.01  # one token far narrower
    result = activations.static_vs_dynamic(calibration, evaluation, "int8")
    per_token = {r["token"]: r for r in result.per_token}
    assert per_token[3]["static_clipped_fraction"] > 0.5
    assert sum(r["static_clipped_fraction"] > 0 for r in result.per_token) == 1
    assert per_token[3]["dynamic_relative_mse"] < per_token[3]["static_relative_mse"] / 100
    assert per_token[7]["dynamic_relative_mse"] < per_token[7]["static_relative_mse"] / 100  # few levels used
    assert result.static_scale == pytest.approx(calibration.abs().max().item() / 127, rel=1e-6)
    assert result.summary["dynamic_relative_mse"] < result.summary["static_relative_mse"]
    with pytest.raises(QlabError, match="same features"):
        activations.static_vs_dynamic(calibration, evaluation[:, :8])


@pytest.mark.slow
def test_calibration_tokens_come_from_the_end_and_capture_real_inputs(smollm):
    from qlab.models.evaluate import EvalSpec, default_text

    spec = EvalSpec(tokens=256)
    data = activations.calibration_data(smollm, spec, 300)
    assert data.tokens == 300 and not data.overlaps_eval and len(data.batches) == 1
    ids = smollm.tokenizer(default_text(), return_tensors="pt", add_special_tokens=False).input_ids[0]
    assert torch.equal(data.batches[0]["input_ids"][0], ids[-300:])
    name = "model.layers.1.mlp.down_proj"
    inputs = activations.capture_inputs(smollm, name, data)
    assert inputs.shape == (300, 1536)
    start = activations.capture_inputs(smollm, name, activations.text_batches(smollm, default_text(), 64))
    assert start.shape == (64, 1536) and not torch.equal(start[:8], inputs[:8])
    short = activations.calibration_data(smollm, EvalSpec(tokens=256, text="a short text " * 20), 300)
    assert short.overlaps_eval


def test_an_untied_head_is_calibrated_on_the_final_norms_output_without_its_vocabulary_matmul():
    from qlab.models.evaluate import EvalSpec
    from tests.tiny_models import tiny_llama

    loaded = tiny_llama(tied=False)
    data = activations.calibration_data(loaded, EvalSpec(tokens=64), 256)
    seen: dict[str, list[torch.Tensor]] = {}
    head_runs = []
    handle = loaded.model.lm_head.register_forward_hook(lambda *_: head_runs.append(1))
    try:
        for names in (["model.layers.0.mlp.down_proj"], ["model.layers.0.mlp.down_proj", "lm_head"]):
            activations.run_with_input_hooks(loaded, data, names,
                                             lambda name, x, _: seen.setdefault(name, []).append(x.clone()))
    finally:
        handle.remove()
    assert not head_runs  # the decoder alone, then the head's input taken and its logits skipped
    final = torch.cat([loaded.model.model(**batch).last_hidden_state[0] for batch in data.batches])
    assert torch.equal(torch.cat(seen["lm_head"]), final) and final.shape == (256, 64)
    down = seen["model.layers.0.mlp.down_proj"]
    assert len(down) == 2 * len(data.batches) and torch.equal(down[0], down[len(data.batches)])
