#!/usr/bin/env bash
# Fresh machine -> venv -> Brown dataset -> tiny CPU training run (2 processes) -> final val_bpb.
#   bash scripts/quickstart.sh
# Env: RUN_ID (default quickstart_<time>), NPROC (default 2), PRESET (default tiny),
#      TORCH_INDEX_URL (see .ci/run).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv" >&2
  "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
echo "== pip install torch==2.13.0 + requirements.txt" >&2
python -m pip install -q torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
python -m pip install -q -r requirements.txt

echo "== building the Brown dataset" >&2
DATA_PATH=$(python scripts/prepare_data.py local | tail -n 1)
export DATA_PATH
export RUN_ID=${RUN_ID:-quickstart_$(date +%Y%m%d_%H%M%S)}
export PRESET=${PRESET:-tiny}

echo "== training: PRESET=$PRESET torchrun --standalone --nproc_per_node=${NPROC:-2} train_gpt.py (RUN_ID=$RUN_ID)" >&2
torchrun --standalone --nproc_per_node="${NPROC:-2}" train_gpt.py

python - "logs/$RUN_ID.json" <<'PY'
import json, sys
path = sys.argv[1]
try:
    r = json.load(open(path))
except (OSError, ValueError) as e:
    sys.exit(f"error: {path}: no results ({e}); see logs/ for the run's text log")
if "val_bpb" not in r:
    sys.exit(f"error: {path}: no val_bpb (status {r.get('status')}); see the run's text log")
print(f"final val_bpb {r['val_bpb']:.4f} (val_loss {r.get('val_loss', float('nan')):.4f}, run {r.get('run_id')}, {path})")
PY
