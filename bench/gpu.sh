#!/usr/bin/env bash
# GPU readiness: one script, under 8 minutes on one H200, whose output is the markdown for
# docs/benchmarks.md ("GPU" section). It records, for GPT-2 124M at T=1024:
#   1. training tokens/s, MFU and peak memory, GPT-2 recipe (fineweb-edu-124m: AdamW, tied, GELU)
#   2. the same for the speedrun recipe (fineweb-edu-speedrun: RoPE, QK-norm, ReLU², Muon, ...)
#      both with torch.compile, bf16 autocast, FlashAttention (SDPA's kernel), fused AdamW
#   3. decode tokens/s (batch 1 and 64, bf16, CUDA-graph decode), against transformers at batch 1
#   4. HellaSwag examples/s (bf16 and fp32, batched scorer)
#
#   bash bench/gpu.sh              # on a CUDA machine, from the repository root or anywhere
#   bash bench/gpu.sh --dry-run    # anywhere: every step on CPU with a tiny model (checks the script)
#
# Each step has its own time limit, so one that hangs or fails cannot eat the others' time; a failed
# step prints its error and the script goes on. Target (issue 16): >= 400K training tokens/s for GPT-2
# 124M on one H200.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
PY=${PYTHON:-python}

if [[ $DRY == 1 ]]; then
    # Every step on CPU, tiny shapes, no compile: proves the commands and flags, measures nothing.
    TRAIN=(--device cpu --set n_layer=2 --set n_head=2 --set n_embd=64 --set block_size=64
           --batch-size 2 --seq-len 64 --steps 3 --no-compile --dtype float32)
    DECODE=(--device cpu --new-tokens 4 --batches 1 --rounds 1 --no-hf)
    HELLASWAG=(--limit 2 --batch-sizes 2 --chunk 2)
    LIMIT=600
else
    # 30 steps: 5 warm-up (compilation) + 25 timed. Batch 32 x 1024 tokens per step.
    TRAIN=(--batch-size 32 --seq-len 1024 --steps 30 --peak-flops 989e12)
    DECODE=(--device cuda --dtype bfloat16 --compile --batches 1,64 --new-tokens 256 --rounds 3)
    HELLASWAG=(--limit 400 --batch-sizes 16 64 --chunk 100)
    LIMIT=180
fi

step() {  # step TITLE SECONDS COMMAND...: run with a time limit, report failures without stopping
    local title=$1 limit=$2
    shift 2
    echo
    echo "### $title"
    echo
    echo "\`$*\`"
    echo
    local t0=$SECONDS
    if ! timeout "$limit" "$@" 2>&1 | grep -v -E "^(W|I)[0-9]{4} |UserWarning|warnings.warn"; then
        echo "(step failed or timed out after $((SECONDS - t0)) s)"
    fi
    echo
    echo "($((SECONDS - t0)) s)"
}

echo "## GPU benchmark, $(date -u +%Y-%m-%d)"
echo
$PY - <<'EOF'
import platform, torch
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU (dry run on CPU)"
print(f"{gpu}; torch {torch.__version__}; Python {platform.python_version()}; {platform.processor() or platform.machine()}")
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null || true

step "Training, GPT-2 recipe (AdamW, tied head, GELU, learned positions)" $LIMIT \
    $PY bench/train.py "${TRAIN[@]}"
step "Training, speedrun recipe (fineweb-edu-speedrun: RoPE, QK-norm, ReLU², untied, Muon)" $LIMIT \
    $PY bench/train.py --recipe fineweb-edu-speedrun "${TRAIN[@]}"
step "Decode (GPT-2 124M, random weights, greedy; ours vs transformers)" $LIMIT \
    $PY bench/generate.py "${DECODE[@]}"
step "HellaSwag scoring (GPT-2 124M, random weights)" $LIMIT \
    $PY bench/hellaswag.py "${HELLASWAG[@]}"
echo
echo "total: $SECONDS s"
