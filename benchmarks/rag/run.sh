#!/usr/bin/env bash
# Federated RAG on the packaged ChatterBot corpus (issue 22): answers as documents, whole topics per client,
# 4 clients; MiniLM retrieval (k=5) with every client, with topn:2 routing and from one central index; SmolLM2
# answers without retrieval, with federated and with central retrieval. Results: benchmarks/results/rag/.
set -euo pipefail
cd "$(dirname "$0")/../.."
HF_HUB_OFFLINE=1 .venv/bin/fedcustom rag eval --dataset chatterbot --clients 4 --k 5 --route topn:2 \
  --max-questions 100 --max-new-tokens 32 --output benchmarks/results/rag "$@"
