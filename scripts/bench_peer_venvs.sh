#!/usr/bin/env bash
# Install the peers of scripts/bench_train.py into their own venvs: PEERS_DIR/axolotl, PEERS_DIR/llamafactory.
#   bash scripts/bench_peer_venvs.sh [PEERS_DIR]      (default /tmp/peers; ~10 minutes, mostly downloads)
# torch is pinned to 2.13.0 in each, so pip takes the CPU wheel this machine's index holds instead of fetching a
# CUDA build. scripts/bench_peers.py says why each environment fix below is needed.
set -euo pipefail
PEERS_DIR=${1:-/tmp/peers}
PYTHON=${PYTHON:-python3.11}   # axolotl >= 0.20 needs 3.12, which has no CPU torch 2.13 wheel here
mkdir -p "$PEERS_DIR"

install() {  # NAME PACKAGE==VERSION
  local venv="$PEERS_DIR/$1"
  [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
  "$venv/bin/pip" install -q torch==2.13.0
  "$venv/bin/pip" install -q torch==2.13.0 "$2"
}

install axolotl axolotl==0.19.0
install llamafactory llamafactory==0.9.5
# LLaMA-Factory imports torchvision and torchaudio at start; their PyPI wheels need CUDA torch.
"$PEERS_DIR/llamafactory/bin/pip" uninstall -q -y torchvision torchaudio || true
site=$("$PEERS_DIR/llamafactory/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p "$site/torchaudio"
echo '"""Empty stand-in (scripts/bench_peer_venvs.sh): LLaMA-Factory imports torchaudio for audio data only."""' \
  > "$site/torchaudio/__init__.py"
for peer in axolotl llamafactory; do
  "$PEERS_DIR/$peer/bin/python" -c "import importlib.metadata as m; print('$peer', m.version('$peer'), 'torch', m.version('torch'))"
done
