#!/usr/bin/env bash
# Serve the Aligner corrector with vLLM (OpenAI-compatible, /v1/completions).
#
#   TP=2 ./serve_aligner.sh            # tensor parallelism over 2 GPUs of this node
#   DRY_RUN=1 ./serve_aligner.sh       # print the command instead of running it
#
# Settings live in aligner.yaml; the environment overrides the common ones. Why these settings:
# - prefix caching: every request starts with the same instruction ("Edit the following
#   Question-Answer pair ..."), so its KV cache is computed once and reused.
# - n-gram speculative decoding: the Aligner copies most of the answer it corrects, so drafts
#   looked up in the prompt are usually accepted; with greedy decoding (our client's default)
#   the output is the same as without speculation, only faster.
# - max-model-len 2048: the length the Aligner was trained with; the client truncates to it.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

model="${ALIGNER_MODEL:-aligner/aligner-7b-v1.0}"
args=(serve "$model" --config "$here/aligner.yaml"
  --host "${HOST:-0.0.0.0}" --port "${PORT:-8000}"
  --tensor-parallel-size "${TP:-1}")
if [[ -n "${NGRAM_TOKENS:-}" ]]; then  # e.g. NGRAM_TOKENS=8 for long, mostly-copied answers
  args+=(--speculative-config "{\"method\": \"ngram\", \"num_speculative_tokens\": ${NGRAM_TOKENS}, \"prompt_lookup_max\": 4, \"prompt_lookup_min\": 2}")
fi

# vLLM reads the bearer token from VLLM_API_KEY; keeping it out of argv keeps it out of `ps`.
if [[ -n "${ALIGNER_API_KEY:-}" ]]; then
  export VLLM_API_KEY="$ALIGNER_API_KEY"
fi

if [[ -n "${DRY_RUN:-}" ]]; then
  printf '%q ' vllm "${args[@]}"
  echo
else
  exec vllm "${args[@]}"
fi
