"""End-to-end runs of train_gpt.py on CPU: results file, logs, wall-clock cap, divergence, determinism, torchrun."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

FAST = dict(MODEL_DIM="64", NUM_LAYERS="2", BIGRAM_DIM="16", VE_DIM="16", TRAIN_BATCH_TOKENS="4096",
            ITERATIONS="6", WARMDOWN_ITERS="3", WARMDOWN_FRAC="0", TRAIN_LOG_EVERY="2", VAL_MAX_TOKENS="8193")


def run_script(tmp_path, brown_data, nproc=0, **env):
    """Run train_gpt.py (nproc>0: under torchrun) and return (process, results dict or None)."""
    full = {**os.environ, "PRESET": "tiny", "DATA_PATH": str(brown_data), "LOG_DIR": str(tmp_path),
            "RUN_ID": "r", **FAST, **{k: str(v) for k, v in env.items()}}
    cmd = [sys.executable, str(ROOT / "train_gpt.py")]
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] + cmd[1:]
    proc = subprocess.run(cmd, env=full, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    path = tmp_path / f"{full['RUN_ID']}.json"
    return proc, json.loads(path.read_text()) if path.exists() else None


def test_run_writes_log_and_results(tmp_path, brown_data):
    proc, res = run_script(tmp_path, brown_data)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for key in ("run_id", "seed", "status", "config", "steps", "train_seconds", "eval_seconds", "code_bytes",
                "model_bytes", "artifact_bytes", "stages", "val_bpb", "artifact_path"):
        assert key in res, key
    assert res["status"] == "ok" and res["steps"] == 6 and res["config"]["model_dim"] == 64
    assert res["code_bytes"] == (ROOT / "train_gpt.py").stat().st_size
    assert res["artifact_bytes"] == res["code_bytes"] + res["model_bytes"]
    assert all({"val_loss", "val_bpb", "seconds", "targets_per_s"} <= set(s) for s in res["stages"].values())
    log = (tmp_path / "r.txt").read_text()
    assert log.startswith("config: ") and "step 6/6 loss" in log and "ms/step" in log and "eta" in log
    # the config line alone reproduces the run: it holds every effective value
    assert json.loads(log.splitlines()[0][len("config: "):]) == res["config"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_same_seed_is_deterministic_on_cpu(tmp_path, brown_data):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    _, a = run_script(tmp_path / "a", brown_data, SEED=7)
    _, b = run_script(tmp_path / "b", brown_data, SEED=7)
    assert a["val_loss"] == b["val_loss"]


def test_wallclock_cap_stops_training(tmp_path, brown_data):
    """The cap, not ITERATIONS, ends training, whatever the machine's speed (no wall time is asserted)."""
    proc, res = run_script(tmp_path, brown_data, ITERATIONS=100000, MAX_WALLCLOCK_SECONDS=2, EXPORT_RESERVE_SECONDS=0)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 0 < res["steps"] < 100000 and res["train_loop_seconds"] >= 2
    assert f"stopping at step {res['steps']}: wall-clock cap 2s reached" in (tmp_path / "r.txt").read_text()


def test_divergence_fails_with_results_marked_failed_within_10_steps(tmp_path, brown_data):
    # an embedding of 1e30 overflows float32 in the first forward; the loss is checked every 10 steps whatever
    # TRAIN_LOG_EVERY is (inf itself is refused as a value)
    proc, res = run_script(tmp_path, brown_data, TIED_EMBED_INIT_STD="1e30", ITERATIONS=40, TRAIN_LOG_EVERY=1000)
    assert proc.returncode == 1
    assert res["status"] == "failed" and "train loss is nan at step 10;" in res["error"] and res["steps"] == 10


def test_bad_env_value_is_one_line_error(tmp_path, brown_data):
    proc, res = run_script(tmp_path, brown_data, NUM_HEADS="x")
    assert proc.returncode == 2 and res is None
    assert proc.stderr.strip() == "error: NUM_HEADS='x': expected int"


def test_bad_env_value_under_torchrun_is_printed_once(tmp_path, brown_data):
    proc, res = run_script(tmp_path, brown_data, nproc=2, PRESET="tinyy")
    assert proc.returncode != 0 and res is None
    assert proc.stderr.count("error: PRESET='tinyy': unknown") == 1, proc.stderr  # rank 0's line, not one per rank


def test_missing_data_is_one_line_error(tmp_path):
    proc, _ = run_script(tmp_path, tmp_path / "nowhere")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "nowhere" in proc.stderr and "prepare_data.py" in proc.stderr


def test_torchrun_two_processes_match_one(tmp_path, brown_data):
    (tmp_path / "one").mkdir(), (tmp_path / "two").mkdir()
    p1, one = run_script(tmp_path / "one", brown_data, nproc=1)
    p2, two = run_script(tmp_path / "two", brown_data, nproc=2)
    assert p1.returncode == 0 and p2.returncode == 0, p2.stderr[-3000:]
    assert "broadcast_buffers" not in p2.stderr  # DDP's argument is deprecated in torch 2.13: a warning every run
    assert one["config"]["grad_accum_steps"] == two["config"]["grad_accum_steps"] == 0
    assert abs(one["val_loss"] - two["val_loss"]) < 1e-3, (one["val_loss"], two["val_loss"])
