"""Shared helpers of the run scripts (run_seeds, sweep, compare_runs, package_submission, plot_runs,
bench_train, preflight): one-line user errors, result-JSON loading, tables, statistics,
peak RSS, and the sequential torchrun launcher that run_seeds.py and sweep.py share.

Not a CLI. Every user-facing failure raises UserError; `cli(main)` turns it into
`error: <message>` on stderr and exit code 2 (no traceback).
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import math
import os
import re
import resource
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from train_gpt import ARTIFACT_CAP_BYTES, write_atomic  # noqa: E402  the trainer's own: one cap, one atomic write

RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
NUMBER_RE = re.compile(r"^(-|[-+]?[0-9][0-9,]*(\.[0-9]+)?)$")  # right-aligned in tables
# Variables a launcher sets itself; the user must not pass them with --env / --grid.
LAUNCHER_KEYS = ("SEED", "RUN_ID")


class UserError(Exception):
    """A bad input; reported as one line `error: ...` with exit code 2."""


def cli(main: Callable[[list[str] | None], int]) -> None:
    """Run main(argv) and exit with its code; UserError -> one line + exit 2, Ctrl-C -> 130."""
    try:
        code = main(None)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


def command_echo(script: str, argv: Sequence[str] | None) -> str:
    """The command line a benchmark was run with, for its Markdown section."""
    return " ".join([f"python scripts/{script}", *(argv if argv is not None else sys.argv[1:])])


def peak_rss_bytes() -> int:
    """This process's peak resident memory in bytes (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def append_md(path: str | Path, lines: Sequence[str]) -> None:
    """Append a section (its lines) to a Markdown file, one blank line after what is already there."""
    path = Path(path)
    old = path.read_text() if path.is_file() else ""
    write_atomic(path, old + ("\n" if old and not old.endswith("\n\n") else "") + "\n".join(lines) + "\n\n")
    print(f"appended a section to {path}")


# -----------------------------------------------------------------------------
# result JSONs (logs/<RUN_ID>.json, written by train_gpt.py's report())
# -----------------------------------------------------------------------------

def expand_paths(items: Iterable[str], what: str) -> list[tuple[Path, bool]]:
    """Globs (quoted or already expanded by the shell) and plain paths -> [(path, came_from_glob)], de-duplicated."""
    out: list[tuple[Path, bool]] = []
    seen: set[Path] = set()
    for item in items:
        if any(c in item for c in "*?[") and not Path(item).exists():
            matches = sorted(glob.glob(item))
            if not matches:
                raise UserError(f"{what}: no file matches {item!r}")
            pairs = [(Path(m), True) for m in matches]
        else:
            if not Path(item).is_file():
                raise UserError(f"{what}: {item}: file not found")
            pairs = [(Path(item), False)]
        for p, from_glob in pairs:
            key = p.resolve()
            if key not in seen:
                seen.add(key)
                out.append((p, from_glob))
    return out


def read_result(path: Path) -> dict:
    """One run's result JSON; UserError when it is unreadable or not a train_gpt.py result."""
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not (isinstance(data, dict) and "run_id" in data and "status" in data):
        raise UserError(f"{path}: not a train_gpt.py result JSON (no run_id/status)")
    data["_path"] = str(path)
    return data


def load_results(items: Iterable[str], what: str) -> list[dict]:
    """Result JSONs named by paths/globs. Files matched only by a glob that are not run results
    (e.g. a sweep summary beside them) are skipped with a note; named files must be results."""
    results = []
    for path, from_glob in expand_paths(items, what):
        if path.suffix != ".json":
            if from_glob:
                continue
            raise UserError(f"{what}: {path}: expected a result .json (logs/<RUN_ID>.json)")
        try:
            results.append(read_result(path))
        except UserError:
            if not from_glob:
                raise
            print(f"note: skipping {path}: not a run result JSON", file=sys.stderr)
    if not results:
        raise UserError(f"{what}: no run result JSONs given")
    return results


