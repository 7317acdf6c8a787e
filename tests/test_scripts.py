"""The run scripts in scripts/: launcher, sweep, significance test, packaging, plotting, benchmark.

Everything here runs on synthetic result JSONs and logs (no training): the Student-t CDF
against closed forms and table values, compare_runs verdicts, package_submission output and
refusals, the --dry-run commands of run_seeds/sweep, the launch loop with a stand-in for torchrun,
plot_runs --csv, and one tiny bench_train measurement.
"""
from __future__ import annotations

import csv
import hashlib
import importlib
import io
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(SCRIPTS))

common = importlib.import_module("_common")
compare_runs = importlib.import_module("compare_runs")
package_submission = importlib.import_module("package_submission")
pack_code = importlib.import_module("pack_code")
run_seeds = importlib.import_module("run_seeds")
sweep = importlib.import_module("sweep")
plot_runs = importlib.import_module("plot_runs")
UserError = common.UserError

# A stand-in trainer: the fields package_submission reads defaults from (not a real model).
FAKE_TRAINER = '''
from dataclasses import dataclass

class ConfigError(ValueError):
    pass

@dataclass
class Hyperparameters:
    preset: str = "default"
    run_id: str = ""
    seed: int = 1337
    log_dir: str = "logs"
    num_layers: int = 11
    model_dim: int = 512
    matrix_lr: float = 0.025
    compile: bool = True

PRESETS = {"default": {}, "tiny": {"num_layers": 4}}

def load_hparams(env):
    if env.get("MODEL_DIM", "1").isdigit() is False:
        raise ConfigError(f"MODEL_DIM={env['MODEL_DIM']!r}: expected int")
    return Hyperparameters()
'''

# A stand-in for torchrun + train_gpt.py in the launch loop: writes <LOG_DIR>/<RUN_ID>.json/.txt
# like report() does; seed 2 crashes without a result, seed 3 reports status failed.
FAKE_RUN = '''
import json, os, sys
seed, run_id, log_dir = int(os.environ["SEED"]), os.environ["RUN_ID"], os.environ.get("LOG_DIR", "logs")
print(f"fake training {run_id}", flush=True)
if seed == 2:
    sys.exit(1)
lr = float(os.environ.get("MATRIX_LR", "0.02"))
loss = 2.0 + seed / 1000 + abs(lr - 0.03)
status = "failed" if seed == 3 else "ok"
res = dict(run_id=run_id, seed=seed, status=status, config=dict(seed=seed, run_id=run_id), steps=10,
           train_seconds=1.0, eval_seconds=0.5, code_bytes=100, model_bytes=1000, artifact_bytes=1100,
           artifact_path="x", stages={}, val_loss=loss, val_bpb=loss * 0.6)
os.makedirs(log_dir, exist_ok=True)
open(os.path.join(log_dir, run_id + ".txt"), "w").write("step 10/10 loss 2.0\\n")
open(os.path.join(log_dir, run_id + ".json"), "w").write(json.dumps(res))
sys.exit(0 if status == "ok" else 1)
'''


def make_result(folder: Path, run_id: str, seed: int, val_loss: float, status: str = "ok",
                artifact_bytes: int = 15_000_000, code_bytes: int = 50_000, config: dict | None = None,
                log: bool = True, **extra) -> Path:
    cfg = dict(preset="tiny", num_layers=4, model_dim=256, matrix_lr=0.025, compile=False, log_dir=str(folder))
    cfg.update(config or {})
    cfg.update(seed=seed, run_id=run_id)
    bpb = extra.pop("val_bpb", val_loss * 0.6)
    res = dict(run_id=run_id, seed=seed, status=status, config=cfg, steps=400, train_seconds=55.5,
               eval_seconds=4.25, code_bytes=code_bytes, model_bytes=artifact_bytes - code_bytes,
               artifact_bytes=artifact_bytes, artifact_path=str(folder / f"{run_id}.artifact"), params=2_400_000,
               stages={"roundtrip": dict(val_loss=val_loss, val_bpb=bpb, seconds=4.0)},
               val_loss=val_loss, val_bpb=bpb, **extra)
    if status != "ok":
        res["error"] = "train loss is nan at step 20"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{run_id}.json"
    path.write_text(json.dumps(res))
    if log:
        (folder / f"{run_id}.txt").write_text(
            "config: {}\nruntime: torch 2.x device cuda:0 world_size 8 attention sdpa\n"
            "step 200/400 loss 4.1000 lr_mult 1.000 tok/s 3,824 ms/step 2142.4 eta 43s\n"
            f"eval roundtrip: val_loss {val_loss:.4f} val_bpb {val_loss * 0.6:.4f}\n")
    return path


