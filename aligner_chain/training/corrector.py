"""Residual-correction fine-tuning of a causal LM into an Aligner (Ji et al. 2024, §2).

The recipe the paper describes and its released code implements:

- The input is the same prompt template the corrector uses at inference, and the target is the
  correction followed by EOS; the loss covers only the correction tokens (prompt labels are -100).
- Identity warm-up: first a pass over Q-A-A copies made from ``warmup_share`` of the examples
  (correction := answer), so the model learns to copy; then the Q-A-C examples. The paper found
  20 % best with 50K examples; a corrector that has not learnt to copy rewrites safe answers.
- AdamW (β = 0.9, 0.95), cosine schedule with 3 % warm-up, as in the released training script.

The whole run is a deterministic plan of batches (seeded), so a checkpoint only has to remember
the step it reached: resuming replays nothing and skips nothing.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

from aligner_chain.errors import ConfigurationError, InputError, ModelLoadError
from aligner_chain.loading import check_model_source, resolve_device
from aligner_chain.templates import PromptTemplate
from aligner_chain.training.data import QACExample

logger = logging.getLogger(__name__)

TRAINING_INFO = "aligner_training.json"
"""Written beside the trained weights: the template, data counts and losses of the run."""
_CHECKPOINTS = "checkpoints"
_STATE = "trainer_state.pt"


class TrainConfig(BaseModel):
    """Hyper-parameters. Defaults follow the paper's script except the learning rate, which is
    the script's 2e-5 only for large pretrained models; small or from-scratch models need more."""

    model_config = ConfigDict(extra="forbid")

    template: str | None = None
    warmup_share: float = Field(default=0.2, ge=0.0, le=1.0)
    epochs: float = Field(default=3.0, gt=0)
    learning_rate: float = Field(default=2e-5, gt=0)
    batch_size: int = Field(default=4, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    max_length: int = Field(default=1024, ge=8)
    weight_decay: float = Field(default=0.0, ge=0)
    schedule_warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    save_steps: int = Field(default=200, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    seed: int = 42
    lora: bool = False
    lora_r: int = Field(default=16, ge=1)
    lora_alpha: int = Field(default=32, ge=1)
    device: str = "auto"
    batch_tokens: int | None = Field(default=None, ge=8)
    """Token budget per batch instead of a fixed ``batch_size``: each epoch's examples are sorted
    by length and cut into batches of at most this many (padded) tokens, so short examples come
    many to a batch and padding is nearly nil; the batches are then shuffled."""
    curriculum: bool = False
    """With ``batch_tokens``: the first epoch of each phase runs short batches first."""
    first_token_weight: float = Field(default=1.0, ge=0)
    """Loss weight of each correction's first token: the copy-or-rewrite decision."""
    eos_weight: float = Field(default=1.0, ge=0)
    """Loss weight of the EOS that ends each correction (where a copy must stop)."""
    threads: int | None = Field(default=None, ge=1)
    """torch CPU threads (``torch.set_num_threads``); None leaves torch's default."""
    keep_token: str | None = Field(default=None, min_length=1, pattern=r"\S")
    """Teach a one-token answer to "no change needed": examples whose correction equals the
    answer are trained to emit this special token (added to the tokenizer if missing) and EOS,
    and the saved model's config names it (``aligner_keep_token``), so
    :class:`~aligner_chain.TransformersCorrector` expands it back to the answer byte for byte.
    A small model then never has to copy a long answer token by token to leave it unchanged."""


@dataclass
class TrainResult:
    """What a run did: optimizer steps taken (in total, over resumes) and the loss of each."""

    out: Path
    steps: int
    total_steps: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    finished: bool = False


@dataclass(frozen=True)
class _Tokenized:
    input_ids: list[int]
    labels: list[int]
    phase: str


def load_tokenizer(model: str) -> Any:
    """The model's tokenizer; a folder without one is a clear error, not a deep traceback."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"{model}: no usable tokenizer in the model folder ({exc})") from exc
    if tokenizer.eos_token_id is None:
        raise ModelLoadError(f"{model}: the tokenizer has no EOS token to end corrections with")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def encode_example(
    tokenizer: Any,
    template: PromptTemplate,
    example: QACExample,
    phase: str,
    keep_token_id: int | None = None,
) -> _Tokenized:
    """Prompt tokens as the corrector builds them at inference, then correction + EOS.

    The prompt is tokenized alone (special-token text split, as at inference). The correction is
    taken from the joint tokenization when the prompt's tokens are its prefix, so the boundary
    token matches what the model would naturally produce; otherwise it is tokenized alone. With
    ``keep_token_id``, a correction equal to the answer is that one token instead.
    """
    prompt = template.format(example.question, example.answer)
    prompt_ids = tokenizer(prompt, split_special_tokens=True)["input_ids"]
    if keep_token_id is not None and example.correction == example.answer:
        target = [keep_token_id]
    else:
        joint = tokenizer(prompt + " " + example.correction, split_special_tokens=True)
        if joint["input_ids"][: len(prompt_ids)] == prompt_ids:
            target = joint["input_ids"][len(prompt_ids) :]
        else:
            target = tokenizer(
                " " + example.correction, add_special_tokens=False, split_special_tokens=True
            )["input_ids"]
    target = [*target, tokenizer.eos_token_id]
    return _Tokenized(prompt_ids + target, [-100] * len(prompt_ids) + target, phase)


def plan_batches(
    examples: Sequence[QACExample],
    config: TrainConfig,
    length: Callable[[tuple[str, QACExample]], int | None] | None = None,
) -> list[list[tuple[str, QACExample]]]:
    """The run's batches in order: warm-up copies (every epoch), then Q-A-C (every epoch).

    Epochs may be fractional (e.g. 0.5 = half the shuffled data), for time-boxed CPU runs.
    With ``config.batch_tokens``, ``length`` gives each item's token count (None: too long,
    left out) and batches are bucketed by length under that budget.
    """
    rng = random.Random(config.seed)
    n_copies = round(len(examples) * config.warmup_share)
    copies = [
        ("warmup", QACExample(e.question, e.answer, e.answer))
        for e in rng.sample(list(examples), n_copies)
    ]
    main = [("qac", e) for e in examples]
    batches: list[list[tuple[str, QACExample]]] = []
    for items in (copies, main):
        if not items:
            continue
        if config.batch_tokens is not None:
            if length is None:
                raise ConfigurationError("batch_tokens needs the examples' token lengths")
            batches.extend(_bucketed(items, config, length, rng))
            continue
        ordered: list[tuple[str, QACExample]] = []
        for _ in range(math.ceil(config.epochs)):
            shuffled = items[:]
            rng.shuffle(shuffled)
            ordered.extend(shuffled)
        ordered = ordered[: max(1, round(len(items) * config.epochs))]
        size = config.batch_size
        batches.extend(ordered[i : i + size] for i in range(0, len(ordered), size))
    return batches


def _bucketed(
    items: list[tuple[str, QACExample]],
    config: TrainConfig,
    length: Callable[[tuple[str, QACExample]], int | None],
    rng: random.Random,
) -> list[list[tuple[str, QACExample]]]:
    """One phase's batches by token budget: per epoch, sort by length, cut, shuffle the cuts."""
    sized = [(n, item) for item in items if (n := length(item)) is not None]
    budget = config.batch_tokens or 0
    batches: list[list[tuple[str, QACExample]]] = []
    remaining = max(1, round(len(items) * config.epochs))
    for epoch in range(math.ceil(config.epochs)):
        shuffled = sized[:]
        rng.shuffle(shuffled)
        shuffled = shuffled[: max(0, remaining)]
        remaining -= len(items)
        shuffled.sort(key=lambda pair: pair[0])  # stable: ties keep the shuffled order
        cuts: list[list[tuple[str, QACExample]]] = []
        for n, item in shuffled:
            if cuts and (len(cuts[-1]) + 1) * n <= budget:
                cuts[-1].append(item)
            else:
                cuts.append([item])
        if not (config.curriculum and epoch == 0):
            rng.shuffle(cuts)
        batches.extend(cuts)
    return batches


def _collate(items: list[_Tokenized], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(t.input_ids) for t in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, t in enumerate(items):
        n = len(t.input_ids)
        ids[row, :n] = torch.tensor(t.input_ids)
        labels[row, :n] = torch.tensor(t.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _token_weights(targets: torch.Tensor, config: TrainConfig) -> torch.Tensor | None:
    """Per-token loss weights: the first correction token and the EOS of each row weighted as
    configured, every other correction token 1 (None when all weights are 1)."""
    if config.first_token_weight == 1.0 and config.eos_weight == 1.0:
        return None
    active = targets != -100
    weights = active.float()
    rows = active.any(1).nonzero().squeeze(-1)
    positions = torch.arange(targets.shape[1], device=targets.device)
    first = torch.where(active, positions, targets.shape[1]).min(1).values
    last = torch.where(active, positions, -1).max(1).values
    weights[rows, first[rows]] = config.first_token_weight
    weights[rows, last[rows]] = config.eos_weight
    return weights


def _fingerprint(examples: Sequence[QACExample], model: str, config: TrainConfig) -> str:
    """Identifies data + settings, so ``--resume`` refuses a checkpoint of a different run."""
    digest = hashlib.sha256()
    for e in examples:
        digest.update(json.dumps(asdict(e), ensure_ascii=False).encode())
    settings = config.model_dump(exclude={"max_steps", "save_steps", "keep_checkpoints", "device"})
    digest.update(json.dumps([str(model), settings], sort_keys=True).encode())
    return digest.hexdigest()[:16]


def add_keep_token(tokenizer: Any, token: str) -> int:
    """The id of ``token`` in ``tokenizer``, added as a special token when it is missing
    (special, so answer text that spells it is split at inference and cannot trigger it).

    An ordinary token of the vocabulary is refused: the model would also emit it inside normal
    text, and every such correction would turn into the unchanged answer."""
    if token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [token]})
    elif token not in tokenizer.all_special_tokens:
        raise ConfigurationError(
            f"keep token {token!r} is an ordinary token of this tokenizer; pick a string it does "
            "not have (e.g. '<|keep|>')"
        )
    return tokenizer.convert_tokens_to_ids(token)


def _build_model(
    model: str, config: TrainConfig, device: torch.device, vocab: int, keep_id: int | None
) -> Any:
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    if vocab > lm.get_input_embeddings().num_embeddings:
        lm.resize_token_embeddings(vocab)
    if config.keep_token is not None:
        lm.config.aligner_keep_token = config.keep_token
    if config.lora:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as exc:
            raise ConfigurationError("LoRA needs peft: pip install 'aligner-chain[train]'") from exc
        lora = LoraConfig(
            task_type="CAUSAL_LM",
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=0.0,
            target_modules="all-linear",
            # The keep token is new: its embedding row must learn although the rest is frozen.
            trainable_token_indices=None if keep_id is None else [keep_id],
        )
        lm = get_peft_model(lm, lora)
    return lm.to(device)


def _trainable_state(lm: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in lm.named_parameters() if p.requires_grad}


def _latest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / _CHECKPOINTS).glob("step-*"), key=lambda p: int(p.name[5:]))
    return found[-1] if found else None


