#!/usr/bin/env bash
# The checks that need a CUDA GPU, run where a session is lent one (CI has none): the CUDA tests, then
# the command line end to end on the GPU. From the repository root, with the machine's python3 (which
# holds torch with CUDA): `bash tests/gpu.sh`; the log goes to $OUT/tests-gpu.log (default /tmp/gpu-out).
# The GPU benchmarks are apart: `bash benchmarks/gpu.sh`.
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
LOG="$OUT/tests-gpu.log"  # one file: the device tool brings back at most 8
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DEV=${SALIENCE_TEST_DEVICE:-cuda}  # cpu: a dry run of this script on a machine without a GPU
export SALIENCE_TEST_DEVICE=$DEV
status=0
step() {  # step SECONDS NAME COMMAND...: run with a time limit, log to $OUT/NAME.log, go on after a failure
    local limit=$1 name=$2; shift 2
    echo "== $name ($(date -u +%T))"
    timeout -k 10 "$limit" "$@" > "$OUT/$name.part" 2>&1
    local rc=$?
    cat "$OUT/$name.part" >> "$LOG"
    tail -n 25 "$OUT/$name.part"
    rm -f "$OUT/$name.part"
    echo "== $name rc=$rc" | tee -a "$LOG"
    [ $rc -eq 0 ] || status=1
}

nvidia-smi -L || true
$PY -c "import torch, torchvision, sys; print(sys.version.split()[0], torch.__version__, torchvision.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"
# the CUDA tests: this module and the CUDA cases of the others (-k cuda); 4 workers, the compiles overlap
step 240 tests $PY -m pytest -q -p no:cacheprovider -n 4 tests/test_cuda.py \
    tests/test_performance.py tests/test_gradcam.py tests/test_vanilla.py tests/test_rules.py \
    -k "cuda or test_cuda.py" -o addopts="-ra"
# the command line on the GPU: every method but the attention ones (a CNN) on a random-weight resnet18, then a
# dataset run in bf16
IMG=$(mktemp -d)
$PY - "$IMG" <<'EOF'
import sys
import numpy as np
from PIL import Image
rng = np.random.default_rng(0)
for i in range(3):
    Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(f"{sys.argv[1]}/img{i}.png")
EOF
step 90 cli-explain $PY -m salience explain "$IMG/img0.png" "$IMG/img1.png" --model torchvision:resnet18 \
    --weights random --device "$DEV" --method "$($PY -c 'import salience; print(",".join(n for n in salience.METHODS if n not in salience.methods.ATTENTION_METHODS))')" --out "$IMG/maps" --no-progress
step 60 cli-dataset $PY -m salience explain "$IMG" --model torchvision:resnet18 --weights random \
    --device "$DEV" --precision bf16 --method vanilla,gradcam,rise --out "$IMG/run" --no-progress
exit $status
