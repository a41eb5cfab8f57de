#!/usr/bin/env bash
# The benchmarks of one GPU session (CUDA), for a device machine lent for a few minutes.
#
#     bash benchmarks/gpu.sh                 # from anywhere; results into $OUT (default /tmp/gpu-out)
#
# Runs from the repository root with PYTHONPATH=src (salience from this checkout, not installed; a
# PYTHONPATH already set, e.g. with Captum for the dataset rows, is kept after it) and writes only into
# $OUT, flat: engine-speed-cuda.{json,md}, transformers-cuda.{json,md}, dataset-cuda-*.{json,md},
# engine-speed-freeze-cuda.{json,md} and gpu-log.txt (nvidia-smi, versions, every step's output and the
# profiles of warm calls). Each step has its own time limit and a failing step does not stop the next;
# the JSON of engine_speed is rewritten after every (method, images) job, so a step cut short keeps what
# it finished. FREEZE=0 leaves the compile="freeze" step out, DATASET=0 the dataset runs;
# ENGINE_IMAGES, ENGINE_MODES and ENGINE_LIMIT shorten the engine's table.
# The session tool brings back at most 8 files: pack $OUT (tar) when running through it.
set -u
export PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/gpu-out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
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
#    (ENGINE_IMAGES / ENGINE_MODES / ENGINE_LIMIT choose a shorter run)
# shellcheck disable=SC2086
step engine-speed "${ENGINE_LIMIT:-150}" "$PY" benchmarks/engine_speed.py --device cuda --model resnet50 --size 224 \
    --images ${ENGINE_IMAGES:-1 4 8 32} --methods smoothgrad integrated_gradients \
    --modes ${ENGINE_MODES:-contiguous channels_last bf16 fp16 bf16+channels_last} \
    --rounds 5 --threads 4 --out "$OUT/engine-speed-cuda"

# 2b. a dataset run's images per second (issue 17's table on a GPU): 2,000 JPEGs decoded by 8 workers, resnet50 and
#     vit_b_16, against the bare passes and a plain Captum loop (Captum from PYTHONPATH; DATASET=0 leaves these out)
if [ "${DATASET:-1}" != 0 ]; then
    step dataset-resnet50 "${DATASET_LIMIT:-100}" "$PY" benchmarks/dataset.py --device cuda --model resnet50 --n 2000 \
        --batch 64 --workers 8 --threads 4 --rounds 5 --out "$OUT/dataset-cuda-resnet50"
    step dataset-vit 90 "$PY" benchmarks/dataset.py --device cuda --model vit_b_16 --n 1000 --batch 64 --workers 8 \
        --threads 4 --rounds 5 --out "$OUT/dataset-cuda-vit_b_16"
fi

# 2c. where a warm call's time goes outside the model (cProfile, top functions by own time)
for m in "smoothgrad --images 1" "gradcam --images 8" "attention_rollout --images 8 --model vit_b_16"; do
    # shellcheck disable=SC2086
    step "profile-${m%% *}" 40 "$PY" benchmarks/profile_call.py --device cuda --method $m --calls 10 --top 15 --threads 4
done

# 3. compile="freeze" (inductor with freezing; the first calls compile, 60-120 s of them): last, apart, one
#    small job (SmoothGrad 16 at 1 image: 16 items, one chunk, so one frozen graph to compile)
[ "${FREEZE:-1}" = 0 ] || step engine-speed-freeze 120 "$PY" benchmarks/engine_speed.py --device cuda --model resnet50 --size 224 --images 1 \
    --methods smoothgrad --modes contiguous freeze --rounds 5 --threads 4 --out "$OUT/engine-speed-freeze-cuda"

ls -l "$OUT" | tee -a "$LOG"