def output_of(main, argv, capsys) -> tuple[int, str, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


# -----------------------------------------------------------------------------
# Student t distribution
# -----------------------------------------------------------------------------

@pytest.mark.parametrize("t, df, p", [
    (2.0, 5, 0.050970),     # brief: t=2.0, df=5 one-sided p ~ 0.0510
    (3.747, 4, 0.0100),     # t_{0.01, 4} = 3.747
    (2.015, 5, 0.0500),     # t_{0.05, 5}
    (2.764, 10, 0.0100),    # t_{0.01, 10}
    (2.086, 20, 0.0250),    # t_{0.025, 20}
    (2.750, 30, 0.0050),    # t_{0.005, 30}
    (6.965, 2, 0.0100),     # t_{0.01, 2}
    (31.821, 1, 0.0100),    # t_{0.01, 1}
    (2.3263, 1e7, 0.0100),  # -> standard normal z_{0.99}
])
def test_t_sf_table_values(t, df, p):
    assert compare_runs.t_sf(t, df) == pytest.approx(p, abs=5e-5)


def test_t_distribution_closed_forms_and_symmetry():
    for t in (-40.0, -3.0, -1.0, -0.2, 0.0, 0.3, 1.0, 2.5, 10.0, 300.0):
        assert compare_runs.t_sf(t, 1) == pytest.approx(0.5 - math.atan(t) / math.pi, abs=1e-13)
        assert compare_runs.t_sf(t, 2) == pytest.approx(0.5 * (1 - t / math.sqrt(2 + t * t)), abs=1e-13)
        u = t / math.sqrt(3)
        assert compare_runs.t_sf(t, 3) == pytest.approx(0.5 - (math.atan(u) + u / (1 + u * u)) / math.pi, abs=1e-13)
        for df in (1.5, 4.3, 17.0):
            assert compare_runs.t_sf(-t, df) == pytest.approx(1 - compare_runs.t_sf(t, df), abs=1e-13)
            assert compare_runs.t_cdf(t, df) == pytest.approx(1 - compare_runs.t_sf(t, df), abs=1e-15)
    assert compare_runs.t_sf(0.0, 7.5) == 0.5
    assert compare_runs.t_sf(math.inf, 3) == 0.0 and compare_runs.t_sf(-math.inf, 3) == 1.0
    # I_x(a, b) = 1 - I_{1-x}(b, a); I_x(1, 1) = x; I_x(a, 1) = x^a
    assert compare_runs.betainc(2.5, 0.7, 0.3) == pytest.approx(1 - compare_runs.betainc(0.7, 2.5, 0.7), abs=1e-14)
    assert compare_runs.betainc(1, 1, 0.37) == pytest.approx(0.37, abs=1e-14)
    assert compare_runs.betainc(3.2, 1, 0.6) == pytest.approx(0.6 ** 3.2, abs=1e-14)
    with pytest.raises(ValueError):
        compare_runs.t_sf(1.0, 0)


def test_welch_matches_the_formulas():
    base, new = [2.10, 2.12, 2.11], [2.05, 2.04, 2.07, 2.06]
    r = compare_runs.welch_one_sided(base, new, 0.005)
    vb, vn = 0.0001 / 3, (sum((x - 2.055) ** 2 for x in new) / 3) / 4
    assert r["diff"] == pytest.approx(2.11 - 2.055)
    assert r["t"] == pytest.approx((2.11 - 2.055 - 0.005) / math.sqrt(vb + vn))
    assert r["df"] == pytest.approx((vb + vn) ** 2 / (vb ** 2 / 2 + vn ** 2 / 3))
    assert r["p"] == pytest.approx(compare_runs.t_sf(r["t"], r["df"]))
    # equal variances and sizes: Welch df = 2(n - 1)
    assert compare_runs.welch_one_sided([1.0, 2.0, 3.0], [0.0, 1.0, 2.0], 0.0)["df"] == pytest.approx(4.0)


# -----------------------------------------------------------------------------
# compare_runs
# -----------------------------------------------------------------------------

def test_compare_clear_improvement_is_a_record(tmp_path, capsys):
    for i, (s, b, n) in enumerate(zip((1337, 42, 2024), (2.1000, 2.1012, 2.0991), (2.0500, 2.0508, 2.0493))):
        make_result(tmp_path, f"base_seed{s}", s, b)
        make_result(tmp_path, f"new_seed{s}", s, n)
    code, out, _ = output_of(compare_runs.main, ["--base", str(tmp_path / "base_*.json"),
                                                 "--new", str(tmp_path / "new_*.json")], capsys)
    assert code == 0
    assert "RECORD:" in out and "NOT SIGNIFICANT" not in out
    assert "t = " in out and "df = " in out and "p = " in out
    assert "2.1001" in out and "2.0500" in out  # the group means (val_loss)
    assert "val_bpb" in out


def test_compare_equal_groups_and_small_gains_are_not_significant(tmp_path, capsys):
    losses = (2.1000, 2.1012, 2.0991)
    for s, v in zip((1, 2, 3), losses):
        make_result(tmp_path / "a", f"a_seed{s}", s, v)
        make_result(tmp_path / "b", f"b_seed{s}", s, v)
        make_result(tmp_path / "c", f"c_seed{s}", s, v - 0.004)  # better, but by less than 0.005 nats
    code, out, _ = output_of(compare_runs.main, ["--base", *map(str, sorted((tmp_path / "a").glob("*.json"))),
                                                 "--new", *map(str, sorted((tmp_path / "b").glob("*.json")))], capsys)
    assert code == 0 and "NOT SIGNIFICANT:" in out and "RECORD" not in out
    code, out, _ = output_of(compare_runs.main, ["--base", str(tmp_path / "a" / "*.json"),
                                                 "--new", str(tmp_path / "c" / "*.json")], capsys)
    assert code == 0 and "NOT SIGNIFICANT:" in out and "below the required 0.005" in out
    # the same gain passes with a smaller margin
    code, out, _ = output_of(compare_runs.main, ["--base", str(tmp_path / "a" / "*.json"),
                                                 "--new", str(tmp_path / "c" / "*.json"), "--margin", "0"], capsys)
    assert "RECORD:" in out


def test_compare_base_values_and_single_runs(tmp_path, capsys):
    for s, v in zip((1, 2, 3), (2.050, 2.051, 2.049)):
        make_result(tmp_path, f"n_seed{s}", s, v)
    code, out, _ = output_of(compare_runs.main, ["--base-loss", "2.10,2.101,2.099",
                                                 "--new", str(tmp_path / "n_*.json")], capsys)
    assert code == 0 and "RECORD:" in out
    code, out, _ = output_of(compare_runs.main, ["--base-loss", "2.10", "--new", str(tmp_path / "n_*.json")], capsys)
    assert code == 0 and "NOT SIGNIFICANT: cannot test" in out


def test_compare_on_bpb_across_tokenizers(tmp_path, capsys):
    # a larger vocabulary: more nats per token, fewer bits per byte; only val_bpb ranks the two
    for s in (1, 2, 3):
        make_result(tmp_path, f"sp1024_seed{s}", s, 2.0 + 0.001 * s)
        make_result(tmp_path, f"sp4096_seed{s}", s, 3.0 + 0.001 * s, val_bpb=1.0 + 0.001 * s,
                    config=dict(vocab_size=4096, data_path="brown_sp4096"))
    args = ["--base", str(tmp_path / "sp1024_*.json"), "--new", str(tmp_path / "sp4096_*.json"), "--margin", "0"]
    code, out, err = output_of(compare_runs.main, args, capsys)
    assert code == 0 and "NOT SIGNIFICANT" in out and "--metric val_bpb" in err  # per token it looks worse
    code, out, err = output_of(compare_runs.main, [*args, "--metric", "val_bpb"], capsys)
    assert code == 0 and "RECORD: new mean val_bpb 1.00200 beats base 1.20120 by 0.19920 bpb" in out and not err
    code, out, _ = output_of(compare_runs.main, ["--base-loss", "1.0,1.001", "--new", str(tmp_path / "sp4096_*.json"),
                                                 "--metric", "val_bpb", "--margin", "0"], capsys)
    assert "NOT SIGNIFICANT: the improvement -0.00150 bpb is below the required 0.0 bpb" in out
    # no --margin: the rules' 0.005 nats at the new runs' bpb per nat (1.002 / 3.002)
    code, out, _ = output_of(compare_runs.main, ["--base-loss", "1.0055,1.0065", "--new", str(tmp_path / "sp4096_*.json"),
                                                 "--metric", "val_bpb"], capsys)
    assert "(required >= 0.001669 bpb); the rules' 0.005 nats at the new runs' 0.3338 bpb per nat" in out
    assert "NOT SIGNIFICANT: the improvement 0.00400 bpb clears the 0.001669 margin" in out  # 0.005 bpb would not


def test_compare_refuses_failed_and_over_cap_runs(tmp_path, capsys):
    for s, v in zip((1, 2, 3), (2.10, 2.101, 2.099)):
        make_result(tmp_path, f"a_seed{s}", s, v)
    make_result(tmp_path, "b_seed1", 1, 2.05)
    make_result(tmp_path, "b_seed2", 2, 2.05, status="failed")
    make_result(tmp_path, "b_seed3", 3, 2.05, artifact_bytes=16_000_001)
    with pytest.raises(UserError) as e:
        compare_runs.main(["--base", str(tmp_path / "a_*.json"), "--new", str(tmp_path / "b_*.json")])
    msg = str(e.value)
    assert "b_seed2.json" in msg and "failed" in msg and "b_seed3.json" in msg and "16,000,001" in msg
    assert "b_seed1.json" not in msg
    # --skip-bad drops them (one usable run left: not testable, but no error)
    code, out, err = output_of(compare_runs.main, ["--base", str(tmp_path / "a_*.json"),
                                                   "--new", str(tmp_path / "b_*.json"), "--skip-bad"], capsys)
    assert code == 0 and "dropping" in err and "NOT SIGNIFICANT: cannot test" in out


def test_compare_cli_exit_codes_and_bad_input(tmp_path):
    make_result(tmp_path, "a_seed1", 1, 2.1)
    make_result(tmp_path, "b_seed1", 1, 2.0, status="failed")
    (tmp_path / "junk.json").write_text("[1, 2]")
    script = str(SCRIPTS / "compare_runs.py")
    for args in (["--base", str(tmp_path / "a_seed1.json"), "--new", str(tmp_path / "b_seed1.json")],
                 ["--base", str(tmp_path / "nothing_*.json"), "--new", str(tmp_path / "a_seed1.json")],
                 ["--base", str(tmp_path / "junk.json"), "--new", str(tmp_path / "a_seed1.json")],
                 ["--base-loss", "abc", "--new", str(tmp_path / "a_seed1.json")]):
        proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    proc = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "one-sided Welch" in proc.stdout and "nats" in proc.stdout


def test_globs_skip_non_result_json(tmp_path, capsys):
    for s, v in zip((1, 2), (2.10, 2.11)):
        make_result(tmp_path, f"a_seed{s}", s, v)
    (tmp_path / "a_summary.json").write_text(json.dumps({"combos": []}))
    runs = common.load_results([str(tmp_path / "a_*.json")], "--base")
    assert sorted(r["run_id"] for r in runs) == ["a_seed1", "a_seed2"]
    assert "skipping" in capsys.readouterr().err
    with pytest.raises(UserError, match="not a train_gpt.py result"):
        common.load_results([str(tmp_path / "a_summary.json")], "--base")


# -----------------------------------------------------------------------------
# package_submission
# -----------------------------------------------------------------------------

@pytest.fixture
def pkg_env(tmp_path, monkeypatch):
    """A working folder with a stand-in train_gpt.py, requirements.txt and three finished seeds."""
    monkeypatch.chdir(tmp_path)
    script = tmp_path / "train_gpt.py"
    script.write_text(FAKE_TRAINER)
    (tmp_path / "requirements.txt").write_text("torch\nnumpy\n")
    size = len(script.read_bytes())
    logs = tmp_path / "logs"
    paths = [make_result(logs, f"rec_seed{s}", s, v, code_bytes=size, artifact_bytes=ab)
             for s, v, ab in ((1337, 2.05, 15_100_000), (42, 2.06, 15_200_000), (2024, 2.07, 15_000_000))]
    return tmp_path, paths


def test_package_builds_the_folder(pkg_env, capsys):
    root, paths = pkg_env
    out = root / "records" / "2026-05-01_Test"
    code, stdout, _ = output_of(package_submission.main, [
        "--runs", str(root / "logs" / "rec_seed*.json"), "--name", "Test run", "--github-id", "octocat",
        "--out", str(out), "--blurb", "A tiny test.", "--date", "2026-05-01", "--no-verify"], capsys)
    assert code == 0 and stdout.strip().splitlines()[-1] == str(out)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["README.md", "submission.json", "train_gpt.py", "train_gpt_readable.py", "requirements.txt",
                            "rec_seed1337.txt", "rec_seed42.txt", "rec_seed2024.txt",
                            "rec_seed1337.json", "rec_seed42.json", "rec_seed2024.json"])
    readable, packed = (root / "train_gpt.py").read_bytes(), (out / "train_gpt.py").read_bytes()
    assert (out / "train_gpt_readable.py").read_bytes() == readable
    assert pack_code.packed_hash(packed) == hashlib.sha256(readable).hexdigest()
    sub = json.loads((out / "submission.json").read_text())
    assert sub["name"] == "Test run" and sub["github_id"] == "octocat" and sub["date"] == "2026-05-01"
    assert sub["val_bpb"] == pytest.approx((2.05 + 2.06 + 2.07) / 3 * 0.6)
    assert sub["val_loss"] == pytest.approx(2.06)
    assert sub["bytes_code"] == len(packed)  # the packed file is the counted code
    assert sub["bytes_total"] == len(packed) + 15_200_000 - len(readable)  # + the largest model file
    assert sub["metadata"]["packed_verified"] is False and "not verified" in (out / "README.md").read_text()
    assert "left as it is" in stdout and not (root / "submission.json").exists()  # no 8x H100 run: untouched
    assert sub["seeds"] == [1337, 2024, 42]  # the order given (the glob sorts by name)
    assert sub["val_bpb_per_seed"]["42"] == pytest.approx(2.06 * 0.6)
    assert sub["metadata"]["config_changes"] == {"NUM_LAYERS": 4, "MODEL_DIM": 256, "COMPILE": False}
    assert sub["metadata"]["world_size"] == 8
    readme = (out / "README.md").read_text()
    assert "| 42 | 1.2360 | 2.0600 | 15,200,000 | 400 | 55.5 | 4.25 |" in readme
    assert "`NUM_LAYERS` | `4` | `11` | PRESET=tiny" in readme
    assert "`MODEL_DIM` | `256` | `512` | env" in readme
    assert "PRESET=tiny COMPILE=0 MODEL_DIM=256 SEED=$SEED RUN_ID=rec_seed$SEED" in readme
    assert "torchrun --standalone --nproc_per_node=8 train_gpt.py" in readme
    assert "for SEED in 1337 2024 42" in readme
    assert not [p for p in (root / "records").iterdir() if p.name.startswith(".")]  # no temp dir left
    with pytest.raises(UserError, match="already exists"):
        package_submission.main(["--runs", str(paths[0]), "--name", "x", "--github-id", "o", "--out", str(out)])


