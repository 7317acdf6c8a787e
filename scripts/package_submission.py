#!/usr/bin/env python3
"""Build a records/ submission folder from finished runs (one per seed).

  python scripts/package_submission.py --runs logs/myrecord_seed*.json --name "11L int6 QAT" \
      --github-id octocat [--blurb TEXT] [--out records/2026-05-01_11L_int6_QAT]

The folder gets: train_gpt.py = the packed script (scripts/pack_code.py; --packed, else packed
from --script now), train_gpt_readable.py (the readable source it unpacks to, not counted),
requirements.txt, each run's train log (<RUN_ID>.txt) and result JSON (<RUN_ID>.json),
submission.json in the public records' layout (author, github_id, name, blurb, date, track,
val_bpb and val_loss means over the seeds and their std, seeds, seed_results, bytes_total = the
packed code + the largest model file, bytes_code = the packed file, hardware, versions, metadata
with the config and its changes from the defaults), and README.md (results, configuration, the
command that reproduces each seed from inside the folder, the expected val_bpb).

Before writing, it proves the packed file: it runs it from inside the new folder and the readable
script, each for 5 steps of PRESET=tiny on the --verify-data dataset (CPU is fine), and requires
the same loss at every step and byte-identical model files (--no-verify skips this, and the
README then says so). When the runs are 8x H100 runs, the top-level submission.json
(--top-level) is rewritten from them; a CPU or other run never fills it.

Refused (exit 2, nothing written): runs that failed or are over the 16,000,000-byte cap, runs
whose configs differ in anything but seed/run_id/log_dir, repeated seeds, a missing train log,
runs whose code_bytes match neither the readable script nor its packed form, a --packed file
packed from another source (its sha256 line), a packed run that does not match, an existing
--out. The folder is assembled beside --out and renamed into place. The last line of stdout is
the folder.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (ARTIFACT_CAP_BYTES, UserError, cli, import_trainer, load_results, mean_std,  # noqa: E402
                     refuse_bad, write_atomic)
from pack_code import pack, packed_hash  # noqa: E402

VERIFY_STEPS = 5
VERIFY_ENV = dict(PRESET="tiny", ITERATIONS=str(VERIFY_STEPS), TRAIN_LOG_EVERY="1", VAL_MAX_TOKENS="4097",
                  TTT_ENABLED="0", NGRAM_ORDER="0", SEED="1337", RUN_ID="verify")

PER_RUN_KEYS = ("seed", "run_id", "log_dir")  # config fields allowed to differ between the seeds


def slug(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9.+-]+", "_", name).strip("_.")
    if not s:
        raise UserError(f"--name {name!r}: needs at least one letter or digit")
    return s


def env_value(v: object) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    return str(v)


def check_same_config(runs: list[dict]) -> dict:
    configs = []
    for r in runs:
        cfg = r.get("config")
        if not isinstance(cfg, dict):
            raise UserError(f"{r['_path']}: no config in the result JSON")
        configs.append({k: v for k, v in cfg.items() if k not in PER_RUN_KEYS})
    ref = configs[0]
    diffs = []
    for r, cfg in zip(runs[1:], configs[1:]):
        for k in sorted(set(ref) | set(cfg)):
            if ref.get(k, "<unset>") != cfg.get(k, "<unset>"):
                diffs.append(f"{k.upper()}: {ref.get(k, '<unset>')!r} in {Path(runs[0]['_path']).name} vs "
                             f"{cfg.get(k, '<unset>')!r} in {Path(r['_path']).name}")
    if diffs:
        raise UserError(f"the runs differ in more than the seed: {'; '.join(diffs)}; package runs of one configuration")
    return ref


def check_code_bytes(runs: list[dict], script: Path, packed: bytes) -> None:
    """The runs ran this script, readable or packed: their code_bytes is one of the two sizes."""
    size = len(script.read_bytes())
    recorded = {r.get("code_bytes") for r in runs}
    if len(recorded) > 1:
        listing = ", ".join(f"{Path(r['_path']).name}={r.get('code_bytes')}" for r in runs)
        raise UserError(f"the runs were made with different train_gpt.py versions (code_bytes {listing}); "
                        "package runs of one version")
    (code,) = recorded
    if code not in (size, len(packed)):
        raise UserError(f"{script} is {size:,} bytes ({len(packed):,} packed) but the runs recorded code_bytes {code}: "
                        "the script changed since they ran; restore the exact version they ran (e.g. git checkout "
                        "<commit> -- train_gpt.py) or re-run the seeds")


def packed_form(script: Path, packed_path: Path | None) -> bytes:
    """The packed script: --packed (refused unless packed from exactly this source), else packed now."""
    source = script.read_bytes()
    if packed_path is None:
        return pack(source)[0]
    packed = packed_path.read_bytes() if packed_path.is_file() else b""
    named, actual = packed_hash(packed), hashlib.sha256(source).hexdigest()
    if named != actual:
        what = "not a packed train_gpt.py" if named is None else f"packed from a source with sha256 {named[:12]}..."
        raise UserError(f"{packed_path}: {what}, not from {script} (sha256 {actual[:12]}...); pack it again: "
                        f"python scripts/pack_code.py --source {script}")
    return packed


def verify_packed(folder: Path, readable: Path, data: Path) -> str:
    """Run the packed train_gpt.py from inside folder and the readable script for VERIFY_STEPS steps of PRESET=tiny;
    the per-step losses and the model files must be identical. Returns a one-line account."""
    if not (data / "manifest.json").is_file():
        raise UserError(f"--verify-data {data}: no dataset there; build it with scripts/prepare_data.py local "
                        "or pass --no-verify")
    outs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, script, cwd in (("packed", "train_gpt.py", folder), ("readable", str(readable.resolve()), tmp)):
            env = {**os.environ, **VERIFY_ENV, "DATA_PATH": str(data.resolve()), "LOG_DIR": str(Path(tmp) / name)}
            proc = subprocess.run([sys.executable, script], cwd=cwd, env=env, capture_output=True, text=True)
            log = Path(tmp) / name / "verify.txt"
            if proc.returncode != 0 or not log.is_file():
                raise UserError(f"the {name} script failed its {VERIFY_STEPS}-step check (exit {proc.returncode}): "
                                f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
            losses = re.findall(r"^step (\d+)/\d+ loss (\S+)", log.read_text(), re.M)
            outs[name] = (losses, (Path(tmp) / name / "verify.artifact").read_bytes())
    (lp, ap), (lr, ar) = outs["packed"], outs["readable"]
    if len(lp) != VERIFY_STEPS or lp != lr or ap != ar:
        raise UserError(f"the packed script does not reproduce the readable one: losses {lp} vs {lr}, model files "
                        f"{'identical' if ap == ar else 'differ'}; pack it again with scripts/pack_code.py")
    return (f"the packed train_gpt.py, run from this folder, reproduced the readable script's loss at each of "
            f"{VERIFY_STEPS} steps of PRESET=tiny ({', '.join(x for _, x in lp)}) and its model file byte for byte")


def hardware(runs: list[dict]) -> str | None:
    """'8xNVIDIA H100 80GB HBM3' when every run recorded the same world size and device, else None."""
    kinds = {(r.get("world_size"), r.get("device")) for r in runs}
    kind = kinds.pop() if len(kinds) == 1 else (None, None)
    return None if None in kind else f"{kind[0]}x{kind[1]}"


def config_changes(config: dict, script: Path) -> tuple[list[tuple[str, object, object, str]], dict[str, str],
                                                       str | None]:
    """(rows of (KEY, value, default, source), env needed to reproduce, warning)."""
    preset = str(config.get("preset", "default"))
    try:
        trainer = import_trainer(script)
        defaults = {f.name: f.default for f in dataclasses.fields(trainer.Hyperparameters)}
        overrides = dict(getattr(trainer, "PRESETS", {}).get(preset, {}))
    except Exception as e:  # noqa: BLE001 - fall back to listing the whole config
        env = {k.upper(): env_value(v) for k, v in config.items() if k != "preset"}
        if preset != "default":
            env = {"PRESET": preset, **env}
        return [], env, f"could not read the defaults from {script} ({type(e).__name__}: {e}); listing the whole config"
    rows, env = [], {}
    if preset != "default":
        env["PRESET"] = preset
    for k, v in sorted(config.items()):
        if k == "preset":
            continue
        default = defaults.get(k, "?")
        base = overrides.get(k, default)
        if v != default:
            rows.append((k.upper(), v, default, f"PRESET={preset}" if k in overrides and v == base else "env"))
        if v != base:
            env[k.upper()] = env_value(v)
    return rows, env, None


def world_size_from_log(text: str) -> int | None:
    m = re.findall(r"world_size (\d+)", text)
    return int(m[-1]) if m else None


def readme_results(sub: dict, runs: list[dict]) -> list[str]:
    """The README's title, summary and per-seed results table (with the evaluation stages' means)."""
    lines = [f"# {sub['name']}", ""]
    if sub.get("blurb"):
        lines += [sub["blurb"], ""]
    std = f" (std {sub['val_bpb_std']:.4f})" if sub.get("val_bpb_std") is not None else ""
    lines += [f"**val_bpb {sub['val_bpb']:.4f}**{std} over {len(runs)} seed(s); val_loss {sub['val_loss']:.4f} nats; "
              f"largest artifact {sub['bytes_total']:,} bytes (cap {ARTIFACT_CAP_BYTES:,}), of which code "
              f"{sub['bytes_code']:,}. Author: {sub['author']} (@{sub['github_id']}), {sub['date']}.", "",
              "## Results", "",
              "| seed | val_bpb | val_loss | artifact bytes | steps | train s | eval s |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        lines.append(f"| {r['seed']} | {r['val_bpb']:.4f} | {r['val_loss']:.4f} | {int(r['artifact_bytes']):,} | "
                     f"{r.get('steps', '-')} | {r.get('train_seconds', '-')} | {r.get('eval_seconds', '-')} |")
    lines.append(f"| **mean** | **{sub['val_bpb']:.4f}** | **{sub['val_loss']:.4f}** | {sub['bytes_total']:,} (max) "
                 "| | | |")
    stages = sub["metadata"].get("eval_stages") or {}
    if len(stages) > 1:
        lines += ["", "Evaluation stages (mean over seeds; the last one is the score): " +
                  ", ".join(f"{k} {v:.4f} bpb" for k, v in stages.items()) + "."]
    return lines


def readme_configuration(sub: dict, rows: list, warning: str | None) -> list[str]:
    """The README's settings that differ from train_gpt.py's defaults."""
    lines = ["", "## Configuration", ""]
    if warning:
        lines += [f"({warning}.)", ""]
    elif rows:
        lines += [f"Settings that differ from `train_gpt.py`'s defaults (preset `{sub['metadata']['preset']}`):", "",
                  "| setting | value | default | from |", "|---|---|---|---|"]
        lines += [f"| `{k}` | `{v}` | `{d}` | {src} |" for k, v, d, src in rows]
    else:
        lines += ["All settings are `train_gpt.py`'s defaults."]
    return lines


def readme_reproduce(sub: dict, runs: list[dict], env: dict[str, str], nproc: int, folder: str,
                     verified: str) -> list[str]:
    """The README's command per seed, the packed code's check and the folder's files."""
    env_str = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    data_path = sub["metadata"]["config"].get("data_path")
    data_note = f" (here `{data_path}`)" if data_path else ""
    return ["", "## Reproduce", "", f"From this folder (`{folder}`), with the data in place, once per seed:", "",
            "```bash", f"for SEED in {' '.join(str(r['seed']) for r in runs)}; do",
            f"  {env_str + ' ' if env_str else ''}SEED=$SEED RUN_ID={sub['metadata']['run_prefix']}_seed$SEED \\",
            f"    torchrun --standalone --nproc_per_node={nproc} train_gpt.py", "done", "```", "",
            f"`DATA_PATH`{data_note} and `TOKENIZER_PATH` are read relative to where you run it: point them at "
            "the dataset if it is not there. Each run writes `logs/<RUN_ID>.txt` and `logs/<RUN_ID>.json`. "
            "Expected val_bpb per seed: " + ", ".join(f"{r['seed']}: {r['val_bpb']:.4f}" for r in runs) +
            f" (mean {sub['val_bpb']:.4f}).", "",
            f"Packed code: {verified}." if verified else "Packed code: not verified (packaged with --no-verify).", "",
            "## Files", "",
            f"- `train_gpt.py`: the packed training script ({sub['bytes_code']:,} bytes, counted in the artifact): it "
            "decompresses `train_gpt_readable.py` and runs it",
            "- `train_gpt_readable.py`: the readable source (not counted; its sha256 is on the packed file's first "
            "line)",
            "- `requirements.txt`: its Python dependencies",
            *[f"- `{r['run_id']}.txt` / `{r['run_id']}.json`: train log and results of seed {r['seed']}" for r in runs],
            "- `submission.json`: the numbers above, machine-readable", ""]


