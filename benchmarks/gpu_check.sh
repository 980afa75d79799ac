#!/usr/bin/env bash
# The GPU check (issue 19), one prepared script of at most 8 minutes on a machine with a CUDA GPU:
#   1. builds the paper-size models once (.cache/tmr-models-paper; instant when up to date),
#   2. runs the `gpu`-marked tests (pytest -m gpu),
#   3. runs bench_train, bench_back_translation and bench_serve at paper size on CUDA,
#   4. prints one table of their ratios (benchmarks.run_all --table) and the tests' outcome.
#
#   bash benchmarks/gpu_check.sh                     # PY=.venv/bin/python, reports in outputs/bench/gpu
#   PY=/opt/venv/bin/python OUT_DIR=/tmp/gpu bash benchmarks/gpu_check.sh
#
# Needs a Python whose torch is a CUDA build with the project installed (`make install` on a GPU
# machine). Without a CUDA device it stops at once with exit code 3 and says why.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
OUT_DIR=${OUT_DIR:-outputs/bench/gpu}
BUDGET_S=${BUDGET_S:-470}  # 8 minutes less the table and slack
export RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export TOKENIZERS_PARALLELISM=false RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1

# one interpreter start (importing torch takes seconds): prints torch's version, fails without CUDA
if ! torch_version=$("$PY" -c "import sys, torch; print(torch.__version__); sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null); then
    echo "gpu_check: no CUDA GPU here (torch.cuda.is_available() is False for $PY, torch ${torch_version:-not importable})." \
         "Nothing was run. Run this on a machine with a CUDA GPU and a CUDA build of torch." >&2
    exit 3
fi

mkdir -p "$OUT_DIR"
rm -f "$OUT_DIR"/*.json
"$PY" -c "import torch; print('gpu_check:', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| CUDA', torch.version.cuda)"
date -u +"gpu_check: started %Y-%m-%d %H:%M UTC"

declare -A STATUS
# run NAME CAP_S CMD...: CMD under a timeout of min(CAP_S, time left), its outcome kept for the table
run() {
    local name=$1 cap=$2 left=$((BUDGET_S - SECONDS))
    shift 2
    if ((left < 20)); then STATUS[$name]="skipped (budget spent)"; return; fi
    ((cap > left)) && cap=$left
    echo "##### $name (up to ${cap}s)"
    local started=$SECONDS
    timeout --signal=INT --kill-after=10 "$cap" "$@"
    local rc=$?
    case $rc in
        0) STATUS[$name]="ok";;
        124|137) STATUS[$name]="timed out after ${cap}s";;
        *) STATUS[$name]="failed (exit $rc)";;
    esac
    STATUS[$name]+=" in $((SECONDS - started))s"
}

run models 120 "$PY" -m jobs.make_tiny_models --size paper
run gpu_tests 90 "$PY" -m pytest -q -m gpu -p no:cacheprovider
run train 170 "$PY" -m benchmarks.bench_train --size paper --device cuda --batch-size 16 --cpus 4 \
    --min-train-seconds 60 --output "$OUT_DIR/train.json"
run back_translation 120 "$PY" -m benchmarks.bench_back_translation --size paper --device cuda --num-gpus 1 \
    --dtype float16 --height 512 --width 512 --steps 20 --batch-size 8 --actor-cpus 4 --seconds 20 \
    --output "$OUT_DIR/back_translation.json"
run serve 120 "$PY" -m benchmarks.bench_serve --size paper --device cuda --output "$OUT_DIR/serve.json"

echo
echo "## GPU check, $(date -u +%Y-%m-%d), $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')"
echo
"$PY" -m benchmarks.run_all --table "$OUT_DIR"
echo
echo "| step | outcome |"
echo "|---|---|"
for name in models gpu_tests train back_translation serve; do
    echo "| $name | ${STATUS[$name]:-not run} |"
done
failed=0
for name in "${!STATUS[@]}"; do [[ ${STATUS[$name]} == ok* ]] || failed=1; done
exit $failed
