#!/usr/bin/env bash
# GPU check (issue 18): run on a machine with one NVIDIA GPU, from the repository root, after `make setup`
# (a CUDA build of torch==2.13.0 in .venv, and `pip install bitsandbytes` for the 4-bit row).
#   bash benchmarks/gpu/check.sh
# Under 8 minutes on an H100-class GPU. Writes benchmarks/results/gpu/report.md (and the runs under /tmp).
set -euo pipefail
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data}
OUT=${OUT:-benchmarks/results/gpu}
RUNS=$(mktemp -d)
export HF_HUB_OFFLINE=1
mkdir -p "$OUT"
"$PY" - <<'PY' > "$RUNS/device.txt"
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device {torch.cuda.get_device_name(0)}")
PY
common=(--config configs/main.toml --quiet --no-save-model --no-checkpoint --no-centralized)
run() { # name, flags...
  local name=$1; shift
  local start=$(date +%s.%N)
  "$PY" -m fedcustom.cli run "${common[@]}" --output "$RUNS/$name" "$@"
  "$PY" - "$RUNS/$name/summary.json" "$name" "$start" <<'PY' >> "$RUNS/rows.txt"
import json, sys, time
s = json.load(open(sys.argv[1]))
print(f"| {sys.argv[2]} | {s['device']} | {s.get('final_accuracy', s.get('final_rouge_l')):.3f} | {sum(s['round_wall_seconds']) / len(s['round_wall_seconds']):.2f} | "
      f"{s.get('peak_gpu_mb', 0):.0f} | {s['peak_rss_mb']:.0f} | {time.time() - float(sys.argv[3]):.0f} |")
PY
}
run main-cpu --device cpu
run main-cuda-fp32 --device cuda
run main-cuda-bf16 --device cuda --precision bf16
run split-cuda --device cuda --method split --cut-layer 2 --lr 1e-4 --local-epochs 1
run smollm2-lora-4bit --model smollm2 --task causal-lm --dataset chatterbot --max-train-examples 120 \
    --max-eval-examples 24 --max-length 256 --clients 3 --rounds 2 --local-steps 4 --batch-size 4 \
    --device cuda --load-in 4bit --precision bf16 --eval-generations 8 --max-new-tokens 24 || echo "| smollm2-lora-4bit | failed | | | | | |" >> "$RUNS/rows.txt"
{
  echo "# GPU check"
  echo
  echo "Machine: $(cat "$RUNS/device.txt"). Command: \`bash benchmarks/gpu/check.sh\` ($(date -u +%F))."
  echo "The main job (configs/main.toml, seed 0) on the CPU and on CUDA (fp32, bf16); LoRA on SmolLM2 in 4 bit."
  echo "Target: CUDA fp32 accuracy within 1 point of the CPU's."
  echo
  echo "| run | device | final accuracy (ROUGE-L for SmolLM2) | s / round | peak GPU MB | peak RSS MB | s in all |"
  echo "|---|---|---|---|---|---|---|"
  cat "$RUNS/rows.txt"
} > "$OUT/report.md"
cat "$OUT/report.md"