def build_readme(sub: dict, runs: list[dict], rows: list, env: dict[str, str], nproc: int, folder: str,
                 warning: str | None, verified: str) -> str:
    return "\n".join(readme_results(sub, runs) + readme_configuration(sub, rows, warning)
                     + readme_reproduce(sub, runs, env, nproc, folder, verified))


def common_prefix(run_ids: list[str]) -> str:
    stripped = [re.sub(r"_seed-?\d+$", "", rid) for rid in run_ids]
    return stripped[0] if len(set(stripped)) == 1 else "run"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, metavar="JSON",
                   help="result JSONs (paths or globs), one per seed")
    p.add_argument("--name", required=True, help="submission name")
    p.add_argument("--github-id", required=True, help="your GitHub user name")
    p.add_argument("--author", default=None, help="author name (default: the GitHub id)")
    p.add_argument("--blurb", default="", help="one-paragraph description of the approach")
    p.add_argument("--out", type=Path, default=None, help="folder to create (default records/<date>_<name>)")
    p.add_argument("--date", default=None, help="YYYY-MM-DD (default: today, UTC)")
    p.add_argument("--script", type=Path, default=Path("train_gpt.py"),
                   help="the training script (default ./train_gpt.py)")
    p.add_argument("--requirements", type=Path, default=Path("requirements.txt"),
                   help="requirements file to include (default ./requirements.txt)")
    p.add_argument("--packed", type=Path, default=None,
                   help="packed script made by scripts/pack_code.py from --script (default: pack --script now)")
    p.add_argument("--verify-data", type=Path, default=Path("data/datasets/brown_sp1024"),
                   help="dataset for the packed-vs-readable check (default data/datasets/brown_sp1024)")
    p.add_argument("--no-verify", action="store_true", help="skip the packed-vs-readable check")
    p.add_argument("--top-level", type=Path, default=Path("submission.json"),
                   help="the repo's submission.json, rewritten when the runs are 8x H100 runs "
                        "(default ./submission.json)")
    return p


