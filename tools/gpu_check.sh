#!/usr/bin/env bash
# Every GPU check of the project in one run, for one GPU, in under 8 minutes (GPU_CHECK_BUDGET_S, default 440 s,
# shared out among the parts; each part also has its own limit):
#   0. with --wheelhouse DIR: install DIR/*.whl (tools/gpu_wheelhouse.sh built them) with `pip --no-index --no-deps
#      --target /tmp/gpu_check_site` (GPU_CHECK_SITE) on top of the machine's own torch, and import what the check needs,
#   1. the GPU parity tests (pytest -m gpu: fused kernels against their references),
#   2. throughput, MFU and peak memory against the memory plan for test_small, 1b_transformer, 1b_mamba and 1b_hybrid
#      (tools/throughput.py: short runs, the plan's micro-batch, sequence 2048, next to a plain PyTorch loop and
#      transformers' model of the same shape; the hybrid: mamba-ssm's fused Mamba-2 kernels and FlashAttention in one
#      model, BambaForCausalLM beside it; a preset this checkout lacks gets a "skipped" row),
#   3. the quick start's "the same command uses the GPU" path (launcher/run.py --preset tiny, a few steps),
#   4. the newer features, each only where this checkout has it (sequence parallelism, Muon),
# GPU_CHECK_PARTS picks parts (default: install imports tests throughput quickstart features).
# Then one Markdown table, printed and written to OUT/gpu_check.md beside OUT/gpu_check_logs.tar.gz (every log and
# JSON report; per-contender detail: tools/throughput.py --markdown *.json). OUT: --out DIR, else the device tool's
# $OUT, else gpu_check_results/. Without --wheelhouse it needs requirements*.txt installed.
# Without CUDA it says "no GPU" and exits 0, unless --cpu (a rehearsal of the plumbing on CPU: GPU tests skip,
# throughput is slow, so pick small presets with GPU_CHECK_PRESETS / GPU_CHECK_SEQ). A throughput run stopped by
# its limit still reports the contenders it finished (tools/throughput.py catches the SIGTERM).
#
#   bash tools/gpu_check.sh --wheelhouse .wheelhouse     # on the device machine (docs/gpu_check.md)
#   bash tools/gpu_check.sh                              # where requirements*.txt are installed
set -u
cd "$(dirname "$0")/.."
WHEELHOUSE="" RESULTS="${OUT:-${GPU_CHECK_OUT:-gpu_check_results}}" ALLOW_CPU=0
while [ $# -gt 0 ]; do
    case "$1" in
        --wheelhouse) WHEELHOUSE=${2:?--wheelhouse needs a folder}; shift 2 ;;
        --out) RESULTS=${2:?--out needs a folder}; shift 2 ;;
        --cpu) ALLOW_CPU=1; shift ;;
        *) echo "error: unknown argument $1 (use --wheelhouse DIR, --out DIR, --cpu)" >&2; exit 2 ;;
    esac
done
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -z "$WHEELHOUSE" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
BUDGET=${GPU_CHECK_BUDGET_S:-440}  # + up to 10 s for a part killed at its limit, + the table: < 8 minutes
STEPS=${GPU_CHECK_STEPS:-5}
SEQ=${GPU_CHECK_SEQ:-2048}
read -r -a PRESETS <<< "${GPU_CHECK_PRESETS:-test_small 1b_transformer 1b_mamba 1b_hybrid}"
# Which parts run (a second call can redo only what the first did not finish); the others get a "skipped" row.
PARTS=" ${GPU_CHECK_PARTS:-install imports tests throughput quickstart features} "
want() { [[ "$PARTS" == *" $1 "* ]]; }
NOT_WANTED="skipped (not in GPU_CHECK_PARTS)"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
ROWS=()  # "check|result" in table order
row() { ROWS+=("$1|$2"); }
start=$SECONDS

# A part's time limit: its own cap, or what the budget has left after keeping 30 s for each part still to come.
limit() {  # limit CAP PARTS_AFTER
    local left=$((BUDGET - (SECONDS - start) - 30 * $2))
    [ "$left" -lt "$1" ] && echo "$left" || echo "$1"
}
# run_part NAME CAP PARTS_AFTER LOG CMD...: time-boxed, output to WORK/LOG; sets CODE and TOOK; 124 = timed out.
run_part() {
    local name=$1 cap=$2 after=$3 log=$4; shift 4
    local lim; lim=$(limit "$cap" "$after")
    local t0=$SECONDS
    if [ "$lim" -lt 10 ]; then
        CODE=125 TOOK=0; echo "skipped: no time left in the ${BUDGET} s budget" > "$WORK/$log"
    else
        echo "== $name (limit ${lim} s)"
        timeout --kill-after=10 "$lim" "$@" > "$WORK/$log" 2>&1
        CODE=$?
        TOOK=$((SECONDS - t0))
    fi
    LIMIT=$lim
}
status_of() {  # a short word for CODE
    case "$CODE" in 0) echo "ok" ;; 124|137) echo "timed out at ${LIMIT} s" ;; 125) echo "skipped (budget)" ;;
        *) echo "exit $CODE" ;; esac
}

