#!/usr/bin/env bash
# Everything to run on a lent CUDA machine, in one command, from the repository root:
#
#     bash benchmarks/gpu_session.sh            # results and log under $OUT (default gpu-out/)
#
# 1. the GPU tests (`pytest -m gpu`: compiled Triton kernels at realistic sizes, N×V > 2^31,
#    peers' own GPU kernels beside fastxent),
# 2. benchmarks/gpu.py at Llama-3-8B and Gemma-2-2B shapes (correctness at full size, time,
#    memory, floors, peers): the logits-given and linear cases first, then the autocast case,
# 3. `fastxent check --device cuda` (every backend against float64; Triton's own kernel in its
#    float32 table),
# 4. `fastxent bench --device cuda --full` (the suite's largest preset: seconds on a GPU).
#
# A lent machine runs one command for at most 10 minutes, so the whole script keeps within
# DEADLINE seconds (default 560): each step is stopped at its own cap or at what is left, the
# most informative steps first, and gpu.py keeps the tasks that ran (its JSON is rewritten after
# each). A step cut short exits 124 and says so; the steps after it still run while time is left.
# Five files come back from $OUT (the device tool returns at most 8): session.log (every step's
# output), gpu.json, gpu-amp.json, suite/bench.json and suite/bench.png.
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

DEADLINE=${DEADLINE:-560}
MIN_STEP=${MIN_STEP:-10}  # a step with fewer seconds left is not started
status=0
LOG="$OUT/session.log"
: >"$LOG"
step() {  # step NAME CAP COMMAND...: run for at most CAP seconds (or what is left of DEADLINE),
    local name=$1 cap=$2  # append to the log, remember the first failure
    shift 2
    local left=$((DEADLINE - SECONDS))
    if [ "$left" -lt "$MIN_STEP" ]; then
        echo "== $name: not run, ${left}s left of DEADLINE=${DEADLINE}s" | tee -a "$LOG"
        if [ "$status" -eq 0 ]; then status=124; fi
        return
    fi
    if [ "$cap" -gt "$left" ]; then cap=$left; fi
    echo "== $name (at most ${cap}s, ${SECONDS}s in): $*" | tee -a "$LOG"
    timeout --kill-after=10 "$cap" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then echo "== $name: stopped at its ${cap}s" | tee -a "$LOG"; fi
    echo "== $name: exit $rc (${SECONDS}s in)" | tee -a "$LOG"
    if [ "$status" -eq 0 ] && [ "$rc" -ne 0 ]; then status=$rc; fi
}

step machine 30 sh -c "nvidia-smi; $PYTHON -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())'"
step gpu-tests 150 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider
step gpu-bench 240 "$PYTHON" benchmarks/gpu.py --tasks ce,linear --out "$OUT/gpu.json"
step gpu-amp 90 "$PYTHON" benchmarks/gpu.py --tasks amp --out "$OUT/gpu-amp.json"
step check 60 "$PYTHON" -m fastxent.cli check --device cuda
step suite 120 "$PYTHON" -m fastxent.cli bench --device cuda --full --out "$OUT/suite"
exit "$status"
