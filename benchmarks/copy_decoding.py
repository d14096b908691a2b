"""Copy-aware decoding: speed-up over plain greedy ``generate`` on real Aligner corrections.

    python benchmarks/copy_decoding.py                 # --data-dir ../shared/data --size small
    python benchmarks/copy_decoding.py --model <dir>   # a real (trained) Aligner instead

Data: the Aligner-2B question/original/correction triples of AlpacaEval
(``alpaca_eval_aligner2b``). A correction's *copy share* is the fraction of its tokens inside a
token 3-gram that also occurs in the original answer. Subsets: ``copy_heavy`` (share >= 0.8),
``rewrite_heavy`` (share <= 0.2) and ``real_mix`` (a seeded random sample of all triples).

Model: without ``--model``, a random Llama of the chosen size *replays* the real correction:
its forward pass is the real computation, and the token it picks greedily at each position is
the one Aligner-2B wrote there. Its drafts are therefore accepted or rejected exactly as they
would be for Aligner-2B's output, at this model's cost per forward pass, and every correction
is decoded to the end. A random model cannot copy by itself, and a tiny model trained for
minutes on CPU rewrites nothing like a real Aligner does. With ``--bias 1.5`` the replay is
weak and the random model's own logits, near-ties included, decide many tokens (an exactness
stress test). With ``--model`` the model's own greedy output is decoded instead (e.g. the
embedded mini Aligner).

Both variants run through ``TransformersCorrector.correct`` of one pair (copy drafts on and
off), interleaved; outputs must be identical. ``batch_*``: the subset's pairs in one
``correct`` call (one left-padded batch), copy drafts on and off, timed in the same turns.
Corrections are capped at ``--max-new-tokens``.
Ablations, timed in the same turns: ``copy_no_backoff`` drafts at every step even after misses;
``loop_no_drafts`` runs the copy-aware decoding loop with drafting disabled, which shows how
much of a speed-up comes from the loop's lower per-step overhead rather than from drafts;
``hf_prompt_lookup`` is transformers' ``generate(prompt_lookup_num_tokens=10)``.
``copy`` drafts from the input only (``draft_memory=0``: the runs repeat the same corrections,
which a memory would recall whole); ``memory`` / ``memory_batch`` are the shipped default,
their draft memory refilled before every call with the corrections of 64 *other* triples
(``TransformersCorrector.remember``), as a deployment's memory holds other requests' output.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

from _bench import ROOT, interleaved, median, parse, parser, ratios, write

SIZES = {
    "tiny": {"hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2},
    "small": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4},
    "medium": {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8},
}
TEMPLATE = "aligner-revision"  # the prompt the AlpacaEval Aligner-2B runs used
MEMORY_OTHERS = 64  # other triples' corrections in the draft memory of the `memory` variants


def load_triples(data_dir: Path) -> list[dict[str, str]]:
    rows = []
    for path in sorted((data_dir / "alpaca_eval_aligner2b").glob("*.json")):
        rows += json.loads(path.read_text())
    return [r for r in rows if r["original_output"].strip() and r["output"].strip()]


def build_tokenizer(texts: list[str], out: Path) -> Any:
    """A byte-level BPE with 8k tokens trained on the texts, so answers have realistic lengths."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=8000,
        special_tokens=list(special.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **special)
    fast.save_pretrained(out)
    return fast


def build_replay_model(tokenizer: Any, size: str, out: Path, bias: float) -> type:
    """Save a random Llama of ``size`` to ``out``; return its replaying subclass, which adds
    ``bias`` to the scripted token's logit."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    class ReplayLlama(LlamaForCausalLM):
        """Real forward passes; the greedy choice at each position is the scripted token of
        that row. A row's script position is its token position (``position_ids`` when given,
        as in padded batches) minus its prompt length; rows that leave copy decoding's batch
        are followed through the cache's ``batch_select_indices``."""

        scripts: ClassVar[list[list[int]]] = []
        prompt_lens: ClassVar[list[int]] = []
        rows: ClassVar[list[int]] = []
        head: ClassVar[int] = 0  # prompt tokens already cached when a prefill starts

        def forward(self, input_ids: Any = None, position_ids: Any = None, **kwargs: Any) -> Any:
            # The cache arrives as ``cache`` (transformers 5.x) or ``past_key_values`` (4.x).
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            past = 0 if cache is None else cache.get_seq_length()
            if position_ids is None:
                position_ids = torch.arange(past, past + input_ids.shape[1]).expand_as(input_ids)
            out = super().forward(input_ids=input_ids, position_ids=position_ids, **kwargs)
            if past <= self.head:  # a prefill (after the template head's cached tokens)
                ReplayLlama.rows = list(range(input_ids.shape[0]))
                cache = getattr(out, "cache", None) or out.past_key_values  # 5.x or 4.x name
                select = cache.batch_select_indices

                def follow(indices: torch.Tensor) -> None:
                    ReplayLlama.rows = [ReplayLlama.rows[i] for i in indices.tolist()]
                    select(indices)

                cache.batch_select_indices = follow
            width = out.logits.shape[1]
            for row, index in enumerate(self.rows):
                script = self.scripts[index]
                for i, position in enumerate(position_ids[row, -width:].tolist()):
                    j = position + 1 - self.prompt_lens[index]  # script index predicted here
                    if 0 <= j < len(script):
                        out.logits[row, i, script[j]] += bias
            return out

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **SIZES[size],
    )
    LlamaForCausalLM(config).save_pretrained(out)
    return ReplayLlama


