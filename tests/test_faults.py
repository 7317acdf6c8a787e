"""What a run leaves when things go wrong: a signal (SIGTERM to torchrun, a killed worker), a RUN_ID already in use, a
failed checkpoint write, a tampered file, a mistyped or non-finite variable, bad shards and tokenizers; and a training
checkpoint that resumes to the same losses and the same artifact bytes."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from test_e2e_distributed import clean_env, run_train
from test_train import FAST

import train_gpt as T

QUICK = {**FAST, "PRESET": "tiny", "TTT_ENABLED": 0, "NGRAM_ORDER": 0, "OMP_NUM_THREADS": 1}
# the restored state has to hold more than weights: curriculum draws, looping, QAT and SWA all cross the resume point
RESUME_FEATURES = dict(ITERATIONS=10, TRAIN_LOG_EVERY=1, WARMDOWN_ITERS=4, LR_WARMUP_STEPS=2, CURRICULUM_BUCKETS=2,
                       LOOP_LAYERS="0-0", LOOP_COUNT=2, LOOP_START=0.3, QAT_THRESHOLD=0.5, SWA_EVERY=1,
                       SWA_THRESHOLD=0.9, WEIGHT_AVG="swa", CKPT_EVERY=3)


def wrapper(tmp_path: Path, name: str, body: str) -> Path:
    """A script that patches train_gpt (body) and runs its main(): what torchrun launches in place of train_gpt.py."""
    path = tmp_path / f"{name}.py"
    path.write_text(f"import os, signal, sys, time\nsys.path.insert(0, {str(ROOT)!r})\nimport train_gpt as T\n"
                    f"{body}\nsys.exit(T.main())\n")
    return path


def torchrun(cwd: Path, env: dict, script: Path, nproc: int = 2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script)]
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    path = Path(env["LOG_DIR"]) / f"{env['RUN_ID']}.json"
    return proc, json.loads(path.read_text()) if path.exists() else None


def step_lines(log: Path) -> list[str]:
    """'step N/M loss X' of each logged step (the timing figures differ run to run)."""
    return re.findall(r"^step \d+/\d+ loss \S+", log.read_text(), re.M)


def test_sigterm_to_torchrun_leaves_interrupted_results_and_a_state_that_resumes_exactly(tmp_path, brown_data):
    env = clean_env(DATA_PATH=brown_data, **{**QUICK, **RESUME_FEATURES})
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    # 1. uninterrupted (its training checkpoints every 3 steps change nothing)
    proc, full = torchrun(tmp_path, {**env, "LOG_DIR": str(full_dir), "RUN_ID": "r"}, ROOT / "train_gpt.py")
    assert proc.returncode == 0 and full["status"] == "ok", proc.stderr[-3000:]
    assert "checkpoint: training state at step 9" in (full_dir / "r.txt").read_text()

    # 2. rank 1 sends SIGTERM to torchrun (its parent) as step 5 starts, then waits so both ranks hold the signal
    # before step 5 ends: torchrun forwards it, the ranks agree on it after step 5 and act on it after step 6
    term = wrapper(tmp_path, "term", "real = T.train_step\n"
                   "def step(run, *a):\n"
                   "    if run.rank == 1 and a[-1] == 4:\n"
                   "        os.kill(os.getppid(), signal.SIGTERM)\n"
                   "        time.sleep(2)\n"
                   "    return real(run, *a)\n"
                   "T.train_step = step")
    proc, cut = torchrun(tmp_path, {**env, "LOG_DIR": str(cut_dir), "RUN_ID": "r"}, term)
    assert proc.returncode != 0
    assert cut["status"] == "interrupted" and cut["steps"] == 6 and cut["train_loop_seconds"] > 0, cut
    assert "stopped by SIGTERM at step 6/10" in cut["error"] and "RESUME_FROM=" in cut["error"]
    assert (cut_dir / "r.ckpt").is_file() and not (cut_dir / "r.artifact").exists()
    assert sorted(p.name for p in cut_dir.iterdir()) == ["r.ckpt", "r.json", "r.txt"]  # no lock, no reserves

    # 3. resumed without a RUN_ID: its own files in the same LOG_DIR, the interrupted run's untouched
    before = {p.name: p.read_bytes() for p in cut_dir.iterdir()}
    env_r = clean_env(DATA_PATH=brown_data, OMP_NUM_THREADS=1, RESUME_FROM=cut_dir / "r.ckpt", LOG_DIR=cut_dir)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "train_gpt.py")], env=env_r, cwd=tmp_path, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in cut_dir.iterdir() if p.name in before} == before
    (new_json,) = [p for p in cut_dir.glob("*.json") if p.name != "r.json"]
    resumed = json.loads(new_json.read_text())
    assert resumed["status"] == "ok" and resumed["run_id"] != "r" and resumed["steps"] == 10
    log = cut_dir / f"{resumed['run_id']}.txt"
    assert "resume: " in log.read_text() and "at step 6/10" in log.read_text()
    assert step_lines(log) == step_lines(full_dir / "r.txt")[6:]  # steps 7..10, loss for loss
    assert Path(resumed["artifact_path"]).read_bytes() == (full_dir / "r.artifact").read_bytes()
    assert resumed["val_bpb"] == full["val_bpb"] and resumed["qat_stages"] == full["qat_stages"]
    assert resumed["looping_from_step"] == full["looping_from_step"]


def test_sigkill_of_one_worker_leaves_rank_0_results(tmp_path, brown_data):
    kill = wrapper(tmp_path, "kill", "real = T.train_step\n"
                   "def step(run, *a):\n"
                   "    if run.rank == 1 and a[-1] == 3:\n"
                   "        os.kill(os.getpid(), signal.SIGKILL)\n"
                   "    return real(run, *a)\n"
                   "T.train_step = step")
    env = clean_env(DATA_PATH=brown_data, LOG_DIR=tmp_path / "logs", RUN_ID="r",
                    **{**QUICK, "ITERATIONS": 100000, "TRAIN_LOG_EVERY": 1})
    proc, res = torchrun(tmp_path, env, kill)
    assert proc.returncode != 0
    assert res is not None and res["status"] in ("interrupted", "failed") and res["steps"] == 3, res
    assert res["error"] and "\n" not in res["error"]
    assert not (tmp_path / "logs" / "r.lock").exists()


def test_a_run_id_in_use_is_refused_before_anything_is_written(tmp_path, brown_data):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "r.txt").write_text("an earlier run\n")
    proc, res = run_train(tmp_path, clean_env(DATA_PATH=brown_data, LOG_DIR=logs, RUN_ID="r", **QUICK))
    assert proc.returncode == 2 and res is None
    assert proc.stderr.strip().splitlines() == [
        f"error: RUN_ID=r: {logs / 'r.txt'} exist(s); choose another RUN_ID, or set OVERWRITE=1 to replace them"]
    assert [p.name for p in logs.iterdir()] == ["r.txt"] and (logs / "r.txt").read_text() == "an earlier run\n"


def test_run_id_lock_overwrite_and_resume_into_itself(tmp_path):
    hp = T.load_hparams({"LOG_DIR": str(tmp_path), "RUN_ID": "r"})
    fd = T.lock_run(hp)
    try:  # a second run of that RUN_ID at the same time
        with pytest.raises(T.ConfigError, match="another run holds .*r.lock"):
            T.lock_run(hp)
    finally:
        os.close(fd)
    (tmp_path / "r.json").write_text("{}")
    with pytest.raises(T.ConfigError, match="OVERWRITE=1"):
        T.refuse_taken(hp)
    again = T.load_hparams({"LOG_DIR": str(tmp_path), "RUN_ID": "r", "OVERWRITE": "1"})
    T.refuse_taken(again)
    os.close(T.lock_run(again))  # the lock is free again (closed), the old files are gone
    assert not (tmp_path / "r.json").exists()
    (tmp_path / "r.ckpt").write_bytes(b"")
    with pytest.raises(T.ConfigError, match="give the resumed run its own RUN_ID"):
        T.refuse_taken(T.Hyperparameters(log_dir=str(tmp_path), run_id="r", resume_from=str(tmp_path / "r.ckpt")))


def test_a_failed_checkpoint_write_is_one_line_and_the_run_still_exports(tmp_path, brown_data):
    disk_full = wrapper(tmp_path, "disk_full", "import errno\nreal = os.replace\n"
                   "def replace(src, dst):\n"
                   "    if str(dst).endswith('.ckpt'):\n"
                   "        raise OSError(errno.ENOSPC, 'No space left on device')\n"
                   "    return real(src, dst)\n"
                   "os.replace = replace")
    logs = tmp_path / "logs"
    env = clean_env(DATA_PATH=brown_data, LOG_DIR=logs, RUN_ID="r", GPTQ=0, NUM_LAYRES=3, **QUICK)
    proc, res = run_train(tmp_path, env, code=disk_full.read_text())
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (logs / "r.txt").read_text()
    errors = [line for line in log.splitlines() if line.startswith("ERROR")]
    assert errors == [f"ERROR: checkpoint: {logs / 'r.ckpt'}: write failed (No space left on device); free disk space "
                      "there or set LOG_DIR / ARTIFACT_PATH elsewhere; the weights are still in memory and the run "
                      "goes on"]
    assert res["status"] == "ok" and "No space left on device" in res["checkpoint_error"]
    assert "checkpoint_path" not in res and not (logs / "r.ckpt").exists()
    assert T.load_artifact(logs / "r.artifact")  # the weights were not lost
    assert sorted(p.name for p in logs.iterdir()) == ["r.artifact", "r.json", "r.txt"]
    # a mistyped variable is named with the one it resembles
    assert ("WARNING: NUM_LAYRES is not a train_gpt.py variable and is ignored; did you mean NUM_LAYERS?"
            in log.splitlines())


def test_the_checksum_covers_the_header_length(tmp_path, brown_data):
    hp = T.load_hparams({"PRESET": "tiny", "MODEL_DIM": "64", "NUM_LAYERS": "2", "CODEC": "zstd"})
    T.export_artifact(T.GPT(hp), hp, tmp_path / "m.artifact")
    T.write_atomic(tmp_path / "c.ckpt", T.frame(T.CKPT_MAGIC, dict(config={}, results={}, tensors=[]), [])[1])
    assert T.read_checkpoint(tmp_path / "c.ckpt")[1] == {}
    for name, load in (("m.artifact", T.load_artifact), ("c.ckpt", T.read_checkpoint)):
        good = (tmp_path / name).read_bytes()
        for length in (5, 0xFFFFFFF0):
            (tmp_path / name).write_bytes(good[:4] + length.to_bytes(4, "little") + good[8:])
            with pytest.raises(T.ConfigError, match="checksum mismatch") as e:
                load(tmp_path / name)
            assert "\n" not in str(e.value)
    proc, _ = run_train(tmp_path, clean_env(RESUME_FROM=tmp_path / "c.ckpt", LOG_DIR=tmp_path, DATA_PATH=brown_data))
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and "checksum mismatch" in err, err


def test_a_checkpoint_carries_the_model_state_that_resume_restores(tmp_path):
    """Looping and QAT's bits are saved in the checkpoint's header and restored from there, not from results keys."""
    hp = T.load_hparams({"PRESET": "tiny", "MODEL_DIM": "64", "NUM_LAYERS": "2", "LOG_DIR": str(tmp_path),
                         "RUN_ID": "q", "LOOP_LAYERS": "0-0", "LOOP_COUNT": "2", "LOOP_START": "0.5"})
    run = T.Run(hp=hp, device=T.torch.device("cpu"), model=T.GPT(hp))
    run.log = lambda msg: None
    T.set_qat(run, 1)
    run.model.looping = True
    assert T.write_checkpoint(run, run.model.state_dict())
    header, tensors = T.read_checkpoint(tmp_path / "q.ckpt")
    assert header["model"] == dict(looping=True, qat_extra=1) and "qat_stages" not in header["results"]
    again = T.Run(hp=T.dataclasses.replace(hp, resume_from=str(tmp_path / "q.ckpt")), device=T.torch.device("cpu"),
                  model=T.GPT(hp))
    T.load_weights(again, header, tensors)
    up, saved = again.model.blocks[0].mlp.up, run.model.blocks[0].mlp.up
    assert again.model.looping and again.model.qat_extra == 1 and up.qat_fmt == saved.qat_fmt
    assert T.torch.equal(up.qat, saved.qat)


def test_a_checkpoint_without_model_state_is_refused_in_one_line():
    """Resume reads looping and QAT from the checkpoint's own model state; an older checkpoint has none and is refused
    with one line naming it, before any weight is loaded."""
    run = T.Run(hp=T.Hyperparameters(resume_from="old.ckpt"), device=T.torch.device("cpu"))
    with pytest.raises(T.ConfigError, match=r"RESUME_FROM=old.ckpt: written by an older train_gpt.py") as e:
        T.load_weights(run, dict(config={}, results={}, tensors=[]), {})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("var,value,expected", [
    ("MATRIX_LR", "nan", "MATRIX_LR='nan': expected a finite number"),
    ("EMA_DECAY", "-inf", "EMA_DECAY='-inf': expected a finite number"),
    ("TRAIN_SEQ_LEN", "7", "TRAIN_BATCH_TOKENS=4096: must divide into world_size(1) x grad_accum(8) x TRAIN_SEQ_LEN(7)"),
    ("TRAIN_BATCH_TOKENS", "100", "TRAIN_BATCH_TOKENS=100: must divide"),
    ("CKPT_EVERY", "5m", "CKPT_EVERY='5m': expected steps (500) or seconds (300s)"),
    ("VOCAB_SIZE", "10", "fineweb_val_000000.bin: token 1022 >= VOCAB_SIZE=10; the data and tokenizer/VOCAB_SIZE"),
])
def test_a_bad_value_exits_2_before_any_file_is_written(tmp_path, brown_data, var, value, expected):
    logs = tmp_path / "logs"
    proc, _ = run_train(tmp_path, clean_env(DATA_PATH=brown_data, LOG_DIR=logs, RUN_ID="r", **{**QUICK, var: value}))
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and expected in err, err
    assert not logs.exists()


def test_unknown_variables_are_named_with_the_closest_known_one():
    env = {"NUM_LAYRES": "3", "ITERATION": "5", "SEEDS": "1", "HOME": "/root", "PATH": "/bin", "LOCAL_RANK": "0",
           "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1", "MASTER_PORT": "1", "RANK": "0", "SHELL": "bash", "num_layres": "3"}
    assert T.unknown_variables(env) == [
        f"WARNING: {bad} is not a train_gpt.py variable and is ignored; did you mean {good}?"
        for bad, good in (("ITERATION", "ITERATIONS"), ("NUM_LAYRES", "NUM_LAYERS"), ("SEEDS", "SEED"))]


def data_copy(tmp_path: Path, brown_data: Path) -> Path:
    d = tmp_path / "data"
    shutil.copytree(brown_data, d)
    return d


def test_every_shard_is_checked_at_start_up_and_errors_name_the_file(tmp_path, brown_data):
    def refused(d: Path, **env) -> str:
        hp = T.load_hparams({"PRESET": "tiny", "DATA_PATH": str(d), "LOG_DIR": str(tmp_path / "logs"), **env})
        with pytest.raises(T.ConfigError) as e:
            T.setup(hp)
        assert "\n" not in str(e.value) and not (tmp_path / "logs").exists()
        return str(e.value)

    d = data_copy(tmp_path, brown_data)
    second = d / "fineweb_train_000001.bin"
    second.write_bytes(b"\0" * 2048)  # a later shard: only its header is read at start-up
    assert refused(d).startswith(f"{second}: wrong magic 0")
    second.unlink()
    val = bytearray((d / "fineweb_val_000000.bin").read_bytes())
    val[T.HEADER_INTS * 4:T.HEADER_INTS * 4 + 2] = (5000).to_bytes(2, "little")
    (d / "fineweb_val_000000.bin").write_bytes(bytes(val))
    assert refused(d).startswith(f"{d / 'fineweb_val_000000.bin'}: token 5000 >= VOCAB_SIZE=1024")
    foreign = tmp_path / "foreign.model"
    foreign.write_bytes(b"not a sentencepiece model")
    assert refused(brown_data, TOKENIZER_PATH=str(foreign)).startswith(f"TOKENIZER_PATH={foreign}: ")


def test_writes_go_into_the_space_reserved_at_start_up(tmp_path):
    path = tmp_path / "r.ckpt"
    T.reserve(path, 4096)
    spare = T.reserve_path(path)
    inode = spare.stat().st_ino
    T.write_atomic(path, [b"abc", memoryview(b"def")])
    assert path.read_bytes() == b"abcdef" and path.stat().st_ino == inode  # written where the space was taken
    assert spare.stat().st_size == 4096  # and taken again for the next write
    T.write_atomic(tmp_path / "x.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".r.ckpt.reserve", "r.ckpt", "x.json"]
    with pytest.raises(T.WriteFailed, match=f"{tmp_path / 'no' / 'y'}: write failed"):
        (tmp_path / "no").write_text("a file where a folder should be")
        T.write_atomic(tmp_path / "no" / "y", b"")


def test_training_checkpoints_are_due_by_steps_or_seconds():
    steps, secs = (T.Hyperparameters(run_id="x", iterations=10, ckpt_every=v) for v in ("3", "30s"))
    assert [s for s in range(1, 11) if T.ckpt_due(steps, s, 0.0)[1]] == [3, 6, 9]  # not at 10: the final one follows
    assert not any(T.ckpt_due(steps, s, 1e9)[0] for s in range(1, 11))
    assert T.ckpt_due(secs, 5, 29.9) == (False, False) and T.ckpt_due(secs, 5, 30.0) == (True, False)
    assert T.ckpt_due(secs, 10, 99.0) == (False, False)
    assert not any(any(T.ckpt_due(T.Hyperparameters(run_id="x", ckpt_every=v), 5, 1e9)) for v in ("", "0"))
