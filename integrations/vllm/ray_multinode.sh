#!/usr/bin/env bash
# Several nodes with vLLM over Ray: tensor parallelism inside a node, pipeline parallelism
# across nodes (vLLM's recommended split).
#
#   on the head node:     ./ray_multinode.sh head
#   on every worker:      ./ray_multinode.sh worker <head-ip>
#   then, on the head:    NODES=2 GPUS_PER_NODE=8 ./ray_multinode.sh serve
#
# A 7B Aligner fits on one GPU: for more throughput, run several single-node replicas behind a
# load balancer (or vLLM's --data-parallel-size) and point ALIGNER_CORRECTOR_URL at it. Use this
# script for models that do not fit on one node. Every node needs the same model files and
# vLLM/Ray versions, and NCCL must reach the other nodes.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
run() { if [[ -n "${DRY_RUN:-}" ]]; then printf '%q ' "$@"; echo; else "$@"; fi; }

case "${1:-}" in
  head)
    run ray start --head --port "${RAY_PORT:-6379}"
    ;;
  worker)
    [[ -n "${2:-}" ]] || { echo "usage: $0 worker <head-ip>" >&2; exit 2; }
    run ray start --address "$2:${RAY_PORT:-6379}"
    ;;
  serve)
    [[ -n "${ALIGNER_API_KEY:-}" ]] && export VLLM_API_KEY="$ALIGNER_API_KEY"
    run vllm serve "${ALIGNER_MODEL:-aligner/aligner-7b-v1.0}" --config "$here/aligner.yaml" \
      --host "${HOST:-0.0.0.0}" --port "${PORT:-8000}" \
      --tensor-parallel-size "${GPUS_PER_NODE:-8}" \
      --pipeline-parallel-size "${NODES:-2}" \
      --distributed-executor-backend ray
    ;;
  *)
    echo "usage: $0 head | worker <head-ip> | serve" >&2
    exit 2
    ;;
esac
