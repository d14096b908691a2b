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

A batch decodes in the same passes, each row drafting from its own input and accepting its own
number of tokens: what a row rejected stays in the KV cache, masked out the way left padding
is, so the batch needs no per-row cache surgery.

Two more savings: a :class:`DraftMemory` of the corrector's recent outputs is a second source
of drafts (a small Aligner repeats its refusals word for word), exact in the same way; and a
:class:`PromptPrefix` holds the template head's keys and values, so prompts are prefilled from
where the head ends (the same computation in other shapes, so only float rounding can differ,
as with any change of batch shape).
"""

from __future__ import annotations

import functools
import inspect
import threading
from bisect import bisect_right
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import torch
from transformers import DynamicCache

MAX_NGRAM = 3  # longest trailing n-gram looked up (longer matches are tried first)
MIN_DRAFT = 2  # draft length after a partial match, and the first one
MAX_DRAFT = 32  # cap of the doubling while drafts are fully accepted
MIN_USEFUL = 2  # accepted tokens below which a draft counts as a miss
MAX_PAUSE = 64  # longest pause (in steps) after repeated misses
MAX_PREFIX_REST = 320
"""Longest prompt remainder (after a cached template head) prefilled against the head's cache:
with a cache, attention takes an explicit mask, which on CPU costs more than the head's
prefill saves on long prompts (mini Aligner, 20-token head, one kept answer: a 93-token prompt
14 % faster, a 266-token one 2 % faster, a 407-token one 1 % slower, a 900-token one 22 %
slower)."""
MAX_MEMORY_MATCH = 16  # a row's first tokens that can match the start of a remembered output


def supports_copy_drafts(model: Any) -> bool:
    """True for decoder-only models whose KV cache can be cut back after a rejected draft
    (full attention only: sliding-window, recurrent and encoder-decoder caches are excluded)
    and that take ``position_ids`` (rows of a batch that accept different numbers of tokens
    need explicit positions)."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False) or getattr(model, "_is_stateful", False):
        return False
    if "position_ids" not in inspect.signature(model.forward).parameters:
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

    def propose(self, limit: int, stop: Collection[int]) -> tuple[list[int], int, int]:
        """Up to ``limit`` draft tokens (cut before any ``stop`` token), where they start, and
        the length of the n-gram that matched."""
        end = len(self.tokens)
        for n in range(min(MAX_NGRAM, end - 1), 0, -1):
            ends = self._index.get(tuple(self.tokens[end - n :]))
            if not ends:
                continue
            i = bisect_right(ends, self._cursor)
            start = next((e for e in chain(ends[i:], ends[:i]) if e < end), None)
            if start is None:
                continue
            draft = _cut(self.tokens[start : start + limit], stop)
            if draft:
                return draft, start, n
        return [], 0, 0

    def accepted(self, start: int, count: int) -> None:
        self._cursor = start + count


def _cut(draft: list[int], stop: Collection[int]) -> list[int]:
    """``draft`` up to its first ``stop`` token."""
    return draft[: next((j for j, t in enumerate(draft) if t in stop), len(draft))]


_MemoryState = tuple[
    list[list[int]],  # outputs
    dict[tuple[int, ...], tuple[int, int]],  # n-gram -> (output, end) of its latest occurrence
    dict[tuple[int, ...], int],  # an output's first tokens (up to MAX_MEMORY_MATCH) -> output
]