def check_args(args) -> tuple[str, Path]:
    """The date and the folder to create, after checking --github-id, --date and the files to copy."""
    if not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})", args.github_id):
        raise UserError(f"--github-id {args.github_id!r}: expected a GitHub user name (letters, digits, hyphens)")
    if args.date is not None and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", args.date):
        raise UserError(f"--date {args.date!r}: expected YYYY-MM-DD")
    date = args.date or time.strftime("%Y-%m-%d", time.gmtime())
    out = args.out or Path("records") / f"{date}_{slug(args.name)}"
    for path, flag, what in ((args.script, "--script", "training script"),
                             (args.requirements, "--requirements", "requirements file")):
        if not path.is_file():
            raise UserError(f"{path}: {what} not found; run from the repo root or pass {flag}")
    if out.exists():
        raise UserError(f"{out}: already exists; choose another --out or remove it")
    return date, out


def load_runs(items: list[str]) -> tuple[list[dict], dict[str, Path]]:
    """The seeds' results (each one counting, one per seed) and their train logs by run id."""
    runs = load_results(items, "--runs")
    refuse_bad(runs, "--runs")
    seeds = [r.get("seed") for r in runs]
    dup = sorted({str(s) for s in seeds if seeds.count(s) > 1})
    if dup:
        raise UserError(f"--runs: seed(s) {', '.join(dup)} appear more than once; give one run per seed")
    logs = {}
    for r in runs:
        txt = Path(r["_path"]).with_suffix(".txt")
        if not txt.is_file():
            raise UserError(f"{txt}: train log of {r['run_id']} not found (it is written beside the result JSON)")
        logs[r["run_id"]] = txt
    return runs, logs


