"""End-to-end runs of train_gpt.py on CPU at scale and through failure: eight gloo ranks of the default model width
and depth through every stage, and a run killed (SIGKILL) during evaluation finished by RESUME_FROM with the score
the uninterrupted run gets."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from test_train import FAST

import train_gpt

# every Hyperparameters variable is set explicitly by these tests, never inherited from the calling environment
HP_VARS = {f.name.upper() for f in dataclasses.fields(train_gpt.Hyperparameters)}

# PRESET=default at its width and depth (11 layers, width 512, 8 heads / 4 kv heads, MLP 3x), shrunk everywhere else:
# 8 ranks x grad_accum 1 x one 64-token sequence per step, QAT on from the last step, a 4,096-target validation slice
DEFAULT_SHAPE_SMALL_RUN = dict(
    PRESET="default", TRAIN_SEQ_LEN=64, EVAL_SEQ_LEN=64, TRAIN_BATCH_TOKENS=512, ITERATIONS=3, WARMDOWN_ITERS=2,
    WARMUP_STEPS=0, COMPILE=0, MAX_WALLCLOCK_SECONDS=0, TRAIN_LOG_EVERY=1, VAL_MAX_TOKENS=4097,
    VAL_BATCH_TOKENS=1024, GPTQ_TOKENS=1024, EVAL_STRIDE=32, TTT_CHUNK_TOKENS=32, EVAL_AUDIT=1, QAT_THRESHOLD=0.9,
    CODEC="zstd",  # one codec instead of three per group: export is most of this test's time on two cores
)
STAGES = ["roundtrip", "ttt", "ngram"]  # TTT scores the sliding windows itself


def clean_env(**env) -> dict[str, str]:
    """The calling environment without any train_gpt variable, plus env."""
    return {**{k: v for k, v in os.environ.items() if k not in HP_VARS}, **{k: str(v) for k, v in env.items()}}


def run_train(cwd: Path, env: dict[str, str], nproc: int = 0, code: str | None = None, timeout: int = 900):
    """train_gpt.py (or `python -c code`; nproc > 0: under torchrun) as a subprocess -> (process, results or None)."""
    cmd = [sys.executable, "-c", code] if code else [sys.executable, str(ROOT / "train_gpt.py")]
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] + cmd[1:]
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    path = Path(env["LOG_DIR"]) / f"{env.get('RUN_ID', 'r')}.json"
    return proc, json.loads(path.read_text()) if path.exists() else None


def test_eight_gloo_processes_default_width_and_depth_end_to_end(tmp_path, brown_data):
    env = clean_env(DATA_PATH=brown_data, LOG_DIR=tmp_path / "logs", RUN_ID="r8", OMP_NUM_THREADS=1,
                    **DEFAULT_SHAPE_SMALL_RUN)
    proc, res = run_train(tmp_path, env, nproc=8)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert res["status"] == "ok", res.get("error")
    # every key the run wrote is declared in train_gpt.Results (docs/RECORD.md lists them)
    assert set(res) <= set(train_gpt.Results.__annotations__), set(res) - set(train_gpt.Results.__annotations__)
    assert all(set(s) <= set(train_gpt.StageResult.__annotations__) for s in res["stages"].values())
    cfg = res["config"]
    assert (cfg["num_layers"], cfg["model_dim"], cfg["num_heads"], cfg["num_kv_heads"], cfg["mlp_mult"]) == (
        11, 512, 8, 4, 3.0)
    assert res["params"] > 20_000_000 and res["steps"] == 3
    assert res["qat_stages"] and res["qat_stages"][0][0] <= 3  # QAT switched on inside the run
    # every evaluation stage ran, and every rank holds the same score in each
    assert list(res["stages"]) == STAGES
    for name, s in res["stages"].items():
        assert s["rank_spread"] == 0.0, (name, s)
    assert res["val_bpb"] == res["stages"]["ngram"]["val_bpb"]
    assert res["audit"]["passed"] is True, res["audit"]
    # export: artifact on disk of the counted size, quant report, GPTQ Hessians from the training tokens asked for
    artifact = Path(res["artifact_path"])
    assert artifact.is_file() and artifact.stat().st_size == res["model_bytes"]
    assert res["artifact_bytes"] == res["code_bytes"] + res["model_bytes"] <= 16_000_000
    assert res["quant"]["gptq"] is True and res["quant"]["groups"] and res["quant"]["roles"]
    assert res["gptq_tokens_used"] >= 1024
    assert abs(res["train_seconds"] - (res["train_loop_seconds"] + res["checkpoint_seconds"]
                                       + res["export_seconds"])) <= 0.01
    log = (tmp_path / "logs" / "r8.txt").read_text()
    assert "world_size 8" in log and "eval audit: passed" in log and "WARNING: eval" not in log


def test_run_killed_during_evaluation_is_finished_by_resume_with_the_same_score(tmp_path, brown_data):
    small = {**FAST, **dict(PRESET="tiny", DATA_PATH=brown_data, RUN_ID="r", SEED=11, VAL_MAX_TOKENS=8193,
                            TTT_ENABLED=1, NGRAM_ORDER=7)}
    full_dir, killed_dir, resumed_dir = tmp_path / "full", tmp_path / "killed", tmp_path / "resumed"

    # 1. uninterrupted
    proc, full = run_train(tmp_path, clean_env(LOG_DIR=full_dir, **small))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert full["status"] == "ok" and list(full["stages"]) == STAGES

    # 2. identical, but killed for real (SIGKILL: no finally, no results) when the TTT stage starts
    kill = ("import os, signal, sys; sys.path.insert(0, {root!r}); import train_gpt as T; "
            "T.eval_ttt = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL); sys.exit(T.main())"
            ).format(root=str(ROOT))
    proc, killed = run_train(tmp_path, clean_env(LOG_DIR=killed_dir, **small), code=kill)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-3000:])
    assert killed is None or killed["status"] != "ok"
    log = (killed_dir / "r.txt").read_text()
    assert "eval roundtrip:" in log and "eval ttt:" not in log
    ckpt = killed_dir / "r.ckpt"
    assert ckpt.is_file()

    # 3. resume: the configuration comes from the checkpoint
    proc, resumed = run_train(tmp_path, clean_env(RESUME_FROM=ckpt, LOG_DIR=resumed_dir, DATA_PATH=brown_data, RUN_ID="r"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert resumed["status"] == "ok"
    assert resumed["val_bpb"] == full["val_bpb"] and resumed["val_loss"] == full["val_loss"]
    assert list(resumed["stages"]) == list(full["stages"])
    assert {k: s["val_bpb"] for k, s in resumed["stages"].items()} == {k: s["val_bpb"] for k, s in full["stages"].items()}
    assert resumed["model_bytes"] == full["model_bytes"] and resumed["steps"] == full["steps"] == 6
    assert resumed["config"] == {**full["config"], "log_dir": str(resumed_dir), "resume_from": str(ckpt)}
    log = (resumed_dir / "r.txt").read_text()
    assert "resume:" in log and "step 1/" not in log  # training skipped


@pytest.mark.parametrize("content", [None, b"", b"PGW1" + b"\0" * 100, b"not a checkpoint"],
                         ids=["missing", "empty", "corrupt", "foreign"])
def test_resume_from_a_missing_or_corrupt_file_is_a_one_line_error(tmp_path, brown_data, content):
    ckpt = tmp_path / "r.ckpt"
    if content is not None:
        ckpt.write_bytes(content)
    proc, res = run_train(tmp_path, clean_env(RESUME_FROM=ckpt, LOG_DIR=tmp_path, DATA_PATH=brown_data))
    assert proc.returncode == 2 and res is None
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and str(ckpt) in err, err
