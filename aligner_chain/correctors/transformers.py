"""A corrector backed by any Hugging Face causal LM (the released Aligner, or one you trained)."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import (
    AutoModelForCausalLM,
    LogitsProcessor,
    LogitsProcessorList,
    TextIteratorStreamer,
)

from aligner_chain.batching import BatchingConfig, make_runner
from aligner_chain.correctors.base import Corrector
from aligner_chain.correctors.copy_decoding import (
    DraftMemory,
    PromptPrefix,
    copy_greedy_generate,
    supports_copy_drafts,
)
from aligner_chain.correctors.prompting import PreparedPrompt, PromptPreparation, trim_stream
from aligner_chain.errors import ConfigurationError, CorrectorError, InputError, ModelLoadError
from aligner_chain.loading import DeviceSpec, DtypeSpec, LoadedModel, load_pretrained
from aligner_chain.templates import PromptTemplate
from aligner_chain.types import Correction, QAPair

logger = logging.getLogger(__name__)

MIN_PREFIX_TOKENS = 4
"""A template head shorter than this is prefilled with each prompt (too little to save)."""


class GenerationSettings(BaseModel):
    """Decoding settings. ``greedy`` is the default; ``paper`` is the sampling preset of the
    Aligner paper's evaluations (Table 9: T=0.3, top-p 0.95, top-k 10; its vLLM frequency penalty
    1.2 has no exact transformers equivalent, so the multiplicative repetition penalty stands in).

    ``max_new_tokens`` is derived per answer: ``ceil(answer_tokens * ratio) + margin``, capped
    at ``max_new_tokens_cap``, so that long answers are not cut.

    ``copy_drafts`` lets a local model decode with drafts copied from each answer
    (:mod:`~aligner_chain.correctors.copy_decoding`), single answers and batches alike: the
    same tokens in fewer forward passes. It applies only to plain greedy decoding (no sampling,
    penalty or ``extra`` kwargs), and to models whose cache can be cut back (full attention,
    decoder-only); the rest use ``generate``. This path also prefills the template's constant
    head once per corrector and starts every prompt from its cached keys and values
    (:class:`~aligner_chain.correctors.copy_decoding.PromptPrefix`). ``None`` (default) turns
    it on for float32 weights, where checking several tokens in one pass picks the same
    tokens; in half precision a near-tie can flip (as with any change of batch shape), so it
    takes ``True`` there.
    """

    model_config = ConfigDict(extra="forbid")

    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    new_tokens_ratio: float = Field(default=1.25, gt=0)
    new_tokens_margin: int = Field(default=64, ge=1)
    max_new_tokens_cap: int = Field(default=2048, ge=1)
    extra: dict[str, Any] = Field(default_factory=dict)
    copy_drafts: bool | None = None
    draft_memory: int = Field(default=64, ge=0)
    """Recent corrections (token ids, in this process) that copy drafts may also draft from
    (:class:`~aligner_chain.correctors.copy_decoding.DraftMemory`): repeated refusals and
    boilerplate then decode in a few passes. They make a later correction faster, never
    different; the timing does reveal that similar text was generated before. 0 turns it off."""

    @classmethod
    def preset(cls, name: Literal["greedy", "paper"]) -> GenerationSettings:
        if name == "greedy":
            return cls()
        if name == "paper":
            return cls(
                do_sample=True, temperature=0.3, top_p=0.95, top_k=10, repetition_penalty=1.2
            )
        raise ConfigurationError(f"unknown generation preset {name!r} (greedy, paper)")

    @classmethod
    def resolve(cls, value: str | GenerationSettings) -> GenerationSettings:
        """Settings as given, or the named preset."""
        return value if isinstance(value, GenerationSettings) else cls.preset(value)  # type: ignore[arg-type]

    def budget(self, answer_tokens: int) -> int:
        return min(
            self.max_new_tokens_cap,
            math.ceil(answer_tokens * self.new_tokens_ratio) + self.new_tokens_margin,
        )

    @property
    def plain_greedy(self) -> bool:
        """Greedy decoding with no logits processing, the case copy drafts reproduce exactly."""
        return not self.do_sample and self.repetition_penalty is None and not self.extra

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"do_sample": self.do_sample}
        if self.do_sample:
            for name in ("temperature", "top_p", "top_k"):
                if getattr(self, name) is not None:
                    kwargs[name] = getattr(self, name)
        if self.repetition_penalty is not None:
            kwargs["repetition_penalty"] = self.repetition_penalty
        return {**kwargs, **self.extra}


def load_causal_lm(model: str, **kwargs: Any) -> LoadedModel:
    """Load (once per process) a causal LM and its tokenizer from a local folder or hub id."""
    return load_pretrained(AutoModelForCausalLM, model, **kwargs)


class TransformersCorrector(PromptPreparation, Corrector):
    """Corrects answers with a local causal LM through ``transformers``.

    Args:
        model: a local model folder or a hub id (e.g. ``aligner/aligner-7b-v1.0``).
        template: a preset name (``aligner-7b-v1.0`` by default, ``aligner-correction``,
            ``aligner-revision``, ``aligner-rag``) or a format string with ``{question}`` and
            ``{answer}``.
        generation: ``"greedy"`` (default), ``"paper"``, or :class:`GenerationSettings`.
        device: ``auto`` (CUDA, then MPS, then CPU), or a torch device string.
        dtype: ``auto`` (bf16 on CUDA, fp32 elsewhere) or a torch dtype name.
        device_map: passed to ``from_pretrained`` to spread a large model over several GPUs.
        trust_remote_code: off unless you opt in.
        max_context_tokens: overrides the model's context length for truncation.
        batching: coalesce concurrent ``correct``/``invoke``/``ainvoke`` calls into shared
            ``generate`` calls (:class:`~aligner_chain.batching.BatchingConfig`); ``False``
            generates each call on its own.

    The prompt is tokenized with special tokens *split*, so an answer that contains ``</s>`` or
    another special token's text cannot end the prompt early. The correction is the generated
    tokens after the prompt, decoded without special tokens; it never depends on splitting text.

    Input that does not fit the context is truncated: the question loses tokens from its start
    first (down to 32 tokens), then the answer loses tokens from its start, keeping its end. The
    correction then has ``truncated=True`` and a warning is logged.

    A model trained with a keep token (its config's ``aligner_keep_token``; see
    :class:`~aligner_chain.training.corrector.TrainConfig`) may answer "no change needed" with
    that one token: the correction is then the original answer exactly (even when the prompt was
    truncated), with ``info["kept"] = True``. The token stops generation wherever it appears.
    ``keep_bias`` is added to that token's logit at the first step: above 0 the model keeps more
    answers, below 0 it rewrites more. It defaults to the config's ``aligner_keep_bias`` (set by
    the mini preset from a validation split, see :meth:`keep_margins`), else 0.
    """

    def __init__(
        self,
        model: str,
        *,
        template: str | PromptTemplate | None = None,
        generation: Literal["greedy", "paper"] | GenerationSettings = "greedy",
        device: DeviceSpec = "auto",
        dtype: DtypeSpec = "auto",
        device_map: str | dict[str, Any] | None = None,
        trust_remote_code: bool = False,
        max_context_tokens: int | None = None,
        model_id: str | None = None,
        batching: BatchingConfig | bool = True,
        keep_bias: float | None = None,
    ) -> None:
        self.template = PromptTemplate.resolve(template)
        self.generation = GenerationSettings.resolve(generation)
        self.loaded = load_causal_lm(
            model,
            device=device,
            dtype=dtype,
            device_map=device_map,
            trust_remote_code=trust_remote_code,
        )
        self.context = max_context_tokens or self.loaded.context
        self.model_id = model_id or model
        tok = self.loaded.tokenizer
        self._eos_ids = _eos_ids(self.loaded.model, tok)
        self._keep_id = _keep_id(self.loaded.model, tok, model)
        self._stop_ids = self._eos_ids | ({self._keep_id} if self._keep_id is not None else set())
        self.keep_bias = _keep_bias(self.loaded.model, self._keep_id, keep_bias, model)
        self._overhead = len(self._encode(self.template.format("", "")))
        model = self.loaded.model
        wanted = self.generation.copy_drafts
        if wanted is None:
            wanted = model.dtype == torch.float32
        self._copy_drafts = wanted and self.generation.plain_greedy and supports_copy_drafts(model)
        self._prefix = self._template_head(model) if self._copy_drafts else None
        size = self.generation.draft_memory
        self._memory = DraftMemory(size) if self._copy_drafts and size else None
        self.batcher = make_runner(self._correct_batch, batching)

    def _template_head(self, model: Any) -> PromptPrefix | None:
        """The template's constant head, cached once for copy-draft decoding: the tokens that
        prompts with different questions share (less the last, which may merge with what
        follows). Rows that do not start with them are prefilled whole."""
        a, b = (self._encode(self.template.format(q, "A")) for q in ("Q", "?"))
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))) - 1
        return PromptPrefix.build(model, a[:n]) if n >= MIN_PREFIX_TOKENS else None

    # -- generation --------------------------------------------------------------------------

    def _inputs(self, prepared: Sequence[PreparedPrompt]) -> dict[str, torch.Tensor]:
        """The prompts' token ids (encoded once, in preparation), left-padded into a batch."""
        width = max(len(p.ids) for p in prepared)
        pad = self.loaded.tokenizer.pad_token_id
        ids = [[pad] * (width - len(p.ids)) + p.ids for p in prepared]
        mask = [[0] * (width - len(p.ids)) + [1] * len(p.ids) for p in prepared]
        device = self.loaded.device
        return {
            "input_ids": torch.tensor(ids, device=device),
            "attention_mask": torch.tensor(mask, device=device),
        }

    @property
    def _first_token_bias(self) -> dict[int, float] | None:
        """Logit offsets for the first generated token: the keep token's bias, if any."""
        if self._keep_id is None or not self.keep_bias:
            return None
        return {self._keep_id: self.keep_bias}

    def _generate_kwargs(self, max_new_tokens: int, prompt_width: int) -> dict[str, Any]:
        tok = self.loaded.tokenizer
        kwargs = {
            "max_new_tokens": max_new_tokens,
            "pad_token_id": tok.pad_token_id,
            "eos_token_id": sorted(self._stop_ids),
            **self.generation.generate_kwargs(),
        }
        if self._first_token_bias:
            kwargs["logits_processor"] = LogitsProcessorList(
                [_FirstTokenBias(prompt_width, self._first_token_bias)]
            )
        return kwargs

    def remember(self, texts: Iterable[str]) -> None:
        """Add texts to the draft memory as if this corrector had generated them (e.g. the
        refusals and boilerplate a deployment's corrections usually contain); a no-op when
        the memory is off. Like anything remembered, they can only make decoding faster."""
        texts = list(texts)
        if not all(isinstance(text, str) for text in texts):
            raise InputError("remember() takes texts (strings)")
        if self._memory is None:
            return
        with self.loaded.lock:
            tokenizer = self.loaded.tokenizer
            rows = [
                tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
                for text in texts
            ]
        self._memory.add(rows)

    @property
    def cache_identity(self) -> dict[str, Any]:
        return {**super().cache_identity, "keep_bias": self.keep_bias}

    def forget(self) -> None:
        """Empty the draft memory (``GenerationSettings.draft_memory``): no later correction
        drafts from what was generated before this call."""
        if self._memory is not None:
            self._memory.clear()

    def keep_margins(self, pairs: Sequence[QAPair]) -> list[float]:
        """For each pair, the keep token's logit minus the best other token's at the first step
        (without ``keep_bias``): under greedy decoding an answer is kept exactly when its margin
        plus ``keep_bias`` is above 0. For choosing ``keep_bias`` on labelled pairs."""
        if self._keep_id is None:
            raise ConfigurationError(f"{self.model_id}: the model has no keep token")
        margins: list[float] = []
        for start in range(0, len(pairs), 16):
            prepared = [self._prepare(p) for p in pairs[start : start + 16]]
            with torch.inference_mode():
                logits = (
                    self.loaded.model(**self._inputs(prepared), logits_to_keep=1)
                    .logits[:, -1]
                    .float()
                )
                keep = logits[:, self._keep_id]
                keep_index = torch.tensor([self._keep_id], device=logits.device)
                others = logits.index_fill(1, keep_index, -math.inf)
                margins += (keep - others.max(-1).values).tolist()
        return margins

    def _finish(self, tokens: list[int], prepared: PreparedPrompt, pair: QAPair) -> Correction:
        if self._keep_id is not None and tokens[:1] == [self._keep_id]:
            return Correction(
                text=pair.answer,
                model_id=self.model_id,
                truncated=prepared.truncated,
                info={"finish_reason": "keep", "new_tokens": 1, "kept": True},
            )
        cut = tokens[: prepared.max_new_tokens]
        stop = next((i for i, t in enumerate(cut) if t in self._stop_ids), None)
        finish = "stop" if stop is not None else "length"
        if stop is not None:
            cut = cut[:stop]
        with self.loaded.lock:
            text = self.loaded.tokenizer.decode(cut, skip_special_tokens=True).strip()
        return Correction(
            text=text,
            model_id=self.model_id,
            truncated=prepared.truncated,
            empty=not text,
            info={"finish_reason": finish, "new_tokens": len(cut)},
        )

    def correct(self, pairs: Sequence[QAPair]) -> list[Correction]:
        return self.batcher(pairs)

    async def acorrect(self, pairs: Sequence[QAPair]) -> list[Correction]:
        return await self.batcher.acall(pairs)

    def _generate(
        self, inputs: dict[str, torch.Tensor], budgets: list[int], streamer: Any = None
    ) -> list[list[int]]:
        """New tokens per row (each row's ``budgets`` entry caps it). Copy drafts when they
        are exact (:mod:`~aligner_chain.correctors.copy_decoding`), else ``generate``."""
        model = self.loaded.model
        with torch.inference_mode():
            if self._copy_drafts:
                rows, _ = copy_greedy_generate(
                    model,
                    inputs["input_ids"],
                    inputs["attention_mask"],
                    max_new_tokens=budgets,
                    eos_ids=self._stop_ids,
                    pad_token_id=self.loaded.tokenizer.pad_token_id,
                    streamer=streamer,
                    first_token_bias=self._first_token_bias,
                    prefix=self._prefix,
                    memory=self._memory,
                )
                if self._memory is not None:
                    self._memory.add(rows)
                return rows
            start = inputs["input_ids"].shape[1]
            output = model.generate(
                **inputs, streamer=streamer, **self._generate_kwargs(max(budgets), start)
            )
        return [row[start:].tolist() for row in output]

    def _correct_batch(self, pairs: list[QAPair]) -> list[Correction]:
        prepared = [self._prepare(p) for p in pairs]
        try:
            rows = self._generate(self._inputs(prepared), [p.max_new_tokens for p in prepared])
        except (RuntimeError, ValueError) as exc:
            raise CorrectorError(f"{self.model_id}: generation failed: {exc}") from exc
        return [self._finish(row, p, pair) for row, p, pair in zip(rows, prepared, pairs)]

    def stream_correction(self, pair: QAPair) -> Iterator[str | Correction]:
        prepared = self._prepare(pair)
        inputs = self._inputs([prepared])
        streamer = TextIteratorStreamer(
            self.loaded.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600
        )
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["out"] = self._generate(inputs, [prepared.max_new_tokens], streamer)[0]
            except Exception as exc:  # surfaced to the caller below
                box["error"] = exc
                streamer.end()

        worker = threading.Thread(target=run, name="aligner-generate", daemon=True)
        worker.start()
        yield from trim_stream(streamer)
        worker.join()
        if "error" in box:
            raise CorrectorError(f"{self.model_id}: generation failed: {box['error']}") from box[
                "error"
            ]
        final = self._finish(box["out"], prepared, pair)
        if final.info.get("kept"):
            yield final.text  # the keep token streamed nothing: the answer is the correction
        yield final


