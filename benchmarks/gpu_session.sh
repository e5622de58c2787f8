#!/usr/bin/env bash
# The GPU checks in one command (about 6 minutes on an H200): the `cuda` tests (every method in 16-mixed with
# Lightning's GradScaler and in bf16 against hand-written autocast loops, no host synchronisation, flat memory, FSDP
# on one GPU equal to one device, SAM/ASAM/Momentum-SAM/NEFTune), then the CUDA cost table of the small model.
# Usage: bash benchmarks/gpu_session.sh [OUTDIR]   (default: benchmarks/results)
# On the CPU (to try the script): DEVICE=cpu LIGHTNING_ADV_TEST_DEVICE=cpu bash benchmarks/gpu_session.sh /tmp/out
set -u
out=${1:-benchmarks/results}
device=${DEVICE:-cuda}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
py=${PYTHON:-python3}
$py - <<'PY' 2>&1 | tee "$out/cuda_env.txt"
import torch, lightning, transformers, torchmetrics
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
print("gpu", name, "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| lightning", lightning.__version__, "| transformers", transformers.__version__, "| torchmetrics", torchmetrics.__version__)
PY
start=$(date +%s)
timeout "${TEST_TIMEOUT:-330}" $py -m pytest -m cuda tests/test_cuda.py -p no:cacheprovider -q -rA --tb=short -W ignore \
    --durations=8 2>&1 | tee "$out/cuda_tests.log" | grep -vE "^(INFO|PASSED)" | tail -40
echo "tests: $(( $(date +%s) - start )) s"
start=$(date +%s)
timeout "${BENCH_TIMEOUT:-240}" $py benchmarks/attack_cost.py --device "$device" --precision "${PRECISIONS:-bf16,fp16,fp32}" \
    --models "${MODELS:-small}" --rounds "${ROUNDS:-3}" --steps 3 --warmup 1 --peak-model none --no-count \
    --out "$out/attack_cost_cuda.md" --json "$out/attack_cost_cuda.json" -v 2>"$out/attack_cost_cuda.err" | tail -5
tail -5 "$out/attack_cost_cuda.err"
echo "cost table: $(( $(date +%s) - start )) s"
