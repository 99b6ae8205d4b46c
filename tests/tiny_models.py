"""Tiny random-weight Llama and BERT models with a byte tokenizer: the real code paths in milliseconds."""

from __future__ import annotations

import torch

from qlab.models.loading import LoadedModel, ModelSource

VOCAB = 96


class _Encoding(dict):
    """What a Hugging Face tokenizer returns: a dict that also answers attribute access."""

    def __getattr__(self, name: str):
        return self[name]


class ByteTokenizer:
    """UTF-8 bytes folded into a small vocabulary; id 0 is padding."""

    def _ids(self, text: str) -> list[int]:
        return [b % (VOCAB - 2) + 2 for b in text.encode()]

    def __call__(self, text, return_tensors=None, truncation=False, max_length=None, **_):
        texts = [text] if isinstance(text, str) else list(text)
        ids = [self._ids(t)[:max_length] if truncation and max_length else self._ids(t) for t in texts]
        if return_tensors != "pt":
            return _Encoding(input_ids=ids[0] if isinstance(text, str) else ids)
        width = max(map(len, ids))
        input_ids = torch.zeros(len(ids), width, dtype=torch.long)
        mask = torch.zeros(len(ids), width, dtype=torch.long)
        for row, values in enumerate(ids):
            input_ids[row, : len(values)] = torch.tensor(values)
            mask[row, : len(values)] = 1
        return _Encoding(input_ids=input_ids, attention_mask=mask, token_type_ids=torch.zeros_like(mask))


def tiny_llama(layers: int = 3, seed: int = 0, tied: bool = True) -> LoadedModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=tied)
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    return LoadedModel(ModelSource("tiny-llama", "causal-lm", "."), model, ByteTokenizer())


def tiny_bert(layers: int = 3, seed: int = 0) -> LoadedModel:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=512)
    model = BertModel(config).eval().requires_grad_(False)
    return LoadedModel(ModelSource("tiny-bert", "embedding", "."), model, ByteTokenizer())
