#!/usr/bin/env bash
# Every GPU check of the project in one run, for one GPU (< 8 minutes on one H200), installing nothing:
#   1. the GPU parity tests (pytest -m gpu: fused kernels against their references),
#   2. throughput, MFU and peak memory against the memory plan for test_small, 1b_transformer, 1b_mamba and 1b_hybrid
#      (the hybrid: mamba-ssm's fused Mamba-2 kernels and FlashAttention in one model, BambaForCausalLM beside it;
#      its line adds up to 120 s, not yet timed on a GPU)
#      (tools/throughput.py: short runs, the plan's micro-batch, sequence 2048, next to a plain PyTorch loop and
#      transformers' model of the same shape), and 1b_transformer's DeepSpeed step with training.optimizer=muon,
#   3. the quick start's "the same command uses the GPU" path (launcher/run.py --preset tiny, a few steps),
#   extra: long context, 1b_transformer_32k throughput on one GPU (<= 150 s); with 2+ GPUs the Ulysses parity
#      script and an SP=2 throughput run (skipped, and said so, on one GPU: NCCL needs a GPU per rank),
# then one Markdown table (per-contender detail: tools/throughput.py --markdown $OUT/*.json). Needs requirements.txt, requirements-dev.txt and requirements-gpu.txt installed.
# Without CUDA it says "no GPU" and exits 0. Each part has a time limit; a throughput run stopped by its limit still
# reports the contenders it finished (tools/throughput.py catches the SIGTERM).
#
#   bash tools/gpu_check.sh            # results in gpu_check_results/ (GPU_CHECK_OUT to change)
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "no GPU: tools/gpu_check.sh checks the CUDA path and has nothing to run here (CPU tests: bash scripts/test.sh)"
    exit 0
fi
export DS_ACCELERATOR=cuda HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${GPU_CHECK_OUT:-gpu_check_results}
mkdir -p "$OUT"
STEPS=${GPU_CHECK_STEPS:-5}
declare -A STATUS

echo "== 1/3 GPU parity tests (pytest -m gpu)"
# 200 s: the rotary tests' cold Inductor compiles (four graphs; ~25 s on the CPU here, unmeasured on a GPU) come first.
timeout 200 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest_gpu.txt" | tail -25
code=${PIPESTATUS[0]}
STATUS[tests]="$(tail -1 "$OUT/pytest_gpu.txt") (exit $code)"

echo "== 2/3 throughput, MFU and peak memory vs the plan (sequence 2048)"
reports=()
for preset in test_small 1b_transformer 1b_mamba 1b_hybrid; do
    timeout 120 "$PY" tools/throughput.py --preset "$preset" --seq_len 2048 --steps "$STEPS" --warmup 2 \
        --json "$OUT/$preset.json" 2>&1 | grep -v "^\[\|it/s\]\|s/it\]" | tee "$OUT/$preset.txt"
    code=${PIPESTATUS[0]}
    STATUS[$preset]="exit $code"
    [ -f "$OUT/$preset.json" ] && reports+=("$OUT/$preset.json")
done

# Muon's step time next to AdamW's (the deepspeed contender above): same preset and plan, training.optimizer=muon.
timeout 120 "$PY" tools/throughput.py --preset 1b_transformer --seq_len 2048 --steps "$STEPS" --warmup 2 \
    --contenders deepspeed --set training.optimizer=muon --json "$OUT/1b_transformer_muon.json" 2>&1 \
    | grep -v "^\[\|it/s\]\|s/it\]" | tee "$OUT/1b_transformer_muon.txt"
STATUS[muon]="exit ${PIPESTATUS[0]}"

echo "== 3/3 quick start on the GPU: launcher/run.py --preset tiny (20 steps)"
timeout 120 "$PY" launcher/run.py --preset tiny --set training.max_steps=20 --set training.eval_interval=20 \
    --set training.save_interval=20 --set training.warmup_steps=2 --set training.sample_tokens=20 \
    --set training.output_dir="$OUT/quickstart/outputs" --set training.checkpoint_dir="$OUT/quickstart/checkpoints" \
    > "$OUT/quickstart.txt" 2>&1
code=$?
tail -8 "$OUT/quickstart.txt"
device_line=$(grep -m1 -i "cuda\|gpu" "$OUT/quickstart.txt" | cut -c1-100)
STATUS[quickstart]="exit $code; ${device_line:-no device line found}"

echo "== extra: long context (1b_transformer_32k on one GPU; Ulysses parity and SP throughput when 2+ GPUs)"
timeout 150 "$PY" tools/throughput.py --preset 1b_transformer_32k --contenders deepspeed --steps 2 --warmup 1 \
    --json "$OUT/1b_transformer_32k.json" 2>&1 | grep -v "^\[\|it/s\]\|s/it\]" | tee "$OUT/1b_transformer_32k.txt"
STATUS[long_context]="exit ${PIPESTATUS[0]}"
NUM_GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$NUM_GPUS" -ge 2 ]; then  # Ulysses needs one GPU per rank: NCCL refuses two ranks on one device
    timeout 120 "$PY" -m torch.distributed.run --nproc_per_node 2 tests/model/sequence_parallel_parity.py \
        transformer_gqa transformer_mqa mamba2_one_group mamba2_four_groups > "$OUT/ulysses_parity.txt" 2>&1
    STATUS[ulysses]="exit $?; $(grep -h "grad_diff" "$OUT/ulysses_parity.txt" | tr '\n' ';')"
    timeout 150 "$PY" -m torch.distributed.run --nproc_per_node 2 tools/throughput.py --preset 1b_transformer_32k \
        --sequence_parallel 2 --steps 2 --warmup 1 --json "$OUT/1b_transformer_32k_sp2.json" > "$OUT/sp2.txt" 2>&1
    STATUS[ulysses_throughput]="exit $?"
else
    STATUS[ulysses]="skipped: $NUM_GPUS GPU (Ulysses parity needs 2)"
    STATUS[ulysses_throughput]="skipped: $NUM_GPUS GPU"
fi

echo
echo "## GPU check, $(date -u +%Y-%m-%d), $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0), "torch", torch.__version__)')"
echo
echo "| check | result |"
echo "|---|---|"
echo "| pytest -m gpu | ${STATUS[tests]} |"
for preset in test_small 1b_transformer 1b_mamba 1b_hybrid; do
    line="${STATUS[$preset]}"
    if [ -f "$OUT/$preset.json" ]; then
        line="$line; $("$PY" tools/throughput.py --markdown "$OUT/$preset.json" --summary)"
    fi
    echo "| throughput $preset | $line |"
done
line="${STATUS[muon]}"
if [ -f "$OUT/1b_transformer_muon.json" ]; then
    line="$line; $("$PY" tools/throughput.py --markdown "$OUT/1b_transformer_muon.json" --summary)"
fi
echo "| throughput 1b_transformer, optimizer Muon (deepspeed only) | $line |"
echo "| quick start tiny on GPU | ${STATUS[quickstart]} |"
for name in 1b_transformer_32k 1b_transformer_32k_sp2; do
    [ -f "$OUT/$name.json" ] && echo "| throughput $name | $("$PY" tools/throughput.py --markdown "$OUT/$name.json" --summary) |"
done
echo "| long context 1b_transformer_32k | ${STATUS[long_context]} |"
echo "| Ulysses parity, 2 GPUs (tests/model/sequence_parallel_parity.py) | ${STATUS[ulysses]} |"
echo "| Ulysses throughput 1b_transformer_32k, SP=2 | ${STATUS[ulysses_throughput]} |"
