#!/usr/bin/env bash
# The benchmarks of one GPU session (CUDA), for a device machine lent for a few minutes.
#
#     bash benchmarks/gpu.sh                 # from anywhere; results into $OUT (default /tmp/gpu-out)
#
# Runs from the repository root with PYTHONPATH=src (salience from this checkout, not installed) and
# writes only into $OUT, flat: engine-speed-cuda.{json,md}, engine-speed-freeze-cuda.{json,md},
# transformers-cuda.{json,md} and gpu-log.txt (nvidia-smi, versions, every step's
# output: the device tool brings back at most 8 files, tests/gpu.sh's log is the eighth). Each step has its own time limit and a failing step does not stop the next; the JSON of
# engine_speed is rewritten after every (method, images) job, so a step cut short keeps what it finished.
# FREEZE=0 leaves the compile="freeze" step out.
# Expected on an H200: about 15 s + 100 s + 90 s; the limits add up to 45 + 150 + 120 s.
set -u
export PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/gpu-out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH=src
LOG="$OUT/gpu-log.txt"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, output to the log and the terminal
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s) $(date -u +%H:%M:%S): $*" | tee -a "$LOG"
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
}

{
    date -u
    nvidia-smi 2>&1 | head -20
    "$PY" -c "import sys, torch, torchvision; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print('torchvision', torchvision.__version__)" 2>&1
    git log --oneline -1
} 2>&1 | tee -a "$LOG"

# 1. attention rollout / transformer attribution against their bare passes, vit_b_16 (a few seconds of work)
step transformers 45 "$PY" benchmarks/transformers.py --device cuda --model vit_b_16 --batch 8 --rounds 20 \
    --threads 4 --out "$OUT/transformers-cuda"

# 2. the engine's layouts and precisions against the bare passes (fp32 and bf16/fp16 autocast), maps checked against fp32
step engine-speed 150 "$PY" benchmarks/engine_speed.py --device cuda --model resnet50 --size 224 --images 1 4 8 32 \
    --methods smoothgrad integrated_gradients --modes contiguous channels_last bf16 fp16 bf16+channels_last \
    --rounds 5 --threads 4 --out "$OUT/engine-speed-cuda"

# 3. compile="freeze" (inductor with freezing; the first calls compile, 60-120 s of them): last, apart, one
#    small job (SmoothGrad 16 at 1 image: 16 items, one chunk, so one frozen graph to compile)
[ "${FREEZE:-1}" = 0 ] || step engine-speed-freeze 120 "$PY" benchmarks/engine_speed.py --device cuda --model resnet50 --size 224 --images 1 \
    --methods smoothgrad --modes contiguous freeze --rounds 5 --threads 4 --out "$OUT/engine-speed-freeze-cuda"

ls -l "$OUT" | tee -a "$LOG"
