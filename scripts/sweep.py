#!/usr/bin/env python3
"""Grid sweep of train_gpt.py over environment variables, one torchrun per combination and seed.

  python scripts/sweep.py --grid MATRIX_LR=0.02,0.03 --grid NUM_LAYERS=10,11 --nproc 8 --run-prefix lr
  python scripts/sweep.py --grid MODEL_DIM=192,256 --env PRESET=tiny --nproc 1 --run-prefix w --dry-run

Every combination of the --grid values (in the order given; cartesian product) runs once per
seed (--seeds, default 1337), sequentially, via `python -m torch.distributed.run --standalone
--nproc_per_node=N train_gpt.py`, with RUN_ID=<prefix>_<combination>_seed<seed>, where the
combination reads key+value, lower-cased, joined by '-': `lr_matrix_lr0.02-num_layers10_seed1337`.
A failed run is reported and the sweep goes on. At the end: a table of the combinations sorted
by mean val_bpb (failed ones last), and <LOG_DIR>/sweep_<prefix>.csv (one row per run) and
<LOG_DIR>/sweep_<prefix>.json (runs plus the ranked combinations).

Exit code: 0 every run ok; 1 some run not ok; 2 bad input; 130 interrupted.
"""
from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (ENV_KEY_RE, LAUNCHER_KEYS, RunSpec, add_launch_args, UserError, check_existing,  # noqa: E402
                     check_launch, check_run_prefix, cli, execute, log_dir_for, mean_std, parse_env_pairs,
                     parse_seeds, spec_ok, spec_value, table, write_atomic)

RESULT_COLUMNS = ("seed", "run_id", "status", "val_bpb", "val_loss", "artifact_bytes", "steps", "train_seconds",
                  "eval_seconds")


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not ENV_KEY_RE.match(key):
            raise UserError(f"--grid {item!r}: expected KEY=v1,v2,... with KEY a variable name")
        if key in LAUNCHER_KEYS:
            raise UserError(f"--grid {item!r}: {key} is set by the launcher (use --seeds)")
        if key in grid:
            raise UserError(f"--grid: {key} given twice; list all its values in one --grid {key}=v1,v2")
        vals = [v.strip() for v in values.split(",")]
        if not values.strip() or any(v == "" for v in vals):
            raise UserError(f"--grid {item!r}: empty value; expected KEY=v1,v2,...")
        if len(set(vals)) != len(vals):
            raise UserError(f"--grid {item!r}: a value is repeated")
        grid[key] = vals
    if not grid:
        raise UserError("give at least one --grid KEY=v1,v2")
    return grid


def combo_slug(combo: dict[str, str]) -> str:
    """{'NUM_LAYERS': '10', 'VE_LAYERS': '-1'} -> 'num_layers10-ve_layersm1' (a minus is 'm', other odd chars 'x')."""
    return "-".join(f"{k.lower()}{re.sub(r'[^A-Za-z0-9.+]', 'x', v.replace('-', 'm'))}" for k, v in combo.items())


def plan(grid: dict[str, list[str]], seeds: list[int], env: dict[str, str], prefix: str) -> list[RunSpec]:
    specs, seen = [], {}
    for values in itertools.product(*grid.values()):
        combo = dict(zip(grid, values))
        slug = combo_slug(combo)
        if slug in seen:
            raise UserError(f"combinations {seen[slug]} and {combo} give the same RUN_ID part {slug!r}; "
                            "use values that differ in letters/digits")
        seen[slug] = combo
        for seed in seeds:
            specs.append(RunSpec(run_id=f"{prefix}_{slug}_seed{seed}", seed=seed, env={**env, **combo}, label=combo))
    return specs


