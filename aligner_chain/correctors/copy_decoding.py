"""Copy-aware greedy decoding: drafts taken from the input, checked by the model in one pass.

An Aligner's correction often repeats long runs of the original answer. Each step looks the
last generated n-gram up in the tokens seen so far (the prompt, which holds the answer, and the
correction so far) and proposes the tokens that followed it there; one forward pass over the
proposal yields the model's own greedy choice at every position, and the longest agreeing
prefix is kept plus the model's next token. The model still picks every token, so the output is
plain greedy decoding's; only the number of forward passes changes.

A rejected draft costs a wider forward pass for one token, so a draft cut short before
:data:`MIN_USEFUL` accepted tokens pauses drafting for 1, 2, 4, ... steps (up to :data:`MAX_PAUSE`):
on a heavy rewrite the cost converges to plain decoding, and the next copied run is still
found. Drafts start short (:data:`MIN_DRAFT`) and double while fully accepted. The constants
were chosen by replaying real Aligner-2B corrections (``benchmarks/copy_decoding.py``).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Collection
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import torch

MAX_NGRAM = 3  # longest trailing n-gram looked up (longer matches are tried first)
MIN_DRAFT = 2  # draft length after a partial match, and the first one
MAX_DRAFT = 32  # cap of the doubling while drafts are fully accepted
MIN_USEFUL = 2  # accepted tokens below which a draft counts as a miss
MAX_PAUSE = 64  # longest pause (in steps) after repeated misses


def supports_copy_drafts(model: Any) -> bool:
    """True for decoder-only models whose KV cache can be cut back after a rejected draft
    (full attention only: sliding-window, recurrent and encoder-decoder caches are excluded)."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False) or getattr(model, "_is_stateful", False):
        return False
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    return all(kind == "full_attention" for kind in layer_types)


@dataclass
class DraftStats:
    """What drafting did for one generation (for logs and benchmarks)."""

    forward_passes: int = 0
    drafted: int = 0
    accepted: int = 0


@dataclass
class CopyDrafter:
    """Proposes a continuation of the sequence by n-gram lookup in its own earlier tokens.

    Among earlier occurrences of the trailing n-gram it prefers the first one after where the
    previous accepted draft came from, so a copy keeps following the original in order instead
    of jumping back to an earlier repeat of a common phrase.
    """

    tokens: list[int] = field(default_factory=list)
    _index: dict[tuple[int, ...], list[int]] = field(default_factory=dict)
    _cursor: int = 0

    def __post_init__(self) -> None:
        seed, self.tokens = self.tokens, []
        self.extend(seed)

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            self.tokens.append(token)
            end = len(self.tokens)
            for n in range(1, min(MAX_NGRAM, end) + 1):
                self._index.setdefault(tuple(self.tokens[end - n :]), []).append(end)

    def propose(self, limit: int, stop: Collection[int]) -> tuple[list[int], int]:
        """Up to ``limit`` draft tokens (cut before any ``stop`` token) and where they start."""
        end = len(self.tokens)
        for n in range(min(MAX_NGRAM, end - 1), 0, -1):
            ends = self._index.get(tuple(self.tokens[end - n :]))
            if not ends:
                continue
            i = bisect_right(ends, self._cursor)
            start = next((e for e in chain(ends[i:], ends[:i]) if e < end), None)
            if start is None:
                continue
            draft = self.tokens[start : start + limit]
            cut = next((j for j, t in enumerate(draft) if t in stop), len(draft))
            if cut:
                return draft[:cut], start
        return [], 0

    def accepted(self, start: int, count: int) -> None:
        self._cursor = start + count


def copy_greedy_generate(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    max_new_tokens: int,
    eos_ids: Collection[int],
    streamer: Any = None,
) -> tuple[list[int], DraftStats]:
    """Greedy decoding of one sequence (batch size 1, no padding) with copy drafts.

    Returns the new tokens (ending with an EOS token, or ``max_new_tokens`` long), exactly as
    ``model.generate(do_sample=False)`` would, and drafting statistics.
    """
    if input_ids.shape[0] != 1:
        raise ValueError("copy-aware decoding handles one sequence at a time")
    stats = DraftStats(forward_passes=1)
    drafter = CopyDrafter(input_ids[0].tolist())
    if streamer is not None:
        streamer.put(input_ids.cpu())
    out = model(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=True, logits_to_keep=1
    )
    cache = out.past_key_values
    token = int(out.logits[0, -1].argmax())
    new: list[int] = []
    width, misses, pause = MIN_DRAFT, 0, 0
    while True:
        new.append(token)
        drafter.extend([token])
        if streamer is not None:
            streamer.put(torch.tensor([token]))
        left = max_new_tokens - len(new)
        if token in eos_ids or left <= 0:
            break
        draft, source = [], 0
        if pause:
            pause -= 1
        elif left > 1:  # room for the draft and the model's own next token
            draft, source = drafter.propose(min(width, left - 1), eos_ids)
        out = model(
            input_ids=torch.tensor([[token, *draft]], device=input_ids.device),
            past_key_values=cache,
            use_cache=True,
        )
        stats.forward_passes += 1
        choice = out.logits[0].argmax(-1).tolist()
        n = next((i for i, (d, c) in enumerate(zip(draft, choice)) if d != c), len(draft))
        token = choice[n]
        if not draft:
            continue
        stats.drafted += len(draft)
        stats.accepted += n
        if n < len(draft):
            cache.crop(n - len(draft))  # drop the rejected tail from the KV cache
        if n < min(MIN_USEFUL, len(draft)):
            misses += 1
            pause = min(2 ** (misses - 1), MAX_PAUSE)
        else:
            misses = 0
        if n == 0:
            continue
        width = min(2 * width, MAX_DRAFT) if n == len(draft) else max(MIN_DRAFT, n + 1)
        drafter.accepted(source, n)
        new.extend(draft[:n])
        drafter.extend(draft[:n])
        if streamer is not None:
            streamer.put(torch.tensor(draft[:n]))
    if streamer is not None:
        streamer.end()
    return new, stats