class DraftMemory:
    """A corrector's recent outputs, indexed by their n-grams, as a second source of drafts.

    A small Aligner writes the same refusals and boilerplate word for word, text that is not in
    the answer it corrects. A row whose tokens so far are the start of a remembered output
    drafts that output's continuation; otherwise a row whose own tokens give a shorter n-gram
    match (or none) drafts what followed its last tokens in the latest output that has them.
    Drafts are checked by the model like any other, so what is remembered never changes an
    output, only how many forward passes it takes. Thread-safe; holds at most ``2 * size``
    outputs.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        # Replaced as one when trimmed, so that a reader never mixes two generations' parts.
        self._state: _MemoryState = ([], {}, {})
        self._lock = threading.Lock()

    def add(self, outputs: Iterable[list[int]]) -> None:
        with self._lock:
            for output in outputs:
                if len(output) < 2:  # nothing to continue from (e.g. a keep token)
                    continue
                if len(self._state[0]) >= 2 * self.size:
                    state: _MemoryState = ([], {}, {})
                    for old in self._state[0][-self.size :]:
                        _insert(state, old)
                    self._state = state
                _insert(self._state, output)

    def clear(self) -> None:
        with self._lock:
            self._state = ([], {}, {})

    def propose(
        self,
        tail: Sequence[int],
        limit: int,
        stop: Collection[int],
        follow: tuple[int, int] | None = None,
    ) -> tuple[list[int], int, tuple[int, int]]:
        """Up to ``limit`` draft tokens (cut before any ``stop`` token), the strength of the
        match, and where the draft starts (output, position). Strongest
        (:data:`MAX_MEMORY_MATCH`): ``tail`` goes on with the output at ``follow`` (where the
        row's last accepted draft from here ended), or is the start of an output; else the
        length of the longest n-gram ending ``tail`` in the latest output that has it."""
        outputs, index, starts = self._state
        candidates: list[tuple[int, int, int]] = []  # (output, start, strength)
        if follow is not None and follow[0] < len(outputs):
            k, pos = follow
            if pos < len(outputs[k]) and outputs[k][pos] == tail[-1]:
                candidates.append((k, pos + 1, MAX_MEMORY_MATCH))
        k = starts.get(tuple(tail)) if len(tail) <= MAX_MEMORY_MATCH else None
        if k is not None:
            candidates.append((k, len(tail), MAX_MEMORY_MATCH))
        for n in range(min(MAX_NGRAM, len(tail)), 0, -1):
            hit = index.get(tuple(tail[-n:]))
            if hit is not None:
                candidates.append((hit[0], hit[1], n))
        for k, start, strength in candidates:
            if draft := _cut(outputs[k][start : start + limit], stop):
                return draft, strength, (k, start)
        return [], 0, (0, 0)


def _insert(state: _MemoryState, output: list[int]) -> None:
    """Append ``output`` and index it (the output before its index entries, so that a
    concurrent reader finds every indexed output)."""
    outputs, index, starts = state
    k = len(outputs)
    outputs.append(list(output))
    for end in range(1, len(output)):  # the last token has no continuation
        if end <= MAX_MEMORY_MATCH:
            starts[tuple(output[:end])] = k
        for n in range(1, min(MAX_NGRAM, end) + 1):
            index[tuple(output[end - n : end])] = (k, end)


@dataclass
class _Row:
    """One sequence's decoding state: its drafter, its output, and its drafting backoff.

    The drafter indexes the prompt only when the row goes on past its first token: a row that
    stops there (an answer kept with one token) never pays for indexing a long prompt."""

    prompt: list[int]
    budget: int
    memory: DraftMemory | None = None
    new: list[int] = field(default_factory=list)
    remembered: tuple[int, int] | None = None  # where the last accepted memory draft ended
    from_memory: tuple[int, int] | None = None  # where this step's draft came from, if there
    width: int = MIN_DRAFT
    misses: int = 0
    pause: int = 0
    done: bool = False
    drafter: CopyDrafter | None = None

    def push(self, token: int, eos_ids: Collection[int]) -> None:
        """Append the model's own next token; the row is done at a stop token or its budget."""
        self.new.append(token)
        self.done = token in eos_ids or len(self.new) >= self.budget
        if self.drafter is not None:
            self.drafter.extend([token])
        elif not self.done:
            self.drafter = CopyDrafter(self.prompt + self.new)

    def propose(self, eos_ids: Collection[int]) -> tuple[list[int], int]:
        """This step's draft and where in the row's tokens it starts (-1: from the memory);
        empty while paused, or with room for one token only. The longer n-gram match wins, the
        row's own tokens on a tie."""
        if self.pause:
            self.pause -= 1
            return [], 0
        left = self.budget - len(self.new)
        if left <= 1:  # the draft must leave room for the model's own next token
            return [], 0
        limit = min(self.width, left - 1)
        assert self.drafter is not None  # push builds it for every row that goes on
        draft, start, matched = self.drafter.propose(limit, eos_ids)
        self.from_memory = None
        if self.memory is not None:
            recalled, strength, source = self.memory.propose(
                self.new, limit, eos_ids, self.remembered
            )
            if strength > matched:
                self.from_memory = source
                return recalled, -1
        return draft, start

    def verify(self, draft: list[int], source: int, choice: list[int], stats: DraftStats) -> int:
        """Keep the draft's prefix that agrees with the model's ``choice`` at each position;
        returns how many draft tokens were accepted (``choice[n]`` is the next token)."""
        n = next((i for i, (d, c) in enumerate(zip(draft, choice)) if d != c), len(draft))
        if not draft:
            return 0
        stats.drafted += len(draft)
        stats.accepted += n
        if n < min(MIN_USEFUL, len(draft)):
            self.misses += 1
            self.pause = min(2 ** (self.misses - 1), MAX_PAUSE)
        else:
            self.misses = 0
        assert self.drafter is not None  # a row with a draft went on past its first token
        if n:
            self.width = (
                min(2 * self.width, MAX_DRAFT) if n == len(draft) else max(MIN_DRAFT, n + 1)
            )
            if source >= 0:
                self.drafter.accepted(source, n)
            self.new.extend(draft[:n])
            self.drafter.extend(draft[:n])
        if self.from_memory is not None:
            k, start = self.from_memory
            self.remembered = (k, start + n) if n else None
        return n


@dataclass(frozen=True)
class PromptPrefix:
    """Token ids that every prompt starts with (a template's constant head) and their KV cache,
    computed once: a prompt that starts with them skips that part of its prefill. The head's
    keys and values do not depend on what follows it (causal attention), so the tokens picked
    are those of a full prefill, up to float rounding of the different shapes."""

    ids: tuple[int, ...]
    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    """Each layer's keys and values for a batch of one."""

    @classmethod
    def build(cls, model: Any, ids: Sequence[int]) -> PromptPrefix:
        device = next(model.parameters()).device
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([list(ids)], device=device), use_cache=True)
        cache = getattr(out, _cache_argument(type(model)))
        return cls(tuple(ids), tuple((layer.keys, layer.values) for layer in cache.layers))

    def split(
        self, input_ids: torch.Tensor, mask: torch.Tensor, pad_token_id: int
    ) -> tuple[torch.Tensor, torch.Tensor, Any] | None:
        """For a left-padded batch whose rows all start with the prefix: the rows without it
        (left-padded again), the mask over prefix + padding + rows, and a fresh copy of the
        prefix cache for the batch; ``None`` if some row does not start with the prefix or
        the longest remainder exceeds :data:`MAX_PREFIX_REST`."""
        n = len(self.ids)
        head = torch.tensor(self.ids, device=input_ids.device)
        rests = []
        for ids, keep in zip(input_ids, mask):
            kept = ids[keep.bool()]
            if kept.shape[0] <= n or not torch.equal(kept[:n], head):
                return None
            rests.append(kept[n:])
        width = max(r.shape[0] for r in rests)
        if width > MAX_PREFIX_REST:
            return None
        ids = input_ids.new_full((len(rests), width), pad_token_id)
        full = mask.new_zeros((len(rests), n + width))
        full[:, :n] = 1
        for i, rest in enumerate(rests):
            ids[i, width - rest.shape[0] :] = rest
            full[i, n + width - rest.shape[0] :] = 1
        # The cache replaces its tensors as it grows, crops or drops rows, never writing into
        # them, so every batch can start from views of the same prefix tensors.
        batch = len(rests)
        views = [(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in self.layers]
        return ids, full, DynamicCache(ddp_cache_data=views)


@functools.cache
def _cache_argument(model_class: type) -> str:
    """``cache`` where the model's own ``forward`` (under any subclass wrapper) takes it, as in
    transformers 5.x, which deprecates ``past_key_values``; else ``past_key_values``. Once per
    class: signatures are not inspected on every generation."""
    for cls in model_class.__mro__:
        forward = cls.__dict__.get("forward")
        if forward is not None and "cache" in inspect.signature(forward).parameters:
            return "cache"
    return "past_key_values"


def copy_greedy_generate(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    max_new_tokens: int | Sequence[int],
    eos_ids: Collection[int],
    pad_token_id: int = 0,
    streamer: Any = None,
    first_token_bias: Mapping[int, float] | None = None,
    prefix: PromptPrefix | None = None,
    memory: DraftMemory | None = None,
) -> tuple[list[list[int]], DraftStats]:
    """Greedy decoding of a (left-padded) batch with copy drafts, each row from its own input.

    Returns each row's new tokens (ending with an EOS token, or its ``max_new_tokens`` long),
    exactly as ``model.generate(do_sample=False)`` picks them, and drafting statistics.

    Every step feeds each row its next token and its own draft (cut to the median draft's
    length: every row pays for the widest one), padded to one width; rows accept different
    numbers of tokens. Positions a row rejected (and its padding) stay
    in the KV cache masked out (``attention_mask`` 0, ``position_ids`` counting only kept
    tokens, as with left padding); the tail that no row kept is cropped, and finished rows
    leave the batch. A single unpadded row never has masked positions, so it runs without a
    mask. ``streamer`` receives the tokens of a single row. ``first_token_bias`` adds offsets to
    some tokens' logits at the first step only (as a logits processor would in ``generate``).
    ``prefix``: when every row starts with it, its cached keys and values replace that part of
    the prefill (the rows' padding then sits between prefix and row, masked out). ``memory``
    is a second source of drafts (:class:`DraftMemory`); the caller decides what goes into it.
    """
    batch = input_ids.shape[0]
    if streamer is not None and batch != 1:
        raise ValueError("streaming copy-aware decoding handles one sequence")
    device = input_ids.device
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
    budgets = [max_new_tokens] * batch if isinstance(max_new_tokens, int) else max_new_tokens
    rows = [
        _Row(ids[keep.bool()].tolist(), budget, memory)
        for ids, keep, budget in zip(input_ids, mask, budgets)
    ]
    cache_arg = _cache_argument(type(model))
    split = None if prefix is None else prefix.split(input_ids, mask, pad_token_id)
    prefill, cached = (input_ids, {}) if split is None else (split[0], {cache_arg: split[2]})
    if split is not None:
        mask = split[1]
    positions = mask.sum(1)  # each row's next position: its count of kept tokens
    ragged = not bool(mask.all())  # masked positions in the cache: pass mask and positions
    track = ragged or batch > 1  # a lone unpadded row never has masked positions to track
    stats = DraftStats(forward_passes=1)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    out = model(
        input_ids=prefill,
        attention_mask=mask if ragged else None,
        position_ids=(mask.cumsum(1) - 1).clamp(min=0)[:, -prefill.shape[1] :] if ragged else None,
        use_cache=True,
        logits_to_keep=1,
        **cached,
    )
    cache = getattr(out, cache_arg)  # the output names it as the forward does
    first = out.logits[:, -1]
    if first_token_bias:
        first = first.clone()
        first[:, list(first_token_bias)] += torch.tensor(
            list(first_token_bias.values()), dtype=first.dtype, device=device
        )
    tokens = first.argmax(-1).tolist()
    live = list(range(batch))  # the rows still in the model's batch, in cache order
    while True:
        for i, token in zip(live, tokens):
            rows[i].push(token, eos_ids)
            if streamer is not None:
                streamer.put(torch.tensor([token]))
        keep = [k for k, i in enumerate(live) if not rows[i].done]
        if not keep:
            break
        if len(keep) < len(live):  # finished rows leave the batch
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            mask, positions = mask[index], positions[index]
            live, tokens = [live[k] for k in keep], [tokens[k] for k in keep]
        drafts = [rows[i].propose(eos_ids) for i in live]
        # Every row pays for the widest draft, so drafts are cut to the median draft's length.
        width = 1 + sorted(len(draft) for draft, _ in drafts)[len(drafts) // 2]
        drafts = [(draft[: width - 1], source) for draft, source in drafts]
        step = [
            [token, *draft] + [pad_token_id] * (width - 1 - len(draft))
            for token, (draft, _) in zip(tokens, drafts)
        ]
        # Padding after a row's tokens cannot reach them (causal), so this step needs no mask
        # of its own; the mask only has to hide what earlier steps left in the cache.
        if track:
            mask = torch.cat([mask, mask.new_ones((len(live), width))], 1)
        out = model(
            input_ids=torch.tensor(step, dtype=input_ids.dtype, device=device),
            attention_mask=mask if ragged else None,
            position_ids=positions[:, None] + torch.arange(width, device=device)
            if ragged
            else None,
            use_cache=True,
            **{cache_arg: cache},
        )
        stats.forward_passes += 1
        choices = out.logits.argmax(-1).tolist()
        kept = []
        for k, (i, (draft, source), choice) in enumerate(zip(live, drafts, choices)):
            n = rows[i].verify(draft, source, choice, stats)
            tokens[k] = choice[n]
            kept.append(1 + n)
            if streamer is not None and n:
                streamer.put(torch.tensor(draft[:n]))
        drop = width - max(kept)  # the tail no row kept leaves the cache
        if track:
            kept_t = torch.tensor(kept, device=device)
            positions = positions + kept_t
            mask[:, -width:] = (torch.arange(width, device=device) < kept_t[:, None]).long()
            mask = mask[:, : mask.shape[1] - drop]
            ragged = ragged or min(kept) < max(kept)  # rejected positions stay, masked
        if drop:
            cache.crop(-drop)
    if streamer is not None:
        streamer.end()
    return [row.new for row in rows], stats
