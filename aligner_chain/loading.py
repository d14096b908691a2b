"""Loading Hugging Face models once per process.

Correctors and classifiers built on the same (model, device, dtype) share one set of weights:
a 7B Aligner loaded twice would double the memory for nothing. Loads are guarded by a per-key
lock so concurrent constructors wait for the first load instead of racing it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from aligner_chain.errors import ConfigurationError, ModelLoadError

DeviceSpec = Literal["auto", "cpu", "cuda", "mps"] | str
DtypeSpec = Literal["auto", "float32", "bfloat16", "float16"] | str


def resolve_device(device: DeviceSpec = "auto") -> torch.device:
    """``auto`` picks CUDA if present, else Apple MPS, else the CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ConfigurationError(f"unknown device {device!r}") from exc


def resolve_dtype(dtype: DtypeSpec, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 on CUDA (what Aligners are trained in) and fp32 elsewhere."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ConfigurationError(f"unknown dtype {dtype!r}")
    return value


def check_model_source(model: str) -> str:
    """Fail early, with a clear message, on a local path that does not exist.

    A string that exists on disk is a local model folder; one that looks like a path (starts with
    ``.``, ``/`` or ``~``, or has more than one ``/``) but does not exist is an error; anything
    else is taken as a hub id, which resolves only when the hub or its cache is reachable.
    """
    if not isinstance(model, str) or not model.strip():
        raise ConfigurationError("a model path or hub id is required")
    path = Path(model).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.json").exists():
            raise ModelLoadError(f"{model}: folder has no config.json, so it is not a model folder")
        return str(path)
    if model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model:
        raise ModelLoadError(f"model path not found: {model}")
    return model


@dataclass(frozen=True, slots=True)
class LoadKey:
    kind: str
    model: str
    device: str
    dtype: str
    options: tuple[tuple[str, str], ...] = ()


_CACHE: dict[LoadKey, Any] = {}
_LOCKS: dict[LoadKey, threading.Lock] = {}
_GUARD = threading.Lock()


def load_once(key: LoadKey, loader: Callable[[], Any]) -> Any:
    """Return the cached object for ``key``, calling ``loader`` only for the first request."""
    with _GUARD:
        if key in _CACHE:
            return _CACHE[key]
        lock = _LOCKS.setdefault(key, threading.Lock())
    with lock:
        if key not in _CACHE:
            try:
                _CACHE[key] = loader()
            except (OSError, ValueError, KeyError) as exc:
                raise ModelLoadError(f"could not load {key.model!r}: {exc}") from exc
        return _CACHE[key]


def clear_cache() -> None:
    """Drop every cached model (mainly for tests and long-lived notebooks)."""
    with _GUARD:
        _CACHE.clear()
        _LOCKS.clear()


@dataclass
class LoadedModel:
    """A model and tokenizer shared by every component built on the same weights."""

    model: Any
    tokenizer: Any
    device: torch.device
    context: int
    # Fast tokenizers mutate their Rust backend when padding/truncation settings change, which
    # fails under concurrent calls ("Already borrowed"): tokenization is serialised.
    lock: threading.Lock = field(default_factory=threading.Lock)


def load_pretrained(
    auto_class: Any,
    model: str,
    *,
    device: DeviceSpec = "auto",
    dtype: DtypeSpec = "auto",
    device_map: str | dict[str, Any] | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load (once per process) a model through a transformers Auto class, with its tokenizer.

    The tokenizer gets a pad token when it has none (EOS, else UNK), so batches can be padded.
    """
    from transformers import AutoTokenizer

    source = check_model_source(model)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    key = LoadKey(
        auto_class.__name__,
        source,
        str(device_map or dev),
        str(torch_dtype),
        (("trust_remote_code", str(trust_remote_code)),),
    )

    def loader() -> LoadedModel:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
        if device_map is not None:
            kwargs["device_map"] = device_map
        loaded = auto_class.from_pretrained(source, **kwargs)
        if device_map is None:
            loaded.to(dev)
        loaded.eval()
        if getattr(loaded.config, "pad_token_id", None) is None:
            loaded.config.pad_token_id = tokenizer.pad_token_id
        context = getattr(loaded.config, "max_position_embeddings", None) or 0
        limit = getattr(tokenizer, "model_max_length", 0) or 0
        if 0 < limit < 1_000_000:
            context = min(context, limit) if context else limit
        return LoadedModel(loaded, tokenizer, loaded.device, context or 2048)

    return load_once(key, loader)