def copy_share(original: list[int], correction: list[int], n: int = 3) -> float:
    """Fraction of the correction's tokens inside an n-gram that also occurs in the original."""
    grams = {tuple(original[i : i + n]) for i in range(len(original) - n + 1)}
    covered = [False] * len(correction)
    for i in range(len(correction) - n + 1):
        if tuple(correction[i : i + n]) in grams:
            covered[i : i + n] = [True] * n
    return sum(covered) / max(1, len(correction))


def patched(fn: Any, *args: Any, **constants: int) -> Any:
    """Run ``fn`` with copy-decoding constants overridden (ablations)."""
    from aligner_chain.correctors import copy_decoding

    saved = {name: getattr(copy_decoding, name) for name in constants}
    for name, value in constants.items():
        setattr(copy_decoding, name, value)
    try:
        return fn(*args)
    finally:
        for name, value in saved.items():
            setattr(copy_decoding, name, value)


def main() -> None:
    p = parser(__doc__ or "", "copy_decoding.json")
    p.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--model", type=Path, default=None, help="a real model folder (no replay)")
    p.add_argument("--template", default=TEMPLATE, help="prompt preset for --model")
    p.add_argument("--mini", action="store_true", help="the embedded mini Aligner as --model")
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--examples", type=int, default=8, help="triples per subset")
    p.add_argument("--max-new-tokens", type=int, default=192)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--bias",
        type=float,
        default=1e4,
        help="logit bonus of the replayed token; a small one (e.g. 1.5) lets the random "
        "model's own logits, near-ties included, decide many tokens: an exactness stress test",
    )
    args = parse(p)
    started = time.time()

    import torch

    from aligner_chain import QAPair, TransformersCorrector
    from aligner_chain.correctors.copy_decoding import copy_greedy_generate
    from aligner_chain.correctors.transformers import GenerationSettings

    if args.mini:
        from aligner_chain.correctors import mini

        args.model, args.template = mini.ASSET_DIR, mini.TEMPLATE
    triples = load_triples(args.data_dir)
    work = Path(tempfile.mkdtemp(prefix="bench-copy-"))
    replay = None
    if args.model is None:
        texts = [t[k] for t in triples for k in ("instruction", "original_output", "output")]
        tokenizer = build_tokenizer(texts, work)
        replay = build_replay_model(tokenizer, args.size, work, args.bias)
    path = str(args.model or work)
    cap = GenerationSettings(max_new_tokens_cap=args.max_new_tokens)
    # Drafts from the input only: the runs repeat the same corrections, which a draft memory
    # would recall whole. `remembering` has the memory, filled with *other* corrections.
    copying = TransformersCorrector(
        path,
        template=args.template,
        generation=cap.model_copy(update={"draft_memory": 0}),
        batching=False,
    )
    remembering = TransformersCorrector(
        path, template=args.template, generation=cap, batching=False
    )
    plain = TransformersCorrector(
        path,
        template=args.template,
        generation=cap.model_copy(update={"copy_drafts": False}),
        batching=False,
    )
    lookup = TransformersCorrector(  # transformers' own prompt-lookup decoding, for comparison
        path,
        template=args.template,
        generation=cap.model_copy(update={"extra": {"prompt_lookup_num_tokens": 10}}),
        batching=False,
    )
    tok = copying.loaded.tokenizer
    if replay is not None:
        model = replay.from_pretrained(work).eval()
        model.head = len(copying._prefix.ids) if copying._prefix is not None else 0
        copying.loaded = plain.loaded = lookup.loaded = remembering.loaded = replace(
            copying.loaded, model=model
        )
    model = copying.loaded.model

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    shares = [copy_share(ids(t["original_output"]), ids(t["output"])) for t in triples]
    rng = random.Random(args.seed)
    pool = list(zip(triples, shares))
    subsets = {
        "copy_heavy": [t for t, s in pool if s >= 0.8],
        "rewrite_heavy": [t for t, s in pool if s <= 0.2],
        "real_mix": [t for t, _ in pool],
    }
    subsets = {k: rng.sample(v, min(args.examples, len(v))) for k, v in subsets.items()}

    def select(triple: dict[str, str]) -> tuple[QAPair, list[int]]:
        pair = QAPair(triple["instruction"], triple["original_output"])
        script = [*ids(triple["output"])[: args.max_new_tokens], tok.eos_token_id]
        return pair, script

    def load_scripts(
        corrector: TransformersCorrector, items: list[tuple[QAPair, list[int]]]
    ) -> None:
        if replay is not None:
            model.scripts = [s for _, s in items]
            model.prompt_lens = [len(corrector._prepare(pair).ids) for pair, _ in items]

    def run(corrector: TransformersCorrector, items: list[tuple[QAPair, list[int]]]) -> list[str]:
        texts = []
        for item in items:
            load_scripts(corrector, [item])
            texts.append(corrector.correct([item[0]])[0].text)
        return texts

    def run_batch(
        corrector: TransformersCorrector, items: list[tuple[QAPair, list[int]]]
    ) -> list[str]:
        load_scripts(corrector, items)
        return [c.text for c in corrector.correct([pair for pair, _ in items])]

    figures: dict[str, Any] = {
        "copy_share_all_triples": {
            "median": round(median(shares), 3),
            "mean": round(sum(shares) / len(shares), 3),
            "share_ge_0.8": round(sum(s >= 0.8 for s in shares) / len(shares), 3),
            "identical": round(
                sum(t["output"] == t["original_output"] for t in triples) / len(triples), 3
            ),
        }
    }
    for name, chosen in subsets.items():
        items = [select(t) for t in chosen]
        others = [t["output"] for t in rng.sample(triples, MEMORY_OTHERS) if t not in chosen]

        def recall(others: list[str] = others) -> None:
            remembering.forget()
            remembering.remember(others)

        reference = run(plain, items)
        assert run(copying, items) == reference, f"{name}: outputs differ"
        recall()
        assert run(remembering, items) == reference, f"{name}: outputs differ (memory)"
        assert run_batch(copying, items) == run_batch(plain, items) == reference, name
        lookup_identical = run(lookup, items) == reference
        passes = tokens = drafted = accepted = 0
        for pair, row_script in items:
            prepared = copying._prepare(pair)
            inputs = copying._inputs([prepared])
            load_scripts(copying, [(pair, row_script)])
            with torch.inference_mode():
                (new,), stats = copy_greedy_generate(
                    model,
                    inputs["input_ids"],
                    inputs["attention_mask"],
                    max_new_tokens=prepared.max_new_tokens,
                    eos_ids=copying._eos_ids,
                )
            passes, tokens = passes + stats.forward_passes, tokens + len(new)
            drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
        timings = interleaved(
            {
                "plain": lambda i=items: run(plain, i),
                "copy": lambda i=items: run(copying, i),
                "copy_no_backoff": lambda i=items: patched(run, copying, i, MAX_PAUSE=0),
                "hf_prompt_lookup": lambda i=items: run(lookup, i),
                "loop_no_drafts": lambda i=items: patched(
                    run, copying, i, MIN_DRAFT=0, MAX_DRAFT=0
                ),
                "plain_batch": lambda i=items: run_batch(plain, i),
                "copy_batch": lambda i=items: run_batch(copying, i),
                "memory": lambda i=items: run(remembering, i),
                "memory_batch": lambda i=items: run_batch(remembering, i),
            },
            args.runs,
            before=recall,
        )
        times = timings.wall
        speedups = ratios(times["plain"], times["copy"])
        figures[name] = {
            "examples": len(items),
            "new_tokens": tokens,
            "copy_share_median": round(median([shares[triples.index(t)] for t in chosen]), 3),
            "tokens_per_forward_pass": round(tokens / passes, 2),
            "draft_acceptance": round(accepted / max(1, drafted), 3),
            "plain_s": round(median(times["plain"]), 3),
            "copy_s": round(median(times["copy"]), 3),
            "speedup": round(median(speedups), 3),
            "speedup_per_run": [round(s, 3) for s in speedups],
            "speedup_cpu_time": round(median(ratios(timings.cpu["plain"], timings.cpu["copy"])), 3),
            "speedup_without_backoff": round(
                median(ratios(times["plain"], times["copy_no_backoff"])), 3
            ),
            "speedup_of_hf_prompt_lookup": round(
                median(ratios(times["plain"], times["hf_prompt_lookup"])), 3
            ),
            "hf_prompt_lookup_identical": lookup_identical,
            "speedup_of_loop_without_drafts": round(
                median(ratios(times["plain"], times["loop_no_drafts"])), 3
            ),
            "batch_plain_s": round(median(times["plain_batch"]), 3),
            "batch_copy_s": round(median(times["copy_batch"]), 3),
            "batch_speedup": round(median(ratios(times["plain_batch"], times["copy_batch"])), 3),
            "batch_speedup_cpu_time": round(
                median(ratios(timings.cpu["plain_batch"], timings.cpu["copy_batch"])), 3
            ),
            "speedup_with_memory_of_others": round(
                median(ratios(times["plain"], times["memory"])), 3
            ),
            "batch_speedup_with_memory_of_others": round(
                median(ratios(times["plain_batch"], times["memory_batch"])), 3
            ),
            "identical_outputs": True,
        }
    config = {
        "model": str(args.model or f"replay Llama ({args.size}: {SIZES[args.size]})"),
        "parameters": sum(p.numel() for p in model.parameters()),
        "threads": args.threads,
        "examples": args.examples,
        "max_new_tokens": args.max_new_tokens,
        "template": args.template,
        "runs": args.runs,
        "seed": args.seed,
        "replay_bias": args.bias if replay is not None else None,
    }
    write(args.out, figures, config, started)


if __name__ == "__main__":
    main()