def result_problem(r: dict) -> str | None:
    """Why a result cannot count (status, cap, missing score), or None."""
    if r.get("status") != "ok":
        extra = f": {r['error']}" if r.get("error") else ""
        return f"status {r.get('status')!r}{extra}"
    ab = r.get("artifact_bytes")
    if not isinstance(ab, (int, float)):
        return "no artifact_bytes"
    if ab > ARTIFACT_CAP_BYTES:
        return f"artifact {int(ab):,} bytes > cap {ARTIFACT_CAP_BYTES:,}"
    for key in ("val_loss", "val_bpb"):
        v = r.get(key)
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            return f"no finite {key}"
    return None


def refuse_bad(results: Sequence[dict], what: str) -> None:
    bad = [(r, result_problem(r)) for r in results]
    bad = [(r, why) for r, why in bad if why]
    if bad:
        listing = "; ".join(f"{r['_path']} ({why})" for r, why in bad)
        raise UserError(f"{what}: {len(bad)} run(s) cannot count: {listing}")


# -----------------------------------------------------------------------------
# statistics and formatting
# -----------------------------------------------------------------------------

def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n-1); std is nan for fewer than 2 values."""
    n = len(xs)
    if n == 0:
        return math.nan, math.nan
    m = sum(xs) / n
    if n < 2:
        return m, math.nan
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))


def fmt(v: object, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Plain aligned text table (numbers right-aligned)."""
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else fmt(c) for c in row] for row in rows]
    numeric = [bool(rows) and all(NUMBER_RE.match(r[i]) for r in cells[1:]) for i in range(len(headers))]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for k, r in enumerate(cells):
        padded = (c.rjust(w) if numeric[i] else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
        lines.append("  ".join(padded).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# train_gpt.py: import by path (for defaults and config validation)
# -----------------------------------------------------------------------------

def import_trainer(script: str | Path):
    """Import a train_gpt.py by path as a module (without running main)."""
    script = Path(script)
    if not script.is_file():
        raise UserError(f"{script}: training script not found; run from the repo root or pass --script")
    name = f"_trainer_{abs(hash(str(script.resolve())))}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules[name]
        raise
    return module


def add_launch_args(p: argparse.ArgumentParser, what: str):
    """The options run_seeds.py and sweep.py share; `what` names the unit the config check validates."""
    p.add_argument("--nproc", type=int, default=None,
                   help="processes per run (GPUs); default: the number of CUDA devices, or 1 without CUDA")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VAL",
                   help="fixed environment variable for every run (repeatable), e.g. --env PRESET=tiny")
    p.add_argument("--script", type=Path, default=Path("train_gpt.py"), help="training script (default ./train_gpt.py)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing, write nothing")
    p.add_argument("--overwrite", action="store_true",
                   help="delete an existing <RUN_ID>.json/.txt/.artifact/.ckpt before re-running that RUN_ID")
    p.add_argument("--skip-existing", action="store_true",
                   help="reuse runs whose <RUN_ID>.json already says status ok (resume an interrupted batch)")
    p.add_argument("--no-check", action="store_true",
                   help=f"do not import the script to validate {what} before launching")


def parse_env_pairs(pairs: Sequence[str], flag: str = "--env") -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not ENV_KEY_RE.match(key):
            raise UserError(f"{flag} {pair!r}: expected KEY=VALUE with KEY a variable name")
        if key in LAUNCHER_KEYS:
            raise UserError(f"{flag} {pair!r}: {key} is set by the launcher (use --seeds / --run-prefix)")
        if key in env and env[key] != value:
            raise UserError(f"{flag}: {key} given twice ({env[key]!r} and {value!r})")
        env[key] = value
    return env


def parse_seeds(text: str) -> list[int]:
    seeds = []
    for part in text.split(","):
        part = part.strip()
        try:
            seeds.append(int(part))
        except ValueError:
            raise UserError(f"--seeds {text!r}: expected comma-separated integers, e.g. 1337,42,2024") from None
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {text!r}: a seed is repeated")
    return seeds


def check_run_prefix(prefix: str) -> str:
    if not RUN_ID_RE.match(prefix):
        raise UserError(f"--run-prefix {prefix!r}: use letters, digits and _ . + - (it becomes a file name)")
    return prefix


def validate_config(script: Path, env: dict[str, str], known_extra: Sequence[str] = ()) -> list[str]:
    """Check an environment against the trainer's load_hparams before launching anything.

    Raises UserError for a value train_gpt.py would refuse; returns warnings for keys that are
    no setting of the trainer (typos). Skipped (with a warning) if the trainer cannot be imported."""
    try:
        trainer = import_trainer(script)
    except UserError:
        raise
    except Exception as e:  # an older/other trainer: launch anyway, it reports its own errors
        return [f"could not import {script} to check the configuration ({type(e).__name__}: {e})"]
    warnings = []
    fields = getattr(trainer, "Hyperparameters", None)
    if fields is not None:
        import dataclasses
        known = {f.name.upper() for f in dataclasses.fields(fields)} | {"PRESET", *LAUNCHER_KEYS, *known_extra}
        for key in env:
            if key not in known and not key.startswith(("TORCH", "NCCL", "CUDA", "OMP_", "PYTORCH", "MASTER_")):
                warnings.append(f"{key} is not a setting of {script.name} (typo?); passed through anyway")
    load = getattr(trainer, "load_hparams", None)
    if load is not None:
        full = {k: v for k, v in os.environ.items()}
        full.update(env)
        try:
            load(full)
        except getattr(trainer, "ConfigError", ValueError) as e:
            raise UserError(f"bad configuration: {e}") from None
    return warnings


def check_launch(args: argparse.Namespace, envs: Iterable[dict[str, str]]) -> int:
    """Check add_launch_args' --nproc and --script, and (unless --no-check) validate each environment,
    printing each distinct warning once. Returns the processes per run."""
    if args.nproc is not None and args.nproc < 1:
        raise UserError(f"--nproc {args.nproc}: expected an int >= 1")
    if not args.script.is_file():
        raise UserError(f"{args.script}: training script not found; run from the repo root or pass --script")
    if not args.no_check:
        warned = set()
        for env in envs:
            for w in validate_config(args.script, env):
                if w not in warned:
                    warned.add(w)
                    print(f"warning: {w}", file=sys.stderr)
    return args.nproc or default_nproc()


# -----------------------------------------------------------------------------
# the sequential launcher (run_seeds.py, sweep.py)
# -----------------------------------------------------------------------------

@dataclass
class RunSpec:
    run_id: str
    seed: int
    env: dict[str, str]  # user variables (without SEED/RUN_ID)
    label: dict[str, str] = field(default_factory=dict)  # e.g. the sweep combination
    result: dict | None = None
    status: str = "pending"  # ok | failed | over_cap | no-result (exit N) | interrupted | reused
    exit_code: int | None = None


def log_dir_for(env: dict[str, str]) -> Path:
    return Path(env.get("LOG_DIR") or os.environ.get("LOG_DIR") or "logs")


def result_paths(spec: RunSpec) -> list[Path]:
    d = log_dir_for(spec.env)
    # what train_gpt.py refuses to reuse
    return [d / f"{spec.run_id}{ext}" for ext in (".json", ".txt", ".artifact", ".ckpt")]


def torchrun_argv(nproc: int, script: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script)]


