#!/usr/bin/env bash
# Serve a local Aligner (or any causal LM folder) with `transformers serve`: no vLLM, no GPU
# needed. Slow on CPU, but it is the same OpenAI-compatible /v1/completions the production
# servers expose, so it is what the test suite runs end to end (tests/test_remote.py).
#
#   ./serve.sh /path/to/model          # pinned to that model, on 127.0.0.1:8000
set -euo pipefail
model="${1:?usage: $0 <model folder or hub id>}"
args=(serve "$model" --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}" --device "${DEVICE:-auto}")
if [[ -n "${DRY_RUN:-}" ]]; then
  printf '%q ' transformers "${args[@]}"
  echo
else
  exec transformers "${args[@]}"
fi
