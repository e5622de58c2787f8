#!/usr/bin/env bash
# Everything issue 14 needs from a CUDA GPU, in one command (about 8 minutes on an H200):
#   the `cuda` tests, then the CUDA cost table (fp32, bf16, fp16; MiniLM-L6 and a BERT-base-sized model, batch 32x128).
# Usage: bash benchmarks/gpu_session.sh [OUTDIR]   (default: benchmarks/results)
set -u
out=${1:-benchmarks/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
py=${PYTHON:-python3}
$py - <<'PY' 2>&1 | tee "$out/cuda_env.txt"
import torch, lightning, transformers, torchmetrics
print("gpu", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| lightning", lightning.__version__, "| transformers", transformers.__version__, "| torchmetrics", torchmetrics.__version__)
PY
timeout "${TEST_TIMEOUT:-300}" $py -m pytest -m cuda tests/test_cuda.py -p no:cacheprovider -q -rA --tb=short -W ignore \
    2>&1 | tee "$out/cuda_tests.log" | grep -vE "^(INFO|PASSED)" | tail -60
timeout "${BENCH_TIMEOUT:-400}" $py benchmarks/attack_cost.py --device cuda --precision bf16,fp16,fp32 --models minilm,base \
    --batch 32 --seq 128 --rounds "${ROUNDS:-3}" --steps 3 --warmup 1 --peak-model none --peak-steps 2 \
    --out "$out/attack_cost_cuda.md" --json "$out/attack_cost_cuda.json" -v 2>"$out/attack_cost_cuda.err" \
    | grep -E "^(measuring|  \[)" 
tail -5 "$out/attack_cost_cuda.err"