if [ -n "$WHEELHOUSE" ]; then
    ls "$WHEELHOUSE"/*.whl > /dev/null 2>&1 || {
        echo "error: --wheelhouse $WHEELHOUSE holds no wheels; build it here with: bash tools/gpu_wheelhouse.sh" >&2; exit 2; }
    # Outside the repository: a site left in the checkout would travel with the next device call (64 MiB limit).
    SITE=${GPU_CHECK_SITE:-${TMPDIR:-/tmp}/gpu_check_site}
    if want install; then
    rm -rf "$SITE"
    run_part "install $(ls "$WHEELHOUSE"/*.whl | wc -l) wheels into $SITE" 90 6 install.txt \
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
        --target "$SITE" "$WHEELHOUSE"/*.whl
    result="$(status_of), ${TOOK} s, $(ls "$WHEELHOUSE"/*.whl | wc -l) wheels"
    [ "$CODE" = 0 ] || result="$result: $(grep -v '^WARNING' "$WORK/install.txt" | tail -1 | cut -c1-200)"
    row "wheelhouse install" "$result"
    else row "wheelhouse install" "$NOT_WANTED (uses the $SITE left by an earlier call)"; fi
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

if [ "$ALLOW_CPU" = 0 ] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "no GPU: tools/gpu_check.sh checks the CUDA path and has nothing to run here (CPU tests: bash scripts/test.sh)"
    rm -rf "$WORK"
    exit 0
fi
if [ "$ALLOW_CPU" = 1 ]; then export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}; else export DS_ACCELERATOR=cuda; fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$WORK/torch_extensions}
DEVICE=$("$PY" -c '
import platform, torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (CPU rehearsal)"
print(f"{gpu}, torch {torch.__version__}, CUDA {torch.version.cuda}, Python {platform.python_version()}")' 2>&1 | tail -1)
"$PY" -m pip list --format=freeze > "$WORK/pip_freeze.txt" 2>/dev/null  # the image's versions, for the record

if [ -n "$WHEELHOUSE" ] && ! want imports; then
    row "wheelhouse imports" "$NOT_WANTED"
elif [ -n "$WHEELHOUSE" ]; then
    run_part "imports from the wheelhouse" 60 5 imports.txt "$PY" tools/gpu_wheelhouse.py imports
    cat "$WORK/imports.txt"
    row "wheelhouse imports" "$(status_of): $(tail -1 "$WORK/imports.txt")"
fi

# 200 s cap: the rotary tests' cold Inductor compiles (four graphs; ~25 s on the CPU here) come first.
if want tests; then
    run_part "GPU parity tests (pytest -m gpu)" 200 $((${#PRESETS[@]} + 1)) pytest_gpu.txt \
        "$PY" -m pytest -m gpu -q -p no:cacheprovider tests
    tail -25 "$WORK/pytest_gpu.txt"
    row "pytest -m gpu" "$(tail -1 "$WORK/pytest_gpu.txt" | cut -c1-160) ($(status_of), ${TOOK} s)"
else
    row "pytest -m gpu" "$NOT_WANTED"
fi

has_preset() { "$PY" -c "import sys; from launcher.presets import PRESETS; sys.exit($1 not in PRESETS)" 2>/dev/null; }
throughput_row() {  # throughput_row PRESET PARTS_AFTER [extra throughput.py args]
    local preset=$1 after=$2; shift 2
    want throughput || { row "throughput $preset" "$NOT_WANTED"; return; }
    has_preset "'$preset'" || { row "throughput $preset" "skipped: no preset $preset in this checkout"; return; }
    run_part "throughput $preset (sequence $SEQ)" 120 "$after" "$preset.txt" \
        "$PY" tools/throughput.py --preset "$preset" --seq_len "$SEQ" --steps "$STEPS" --warmup 2 \
        --json "$WORK/$preset.json" "$@"
    grep -v "^\[\|it/s\]\|s/it\]" "$WORK/$preset.txt" | tail -12
    local line="$(status_of), ${TOOK} s"
    if [ -f "$WORK/$preset.json" ]; then
        line="$line; $("$PY" tools/throughput.py --markdown "$WORK/$preset.json" --summary 2>&1 | tail -1)"
    else
        line="$line; $(grep -i -m1 "error" "$WORK/$preset.txt" | cut -c1-160)"
    fi
    row "throughput $preset" "$line"
}
n=${#PRESETS[@]}
for preset in "${PRESETS[@]}"; do
    n=$((n - 1))
    throughput_row "$preset" $((n + 1))
done

quickstart() {  # quickstart NAME LOG [extra --set KEY=VALUE ...]
    local name=$1 log=$2; shift 2
    run_part "$name" 120 "${AFTER:-0}" "$log" \
        "$PY" launcher/run.py --preset tiny --set training.max_steps=20 --set training.eval_interval=20 \
        --set training.save_interval=20 --set training.warmup_steps=2 --set training.sample_tokens=20 \
        --set training.output_dir="$WORK/${log%.txt}/outputs" --set training.checkpoint_dir="$WORK/${log%.txt}/checkpoints" "$@"
    tail -8 "$WORK/$log"
    local device_line; device_line=$(grep -m1 -i "cuda\|gpu" "$WORK/$log" | cut -c1-100)
    QUICK="$(status_of), ${TOOK} s; ${device_line:-no device line found}"
}
if want quickstart; then
    AFTER=0 quickstart "quick start on the GPU: launcher/run.py --preset tiny (20 steps)" quickstart.txt
    row "quick start tiny on GPU" "$QUICK"
else
    row "quick start tiny on GPU" "$NOT_WANTED"
fi

# 4. Newer features: one line each, skipped cleanly (with the reason in the table) where this checkout lacks the
# feature, so the branches that bring them can land in any order. Each runs only if the budget still has room.
num_gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if ! want features; then
    row "sequence parallelism" "$NOT_WANTED"
elif [ -f model/sequence_parallel.py ]; then
    if [ "$num_gpus" -ge 2 ] && [ -f tests/model/sequence_parallel_parity.py ]; then
        run_part "sequence parallelism parity (2 GPUs)" 90 0 sp.txt \
            "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 tests/model/sequence_parallel_parity.py
        row "sequence parallelism (2 GPUs)" "$(status_of), ${TOOK} s; $(tail -1 "$WORK/sp.txt" | cut -c1-120)"
    else
        row "sequence parallelism" "skipped: needs 2 GPUs, this machine has $num_gpus (the CPU tests cover it on gloo)"
    fi
else
    row "sequence parallelism" "skipped: not in this checkout (model/sequence_parallel.py)"
fi
# Muon: runs where the run config accepts the setting (a dry run validates it without training).
MUON_SET=${GPU_CHECK_MUON_SET:-training.optimizer=muon}
if ! want features; then
    row "quick start tiny, Muon" "$NOT_WANTED"
elif [ "$(limit 60 0)" -lt 10 ]; then
    row "quick start tiny, Muon" "skipped (budget)"
elif timeout "$(limit 60 0)" "$PY" launcher/run.py --preset tiny --set "$MUON_SET" --dry_run > "$WORK/muon_dry_run.txt" 2>&1; then
    AFTER=0 quickstart "quick start with Muon" quickstart_muon.txt --set "$MUON_SET"
    row "quick start tiny, Muon" "$QUICK"
else
    row "quick start tiny, Muon" "skipped: this checkout's config refuses $MUON_SET ($(grep -m1 -i 'optimizer' "$WORK/muon_dry_run.txt" | sed 's/^ *//' | cut -c1-120))"
fi

table="$WORK/gpu_check.md"
{
    echo "## GPU check, $(date -u +%Y-%m-%d\ %H:%M) UTC, $DEVICE"
    echo
    echo "Commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown); total $((SECONDS - start)) s of a ${BUDGET} s budget; sequence $SEQ, $STEPS timed steps."
    echo
    echo "| check | result |"
    echo "|---|---|"
    for item in "${ROWS[@]}"; do
        echo "| ${item%%|*} | $(echo "${item#*|}" | tr '|' '/') |"
    done
} > "$table"
mkdir -p "$RESULTS"
cp "$table" "$RESULTS/gpu_check.md"
# Logs and reports in one archive (the device tool returns at most 8 files); no checkpoints.
tar -czf "$RESULTS/gpu_check_logs.tar.gz" -C "$WORK" --exclude=checkpoints --exclude=torch_extensions \
    --exclude='*.pt' --exclude='*.safetensors' . 2>/dev/null
rm -rf "$WORK"
echo
cat "$RESULTS/gpu_check.md"
echo
echo "written: $RESULTS/gpu_check.md, $RESULTS/gpu_check_logs.tar.gz"