def logged_world_size(logs: dict[str, Path]) -> int:
    """The largest world size the train logs recorded (8 when none did)."""
    sizes = {world_size_from_log(p.read_text(errors="replace")) for p in logs.values()}
    sizes.discard(None)
    return max(sizes) if sizes else 8


def stage_means(runs: list[dict]) -> dict[str, float]:
    """Mean val_bpb of each evaluation stage that every run scored."""
    means = {}
    for k in runs[0].get("stages") or {}:
        vals = [r["stages"][k].get("val_bpb") for r in runs if k in (r.get("stages") or {})]
        if len(vals) == len(runs) and all(isinstance(v, (int, float)) for v in vals):
            means[k] = round(sum(vals) / len(vals), 8)
    return means


def r8(v):
    """A figure rounded to 8 decimals for submission.json; None for a missing or NaN one."""
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(v, 8)


def submission(args, date: str, runs: list[dict], config: dict, packed: bytes, rows: list, env: dict[str, str],
               nproc: int) -> dict:
    """submission.json's content."""
    bpb_m, bpb_s = mean_std([r["val_bpb"] for r in runs])
    loss_m, loss_s = mean_std([r["val_loss"] for r in runs])
    return dict(
        author=args.author or args.github_id, github_id=args.github_id, name=args.name, blurb=args.blurb,
        date=date, val_loss=r8(loss_m), val_bpb=r8(bpb_m), val_loss_std=r8(loss_s), val_bpb_std=r8(bpb_s),
        track="10min_16mb", bytes_total=len(packed) + max(int(r["model_bytes"]) for r in runs),
        bytes_code=len(packed), seeds=[r["seed"] for r in runs],
        val_bpb_per_seed={str(r["seed"]): r8(r["val_bpb"]) for r in runs},
        seed_results={str(r["seed"]): dict(run_id=r["run_id"], val_bpb=r8(r["val_bpb"]), val_loss=r8(r["val_loss"]),
                                           artifact_bytes=r["artifact_bytes"], model_bytes=r.get("model_bytes"),
                                           steps=r.get("steps"), train_seconds=r.get("train_seconds"),
                                           eval_seconds=r.get("eval_seconds")) for r in runs},
        hardware=hardware(runs), pytorch_version=runs[0].get("torch"),
        metadata=dict(preset=config.get("preset", "default"), run_prefix=common_prefix([r["run_id"] for r in runs]),
                      world_size=nproc, params=runs[0].get("params"), eval_stages=stage_means(runs),
                      config_changes={k: v for k, v, _, _ in rows}, reproduce_env=env, config=config),
    )