def _keep_id(model: Any, tokenizer: Any, source: str) -> int | None:
    """The id of the model's keep token (``config.aligner_keep_token``), if it was trained with
    one; a config naming a token the tokenizer lacks is a broken model folder."""
    token = getattr(model.config, "aligner_keep_token", None)
    if token is None:
        return None
    found = tokenizer.get_vocab().get(token)
    if found is None:
        raise ModelLoadError(
            f"{source}: config.json names the keep token {token!r}, which its tokenizer lacks"
        )
    return found


def _keep_bias(model: Any, keep_id: int | None, given: float | None, source: str) -> float:
    """The keep token's first-step logit offset: as given, else the config's, else 0."""
    bias = getattr(model.config, "aligner_keep_bias", None) if given is None else given
    if bias is None:
        return 0.0
    if isinstance(bias, bool) or not isinstance(bias, int | float) or not math.isfinite(bias):
        raise ConfigurationError(f"{source}: keep_bias must be a finite number, got {bias!r}")
    if bias and keep_id is None:
        raise ConfigurationError(f"{source}: keep_bias needs a model trained with a keep token")
    return float(bias)


class _FirstTokenBias(LogitsProcessor):
    """Adds fixed offsets to some tokens' scores at the first generated position only."""

    def __init__(self, prompt_width: int, bias: dict[int, float]) -> None:
        self.prompt_width = prompt_width
        self.tokens = torch.tensor(list(bias))
        self.offsets = torch.tensor(list(bias.values()))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] != self.prompt_width:
            return scores
        scores = scores.clone()
        scores[:, self.tokens.to(scores.device)] += self.offsets.to(scores.device, scores.dtype)
        return scores


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids = model.generation_config.eos_token_id
    found = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        found.add(tokenizer.eos_token_id)
    return found
