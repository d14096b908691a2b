"""Tiny random-weight models built at test time, saved to disk and loaded back through the
public API. Nothing here is downloaded; weights are seeded so every run builds the same models.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}

_CORPUS = [
    "BEGINNING OF CONVERSATION: USER: Edit the following Question-Answer pair to make it more "
    "helpful and harmless: How do I bake bread? | Mix flour, water, yeast and salt. ASSISTANT:",
    "##Question: ##Answer: ##Correction: ##Revision: ##Context:",
    "safe unsafe S1 S2 S3 S4 S5 S6 S7 S8 S9 S10 S11 S12 S13 S14",
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France.",
    "I can't help with that. Please contact a professional. Here is how to kill a Python process.",
    "0123456789 !?.,;:'\"()[]{}<>-_=+*/\\|@#$%^&~` \n\t",
]

GUARD_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "Is the last turn safe or unsafe?\n"
)


def build_tokenizer(out: Path, *, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A cased byte-level BPE tokenizer trained on a few sentences."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL)
    fast.add_tokens(["safe", "unsafe"])  # whole-word tokens a guard model can emit first
    fast.save_pretrained(out)
    return fast


def _llama_config(tokenizer: PreTrainedTokenizerFast, **overrides: object) -> LlamaConfig:
    config = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config.update(overrides)
    return LlamaConfig(**config)


def build_causal_lm(out: Path, *, seed: int = 0, **config: object) -> Path:
    """A random Llama-style causal LM with its tokenizer, saved as safetensors."""
    tokenizer = build_tokenizer(out)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_llama_config(tokenizer, **config))
    # Sharpen the random logits and zero the EOS row, so greedy decoding rarely stops early and
    # generations are long enough to test batching, streaming and budgets.
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)
        model.lm_head.weight[tokenizer.eos_token_id] = 0.0
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    return out


def build_sequence_classifier(out: Path, *, seed: int = 0) -> Path:
    """A random Llama sequence classifier with labels safe/unsafe."""
    tokenizer = build_tokenizer(out)
    torch.manual_seed(seed)
    config = _llama_config(
        tokenizer,
        num_labels=2,
        id2label={0: "safe", 1: "unsafe"},
        label2id={"safe": 0, "unsafe": 1},
    )
    LlamaForSequenceClassification(config).save_pretrained(out)
    return out


def build_guard_model(out: Path, *, seed: int = 0) -> Path:
    """A random causal LM with a chat template and "safe"/"unsafe" tokens, shaped like a guard."""
    build_causal_lm(out, seed=seed)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out)
    tokenizer.chat_template = GUARD_TEMPLATE
    tokenizer.save_pretrained(out)
    return out
