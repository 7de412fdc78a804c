#!/usr/bin/env bash
# Everything to run on a lent CUDA machine, in one command, from the repository root:
#
#     bash benchmarks/gpu_session.sh            # results and logs under $OUT (default gpu-out/)
#
# 1. the GPU tests (`pytest -m gpu`: compiled Triton kernels at realistic sizes, N×V > 2^31),
#    and `fastxent check --device cuda` (every backend against float64; Triton's own kernel in
#    its float32 table),
# 2. benchmarks/gpu.py at Llama-3-8B and Gemma-2-2B shapes (correctness at full size, time,
#    memory, floors, peers),
# 3. `fastxent bench --device cuda --full` (the suite's largest preset: seconds on a GPU).
#
# fastxent runs from src/ (no install). Peers that the machine lacks (Liger-Kernel, Cut
# Cross-Entropy) are installed from wheels in .whl/ when that folder exists; without them their
# rows say why they were skipped. Each step runs even if the one before failed; the exit status
# is the first failure's.
set -u -o pipefail

OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/fastxent-site .whl/*.whl && export PYTHONPATH=/tmp/fastxent-site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

status=0
step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, remember the first failure
    local name=$1
    shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc"
    if [ "$status" -eq 0 ] && [ "$rc" -ne 0 ]; then status=$rc; fi
}

step machine sh -c "nvidia-smi; $PYTHON -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())'"
step gpu-tests "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider
step check "$PYTHON" -m fastxent.cli check --device cuda
step gpu-bench "$PYTHON" benchmarks/gpu.py --out "$OUT/gpu.json"
step suite "$PYTHON" -m fastxent.cli bench --device cuda --full --out "$OUT/suite"
exit "$status"
