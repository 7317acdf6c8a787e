#!/usr/bin/env python3
"""Plot train loss (and validation points) against step from train_gpt.py logs.

  python scripts/plot_runs.py logs/a_seed1337.txt logs/b_seed1337.txt --out loss.png
  python scripts/plot_runs.py 'logs/sweep_*.txt' --csv points.csv      # no matplotlib needed
  python scripts/plot_runs.py logs/a_seed1337.txt --csv -              # CSV to stdout

Inputs are the human logs logs/<RUN_ID>.txt (paths or globs; a <RUN_ID>.json is taken to mean
the .txt beside it). Parsed lines:
  step 20/400 loss 5.7054 lr_mult 0.175 tok/s 3,824 ms/step 2142.4 eta 43s   (kind=train)
  step 200 val_loss 4.1234 val_bpb 2.3456                                   (kind=val)
  eval <stage>: val_loss X val_bpb Y                                        (kind=eval, at the last step)
If a log holds several runs (a RUN_ID reused; train_gpt.py appends), only the last is used.

The PNG (needs matplotlib, optional: pip install matplotlib) has train/val loss vs step, val_bpb
vs step when the logs have validation points (VAL_LOSS_EVERY), and the val_bpb of each evaluation
stage (roundtrip, ttt or sliding, ngram) of each run. Default --out: <log>.png for one log,
plot_runs.png for several. --csv FILE writes the parsed points (run, kind, stage, step, loss,
val_bpb, lr_mult, tok_s, ms_step) and needs no matplotlib; with --csv a PNG is only drawn if
--out is also given.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import UserError, cli, expand_paths, write_atomic  # noqa: E402

NUM = r"(-?[0-9][0-9,]*\.?[0-9]*(?:[eE][-+]?\d+)?|nan|inf|-inf)"
TRAIN_RE = re.compile(rf"^step (\d+)/(\d+) loss {NUM}(?: lr_mult {NUM})?(?: tok/s {NUM})?(?: ms/step {NUM})?")
VAL_RE = re.compile(rf"^step (\d+) val_loss {NUM} val_bpb {NUM}")
EVAL_RE = re.compile(rf"^eval ([^:]+): val_loss {NUM} val_bpb {NUM}")
RUN_START_RE = re.compile(r"^config: ")
COLUMNS = ("run", "kind", "stage", "step", "loss", "val_bpb", "lr_mult", "tok_s", "ms_step")


def num(s: str | None) -> float | None:
    return None if s is None else float(s.replace(",", ""))


def parse_log(text: str, run: str) -> tuple[list[dict], int]:
    """Points of the last run in a log; returns (points, number of runs found in the file)."""
    runs: list[list[dict]] = [[]]
    starts = 0
    last_step = 0
    for line in text.splitlines():
        line = line.strip()
        if RUN_START_RE.match(line):
            starts += 1
            if runs[-1]:
                runs.append([])
            last_step = 0
            continue
        m = TRAIN_RE.match(line)
        if m:
            last_step = int(m.group(1))
            runs[-1].append(dict(run=run, kind="train", stage="", step=last_step, loss=num(m.group(3)), val_bpb=None,
                                 lr_mult=num(m.group(4)), tok_s=num(m.group(5)), ms_step=num(m.group(6))))
            continue
        m = VAL_RE.match(line)
        if m:
            last_step = int(m.group(1))
            runs[-1].append(dict(run=run, kind="val", stage="", step=last_step, loss=num(m.group(2)),
                                 val_bpb=num(m.group(3)), lr_mult=None, tok_s=None, ms_step=None))
            continue
        m = EVAL_RE.match(line)
        if m:
            runs[-1].append(dict(run=run, kind="eval", stage=m.group(1).strip(), step=last_step, loss=num(m.group(2)),
                                 val_bpb=num(m.group(3)), lr_mult=None, tok_s=None, ms_step=None))
    return runs[-1], max(starts, 1)


def resolve_logs(items: list[str]) -> list[Path]:
    paths = []
    for item in items:
        if item.endswith(".json") and not any(c in item for c in "*?["):
            item = item[:-5] + ".txt"
        for p, from_glob in expand_paths([item], "logs"):
            if p.suffix == ".json":
                p = p.with_suffix(".txt")
                if not p.is_file():
                    raise UserError(f"{p}: train log not found beside its result JSON")
            if p.suffix != ".txt" and from_glob:
                continue
            if p not in paths:
                paths.append(p)
    if not paths:
        raise UserError("no train logs (.txt) given")
    return paths


def to_csv(points: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    for p in points:
        w.writerow({k: ("" if p[k] is None else p[k]) for k in COLUMNS})
    return buf.getvalue()


def stage_scores(points: list[dict]) -> list[tuple[str, float]]:
    """Each evaluation stage's val_bpb in the order the stages ran (roundtrip, ttt or sliding, ngram)."""
    return [(p["stage"], p["val_bpb"]) for p in points if p["kind"] == "eval" and p["val_bpb"] is not None]


