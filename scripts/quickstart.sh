#!/usr/bin/env bash
# Fresh machine -> venv -> Brown dataset -> tiny CPU training run (2 processes) -> final val_bpb and a loss plot.
#   bash scripts/quickstart.sh
# Env: RUN_ID (default quickstart_<time>), NPROC (default 2), PRESET (default tiny), LOG_DIR (default logs),
#      TORCH_INDEX_URL and PYTHON (scripts/setup_venv.sh says which torch it installs, and from where).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
t0=$(date +%s)

# shellcheck source=scripts/setup_venv.sh
. scripts/setup_venv.sh
setup_venv .venv matplotlib  # matplotlib only draws the plot at the end

export RUN_ID=${RUN_ID:-quickstart_$(date +%Y%m%d_%H%M%S)}
export PRESET=${PRESET:-tiny}
LOG_DIR=${LOG_DIR:-logs}
echo "== checking the configuration (PRESET=$PRESET and the environment's variables)" >&2
python - <<'PY'  # once, here: under torchrun each process would meet the error in the middle of torchrun's report
import sys

import train_gpt

try:
    train_gpt.load_hparams()
except train_gpt.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
PY

echo "== building the Brown dataset" >&2
DATA_PATH=$(python scripts/prepare_data.py local | tail -n 1)
export DATA_PATH

echo "== training: PRESET=$PRESET torchrun --standalone --nproc_per_node=${NPROC:-2} train_gpt.py (RUN_ID=$RUN_ID)" >&2
torchrun --standalone --nproc_per_node="${NPROC:-2}" train_gpt.py

python - "$LOG_DIR/$RUN_ID.json" <<'PY'
import json, sys
path = sys.argv[1]
try:
    r = json.load(open(path))
except (OSError, ValueError) as e:
    sys.exit(f"error: {path}: no results ({e}); see the run's text log beside it")
if "val_bpb" not in r:
    sys.exit(f"error: {path}: no val_bpb (status {r.get('status')}); see the run's text log beside it")
stages = ", ".join(f"{name} {s['val_bpb']:.4f}" for name, s in r.get("stages", {}).items())
print(f"final val_bpb {r['val_bpb']:.4f} (val_loss {r.get('val_loss', float('nan')):.4f}, run {r.get('run_id')}, {path})")
print(f"stages: {stages}")
PY
if python -c 'import matplotlib' 2>/dev/null; then
  python scripts/plot_runs.py "$LOG_DIR/$RUN_ID.txt" --out "$LOG_DIR/$RUN_ID.png" 2>/dev/null \
    && echo "plot: $LOG_DIR/$RUN_ID.png (train loss by step, val_bpb of each evaluation stage)" \
    || echo "plot: not drawn (python scripts/plot_runs.py $LOG_DIR/$RUN_ID.txt says why)"
else
  echo "plot: not drawn, matplotlib is missing (pip install matplotlib; python scripts/plot_runs.py $LOG_DIR/$RUN_ID.txt)"
fi
echo "quick start done in $((($(date +%s) - t0 + 30) / 60)) min" >&2