def write_folder(args, out: Path, packed: bytes, runs: list[dict], logs: dict[str, Path], sub: dict,
                 readme: Callable[[str], str]) -> None:
    """The records folder, written beside out and renamed into place once complete (with the packed script checked
    against the readable one unless --no-verify; sub gains packed_verified, readme(verified) is the README)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{int(time.time() * 1000)}"
    try:
        tmp.mkdir()
        (tmp / "train_gpt.py").write_bytes(packed)
        shutil.copyfile(args.script, tmp / "train_gpt_readable.py")
        shutil.copyfile(args.requirements, tmp / "requirements.txt")
        for r in runs:
            shutil.copyfile(logs[r["run_id"]], tmp / f"{r['run_id']}.txt")
            shutil.copyfile(r["_path"], tmp / f"{r['run_id']}.json")
        verified = "" if args.no_verify else verify_packed(tmp, tmp / "train_gpt_readable.py", args.verify_data)
        sub["metadata"]["packed_verified"] = bool(verified)
        (tmp / "submission.json").write_text(json.dumps(sub, indent=2) + "\n")
        (tmp / "README.md").write_text(readme(verified))
        if hashlib.sha256((tmp / "train_gpt_readable.py").read_bytes()).hexdigest() != packed_hash(packed):
            raise UserError(f"{args.script} changed while packaging; try again")
        if out.exists():
            raise UserError(f"{out}: appeared while packaging; nothing was written")
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def update_top_level(path: Path, sub: dict, out: Path) -> None:
    """The repo's submission.json becomes this submission only when its runs are 8x H100 runs."""
    if (sub["hardware"] or "").startswith("8x") and "H100" in sub["hardware"]:
        write_atomic(path, json.dumps(dict(sub, metadata=dict(sub["metadata"], records_folder=str(out))), indent=2)
                     + "\n")
        print(f"{path}: now this submission")
    else:
        print(f"{path}: left as it is (the runs are {sub['hardware'] or 'of unrecorded hardware'}, "
              "not 8x H100; a CPU figure never fills it)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    date, out = check_args(args)
    runs, logs = load_runs(args.runs)
    config = check_same_config(runs)
    packed = packed_form(args.script, args.packed)
    check_code_bytes(runs, args.script, packed)
    rows, env, warning = config_changes(config, args.script)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    nproc = logged_world_size(logs)
    sub = submission(args, date, runs, config, packed, rows, env, nproc)
    write_folder(args, out, packed, runs, logs, sub,
                 lambda verified: build_readme(sub, runs, rows, env, nproc, str(out), warning, verified))
    update_top_level(args.top_level, sub, out)
    bpb_mean = mean_std([r["val_bpb"] for r in runs])[0]
    print(f"val_bpb {bpb_mean:.4f} over seeds {', '.join(str(r['seed']) for r in runs)}; "
          f"artifact {sub['bytes_total']:,} bytes with the packed code ({len(packed):,} bytes)")
    print(out)
    return 0


if __name__ == "__main__":
    cli(main)