def _save_checkpoint(
    out: Path, step: int, lm: Any, optimizer: Any, scheduler: Any, state: dict[str, Any], keep: int
) -> None:
    """Written to a temporary folder and renamed, so a crash never leaves a half checkpoint."""
    root = out / _CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(
        {
            **state,
            "step": step,
            "weights": _trainable_state(lm),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
        },
        tmp / _STATE,
    )
    final = root / f"step-{step}"
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(root.glob("step-*"), key=lambda p: int(p.name[5:]))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def train_corrector(
    examples: Sequence[QACExample],
    model: str,
    out: str | Path,
    config: TrainConfig | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Fine-tune ``model`` (a folder or hub id of a causal LM) into a corrector saved in ``out``.

    The saved folder loads with :class:`~aligner_chain.TransformersCorrector` using the same
    template (LoRA adapters are merged in). With ``config.max_steps`` the run stops at that step
    with a checkpoint; ``resume=True`` continues from the latest checkpoint in ``out``.
    """
    config = config or TrainConfig()
    if not examples:
        raise InputError("no training examples")
    source = check_model_source(model)
    out = Path(out)
    template = PromptTemplate.resolve(config.template)
    tokenizer = load_tokenizer(source)
    keep_id = None if config.keep_token is None else add_keep_token(tokenizer, config.keep_token)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    if config.threads is not None:
        torch.set_num_threads(config.threads)

    cache: dict[tuple[str, QACExample], _Tokenized | None] = {}

    def tokenized(item: tuple[str, QACExample]) -> _Tokenized | None:
        if item not in cache:
            t = encode_example(tokenizer, template, item[1], item[0], keep_id)
            cache[item] = t if len(t.input_ids) <= config.max_length else None
        return cache[item]

    def length(item: tuple[str, QACExample]) -> int | None:
        t = tokenized(item)
        return None if t is None else len(t.input_ids)

    plan = plan_batches(examples, config, length)

    total_steps = math.ceil(len(plan) / config.grad_accum)
    fingerprint = _fingerprint(examples, source, config)

    lm = _build_model(source, config, device, len(tokenizer), keep_id)
    lm.train()
    optimizer = torch.optim.AdamW(
        [p for p in lm.parameters() if p.requires_grad],
        lr=config.learning_rate,
        betas=(0.9, 0.95),
        weight_decay=config.weight_decay,
    )
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, math.ceil(total_steps * config.schedule_warmup_ratio), total_steps
    )
    step, losses, skipped = 0, [], 0
    checkpoint = _latest_checkpoint(out) if resume else None
    if resume and checkpoint is None:
        logger.warning("no checkpoint in %s: training from the start", out)
    if checkpoint is not None:
        state = torch.load(checkpoint / _STATE, map_location="cpu", weights_only=True)
        if state["fingerprint"] != fingerprint:
            raise ConfigurationError(
                f"{checkpoint}: the checkpoint was made with other data, model or settings; "
                "train into a new --out folder or drop --resume"
            )
        lm.load_state_dict(state["weights"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, losses, skipped = state["step"], state["losses"], state["skipped"]
        logger.info("resumed from %s at step %d of %d", checkpoint, step, total_steps)

    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    slice_logits = "logits_to_keep" in inspect.signature(base.forward).parameters
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    stop = min(total_steps, config.max_steps or total_steps)
    started = time.perf_counter()
    bar = tqdm(total=total_steps, initial=step, disable=not progress, unit="step", desc="train")
    while step < stop:
        group = plan[step * config.grad_accum : (step + 1) * config.grad_accum]
        batches = [[t for t in map(tokenized, batch) if t is not None] for batch in group]
        skipped_here = sum(len(b) for b in group) - sum(len(b) for b in batches)
        n_tokens = sum(sum(x != -100 for x in t.labels) for b in batches for t in b)
        step_loss = 0.0
        for batch in batches:
            if not batch:
                continue
            inputs = {k: v.to(device) for k, v in _collate(batch, tokenizer.pad_token_id).items()}
            targets = inputs.pop("labels")[:, 1:]
            weights = _token_weights(targets, config)
            # Logits only where some row predicts a correction token: the prompt is most of
            # the sequence, and the vocabulary projection is the costliest layer of small models.
            keep = (targets != -100).any(0).nonzero().squeeze(-1)
            with autocast:
                if slice_logits:
                    logits = lm(**inputs, logits_to_keep=keep).logits.float()
                else:
                    logits = lm(**inputs).logits[:, keep].float()
            # Sum over the correction tokens of the whole accumulated step, then one division,
            # so every token weighs the same whatever batch it landed in.
            token_losses = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                targets[:, keep].reshape(-1),
                ignore_index=-100,
                reduction="none",
            )
            if weights is not None:
                token_losses = token_losses * weights[:, keep].reshape(-1)
            loss = token_losses.sum() / max(n_tokens, 1)
            loss.backward()
            step_loss += loss.item()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        skipped += skipped_here
        losses.append(step_loss)
        phase = group[0][0][0] if group and group[0] else "qac"
        bar.set_postfix(loss=f"{step_loss:.3f}", phase=phase)
        bar.update(1)
        if step % config.save_steps == 0 or step == stop:
            _save_checkpoint(
                out,
                step,
                lm,
                optimizer,
                scheduler,
                {"fingerprint": fingerprint, "losses": losses, "skipped": skipped},
                config.keep_checkpoints,
            )
    bar.close()
    result = TrainResult(out, step, total_steps, losses, time.perf_counter() - started)
    if skipped:
        logger.warning(
            "%d example passes were longer than %d tokens and skipped", skipped, config.max_length
        )
    if step == total_steps:
        _save_final(lm, tokenizer, out, config, template, examples, result)
        result.finished = True
    return result


def _save_final(
    lm: Any,
    tokenizer: Any,
    out: Path,
    config: TrainConfig,
    template: PromptTemplate,
    examples: Sequence[QACExample],
    result: TrainResult,
) -> None:
    if config.lora:
        lm = lm.merge_and_unload()
    lm.eval()
    lm.generation_config.eos_token_id = tokenizer.eos_token_id
    lm.generation_config.pad_token_id = tokenizer.pad_token_id
    lm.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = {
        "template": template.text,
        "examples": len(examples),
        "warmup_share": config.warmup_share,
        "config": config.model_dump(),
        "steps": result.steps,
        "first_losses": result.losses[:10],
        "last_losses": result.losses[-10:],
    }
    (out / TRAINING_INFO).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
