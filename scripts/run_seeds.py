#!/usr/bin/env python3
"""Run train_gpt.py once per seed (sequentially, under torchrun) and summarize the results.

  python scripts/run_seeds.py --seeds 1337,42,2024 --nproc 8 --run-prefix myrecord [--env KEY=VAL ...]

Each seed runs `python -m torch.distributed.run --standalone --nproc_per_node=N train_gpt.py`
with SEED=<seed> and RUN_ID=<prefix>_seed<seed> (plus the --env variables) and its output
streamed. A failed seed is reported and the next one runs. At the end: a table (seed, status,
val_bpb, val_loss, artifact bytes, steps) and the mean/std over the seeds that finished ok.
Results are read from <LOG_DIR>/<RUN_ID>.json (LOG_DIR from --env, the environment, or logs).

Exit code: 0 every seed ok; 1 some seed failed / over cap / wrote no result; 2 bad input;
130 interrupted (Ctrl-C stops after the current run).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (RunSpec, add_launch_args, check_existing, check_launch, check_run_prefix, cli,  # noqa: E402
                     execute, fmt, mean_std, parse_env_pairs, parse_seeds, spec_ok, spec_value, table)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", required=True, help="comma-separated seeds, e.g. 1337,42,2024")
    p.add_argument("--run-prefix", required=True, help="RUN_ID of each run is <prefix>_seed<seed>")
    add_launch_args(p, "the configuration")
    return p


def summarize(specs: list[RunSpec]) -> str:
    rows = [(s.seed, s.run_id, s.status, spec_value(s, "val_bpb"), spec_value(s, "val_loss"),
             spec_value(s, "artifact_bytes"), spec_value(s, "steps"), fmt(spec_value(s, "train_seconds"), 1))
            for s in specs]
    out = [table(("seed", "run_id", "status", "val_bpb", "val_loss", "artifact_bytes", "steps", "train_s"), rows)]
    ok = [s for s in specs if spec_ok(s)]
    if ok:
        bpb_m, bpb_s = mean_std([s.result["val_bpb"] for s in ok])
        loss_m, loss_s = mean_std([s.result["val_loss"] for s in ok])
        out.append(f"mean over {len(ok)} ok seed(s): val_bpb {fmt(bpb_m)} (std {fmt(bpb_s)})  "
                   f"val_loss {fmt(loss_m)} (std {fmt(loss_s)})  "
                   f"max artifact {max(s.result['artifact_bytes'] for s in ok):,} bytes")
    bad = [s for s in specs if not spec_ok(s)]
    if bad:
        out.append(f"NOT OK: {', '.join(f'{s.run_id} ({s.status})' for s in bad)}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    seeds = parse_seeds(args.seeds)
    prefix = check_run_prefix(args.run_prefix)
    env = parse_env_pairs(args.env)
    nproc = check_launch(args, [env])
    specs = [RunSpec(run_id=f"{prefix}_seed{s}", seed=s, env=env) for s in seeds]
    check_existing(specs, args.overwrite, args.skip_existing)
    finished = execute(specs, nproc, args.script, args.dry_run, args.overwrite)
    if args.dry_run:
        return 0
    print("\n" + summarize(specs))
    if not finished:
        print("interrupted: the remaining seeds were not run", file=sys.stderr)
        return 130
    return 0 if all(spec_ok(s) for s in specs) else 1


if __name__ == "__main__":
    cli(main)
