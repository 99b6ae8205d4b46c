"""Where accelerate would put each module of a model over several GPUs, computed on the meta device.

The model is built from its config under accelerate's ``init_empty_weights`` (no memory is allocated), then
handed to the same two calls transformers' ``from_pretrained(device_map="auto", max_memory=...)`` makes:
``get_balanced_memory`` and ``infer_auto_device_map``. qlab adds no placement logic of its own, so the answer
is what ``qlab.models.loading.load(..., device_map="auto", max_memory=...)`` would do on real GPUs. Device ids
are plain integers that nothing checks against this machine, so a CPU can place a model over eight GPUs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from qlab.core.errors import QlabError
from qlab.models.architectures import Architecture

# Loading dtypes accelerate can place; quantized formats are applied after loading, not by the placement.
PLACEMENT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class DeviceMap:
    """accelerate's answer: each module's device and the bytes of the parameters and buffers placed there."""

    device_map: dict[str, int | str]  # module name -> GPU index, or "cpu" / "disk" when it did not fit
    module_bytes: dict[str, int]  # module name -> bytes of its parameters and buffers
    layer_names: tuple[str, ...]  # the decoder layers' module names, in order
    max_memory: dict[int, int]  # the budget per GPU accelerate was given (after balancing)

    def device_of(self, module: str) -> int | str:
        """The device of a module, or of the closest placed module containing it."""
        name = module
        while name not in self.device_map:
            if not name:
                raise KeyError(module)
            name = name.rpartition(".")[0]
        return self.device_map[name]


def empty_model(arch: Architecture, dtype: str = "bf16") -> torch.nn.Module:
    """The Hugging Face model of a catalog architecture on the meta device, in a loading dtype."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    if dtype not in PLACEMENT_DTYPES:
        raise QlabError(f"cannot place a model in '{dtype}'; use one of {', '.join(PLACEMENT_DTYPES)} (formats "
                        "such as int4 are applied after loading).")
    fields = {k: v for k, v in arch.config.items() if not k.startswith("_")}
    model_type = fields.pop("model_type", arch.model_type)
    try:
        config = AutoConfig.for_model(model_type, **fields)
    except ValueError as error:
        raise QlabError(f"this transformers has no '{model_type}' model ({str(error).splitlines()[0][:120]}); "
                        "upgrade transformers or pick another model.") from None
    try:
        with init_empty_weights(include_buffers=False):
            return AutoModelForCausalLM.from_config(config, dtype=PLACEMENT_DTYPES[dtype])
    except ValueError as error:
        raise QlabError(f"{arch.slug} has no text-generation class in transformers "
                        f"({str(error).splitlines()[0][:120]}); pick a decoder model.") from None


def module_sizes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of parameters and buffers under every module name ("" is the whole model), as accelerate counts."""
    from accelerate.utils import compute_module_sizes

    return {name: int(size) for name, size in compute_module_sizes(model).items()}


def decoder_layers(model: torch.nn.Module) -> tuple[str, ...]:
    """Module names of the blocks a device map never splits (the decoder layers), in order."""
    classes = set(model._no_split_modules or ())
    return tuple(name for name, module in model.named_modules() if type(module).__name__ in classes)


def infer_device_map(model: torch.nn.Module, max_memory: Mapping[int, int]) -> DeviceMap:
    """accelerate's ``device_map="auto"`` for ``model`` under a per-GPU budget, as ``from_pretrained`` does it."""
    from transformers.integrations.accelerate import get_balanced_memory, infer_auto_device_map

    budget: dict[int | str, int] = {int(gpu): int(size) for gpu, size in max_memory.items()}
    # No CPU budget: what does not fit goes to "cpu"/"disk", which callers report as not fitting.
    budget["cpu"] = 0
    no_split = model._no_split_modules
    accelerate_log = logging.getLogger("accelerate.utils.modeling")
    level = accelerate_log.level
    accelerate_log.setLevel(logging.ERROR)  # the GPU ids are not this machine's on purpose; do not warn
    try:
        balanced = get_balanced_memory(model, max_memory=budget, no_split_module_classes=no_split)
        device_map = infer_auto_device_map(model, max_memory=balanced, no_split_module_classes=no_split)
    finally:
        accelerate_log.setLevel(level)
    sizes = module_sizes(model)
    return DeviceMap(dict(device_map), {name: sizes.get(name, 0) for name in device_map}, decoder_layers(model),
                     {k: int(v) for k, v in balanced.items() if isinstance(k, int)})