def command_line(spec: RunSpec, nproc: int, script: Path) -> str:
    assigns = {**spec.env, "SEED": str(spec.seed), "RUN_ID": spec.run_id}
    env_part = " ".join(f"{k}={shlex.quote(v)}" for k, v in assigns.items())
    return f"{env_part} {shlex.join(torchrun_argv(nproc, script))}"


def default_nproc() -> int:
    try:
        import torch
        return max(1, torch.cuda.device_count())
    except Exception:
        return 1


def check_existing(specs: list[RunSpec], overwrite: bool, skip_existing: bool) -> None:
    """Refuse to mix a new run with an old one's files (train_gpt.py appends to <RUN_ID>.txt)."""
    conflicts = []
    for spec in specs:
        paths = result_paths(spec)
        if not any(p.exists() for p in paths):
            continue
        if skip_existing:
            try:
                old = read_result(paths[0])
            except UserError:
                old = None
            if old is not None and old.get("status") == "ok":
                spec.result, spec.status = old, "reused"
                continue
        if not overwrite:
            conflicts.append(spec.run_id)
    if conflicts:
        where = log_dir_for(specs[0].env)
        raise UserError(f"results already exist in {where}/ for {', '.join(conflicts)}; pass --overwrite to replace "
                        "them, --skip-existing to reuse finished ones, or choose another --run-prefix")


