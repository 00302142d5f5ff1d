#!/usr/bin/env bash
# One-shot GPU check (issue 17): install the carried wheels into this machine's Python, then run
# scripts/gpu_check.py, which writes docs/gpu-<date>.md. Budget: under 8 minutes on one H100/H200
# (wheels ~1 min, a ~1B model generated on the GPU, 8 runs capped by gpu_check.py's --budget).
#
#   bash scripts/gpu_check.sh [--wheels DIR] [gpu_check.py options]     on the GPU machine
#   bash scripts/gpu_check.sh --dry-run                                   anywhere: the same cases, tiny, on the CPU
#
# DIR (default shared/wheels) comes from scripts/gather_gpu_wheels.py, run where the package index is reachable.
# For the nvidia-h200 machine (Python 3.12, torch cu13; the device tool carries at most 64 MiB), 29 MiB:
#   python scripts/gather_gpu_wheels.py --python 3.12 --cuda 130 132 --skip pyarrow pandas numpy accelerate \
#     tokenizers safetensors pyyaml rich typer jinja2 markupsafe requests filelock fsspec tqdm packaging psutil \
#     regex xxhash aiohttp aiosignal frozenlist multidict yarl propcache attrs aiohappyeyeballs idna certifi \
#     charset-normalizer urllib3 click shellingham pygments markdown-it-py mdurl typing-extensions \
#     python-dateutil six hf-xet httpx httpcore h11 anyio sniffio sympy mpmath networkx scipy msgpack ninja \
#     py-cpuinfo einops pillow protobuf
# then run this with carry ["shared"] (shared/ is ignored by git).
# torch is never installed here: the GPU machine's own CUDA build is used.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=shared/wheels
DRY=0
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS=$2; shift 2 ;;
    --dry-run) DRY=1; ARGS+=("$1"); shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
PY=${PYTHON:-python3}
start=$(date +%s)
if [ "$DRY" = 0 ]; then
  "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA GPU visible to torch")'
  if [ -d "$WHEELS" ]; then
    # Only what the carried directory holds, never the network; packages already installed at the pinned
    # version are left alone. The requirement list is the one gather_gpu_wheels.py wrote next to the wheels.
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" -r "$WHEELS/requirements.txt"
  else
    echo "no $WHEELS: using the packages this Python already has" >&2
  fi
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" scripts/gpu_check.py ${ARGS[@]+"${ARGS[@]}"}
echo "gpu_check.sh: $(( $(date +%s) - start )) s in all" >&2