def plot(series: dict[str, list[dict]], out: Path, from_step: int) -> None:
    """Train/val loss by step; val_bpb by step when the logs have validation points; each evaluation stage's val_bpb."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("matplotlib is not installed (it is optional: pip install matplotlib); "
                        "use --csv FILE to get the parsed points as a table instead") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_val = any(p["kind"] == "val" and p["val_bpb"] is not None for pts in series.values() for p in pts)
    has_eval = any(stage_scores(pts) for pts in series.values())
    n = 1 + has_val + has_eval
    fig, axes = plt.subplots(1, n, figsize=(6.5 * n, 4.8), squeeze=False)
    draw_loss(axes[0][0], series, from_step)
    if has_val:
        draw_val_bpb(axes[0][1], series, from_step)
    if has_eval:
        draw_stages(axes[0][n - 1], series)
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    write_atomic(out, buf.getvalue())


def draw_loss(ax, series: dict[str, list[dict]], from_step: int) -> None:
    for i, (run, pts) in enumerate(series.items()):
        pts = [p for p in pts if p["step"] >= from_step and p["loss"] is not None and math.isfinite(p["loss"])]
        train = [p for p in pts if p["kind"] == "train"]
        val = [p for p in pts if p["kind"] == "val"]
        if train:
            ax.plot([p["step"] for p in train], [p["loss"] for p in train], color=f"C{i % 10}", lw=1.4,
                    marker="." if len(train) < 30 else None, label=f"{run} train")
        if val:
            ax.plot([p["step"] for p in val], [p["loss"] for p in val], color=f"C{i % 10}", ls="--", marker="o", ms=3,
                    label=f"{run} val")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="train / val loss")


def draw_val_bpb(ax, series: dict[str, list[dict]], from_step: int) -> None:
    for i, (run, pts) in enumerate(series.items()):
        vb = [p for p in pts if p["kind"] == "val" and p["val_bpb"] is not None and p["step"] >= from_step]
        if vb:
            ax.plot([p["step"] for p in vb], [p["val_bpb"] for p in vb], color=f"C{i % 10}", marker="o", ms=3,
                    label=f"{run} val")
    ax.set(xlabel="step", ylabel="val_bpb", title="validation bits per byte during training")


def draw_stages(ax, series: dict[str, list[dict]]) -> None:
    """One line per run across the evaluation stages, each point labelled with its score."""
    names = list(dict.fromkeys(name for pts in series.values() for name, _ in stage_scores(pts)))
    for i, (run, pts) in enumerate(series.items()):
        scores = stage_scores(pts)
        xs = [names.index(name) for name, _ in scores]
        ax.plot(xs, [bpb for _, bpb in scores], color=f"C{i % 10}", marker="*", ms=9, label=run)
        for x, (_, bpb) in zip(xs, scores):
            ax.annotate(f"{bpb:.4f}", (x, bpb), textcoords="offset points", xytext=(6, 4), fontsize=7)
    ax.set_xticks(range(len(names)), names)
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.set(xlabel="evaluation stage (in the order they ran)", ylabel="val_bpb",
           title="val_bpb of each evaluation stage")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", nargs="+", help="logs/<RUN_ID>.txt files or globs")
    p.add_argument("--out", type=Path, default=None, help="PNG to write")
    p.add_argument("--csv", default=None, metavar="FILE", help="write the parsed points as CSV ('-' = stdout)")
    p.add_argument("--from-step", type=int, default=0,
                   help="plot only points at or after this step (zoom past the start)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    paths = resolve_logs(args.logs)
    series: dict[str, list[dict]] = {}
    for path in paths:
        try:
            text = path.read_text(errors="replace")
        except OSError as e:
            raise UserError(f"{path}: cannot read ({e.strerror})") from None
        name = path.stem
        while name in series:
            name += "'"
        points, n_runs = parse_log(text, name)
        if n_runs > 1:
            print(f"note: {path} holds {n_runs} runs (RUN_ID reused); using the last", file=sys.stderr)
        if not points:
            raise UserError(f"{path}: no step/eval lines found; is it a train_gpt.py log?")
        series[name] = points
    all_points = [p for pts in series.values() for p in pts]
    if args.csv is not None:
        data = to_csv(all_points)
        if args.csv == "-":
            sys.stdout.write(data)
        else:
            write_atomic(args.csv, data)
            print(f"wrote {len(all_points)} points to {args.csv}", file=sys.stderr)
    if args.csv is None or args.out is not None:
        out = args.out or (paths[0].with_suffix(".png") if len(paths) == 1 else Path("plot_runs.png"))
        plot(series, out, args.from_step)
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    cli(main)