STOP_GRACE_S = 60.0  # how long an interrupted torchrun gets to stop its workers before SIGKILL


def stop_run(proc: subprocess.Popen) -> None:
    """SIGINT to torchrun (it stops its workers); after STOP_GRACE_S, or a second Ctrl-C, SIGKILL its whole group."""
    grace_s = STOP_GRACE_S
    print(f"\ninterrupted: stopping the current run (up to {grace_s:.0f}s; Ctrl-C again to kill it)", file=sys.stderr,
          flush=True)
    try:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=grace_s)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        pass
    try:  # anything left in the run's process group (workers of a torchrun that died first)
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt


def execute(specs: list[RunSpec], nproc: int, script: Path, dry_run: bool, overwrite: bool) -> bool:
    """Run each spec in order, streaming its output. Returns False if interrupted (Ctrl-C or SIGTERM)."""
    if dry_run:
        for spec in specs:
            print(f"# {spec.run_id}: reusing its finished result" if spec.status == "reused"
                  else command_line(spec, nproc, script))
        return True
    try:
        previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    except ValueError:  # not the main thread: leave SIGTERM alone
        previous = None
    try:
        return _execute(specs, nproc, script, overwrite)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _execute(specs: list[RunSpec], nproc: int, script: Path, overwrite: bool) -> bool:
    total = len(specs)
    for i, spec in enumerate(specs, 1):
        cmd = command_line(spec, nproc, script)
        if spec.status == "reused":
            print(f"[{i}/{total}] {spec.run_id}: reusing finished result {result_paths(spec)[0]}", flush=True)
            continue
        if overwrite:
            for p in result_paths(spec):
                if p.exists():
                    p.unlink()
        print(f"\n=== [{i}/{total}] {spec.run_id} (seed {spec.seed}) ===\n{cmd}", flush=True)
        env = {**os.environ, **spec.env, "SEED": str(spec.seed), "RUN_ID": spec.run_id}
        t0 = time.time()
        try:  # its own session: Ctrl-C reaches only us, and we forward exactly one SIGINT
            proc = subprocess.Popen(torchrun_argv(nproc, script), env=env, start_new_session=True)
        except OSError as e:
            raise UserError(f"cannot start {sys.executable} -m torch.distributed.run: {e}") from None
        try:
            spec.exit_code = proc.wait()
        except KeyboardInterrupt:
            stop_run(proc)
            spec.status = "interrupted"
            return False
        json_path = result_paths(spec)[0]
        if json_path.is_file() and json_path.stat().st_mtime >= t0 - 1:
            try:
                spec.result = read_result(json_path)
                spec.status = str(spec.result.get("status"))
            except UserError as e:
                spec.status = f"no-result (exit {spec.exit_code})"
                print(f"warning: {e}", file=sys.stderr)
        else:
            spec.status = f"no-result (exit {spec.exit_code})"
        if spec.status != "ok":
            error = f" — {spec.result['error']}" if spec.result and spec.result.get("error") else ""
            print(f"!!! {spec.run_id}: {spec.status}{error}; continuing", file=sys.stderr, flush=True)
    return True


def spec_value(spec: RunSpec, key: str):
    return spec.result.get(key) if spec.result else None


def spec_ok(spec: RunSpec) -> bool:
    """Finished with status ok, under the cap, with finite scores."""
    return spec.result is not None and spec.status in ("ok", "reused") and result_problem(spec.result) is None