def test_package_writes_the_top_level_submission_only_from_8x_h100_runs(pkg_env, capsys):
    root, _ = pkg_env
    size = len((root / "train_gpt.py").read_bytes())
    h100 = [make_result(root / "gpu", f"g_seed{s}", s, 2.0, code_bytes=size, device="NVIDIA H100 80GB HBM3",
                        world_size=8, torch="2.9.1+cu128") for s in (1, 2)]
    code, stdout, _ = output_of(package_submission.main, [
        "--runs", *map(str, h100), "--name", "g", "--github-id", "o", "--out", str(root / "records" / "g"),
        "--no-verify", "--top-level", str(root / "top.json")], capsys)
    top = json.loads((root / "top.json").read_text())
    assert code == 0 and top["hardware"] == "8xNVIDIA H100 80GB HBM3" and top["val_bpb"] == pytest.approx(1.2)
    assert top["metadata"]["records_folder"] == str(root / "records" / "g") and top["pytorch_version"] == "2.9.1+cu128"


def test_package_refuses_a_packed_file_of_another_source(pkg_env, tmp_path):
    root, paths = pkg_env
    other = tmp_path / "other_packed.py"
    other.write_bytes(pack_code.pack(b"print('another source')\n")[0])
    args = ["--runs", *map(str, paths), "--name", "x", "--github-id", "o", "--out", str(root / "records" / "x"),
            "--no-verify", "--packed"]
    with pytest.raises(UserError, match="packed from a source with sha256"):
        package_submission.main(args + [str(other)])
    with pytest.raises(UserError, match="not a packed train_gpt.py"):
        package_submission.main(args + [str(root / "train_gpt.py")])
    assert not (root / "records").exists()


