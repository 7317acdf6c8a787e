"""The submission as the rules count it: the packed script runs exactly like the readable one, packaging proves it
and counts it, and the top-level submission.json stays valid with null scores until an 8x H100 run fills it."""
import importlib
import json
import os
import subprocess
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
pack_code = importlib.import_module("pack_code")
package_submission = importlib.import_module("package_submission")

RUN = dict(PRESET="tiny", ITERATIONS="5", TRAIN_LOG_EVERY="1", VAL_MAX_TOKENS="4097", TTT_ENABLED="0", NGRAM_ORDER="0",
           SEED="7", RUN_ID="r")


def run(script, cwd, data, log_dir):
    env = {**os.environ, **RUN, "DATA_PATH": str(data), "LOG_DIR": str(log_dir)}
    proc = subprocess.run([sys.executable, str(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = (log_dir / "r.txt").read_text()
    return json.loads((log_dir / "r.json").read_text()), log, (log_dir / "r.artifact").read_bytes()


def test_packed_script_runs_like_the_readable_one(brown_data, tmp_path):
    source = (ROOT / "train_gpt.py").read_bytes()
    packed, codec = pack_code.pack(source)
    assert len(packed) < len(source) // 2 and codec in ("lzma-raw", "xz", "brotli", "zstd")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "train_gpt.py").write_bytes(packed)
    a, log_a, art_a = run(ROOT / "train_gpt.py", tmp_path, brown_data, tmp_path / "readable")
    b, log_b, art_b = run("train_gpt.py", folder, brown_data, tmp_path / "packed")  # from inside its folder
    steps = lambda log: [line.split(" lr_mult")[0] for line in log.splitlines() if line.startswith("step ")]  # noqa: E731
    assert len(steps(log_a)) == 5 and steps(log_a) == steps(log_b)  # same loss at every step
    assert art_a == art_b and a["model_bytes"] == b["model_bytes"] and a["val_bpb"] == b["val_bpb"]
    assert (a["code_form"], a["code_bytes"]) == ("readable", len(source))
    assert (b["code_form"], b["code_bytes"]) == ("packed", len(packed))
    assert b["artifact_bytes"] == len(packed) + b["model_bytes"]
    assert f"code: train_gpt.py {len(packed):,} bytes (packed)" in log_b


def test_packaging_verifies_and_counts_the_packed_script(brown_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    packed = pack_code.pack((ROOT / "train_gpt.py").read_bytes())[0]
    logs = tmp_path / "logs"
    logs.mkdir()
    for seed in (1, 2):  # stand-in results of runs launched from the packed file
        res = dict(run_id=f"p_seed{seed}", seed=seed, status="ok", config=dict(preset="tiny", seed=seed),
                   code_bytes=len(packed), model_bytes=1_000_000, artifact_bytes=1_000_000 + len(packed),
                   val_loss=4.0 + seed / 100, val_bpb=2.0 + seed / 100, stages={}, device="cpu", world_size=2)
        (logs / f"p_seed{seed}.json").write_text(json.dumps(res))
        (logs / f"p_seed{seed}.txt").write_text("runtime: world_size 2\n")
    out = tmp_path / "records" / "p"
    assert package_submission.main(["--runs", str(logs / "p_seed*.json"), "--name", "p", "--github-id", "o",
                                    "--out", str(out), "--verify-data", str(brown_data),
                                    "--top-level", str(tmp_path / "top.json")]) == 0
    sub = json.loads((out / "submission.json").read_text())
    assert sub["bytes_code"] == len((out / "train_gpt.py").read_bytes()) == len(packed)
    assert sub["bytes_total"] == len(packed) + 1_000_000 and sub["metadata"]["packed_verified"] is True
    readme = (out / "README.md").read_text()
    assert "reproduced the readable script's loss at each of 5 steps" in readme
    assert "Expected val_bpb per seed: 1: 2.0100, 2: 2.0200" in readme
    assert not (tmp_path / "top.json").exists()  # CPU runs never fill the top-level submission.json


def test_top_level_submission_json_is_valid_and_null_without_a_gpu_run():
    sub = json.loads((ROOT / "submission.json").read_text())
    for key in ("author", "github_id", "name", "blurb", "date", "track", "val_bpb", "val_loss", "val_bpb_std",
                "val_loss_std", "bytes_total", "bytes_code", "seeds", "seed_results", "hardware", "pytorch_version",
                "metadata"):
        assert key in sub, key
    assert sub["track"] == "10min_16mb" and sub["metadata"]["preset"] == "default"
    if not sub["seed_results"]:  # no 8x H100 run recorded: every score is null
        assert all(sub[k] is None for k in ("val_bpb", "val_loss", "val_bpb_std", "val_loss_std", "bytes_total"))
    else:  # written by package_submission.py from 8x H100 runs, whose folder is there
        assert sub["hardware"].startswith("8x") and "H100" in sub["hardware"]
        assert (ROOT / sub["metadata"]["records_folder"] / "train_gpt.py").is_file()
        assert sub["bytes_total"] <= 16_000_000 and isinstance(sub["val_bpb"], float)
