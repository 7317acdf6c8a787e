"""scripts/preflight.py end to end on the CPU proxy: PRESET=tiny on the Brown data, 2 training steps at a smaller
batch, a 2,048-token validation slice. A green run (exit 0, every figure printed), a red one (exit 1, the fix
lines), and a bad variable or option (exit 2, one line)."""
from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT

SCRIPT = ROOT / "scripts" / "preflight.py"
FIGURES = ("train:", "ms/step:", "tokens/s:", "MFU: n/a", "peak memory:", "attention kernel: sdpa",
           "recompiles in the timed loop:", "projected ms/step on 8 x", "projected steps", "export:", "artifact:",
           "eval:", "  roundtrip", "  sliding", "  ttt", "  ngram", "eval total:")


def preflight(data, *args: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "RESUME_FROM")}
    full.update(PRESET="tiny", DATA_PATH=str(data), TRAIN_BATCH_TOKENS="2048", GPTQ_TOKENS="2048", **env)
    return subprocess.run([sys.executable, str(SCRIPT), "--steps", "2", "--val-tokens", "2048", *args], cwd=ROOT,
                          env=full, capture_output=True, text=True, timeout=900)


def test_preflight_green_on_the_tiny_preset(brown_data):
    proc = preflight(brown_data)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    for figure in FIGURES:
        assert any(line.startswith(figure) for line in lines), (figure, proc.stdout)
    assert "RED FLAG" not in proc.stdout and lines[-1] == "preflight: all green"
    assert "QAT on for the last 1 step(s)" in proc.stdout  # QAT switches on inside the short run
    assert "2,048 of " in proc.stdout  # the slice asked for


def test_preflight_red_flags_say_what_to_change(brown_data):
    proc = preflight(brown_data, MAX_WALLCLOCK_SECONDS="600", EXPORT_RESERVE_SECONDS="0", EVAL_BUDGET_SECONDS="0.001")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    flags = [line for line in proc.stdout.splitlines() if line.startswith("RED FLAG: ")]
    assert len(flags) == 2, proc.stdout
    assert "set EXPORT_RESERVE_SECONDS to at least" in flags[0]
    assert "> EVAL_BUDGET_SECONDS=0.001" in flags[1] and "stage" in flags[1]
    assert "projected steps in 600s" in proc.stdout and proc.stdout.splitlines()[-1] == "preflight: 2 red flag(s)"


def test_preflight_bad_input_is_one_line(brown_data):
    proc = preflight(brown_data, NUM_HEADS="x")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: bad configuration: NUM_HEADS='x': expected int"]
    proc = subprocess.run([sys.executable, str(SCRIPT), "--steps", "1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --steps must be >= 2")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "usage:" in proc.stdout and "RED FLAG" in proc.stdout