def test_package_refuses_code_bytes_mismatch(pkg_env):
    root, paths = pkg_env
    with open(root / "train_gpt.py", "a") as f:
        f.write("# edited after the runs\n")
    with pytest.raises(UserError, match="changed since"):
        package_submission.main(["--runs", *map(str, paths), "--name", "x", "--github-id", "o",
                                 "--out", str(root / "records" / "x")])
    assert not (root / "records").exists() or not list((root / "records").iterdir())


def test_package_refuses_bad_runs(pkg_env):
    root, paths = pkg_env
    size = len((root / "train_gpt.py").read_bytes())
    args = ["--name", "x", "--github-id", "o", "--out", str(root / "records" / "x"), "--no-verify", "--runs"]
    failed = make_result(root / "logs", "bad_seed7", 7, 2.0, status="failed", code_bytes=size)
    with pytest.raises(UserError, match="cannot count"):
        package_submission.main(args + [str(paths[0]), str(failed)])
    other = make_result(root / "logs", "other_seed8", 8, 2.0, code_bytes=size, config={"matrix_lr": 0.03})
    with pytest.raises(UserError, match="MATRIX_LR"):
        package_submission.main(args + [str(paths[0]), str(other)])
    dup = make_result(root / "logs", "dup_seed1337", 1337, 2.0, code_bytes=size)
    with pytest.raises(UserError, match="more than once"):
        package_submission.main(args + [str(paths[0]), str(dup)])
    nolog = make_result(root / "logs", "nolog_seed9", 9, 2.0, code_bytes=size, log=False)
    with pytest.raises(UserError, match="train log"):
        package_submission.main(args + [str(paths[0]), str(nolog)])
    with pytest.raises(UserError, match="github-id"):
        package_submission.main(["--runs", str(paths[0]), "--name", "x", "--github-id", "bad id!"])


# -----------------------------------------------------------------------------
# run_seeds / sweep
# -----------------------------------------------------------------------------

