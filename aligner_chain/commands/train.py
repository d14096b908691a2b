"""``aligner-chain train``: residual-correction fine-tuning of a causal LM on Q-A-C data."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from aligner_chain.templates import DEFAULT_TEMPLATE


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a corrector (an Aligner) on question/answer/correction data",
        description=(
            "Fine-tunes any causal LM to rewrite answers: identity warm-up on Q-A-A copies "
            "first, then Q-A-C; loss on the correction tokens only; the same prompt template "
            "as inference. Checkpoints go to OUT/checkpoints; --resume continues from the last."
        ),
    )
    parser.add_argument(
        "--data", type=Path, required=True, help="Q-A-C JSONL, a JSON list, or a correction log"
    )
    parser.add_argument("--model", required=True, help="the causal LM folder (or hub id)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the trained model")
    parser.add_argument(
        "--template", default=DEFAULT_TEMPLATE, help="prompt preset or format string"
    )
    parser.add_argument("--warmup-share", type=float, default=0.2, help="share copied as Q-A-A")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--lr", type=float, default=2e-5, help="learning rate")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=1024, help="longer examples are skipped")
    parser.add_argument("--save-steps", type=int, default=200, help="checkpoint every N steps")
    parser.add_argument("--max-steps", type=int, help="stop (resumably) after this step")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, ...")
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters (needs peft)")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here so that `aligner-chain --help` does not load torch.
    from aligner_chain.training.corrector import TrainConfig, train_corrector
    from aligner_chain.training.data import read_qac

    config = TrainConfig(
        template=args.template,
        warmup_share=args.warmup_share,
        epochs=args.epochs,
        learning_rate=args.lr,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_length=args.max_length,
        save_steps=args.save_steps,
        max_steps=args.max_steps,
        seed=args.seed,
        device=args.device,
        lora=args.lora,
        lora_r=args.lora_r,
    )
    examples = read_qac(args.data)
    result = train_corrector(
        examples, args.model, args.out, config, resume=args.resume, progress=not args.no_progress
    )
    state = "finished" if result.finished else "stopped (resume with --resume)"
    last = f"{result.losses[-1]:.4f}" if result.losses else "n/a"
    print(
        f"{state} at step {result.steps}/{result.total_steps} in {result.seconds:.0f}s, "
        f"last loss {last}: {args.out}",
        file=sys.stderr,
    )
    return 0