def rank_combos(specs: list[RunSpec]) -> list[dict]:
    combos: dict[str, dict] = {}
    for s in specs:
        c = combos.setdefault(combo_slug(s.label), dict(params=s.label, runs=[]))
        c["runs"].append(s)
    ranked = []
    for c in combos.values():
        ok = [s for s in c["runs"] if spec_ok(s)]
        bpb_m, bpb_s = mean_std([s.result["val_bpb"] for s in ok])
        loss_m, loss_s = mean_std([s.result["val_loss"] for s in ok])
        ranked.append(dict(params=c["params"], n_runs=len(c["runs"]), n_ok=len(ok),
                           val_bpb_mean=bpb_m if ok else None, val_bpb_std=bpb_s if len(ok) > 1 else None,
                           val_loss_mean=loss_m if ok else None, val_loss_std=loss_s if len(ok) > 1 else None,
                           artifact_bytes_max=max((s.result["artifact_bytes"] for s in ok), default=None),
                           run_ids=[s.run_id for s in c["runs"]],
                           failed=[f"{s.run_id} ({s.status})" for s in c["runs"] if not spec_ok(s)]))
    ranked.sort(key=lambda c: (c["val_bpb_mean"] is None, c["val_bpb_mean"] or 0.0))
    return ranked


def run_rows(specs: list[RunSpec], grid: dict[str, list[str]]) -> list[dict]:
    rows = []
    for s in specs:
        row = {k: s.label[k] for k in grid}
        row.update(seed=s.seed, run_id=s.run_id, status=s.status)
        for col in RESULT_COLUMNS[3:]:
            row[col] = spec_value(s, col)
        rows.append(row)
    return rows


def write_summary(specs: list[RunSpec], grid: dict[str, list[str]], seeds: list[int], env: dict[str, str],
                  prefix: str, ranked: list[dict]) -> tuple[Path, Path]:
    log_dir = log_dir_for(env)
    rows = run_rows(specs, grid)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=[*grid, *RESULT_COLUMNS], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    csv_path, json_path = log_dir / f"sweep_{prefix}.csv", log_dir / f"sweep_{prefix}.json"
    write_atomic(csv_path, buf.getvalue())
    write_atomic(json_path, json.dumps(dict(run_prefix=prefix, grid=grid, env=env, seeds=seeds, runs=rows,
                                            combos=ranked), indent=2))
    return csv_path, json_path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", action="append", default=[], metavar="KEY=v1,v2",
                   help="a variable and its values (repeatable; the sweep is the cartesian product)")
    p.add_argument("--seeds", default="1337", help="comma-separated seeds per combination (default 1337)")
    p.add_argument("--run-prefix", required=True, help="first part of every RUN_ID and of the summary file names")
    add_launch_args(p, "each combination")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    grid = parse_grid(args.grid)
    seeds = parse_seeds(args.seeds)
    prefix = check_run_prefix(args.run_prefix)
    env = parse_env_pairs(args.env)
    both = sorted(set(grid) & set(env))
    if both:
        raise UserError(f"{', '.join(both)}: given in both --grid and --env")
    specs = plan(grid, seeds, env, prefix)
    nproc = check_launch(args, [s.env for s in specs[::len(seeds)]])  # one check per combination
    n_combos = len(specs) // len(seeds)
    print(f"sweep {prefix}: {n_combos} combination(s) x {len(seeds)} seed(s) = {len(specs)} run(s), "
          f"{nproc} process(es) each", flush=True)
    check_existing(specs, args.overwrite, args.skip_existing)
    finished = execute(specs, nproc, args.script, args.dry_run, args.overwrite)
    if args.dry_run:
        return 0
    ranked = rank_combos(specs)
    rows = [(i, *[c["params"][k] for k in grid], f"{c['n_ok']}/{c['n_runs']}", c["val_bpb_mean"], c["val_bpb_std"],
             c["val_loss_mean"], c["artifact_bytes_max"]) for i, c in enumerate(ranked, 1)]
    print("\n" + table(("rank", *grid, "ok", "val_bpb", "bpb std", "val_loss", "max artifact"), rows))
    failed = [f for c in ranked for f in c["failed"]]
    if failed:
        print(f"NOT OK: {', '.join(failed)}")
    csv_path, json_path = write_summary(specs, grid, seeds, env, prefix, ranked)
    print(f"summary: {csv_path} {json_path}")
    if not finished:
        print("interrupted: the remaining runs were not started", file=sys.stderr)
        return 130
    return 0 if not failed else 1


if __name__ == "__main__":
    cli(main)