def test_run_seeds_dry_run_prints_the_commands(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train_gpt.py").write_text(FAKE_TRAINER)
    code, out, _ = output_of(run_seeds.main, ["--seeds", "1337,42,2024", "--nproc", "2", "--run-prefix", "base",
                                              "--env", "PRESET=tiny", "--env", "DATA_PATH=/data/my set",
                                              "--dry-run"], capsys)
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 3
    for line, seed in zip(lines, (1337, 42, 2024)):
        assert f"SEED={seed} RUN_ID=base_seed{seed} " in line
        assert line.startswith("PRESET=tiny DATA_PATH='/data/my set' ")
        assert line.endswith(f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node=2 train_gpt.py")
    assert not (tmp_path / "logs").exists()


def test_run_seeds_bad_input(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train_gpt.py").write_text(FAKE_TRAINER)
    base = ["--run-prefix", "p", "--dry-run", "--nproc", "1"]
    for argv, msg in ((["--seeds", "1,x"], "comma-separated integers"), (["--seeds", "1,1"], "repeated"),
                      (["--seeds", "1", "--env", "SEED=3"], "set by the launcher"),
                      (["--seeds", "1", "--env", "NOEQUALS"], "KEY=VALUE"),
                      (["--seeds", "1", "--env", "MODEL_DIM=abc"], "bad configuration"),
                      (["--seeds", "1", "--script", "nope.py"], "not found")):
        with pytest.raises(UserError, match=msg):
            run_seeds.main(base + argv)
    with pytest.raises(UserError, match="run-prefix"):
        run_seeds.main(["--seeds", "1", "--run-prefix", "a/b", "--dry-run"])
    # existing results are not silently mixed with a new run
    make_result(tmp_path / "logs", "p_seed1", 1, 2.0)
    with pytest.raises(UserError, match="already exist"):
        run_seeds.main(base + ["--seeds", "1"])
    assert run_seeds.main(base + ["--seeds", "1", "--skip-existing"]) == 0
    assert "reusing" in capsys.readouterr().out


def test_run_seeds_launch_loop_continues_past_failures(tmp_path, monkeypatch, capfd):
    """The real loop, with `python fake_run.py` standing in for torchrun + train_gpt.py."""
    monkeypatch.chdir(tmp_path)
    fake = tmp_path / "train_gpt.py"
    fake.write_text(FAKE_RUN)
    monkeypatch.setattr(common, "torchrun_argv", lambda nproc, script: [sys.executable, str(script)])
    code, out, err = output_of(run_seeds.main, ["--seeds", "1,2,3,4", "--nproc", "1", "--run-prefix", "r",
                                                "--no-check"], capfd)
    assert code == 1
    assert "fake training r_seed4" in out  # the child's output is streamed
    assert "no-result (exit 1)" in out and "failed" in out
    assert "mean over 2 ok seed(s): val_bpb" in out
    mean_bpb = (2.001 + 0.01 + 2.004 + 0.01) / 2 * 0.6
    assert f"{mean_bpb:.4f}" in out
    assert "r_seed2" in err and "continuing" in err


STUCK_RUN = '''
import os, signal, subprocess, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)  # a torchrun that does not stop when asked
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
open(os.environ["PG_TEST_PID_FILE"], "w").write(str(child.pid))
print("started", flush=True)
time.sleep(120)
'''


def test_run_seeds_interrupt_stops_the_whole_run(tmp_path, monkeypatch, capfd):
    """SIGTERM (like Ctrl-C) stops the batch: SIGINT to the run, then SIGKILL to its process group."""
    import os
    import signal
    import threading
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train_gpt.py").write_text(STUCK_RUN)
    pid_file = tmp_path / "pid"
    monkeypatch.setenv("PG_TEST_PID_FILE", str(pid_file))
    monkeypatch.setattr(common, "torchrun_argv", lambda nproc, script: [sys.executable, str(script)])
    monkeypatch.setattr(common, "STOP_GRACE_S", 0.5)
    handler = signal.getsignal(signal.SIGTERM)

    def interrupt():
        deadline = time.monotonic() + 300  # wait until the stand-in has started its worker (slow on a busy machine)
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            threading.Event().wait(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    timer = threading.Thread(target=interrupt)
    timer.start()
    code, out, err = output_of(run_seeds.main, ["--seeds", "1,2", "--nproc", "1", "--run-prefix", "i", "--no-check"],
                               capfd)
    timer.join()
    assert code == 130
    assert "interrupted" in out and "remaining seeds were not run" in err
    assert "i_seed2" not in err and out.count("=== [") == 1  # the second seed never started
    worker = int(pid_file.read_text())
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # the worker was in the run's process group: killed (gone or a zombie)
        try:
            state = Path(f"/proc/{worker}/stat").read_text().split(")")[-1].split()[0]
        except FileNotFoundError:
            break
        if state in ("Z", "X"):
            break
        threading.Event().wait(0.05)
    else:
        os.kill(worker, signal.SIGKILL)
        pytest.fail("the run's worker survived the interrupt")
    assert signal.getsignal(signal.SIGTERM) == handler  # the launcher's handler was removed again


def test_sweep_dry_run_and_summary(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train_gpt.py").write_text(FAKE_TRAINER)
    code, out, _ = output_of(sweep.main, ["--grid", "MATRIX_LR=0.02,0.03", "--grid", "VE_LAYERS=-1,-2",
                                          "--seeds", "1,2", "--nproc", "1", "--run-prefix", "sw", "--dry-run",
                                          "--no-check"], capsys)
    cmds = [line for line in out.splitlines() if "torch.distributed.run" in line]
    assert code == 0 and len(cmds) == 8
    assert "MATRIX_LR=0.02 VE_LAYERS=-1 SEED=1 RUN_ID=sw_matrix_lr0.02-ve_layersm1_seed1 " in cmds[0]
    assert "MATRIX_LR=0.03 VE_LAYERS=-2 SEED=2 RUN_ID=sw_matrix_lr0.03-ve_layersm2_seed2 " in cmds[-1]
    assert len({c.split("RUN_ID=")[1].split()[0] for c in cmds}) == 8
    assert not (tmp_path / "logs").exists()
    for argv, msg in ((["--grid", "A=1,1"], "repeated"), (["--grid", "A"], "KEY=v1,v2"), ([], "at least one"),
                      (["--grid", "A=1", "--grid", "A=2"], "twice"), (["--grid", "A=1", "--env", "A=2"], "both"),
                      (["--grid", "A=x y,x.y"], None)):
        if msg is None:  # 'x y' and 'x.y' differ; 'x y' -> 'xxy' is fine
            sweep.main(["--run-prefix", "s", "--dry-run", "--no-check", "--nproc", "1", *argv])
            continue
        with pytest.raises(UserError, match=msg):
            sweep.main(["--run-prefix", "s", "--dry-run", "--no-check", "--nproc", "1", *argv])
    with pytest.raises(UserError, match="same RUN_ID"):
        sweep.main(["--run-prefix", "s", "--dry-run", "--no-check", "--nproc", "1", "--grid", "A=a/b,a_b"])


def test_sweep_runs_and_ranks(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train_gpt.py").write_text(FAKE_RUN)
    monkeypatch.setattr(common, "torchrun_argv", lambda nproc, script: [sys.executable, str(script)])
    code, out, _ = output_of(sweep.main, ["--grid", "MATRIX_LR=0.02,0.03,0.05", "--seeds", "1,4", "--nproc", "1",
                                          "--run-prefix", "lr", "--no-check"], capfd)
    assert code == 0
    table_lines = out[out.index("rank"):].splitlines()
    ranked = [line.split()[1] for line in table_lines[2:5]]
    assert ranked == ["0.03", "0.02", "0.05"]  # loss grows with |lr - 0.03|
    rows = list(csv.DictReader(io.StringIO((tmp_path / "logs" / "sweep_lr.csv").read_text())))
    assert len(rows) == 6 and rows[0]["MATRIX_LR"] == "0.02" and rows[0]["status"] == "ok"
    summary = json.loads((tmp_path / "logs" / "sweep_lr.json").read_text())
    assert [c["params"]["MATRIX_LR"] for c in summary["combos"]] == ["0.03", "0.02", "0.05"]
    assert summary["combos"][0]["n_ok"] == 2
    # the summary JSON sits beside the results but is skipped by result globs
    assert len(common.load_results([str(tmp_path / "logs" / "*.json")], "x")) == 6


# -----------------------------------------------------------------------------
# plot_runs
# -----------------------------------------------------------------------------

LOG = """config: {"run_id": "old"}
step 10/100 loss 9.0000 lr_mult 1.000 tok/s 1,000 ms/step 10.0 eta 9s
config: {"run_id": "x"}
runtime: torch 2.x device cpu world_size 1 attention sdpa
step 20/400 loss 5.7054 lr_mult 0.175 tok/s 3,824 ms/step 2142.4 eta 43s
step 40/400 loss 5.1000 lr_mult 0.350 tok/s 3,900 ms/step 2100.0 eta 40s
step 40 val_loss 5.0500 val_bpb 2.9000
step 60/400 loss nan lr_mult 0.500 tok/s 3,950 ms/step 2090.0 eta 38s
eval roundtrip: val_loss 4.9000 val_bpb 2.8000
eval sliding: val_loss 4.8000 val_bpb 2.7500
"""


def test_plot_runs_csv(tmp_path, capsys):
    log = tmp_path / "x.txt"
    log.write_text(LOG)
    code, out, err = output_of(plot_runs.main, [str(log), "--csv", "-"], capsys)
    assert code == 0 and "2 runs" in err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(r["kind"], r["step"]) for r in rows] == [("train", "20"), ("train", "40"), ("val", "40"), ("train", "60"),
                                                      ("eval", "60"), ("eval", "60")]
    assert rows[0]["loss"] == "5.7054" and rows[0]["tok_s"] == "3824.0" and rows[0]["ms_step"] == "2142.4"
    assert rows[2]["val_bpb"] == "2.9" and rows[5]["stage"] == "sliding" and rows[3]["loss"] == "nan"
    out_csv = tmp_path / "points.csv"
    assert plot_runs.main([str(tmp_path / "x.json"), "--csv", str(out_csv)]) == 0  # .json means the .txt beside it
    assert out_csv.read_text() == out
    (tmp_path / "empty.txt").write_text("hello\n")
    with pytest.raises(UserError, match="no step/eval lines"):
        plot_runs.main([str(tmp_path / "empty.txt"), "--csv", "-"])


def test_plot_runs_shows_every_evaluation_stage():
    points, _ = plot_runs.parse_log(LOG + "eval ngram: val_loss 4.5000 val_bpb 2.6000\n", "x")
    assert plot_runs.stage_scores(points) == [("roundtrip", 2.8), ("sliding", 2.75), ("ngram", 2.6)]


def test_plot_runs_png(tmp_path):
    pytest.importorskip("matplotlib")
    log = tmp_path / "x.txt"
    log.write_text(LOG)
    assert plot_runs.main([str(log)]) == 0
    png = (tmp_path / "x.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(png[16:20], "big") == 3 * 6.5 * 120  # loss, val_bpb by step, the evaluation stages
    log.write_text("\n".join(line for line in LOG.splitlines() if " val_loss " not in line or "eval" in line))
    assert plot_runs.main([str(log)]) == 0
    assert int.from_bytes((tmp_path / "x.png").read_bytes()[16:20], "big") == 2 * 6.5 * 120  # no validation points


def test_plot_runs_without_matplotlib(tmp_path, monkeypatch):
    log = tmp_path / "x.txt"
    log.write_text(LOG)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(UserError, match="--csv"):
        plot_runs.main([str(log)])


# -----------------------------------------------------------------------------
# bench_train (a microscopic model so it stays fast)
# -----------------------------------------------------------------------------

def test_bench_train_tiny(tmp_path, capsys, monkeypatch):
    bench_train = importlib.import_module("bench_train")
    monkeypatch.chdir(ROOT)
    out_json, md = tmp_path / "bench.json", tmp_path / "BENCH.md"
    md.write_text("# Benchmarks\n")
    import torch
    threads = torch.get_num_threads()
    try:
        code, out, _ = output_of(bench_train.main, [
            "--steps", "2", "--warmup", "1", "--device", "cpu", "--threads", "1", "--json", str(out_json), "--append-md", str(md),
            "--env", "NUM_LAYERS=2", "--env", "MODEL_DIM=32", "--env", "NUM_HEADS=2", "--env", "NUM_KV_HEADS=1",
            "--env", "TRAIN_SEQ_LEN=32", "--env", "TRAIN_BATCH_TOKENS=512", "--env", "BIGRAM_BUCKETS=64",
            "--env", "BIGRAM_DIM=16", "--env", "VE_DIM=16", "--env", "ROPE_DIMS=8", "--env", "VOCAB_SIZE=256"], capsys)
        assert code == 0
        assert "tokens/s" in out and "ms/step" in out and "peak memory" in out and "parameters" in out
        res = json.loads(out_json.read_text())
        assert res["tokens_per_step"] == 512 and res["grad_accum"] == 8 and res["params"] > 0
        assert res["tokens_per_second"] > 0 and res["peak_rss_bytes"] > 0 and math.isfinite(res["last_loss"])
        text = md.read_text()
        assert text.startswith("# Benchmarks\n\n## bench_train.py: PRESET=tiny, CPU") and "| 512 | 8 |" in text
    finally:
        torch.set_num_threads(threads)  # --threads 1 must not slow down later tests
    with pytest.raises(UserError, match="bad configuration"):
        bench_train.main(["--env", "TRAIN_BATCH_TOKENS=100", "--steps", "1"])


def test_bench_export_times_every_codec_job(tmp_path, capsys, monkeypatch):
    bench_export = importlib.import_module("bench_export")
    for k, v in dict(PRESET="tiny", NUM_LAYERS="2", MODEL_DIM="64", BIGRAM_DIM="16", VE_DIM="16").items():
        monkeypatch.setenv(k, v)
    code, out, _ = output_of(bench_export.main, ["--append-md", str(tmp_path / "B.md")], capsys)
    assert code == 0 and "quantize every matrix" in out
    lines = out.splitlines()
    codecs = {line.split(", ")[1] for line in lines if " group (" in line}
    every = list(importlib.import_module("train_gpt").CODEC_MODULES)  # CI installs every codec
    assert codecs == set(every)  # each once per group
    assert sorted(line.split()[0] for line in lines if " group (" in line) == sorted(["int5", "int6", "int8"] * len(every))
    assert [line.split()[2] for line in lines if "whole export" in line] == [f"CODEC={c}" for c in [*every, "auto", "auto"]]
    assert [line.split()[3] for line in lines if "whole export, CODEC=auto" in line] == [
        "CODEC_SAMPLE_BYTES=0", "CODEC_SAMPLE_BYTES=1048576"]  # every codec on every group, then picked on samples
    assert "whole export, CODEC=auto" in (tmp_path / "B.md").read_text()
    monkeypatch.setenv("QUANT_SPEC", "attn_qk:int6@12,attn_vo:int6@12,mlp_up:int6@12,mlp_down:int6@12,embed:int8@24,aux:int6@12")
    monkeypatch.setenv("QUANT_FIT_MARGIN", "500")
    left = lambda out: [int(line.split(" to the cap")[0].split()[-1].replace(",", ""))  # noqa: E731
                        for line in out.splitlines() if "QUANT_FIT export" in line]
    code, out, _ = output_of(bench_export.main, ["--auto-only", "--fit", "--cap", "99000000"], capsys)
    assert code == 0 and len(left(out)) == 1 and "whole export" in out and " group (" not in out  # fits: one export
    cap = 99000000 - left(out)[0] - 3000  # 3,000 bytes less than the model at QUANT_SPEC: QUANT_FIT widens the steps
    code, out, _ = output_of(bench_export.main, ["--auto-only", "--fit", "--cap", str(cap)], capsys)
    assert left(out)[0] == -3000 and 500 <= left(out)[-1] <= 1000, out  # landed within QUANT_FIT_MARGIN..2x
    assert float(out.split("QUANT_FIT keeps QUANT_SPEC=attn_qk:int6@")[1].split(",")[0]) > 12  # wider steps
    monkeypatch.setenv("NUM_HEADS", "x")
    with pytest.raises(UserError, match="NUM_HEADS"):
        bench_export.main([])


def test_bench_codecs_measures_every_coder_on_an_artifact(tmp_path, capsys):
    bench_codecs = importlib.import_module("bench_codecs")
    T = bench_codecs.import_trainer(ROOT / "train_gpt.py")
    hp = T.load_hparams(dict(PRESET="tiny", NUM_LAYERS="2", MODEL_DIM="64", BIGRAM_DIM="16", VE_DIM="16", CODEC="zstd"))
    T.export_artifact(T.GPT(hp), hp, tmp_path / "m.artifact")
    code, out, _ = output_of(bench_codecs.main, [str(tmp_path / "m.artifact"), "--append-md", str(tmp_path / "B.md")], capsys)
    rows = [line.split() for line in out.splitlines() if line.startswith(("int", "fp16", "scales"))]
    groups = {r[0] for r in rows}
    assert code == 0 and groups >= {"int5", "int6", "int8", "scales"}
    for g in groups:  # every shipped codec once, the stored one marked; round trips hold
        coders = [r[3] for r in rows if r[0] == g and r[2] != "-"]
        assert {c for c in coders if not c.startswith("ppmd")} == set(T.codecs()) and coders.count("zstd") == 1
        assert all(r[-1] == "yes" for r in rows if r[0] == g and r[3] in T.codecs())
    assert sum(r[0] == "int6" and "per-row" in r for r in rows) == 1 and "(stored)" in out
    assert "bench_codecs.py" in (tmp_path / "B.md").read_text()
    with pytest.raises(UserError, match="missing or empty"):
        bench_codecs.main([str(tmp_path / "none.artifact")])


@pytest.mark.parametrize("name", ["run_seeds", "sweep", "compare_runs", "package_submission", "plot_runs", "bench_train",
                                  "bench_export", "bench_codecs"])
def test_every_script_has_help(name, capsys):
    module = importlib.import_module(name)
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_predict_size_fits_and_quant_fit_fallback(monkeypatch, capsys, tmp_path):
    """Meta-device parameter counts, the verdict first: the tiny config fits at its own spec (exit 0); a 16-layer
    d=512 model at int8 does not, and QUANT_FIT's narrower spec (MLP-up first) does (exit 1); with QUANT_FIT=0
    nothing fits (exit 3). Rates measured once come from the disk cache the next time."""
    predict_size = importlib.import_module("predict_size")
    monkeypatch.setenv("PRESET", "tiny")
    cache = ["--cache", str(tmp_path / "rates.json")]
    assert predict_size.main(["--codec", "zstd", "--spec", "mlp_up:int5,embed:int8", *cache]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("verdict: FITS at its own QUANT_SPEC: predicted ") and "measuring int5 on rows of 256" in err
    assert "2,412,819 parameters" in out and ": fits" in out and "QUANT_FIT" not in out
    readable = int(out.split("| code (train_gpt.py) | | | ")[1].split(" ")[0].replace(",", ""))
    assert predict_size.main(["--codec", "zstd", "--spec", "mlp_up:int5,embed:int8", "--packed", *cache]) == 0
    out, err = capsys.readouterr()
    assert "measuring" not in err  # every rate from the cache
    packed = int(out.split("| code (train_gpt.py, packed) | | | ")[1].split(" ")[0].replace(",", ""))
    assert packed == len(pack_code.pack((ROOT / "train_gpt.py").read_bytes())[0]) < readable // 2
    monkeypatch.setenv("NUM_LAYERS", "16")
    monkeypatch.setenv("MODEL_DIM", "512")
    assert predict_size.main(["--codec", "zstd", "--spec", "attn_qk:int8,attn_vo:int8,mlp_up:int8,mlp_down:int8", *cache]) == 1
    out = capsys.readouterr().out
    assert out.startswith("verdict: FITS after QUANT_FIT, at QUANT_SPEC=")
    line = out.split("QUANT_FIT=1 would re-export it as QUANT_SPEC=")[1].split("\n")[0]
    bits = {r: int(f[3]) for r, f in (x.split(":") for x in line.split(" ")[0].rstrip(":").split(","))}
    assert line.endswith("(fits)") and bits["mlp_up"] <= bits["mlp_down"] <= bits["attn_vo"] <= bits["attn_qk"] < 8, line
    monkeypatch.setenv("QUANT_FIT", "0")
    assert predict_size.main(["--codec", "zstd", "--spec", "mlp_up:int8", *cache]) == 3
    out = capsys.readouterr().out
    assert out.startswith("verdict: DOES NOT FIT: ") and "would re-export" not in out


def test_predict_size_quant_fit_widens_set_steps(monkeypatch, capsys, tmp_path):
    """A set-step spec over the cap: QUANT_FIT (train_gpt.fit_spec on predicted bytes) widens every intN@K step by one
    factor and the prediction lands QUANT_FIT_MARGIN..2x that under the cap."""
    predict_size = importlib.import_module("predict_size")
    for k, v in dict(PRESET="tiny", NUM_LAYERS="16", MODEL_DIM="512", QUANT_FIT_MARGIN="20000").items():
        monkeypatch.setenv(k, v)
    spec = "attn_qk:int8@24,attn_vo:int8@24,mlp_up:int8@24,mlp_down:int8@24,embed:int8"
    assert predict_size.main(["--codec", "zstd", "--spec", spec, "--no-cache"]) == 1
    out = capsys.readouterr().out
    total = int(out.split("\n")[0].split("predicted ")[1].split(" ")[0].replace(",", ""))
    assert 16_000_000 - 40_000 <= total <= 16_000_000 - 20_000, out.split("\n")[0]
    final = out.split("QUANT_FIT=1 would re-export it as QUANT_SPEC=")[1].split(":")[0:3]
    assert final[0] == "attn_qk" and float(final[1].split("@")[1].split(",")[0]) > 24


def test_predict_size_prices_a_checkpoints_weights(monkeypatch, capsys, tmp_path):
    """--ckpt draws each role's rows from a checkpoint's matrices: Gaussian matrices price like the Gaussian proxy,
    heavier-tailed (Laplace) ones at the same row RMS cost fewer bytes at a set clip; a bad path is exit 2."""
    import torch
    T = importlib.import_module("train_gpt")
    predict_size = importlib.import_module("predict_size")
    monkeypatch.setenv("PRESET", "tiny")
    spec = ["--codec", "zstd", "--no-cache", "--spec", "attn_qk:int6@12,attn_vo:int6@12,mlp_up:int6@12,mlp_down:int6@12"]
    totals = {}
    for name, draw in [("gauss", torch.randn), ("laplace", lambda *s: torch.distributions.Laplace(0, 1).sample(s))]:
        hp = T.load_hparams({"PRESET": "tiny", "LOG_DIR": str(tmp_path), "RUN_ID": name})
        run = T.Run(hp, torch.device("cpu"), model=T.GPT(hp))
        with torch.no_grad():
            torch.manual_seed(0)
            for n, p in run.model.named_parameters():
                if p.dim() == 2:
                    p.copy_(draw(*p.shape) * torch.rand(p.shape[0], 1) * 0.05)  # rows of different spread
        T.save_checkpoint(run)
        capsys.readouterr()  # its log line
        assert predict_size.main([*spec, "--ckpt", str(tmp_path / f"{name}.ckpt")]) == 0
        out, err = capsys.readouterr()
        assert f"from {tmp_path / name}.ckpt per role" in out.split("\n")[0] and "mlp_up rows of the checkpoint" in err
        totals[name] = int(out.split("**total** | | | **")[1].split("*")[0].replace(",", ""))
    predict_size.main(spec)
    totals["proxy"] = int(capsys.readouterr().out.split("**total** | | | **")[1].split("*")[0].replace(",", ""))
    model = {k: v - T.CODE_BYTES for k, v in totals.items()}  # measured: Laplace 0.96 of Gaussian
    assert abs(model["gauss"] - model["proxy"]) < 0.01 * model["proxy"] and model["laplace"] < 0.975 * model["gauss"], totals
    with pytest.raises(UserError, match="--ckpt"):
        predict_size.main([*spec, "--ckpt", str(tmp_path / "missing.ckpt")])


def test_predict_size_prices_lqer():
    """LQER_TOP=k prices the k largest matrices' rank-r int4 factors (~4 bits a value, two fp16 scales a component);
    a +lqR spec prices its factors the same way."""
    import dataclasses

    import torch
    T = importlib.import_module("train_gpt")
    predict_size = importlib.import_module("predict_size")
    hp = T.load_hparams({"PRESET": "tiny", "CODEC": "zstd"})
    with torch.device("meta"):
        model = T.GPT(hp)
    state, meter = model.state_dict(), predict_size.Meter("zstd")
    base = predict_size.predict(hp, model, meter)["model"]
    top = predict_size.predict(dataclasses.replace(hp, lqer_top=2, lqer_rank=4), model, meter)["model"]
    sizes = sorted(sum(state[n].shape) for n, (_, f) in T.quant_formats(hp, model).items() if f.kind != "fp16")
    values = 4 * (sizes[-1] + sizes[-2])
    assert 3.5 / 8 * values < top - base < 4.5 / 8 * values + 32, (top - base, values)
    spec = predict_size.predict(dataclasses.replace(hp, quant_spec=hp.quant_spec.replace("embed:int8", "embed:int8+lq4")),
                                model, meter)["model"]
    values = 4 * sum(state["tok_emb.weight"].shape)
    assert 3.5 / 8 * values < spec - base < 4.5 / 8 * values + 32, (spec - base, values)
