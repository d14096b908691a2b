"""``aligner-chain train``: residual-correction fine-tuning of a causal LM on Q-A-C data."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from aligner_chain.errors import ConfigurationError, InputError

# CLI flag -> TrainConfig field. Unset flags keep TrainConfig's (or the preset's) value.
_OVERRIDES = {
    "template": "template",
    "warmup_share": "warmup_share",
    "epochs": "epochs",
    "lr": "learning_rate",
    "batch_size": "batch_size",
    "grad_accum": "grad_accum",
    "max_length": "max_length",
    "save_steps": "save_steps",
    "max_steps": "max_steps",
    "seed": "seed",
    "device": "device",
    "lora_r": "lora_r",
    "keep_token": "keep_token",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a corrector (an Aligner) on question/answer/correction data",
        description=(
            "Fine-tunes any causal LM to rewrite answers: identity warm-up on Q-A-A copies "
            "first, then Q-A-C; loss on the correction tokens only; the same prompt template "
            "as inference. Checkpoints go to OUT/checkpoints; --resume continues from the last. "
            "--preset mini builds the shipped mini Aligner from the shared data instead."
        ),
    )
    parser.add_argument("--data", type=Path, help="Q-A-C JSONL, a JSON list, or a correction log")
    parser.add_argument("--model", help="the causal LM folder (or hub id) to fine-tune")
    parser.add_argument("--out", type=Path, required=True, help="folder for the trained model")
    parser.add_argument("--preset", choices=["mini"], help="train the embedded mini Aligner")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("ALIGNER_DATA_DIR", "../shared/data")),
        help="the shared data, for --preset mini (default: $ALIGNER_DATA_DIR or %(default)s)",
    )
    parser.add_argument(
        "--template", help="prompt preset or format string (default: aligner-7b-v1.0)"
    )
    parser.add_argument("--warmup-share", type=float, help="share copied as Q-A-A (default 0.2)")
    parser.add_argument("--epochs", type=float, help="passes over the data (default 3)")
    parser.add_argument("--lr", type=float, help="peak learning rate (default 2e-5)")
    parser.add_argument("--batch-size", type=int, help="examples per batch (default 4)")
    parser.add_argument("--grad-accum", type=int, help="batches per optimizer step (default 1)")
    parser.add_argument("--max-length", type=int, help="longer examples are skipped (default 1024)")
    parser.add_argument("--save-steps", type=int, help="checkpoint every N steps (default 200)")
    parser.add_argument("--max-steps", type=int, help="stop (resumably) after this step")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--device", help="auto (GPU if present; default), cpu, cuda, ...")
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters (needs peft)")
    parser.add_argument("--lora-r", type=int, help="LoRA rank (default 16)")
    parser.add_argument(
        "--keep-token",
        help="train copies (correction = answer) to emit this one special token, which the "
        "corrector expands back to the answer exactly (e.g. '<|keep|>'; the mini preset's)",
    )
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here so that `aligner-chain --help` does not load torch.
    from aligner_chain.training.corrector import train_corrector

    overrides = {
        field: getattr(args, flag)
        for flag, field in _OVERRIDES.items()
        if getattr(args, flag) is not None
    }
    if args.lora:
        overrides["lora"] = True
    progress = not args.no_progress
    if args.preset == "mini":
        from aligner_chain.training.mini import MiniConfig, train_mini

        if args.data or args.model:
            raise InputError("--preset mini builds its own data and model: drop --data/--model")
        preset = MiniConfig().train.model_dump()
        config = MiniConfig(train=_train_config({**preset, **overrides}))
        command = shlex.join(["aligner-chain", *sys.argv[1:]])
        result, report = train_mini(
            args.data_dir, args.out, config, resume=args.resume, progress=progress, command=command
        )
        if report is not None:
            summary = {k: v for k, v in report.items() if k not in ("examples", "config")}
            print(json.dumps(summary, indent=2), file=sys.stderr)
    else:
        from aligner_chain.training.data import read_qac

        if args.data is None or args.model is None:
            raise InputError("--data and --model are required (or use --preset mini)")
        config = _train_config(overrides)
        result = train_corrector(
            read_qac(args.data),
            args.model,
            args.out,
            config,
            resume=args.resume,
            progress=progress,
        )
    state = "finished" if result.finished else "stopped (resume with --resume)"
    last = f"{result.losses[-1]:.4f}" if result.losses else "n/a"
    print(
        f"{state} at step {result.steps}/{result.total_steps} in {result.seconds:.0f}s, "
        f"last loss {last}: {args.out}",
        file=sys.stderr,
    )
    return 0


def _train_config(settings: dict[str, Any]) -> Any:
    """``TrainConfig`` from CLI settings; an invalid value is a usage error naming the flag's
    field, not a pydantic traceback."""
    from pydantic import ValidationError

    from aligner_chain.training.corrector import TrainConfig

    try:
        return TrainConfig(**settings)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False)
        )
        raise ConfigurationError(f"invalid training setting: {problems}") from exc
