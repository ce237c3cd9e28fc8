#!/usr/bin/env bash
# One entry for set-up + the two everyday jobs; creates or reuses the virtual environment.
#   bash tools/run.sh demo   train + evaluate the MaskFormer on the embedded demo data (CPU)
#   bash tools/run.sh test   run the test suite
# Environment: OPENSEG_VENV (default ~/.venvs/openseg), OPENSEG_PYTHON (a Python 3.10),
# OPENSEG_DATASETS (dataset root, default ./datasets), OPENSEG_DEVICE (demo device, default cpu).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
venv="${OPENSEG_VENV:-$HOME/.venvs/openseg}"

find_python() {
  local candidate
  for candidate in "${OPENSEG_PYTHON:-}" /root/.pyenv/versions/3.10.13/bin/python python3.10 python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 10))' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  echo "tools/run.sh: no Python 3.10 found; set OPENSEG_PYTHON to one (detectron2's only current wheel is cp310)." >&2
  return 1
}

setup_env() {
  if [ ! -x "$venv/bin/python" ]; then
    local python; python="$(find_python)"
    echo "[openseg] creating virtual environment $venv"
    "$python" -m venv "$venv"
  fi
  local py="$venv/bin/python"
  # requirements are reinstalled when they change; the editable install when this checkout
  # (or setup.py) is not the one the environment points at, e.g. a fresh clone in CI
  local req_stamp="$venv/.openseg-requirements" src_stamp="$venv/.openseg-source"
  local want_req want_src
  want_req="$(sha256sum requirements.txt | cut -d' ' -f1)"
  want_src="$here $(sha256sum setup.py | cut -d' ' -f1)"
  if [ "$(cat "$req_stamp" 2>/dev/null)" != "$want_req" ]; then
    echo "[openseg] installing requirements into $venv"
    "$py" -m pip install --disable-pip-version-check -q -r requirements.txt
    "$py" -m pip install --disable-pip-version-check -q --no-deps "torchscale==0.3.0"
    # a detectron2 the user built from source is kept; otherwise the cp310 wheel of main
    if ! "$py" -c 'import detectron2' 2>/dev/null; then
      "$py" -m pip install --disable-pip-version-check -q "sal-detectron2==0.7.2"
    fi
    echo "$want_req" > "$req_stamp"
  fi
  if [ "$(cat "$src_stamp" 2>/dev/null)" != "$want_src" ]; then
    echo "[openseg] installing openseg from $here (editable)"
    "$py" -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
    echo "$want_src" > "$src_stamp"
  fi
  # WordNet 3.0 for the lexical evaluation (Debian package, copied where nltk reads it)
  local nltk_data
  if nltk_data="$(bash tools/setup_wordnet.sh | tail -n 1)"; then
    export NLTK_DATA="$nltk_data"
  else
    echo "[openseg] WordNet is not available: the lexical evaluation needs it (tools/setup_wordnet.sh)" >&2
  fi
  PY="$py"
}

case "${1:-}" in
  demo)
    shift
    setup_env
    out="${OPENSEG_DEMO_OUTPUT:-output/demo}"
    "$PY" tools/train_net.py --config-file configs/demo/maskformer_R18.yaml \
      MODEL.DEVICE "${OPENSEG_DEVICE:-cpu}" OUTPUT_DIR "$out" "$@"
    "$PY" tools/demo.py --config-file configs/demo/maskformer_R18.yaml \
      --input "${OPENSEG_DATASETS:-datasets}/openseg_demo/images/val" --max-images 4 \
      --output "$out/visualised" \
      MODEL.WEIGHTS "$out/model_final.pth" MODEL.DEVICE "${OPENSEG_DEVICE:-cpu}"
    ;;
  test)
    shift
    setup_env
    set +e
    "$PY" -m pytest tests -q "$@"
    rc=$?
    set -e
    if [ "$rc" -eq 5 ]; then
      echo "tools/run.sh: pytest collected no tests: that is a failure here." >&2
      exit 1
    fi
    exit "$rc"
    ;;
  *)
    echo "usage: bash tools/run.sh demo|test [extra args]" >&2
    exit 2
    ;;
esac
