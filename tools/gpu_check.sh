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
#   4. the newer features, each where this checkout has it: 1b_transformer's DeepSpeed step with
#      training.optimizer=muon, and tiny's quick start with Muon under fp16's loss scaler; long context (1b_transformer_32k on one GPU); with 2+ GPUs the Ulysses parity script
#      and an SP=2 throughput run (skipped, and said so, on one GPU: NCCL needs a GPU per rank),
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
    run_part "install $(ls "$WHEELHOUSE"/*.whl | wc -l) wheels into $SITE" 90 $((${#PRESETS[@]} + 5)) install.txt \
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
    run_part "imports from the wheelhouse" 60 $((${#PRESETS[@]} + 4)) imports.txt "$PY" tools/gpu_wheelhouse.py imports
    cat "$WORK/imports.txt"
    row "wheelhouse imports" "$(status_of): $(tail -1 "$WORK/imports.txt")"
fi

# 200 s cap: the rotary tests' cold Inductor compiles (four graphs; ~25 s on the CPU here) come first.
if want tests; then
    run_part "GPU parity tests (pytest -m gpu)" 200 $((${#PRESETS[@]} + 3)) pytest_gpu.txt \
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
    throughput_row "$preset" $((n + 4))  # the quick start and three feature rows still to come
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
    AFTER=3 quickstart "quick start on the GPU: launcher/run.py --preset tiny (20 steps)" quickstart.txt
    row "quick start tiny on GPU" "$QUICK"
else
    row "quick start tiny on GPU" "$NOT_WANTED"
fi

# 4. Newer features, one row each, after the core checks so that the budget serves those first; a feature this
# checkout lacks gets a "skipped: ..." row (the branches that bring them land in any order).
num_gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
feature_throughput() {  # feature_throughput ROW NAME CAP PARTS_AFTER PRESET [throughput.py args]: one JSON-backed row
    local title=$1 name=$2 cap=$3 after=$4 preset=$5; shift 5
    want features || { row "$title" "$NOT_WANTED"; return; }
    has_preset "'$preset'" || { row "$title" "skipped: no preset $preset in this checkout"; return; }
    run_part "$title" "$cap" "$after" "$name.txt" "$@" --preset "$preset" --json "$WORK/$name.json"
    local line="$(status_of), ${TOOK} s"
    if [ -f "$WORK/$name.json" ]; then
        line="$line; $("$PY" tools/throughput.py --markdown "$WORK/$name.json" --summary 2>&1 | tail -1)"
    else
        line="$line; $(grep -v '^\[\|it/s\]\|s/it\]' "$WORK/$name.txt" | grep -i -m1 "error" | sed 's/^ *//' | cut -c1-160)"
    fi
    row "$title" "$line"
}
# Muon's step time next to AdamW's (the deepspeed contender above): same preset and plan, training.optimizer=muon
# (a config without Muon refuses the key at once, and the row quotes the refusal).
feature_throughput "throughput 1b_transformer, optimizer Muon (deepspeed only)" 1b_transformer_muon 120 3 \
    1b_transformer "$PY" tools/throughput.py --seq_len "$SEQ" --steps "$STEPS" --warmup 2 --contenders deepspeed \
    --set "${GPU_CHECK_MUON_SET:-training.optimizer=muon}"
# Muon under fp16's dynamic loss scaler (DeepSpeed 0.19.8 rescales Muon's update by the loss scale at ZeRO 1-3; the
# CPU has no fp16, so this row is its only run): the quick start at ZeRO-2, its last validation loss must be finite.
if want features; then
    AFTER=2 quickstart "quick start tiny, Muon with fp16, ZeRO-2" quickstart_muon_fp16.txt \
        --set training.optimizer=muon --set training.fp16=true --set training.zero_stage=2
    result=$(grep -o 'val_loss [^ ]*' "$WORK/quickstart_muon_fp16.txt" | tail -1)
    [ -n "$result" ] || result=$(grep -i -m1 "error" "$WORK/quickstart_muon_fp16.txt" | cut -c1-160)
    row "quick start tiny, Muon fp16 ZeRO-2" "$QUICK; ${result:-no validation loss in the log}"
else
    row "quick start tiny, Muon fp16 ZeRO-2" "$NOT_WANTED"
fi
# Long context on one GPU: the 32k preset's own sequence length.
feature_throughput "throughput 1b_transformer_32k (long context, deepspeed only)" 1b_transformer_32k 150 1 \
    1b_transformer_32k "$PY" tools/throughput.py --contenders deepspeed --steps 2 --warmup 1
# Ulysses sequence parallelism needs one GPU per rank (NCCL refuses two ranks on one device).
if ! want features; then
    row "Ulysses parity and SP=2 throughput" "$NOT_WANTED"
elif [ ! -f tests/model/sequence_parallel_parity.py ]; then
    row "Ulysses parity and SP=2 throughput" "skipped: not in this checkout (tests/model/sequence_parallel_parity.py)"
elif [ "$num_gpus" -lt 2 ]; then
    row "Ulysses parity and SP=2 throughput" "skipped: $num_gpus GPU (Ulysses needs 2; the CPU tests cover it on gloo)"
else
    run_part "Ulysses parity, 2 GPUs" 120 1 ulysses_parity.txt "$PY" -m torch.distributed.run --nproc_per_node 2 \
        tests/model/sequence_parallel_parity.py transformer_gqa transformer_mqa mamba2_one_group mamba2_four_groups
    row "Ulysses parity, 2 GPUs (tests/model/sequence_parallel_parity.py)" \
        "$(status_of), ${TOOK} s; $(grep -h "grad_diff" "$WORK/ulysses_parity.txt" | tr '\n' ';' | cut -c1-200)"
    run_part "Ulysses throughput 1b_transformer_32k, SP=2" 150 0 sp2.txt "$PY" -m torch.distributed.run \
        --nproc_per_node 2 tools/throughput.py --preset 1b_transformer_32k --sequence_parallel 2 --steps 2 --warmup 1 \
        --json "$WORK/1b_transformer_32k_sp2.json"
    line="$(status_of), ${TOOK} s"
    [ -f "$WORK/1b_transformer_32k_sp2.json" ] && \
        line="$line; $("$PY" tools/throughput.py --markdown "$WORK/1b_transformer_32k_sp2.json" --summary 2>&1 | tail -1)"
    row "Ulysses throughput 1b_transformer_32k, SP=2" "$line"
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
