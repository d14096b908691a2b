#!/usr/bin/env bash
# Serve a Llama Guard 3 classifier with vLLM (OpenAI-compatible, /v1/chat/completions).
#
#   ./serve_guard.sh                   # meta-llama/Llama-Guard-3-8B on port 8001
#   GUARD_MODEL=meta-llama/Llama-Guard-3-1B ./serve_guard.sh
#
# The guard's chat template wraps every pair in the same long policy prompt, so prefix caching
# saves most of the prefill. Its verdict is a few tokens; the client reads P(unsafe) from the
# first token's logprobs (max-logprobs bounds what a request may ask for). No speculative
# decoding: there is nothing to speculate on in a five-token answer.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

model="${GUARD_MODEL:-meta-llama/Llama-Guard-3-8B}"
args=(serve "$model" --config "$here/llama-guard-3.yaml"
  --host "${HOST:-0.0.0.0}" --port "${PORT:-8001}"
  --tensor-parallel-size "${TP:-1}")

if [[ -n "${ALIGNER_GUARD_API_KEY:-}" ]]; then
  export VLLM_API_KEY="$ALIGNER_GUARD_API_KEY"
fi

if [[ -n "${DRY_RUN:-}" ]]; then
  printf '%q ' vllm "${args[@]}"
  echo
else
  exec vllm "${args[@]}"
fi
