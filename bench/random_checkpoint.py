"""A random-initialised checkpoint of a catalog architecture, as a Hugging Face model directory: sharded bf16
safetensors, config.json and a tokenizer. Speed and memory do not depend on the weights' values, so this is a
model at real size for a machine without network (the lent GPU machine) or without the real weights.

    python bench/random_checkpoint.py llama-3.1-8b /tmp/llama-8b-random --device cuda
    python -m qlab sweep --model /tmp/llama-8b-random --device cuda --formats bf16,int8,int4,nf4 --tokens 2048

``CONFIG`` is a name under ``assets/model_configs/`` or a path to a config.json. Tensors are generated one at
a time (on ``--device``; a GPU is much faster for an 8B model) and written shard by shard, so the build needs
about one shard of RAM, never the whole model. The tokenizer is the bundled SmolLM2 one when its converted copy
exists in qlab's cache (49k ids fit every catalog vocabulary), else a byte-level BPE trained here on Python's
help text, capped at the config's vocabulary.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHARD_BYTES = 5_000_000_000  # the size transformers' own save_pretrained shards at
OFFLINE_VOCAB = 8192
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def read_config(name_or_path: str) -> dict:
    """The config fields of a catalog name or a config.json path (qlab's ``_qlab`` provenance dropped)."""
    path = Path(name_or_path)
    if not path.is_file():
        path = REPO / "assets" / "model_configs" / f"{name_or_path}.json"
    if not path.is_file():
        catalog = sorted(p.stem for p in (REPO / "assets" / "model_configs").glob("*.json"))
        raise SystemExit(f"no config '{name_or_path}'; use a path or one of {', '.join(catalog)}")
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def _shards(shapes: dict[str, torch.Size], itemsize: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def build(config_name: str, directory: Path, device: str = "cpu", dtype: torch.dtype = torch.bfloat16,
          seed: int = 0) -> dict:
    """Write the checkpoint into ``directory``; return what was built (parameters, bytes, shards, seconds)."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    started = time.perf_counter()
    fields = read_config(config_name)
    fields["torch_dtype"] = str(dtype).removeprefix("torch.")
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    # The meta device gives every parameter's name and shape (tied ones once) without allocating anything.
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    shapes = {name: p.shape for name, p in skeleton.named_parameters()}
    std = getattr(config, "initializer_range", 0.02)
    generator = torch.Generator(device).manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    shards = _shards(shapes, dtype.itemsize)
    weight_map = {}
    for index, names in enumerate(shards, start=1):
        file = "model.safetensors" if len(shards) == 1 else f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            shape = shapes[name]
            if len(shape) == 1:  # norms start at one, biases at zero, as the models' own init does
                tensor = torch.ones(shape, dtype=dtype) if name.endswith("weight") else torch.zeros(shape, dtype=dtype)
            else:
                tensor = torch.empty(shape, dtype=dtype, device=device).normal_(0.0, std, generator=generator).cpu()
            tensors[name] = tensor
            weight_map[name] = file
        save_file(tensors, directory / file, metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        total = sum(math.prod(s) for s in shapes.values()) * dtype.itemsize
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(directory)
    tokenizer = write_tokenizer(directory, config.vocab_size)
    params = sum(math.prod(s) for s in shapes.values())
    return {"config": config_name, "parameters": params, "bytes": params * dtype.itemsize,
            "dtype": str(dtype).removeprefix("torch."), "shards": len(shards), "tokenizer": tokenizer,
            "build_seconds": round(time.perf_counter() - started, 1)}


def write_tokenizer(directory: Path, vocab_size: int) -> str:
    """Copy the bundled SmolLM2 tokenizer when its converted copy is cached and fits, else train one offline."""
    from qlab.models.loading import cache_dir

    for converted in sorted((cache_dir() / "converted").glob("smollm2-135m-*")):
        if (converted / "tokenizer.json").is_file() and vocab_size >= 49152:
            for name in TOKENIZER_FILES:
                if (converted / name).is_file():
                    (directory / name).write_bytes((converted / name).read_bytes())
            return "smollm2-135m (bundled)"
    return _train_offline(directory, min(vocab_size, OFFLINE_VOCAB))


def _train_offline(directory: Path, vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from qlab.models.evaluate import default_text

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(default_text().split("\n\n"), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                            bos_token="<|endoftext|>").save_pretrained(directory)
    return f"byte-level BPE of {tokenizer.get_vocab_size()} ids trained on Python's help text"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="catalog name (assets/model_configs/NAME.json) or a config.json path")
    parser.add_argument("out", type=Path, help="directory to write the checkpoint into")
    parser.add_argument("--device", default="cpu", help="where the random values are drawn (cuda: much faster)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    print(json.dumps(build(args.config, args.out, args.device, dtype, args.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
