#!/usr/bin/env python3
"""Is a new group of runs a record over a base group? The rules' significance test, on val_loss.

  python scripts/compare_runs.py --base logs/base_seed*.json --new logs/mine_seed*.json
  python scripts/compare_runs.py --base-loss 2.0601,2.0612,2.0598 --new logs/mine_seed*.json

The rules: a new record must beat the best by at least 0.005 nats with p < 0.01 over seeds.
The margin is in nats, so the test uses val_loss (mean token cross-entropy in nats, which every
result JSON carries); val_bpb (bits per byte, the leaderboard metric) is reported beside it,
with the margin converted at the runs' own bits-per-nat x tokens-per-byte ratio. The two only
rank runs identically when both groups use the same tokenizer (a warning says when they don't);
--metric val_bpb tests bits per byte instead (--margin and --base-loss are then in bpb; the default
margin is the rules' 0.005 nats at the new runs' ratio), the one measure that compares runs with
different tokenizers.

Test: one-sided Welch t-test of H0: mean_base - mean_new <= margin (default 0.005) against
H1: mean_base - mean_new > margin; t = (mean_base - mean_new - margin) / sqrt(s_b^2/n_b + s_n^2/n_n)
with Welch-Satterthwaite degrees of freedom, p = P(T_df > t) from a Student-t CDF computed here
(regularized incomplete beta by continued fraction; no scipy). Verdict `RECORD: ...` when
p < alpha (default 0.01), otherwise `NOT SIGNIFICANT: ...`; both exit 0. Each group needs at
least 2 runs (a variance). Runs whose status is not ok, or whose artifact exceeds 16,000,000
bytes, are refused (listed, exit 2); --skip-bad drops them instead.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import UserError, cli, load_results, mean_std, refuse_bad, result_problem, table  # noqa: E402

DEFAULT_MARGIN = 0.005  # nats
DEFAULT_ALPHA = 0.01

# -----------------------------------------------------------------------------
# Student t distribution
# -----------------------------------------------------------------------------


def _betacf(a: float, b: float, x: float, max_iter: int = 500, eps: float = 1e-15) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz's method)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, max_iter + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))  # even step
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))  # odd step
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if a <= 0 or b <= 0:
        raise ValueError(f"betainc: a and b must be > 0 (a={a}, b={b})")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc: x must lie in [0, 1] (x={x})")
    if x == 0.0 or x == 1.0:
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):  # the fraction converges fast here; else use the symmetry
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """One-sided upper tail P(T > t) of Student's t with df (> 0, may be fractional) degrees of freedom."""
    if df <= 0 or math.isnan(df):
        raise ValueError(f"t_sf: df must be > 0 (df={df})")
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return tail if t >= 0 else 1.0 - tail


def t_cdf(t: float, df: float) -> float:
    """P(T <= t)."""
    return 1.0 - t_sf(t, df)


# -----------------------------------------------------------------------------
# the test
# -----------------------------------------------------------------------------


def welch_one_sided(base: list[float], new: list[float], margin: float) -> dict:
    """One-sided Welch test of H0: mean(base) - mean(new) <= margin. Needs >= 2 values per group."""
    nb, nn = len(base), len(new)
    mb, sb = mean_std(base)
    mn, sn = mean_std(new)
    diff = mb - mn
    vb, vn = sb * sb / nb, sn * sn / nn
    se2 = vb + vn
    if se2 == 0.0:  # both groups constant: the difference is exact
        t = math.inf if diff > margin else (-math.inf if diff < margin else 0.0)
        df, p = math.inf, (0.0 if diff > margin else 1.0)
    else:
        t = (diff - margin) / math.sqrt(se2)
        df = se2 * se2 / ((vb * vb / (nb - 1) if vb else 0.0) + (vn * vn / (nn - 1) if vn else 0.0))
        p = t_sf(t, df)
    return dict(mean_base=mb, std_base=sb, n_base=nb, mean_new=mn, std_new=sn, n_new=nn, diff=diff, margin=margin,
                t=t, df=df, p=p)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    base = p.add_mutually_exclusive_group(required=True)
    base.add_argument("--base", nargs="+", metavar="JSON", help="result JSONs (paths or globs) of the current best")
    base.add_argument("--base-loss", metavar="L1,L2,...",
                      help="the current best's per-seed values of --metric (when you only have its README)")
    p.add_argument("--new", nargs="+", required=True, metavar="JSON",
                   help="result JSONs (paths or globs) of the candidate")
    p.add_argument("--metric", choices=("val_loss", "val_bpb"), default="val_loss",
                   help="what the test compares: val_loss in nats (the rules') or val_bpb (across tokenizers)")
    p.add_argument("--margin", type=float, default=None,
                   help=f"required improvement of the mean, in the metric's unit (default {DEFAULT_MARGIN} nats, "
                        "converted to bpb at the new runs' ratio for --metric val_bpb)")
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help=f"significance level (default {DEFAULT_ALPHA})")
    p.add_argument("--skip-bad", action="store_true",
                   help="drop runs that failed or are over the cap (listed) instead of refusing")
    return p


def load_group(items: list[str], what: str, skip_bad: bool) -> list[dict]:
    runs = load_results(items, what)
    if skip_bad:
        kept = []
        for r in runs:
            why = result_problem(r)
            if why:
                print(f"note: {what}: dropping {r['_path']} ({why})", file=sys.stderr)
            else:
                kept.append(r)
        runs = kept
        if not runs:
            raise UserError(f"{what}: no usable runs left after dropping the bad ones")
    refuse_bad(runs, what)
    return runs


def parse_losses(text: str, metric: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--base-loss {text!r}: expected comma-separated numbers ({metric})") from None
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise UserError(f"--base-loss {text!r}: expected positive finite {metric} values")
    return values


def load_groups(args, metric: str) -> tuple[list[dict], list[float], list[dict], list[float]]:
    """(base runs, base values, new runs, new values) of --metric; base runs are [] with --base-loss."""
    new = load_group(args.new, "--new", args.skip_bad)
    if args.base is not None:
        base = load_group(args.base, "--base", args.skip_bad)
        both = {Path(r["_path"]).resolve() for r in base} & {Path(r["_path"]).resolve() for r in new}
        if both:
            raise UserError(f"{', '.join(sorted(map(str, both)))}: given in both --base and --new")
        base_values = [r[metric] for r in base]
    else:
        base, base_values = [], parse_losses(args.base_loss, metric)
    return base, base_values, new, [r[metric] for r in new]


def warn_groups(base: list[dict], new: list[dict], metric: str) -> None:
    """Warnings on stderr: a seed repeated within a group; val_loss across different tokenizers or data."""
    for what, group in (("--base", base), ("--new", new)):
        seeds = [r.get("seed") for r in group]
        dup = sorted({s for s in seeds if seeds.count(s) > 1}, key=str)
        if dup:
            print(f"warning: {what}: seed(s) {', '.join(map(str, dup))} appear more than once; "
                  "repeated seeds understate the variance", file=sys.stderr)
    if not base:
        return
    settings = lambda runs, k: {str(r.get("config", {}).get(k)) for r in runs}  # noqa: E731
    differ = [k for k in ("vocab_size", "tokenizer_path", "data_path") if settings(base, k) != settings(new, k)]
    if differ and metric == "val_loss":
        print(f"warning: the groups differ in {', '.join(differ)}: val_loss per token is only comparable with the "
              "same tokenizer and validation data; compare val_bpb instead (--metric val_bpb)", file=sys.stderr)


def print_groups(groups, metric: str) -> list[tuple]:
    """The table of both groups (and each run's scores); returns its rows: (label, n, val_loss mean, std, val_bpb
    mean, std, max artifact bytes), --metric's columns from the values tested."""
    rows = []
    for label, runs, values in groups:
        cols = {m: mean_std([r[m] for r in runs]) if runs else (math.nan, math.nan) for m in ("val_loss", "val_bpb")}
        cols[metric] = mean_std(values)
        rows.append((label, len(values), *cols["val_loss"], *cols["val_bpb"],
                     max((r["artifact_bytes"] for r in runs), default=None)))
    print(table(("group", "n", "val_loss mean", "val_loss std", "val_bpb mean", "val_bpb std", "max artifact"), rows))
    for label, runs, _ in groups:
        if runs:
            print(f"  {label}: " + ", ".join(f"seed {r.get('seed')} {r['val_loss']:.5f} nats / {r['val_bpb']:.5f} bpb"
                                             for r in runs))
    return rows


def print_difference(rows: list[tuple], metric: str, unit: str, margin_arg: float | None) -> float:
    """The difference of the means (base - new) and the margin it must clear; returns the margin."""
    diff = {"val_loss": rows[0][2] - rows[1][2], "val_bpb": rows[0][4] - rows[1][4]}
    other = "val_bpb" if metric == "val_loss" else "val_loss"
    ratio = rows[1][4] / rows[1][2]  # bpb per nat of val_loss, from the new runs (tokens/byte / ln 2)
    margin = margin_arg if margin_arg is not None else round(DEFAULT_MARGIN * (ratio if metric == "val_bpb" else 1), 6)
    notes = f", {other} {diff[other]:+.5f}" if math.isfinite(diff[other]) else ""
    if metric == "val_loss":
        notes += f"; the margin is ~{margin * ratio:.5f} bpb at the new runs' {ratio:.4f} bpb per nat"
    elif margin_arg is None:
        notes += f"; the rules' {DEFAULT_MARGIN} nats at the new runs' {ratio:.4f} bpb per nat"
    print(f"difference (base - new): {metric} {diff[metric]:+.5f} {unit} (required >= {margin} {unit}){notes}")
    return margin


def print_verdict(base_values: list[float], new_values: list[float], margin: float, metric: str, unit: str,
                  alpha: float) -> None:
    """The Welch test and its verdict line: RECORD or NOT SIGNIFICANT (and why)."""
    if len(base_values) < 2 or len(new_values) < 2:
        print(f"NOT SIGNIFICANT: cannot test with n_base={len(base_values)}, n_new={len(new_values)}; "
              "each group needs at least 2 seeds (the rules usually ask for 3)")
        return
    res = welch_one_sided(base_values, new_values, margin)
    print(f"Welch one-sided test on {metric} of H0: mean_base - mean_new <= {margin}: t = {res['t']:.4f}, "
          f"df = {res['df']:.2f}, p = {res['p']:.3g}")
    if res["p"] < alpha:
        print(f"RECORD: new mean {metric} {res['mean_new']:.5f} beats base {res['mean_base']:.5f} by "
              f"{res['diff']:.5f} {unit} (>= {margin}) with p = {res['p']:.3g} < {alpha}")
    elif res["diff"] < margin:
        print(f"NOT SIGNIFICANT: the improvement {res['diff']:+.5f} {unit} is below the required {margin} {unit} "
              f"(p = {res['p']:.3g})")
    else:
        print(f"NOT SIGNIFICANT: the improvement {res['diff']:.5f} {unit} clears the {margin} margin on average, "
              f"but p = {res['p']:.3g} >= {alpha}; more seeds or a larger gain are needed")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    metric, unit = args.metric, {"val_loss": "nats", "val_bpb": "bpb"}[args.metric]
    if args.margin is not None and not (math.isfinite(args.margin) and args.margin >= 0):
        raise UserError(f"--margin {args.margin}: expected a number >= 0 ({unit})")
    if not 0 < args.alpha < 1:
        raise UserError(f"--alpha {args.alpha}: expected a number in (0, 1)")
    base, base_values, new, new_values = load_groups(args, metric)
    warn_groups(base, new, metric)
    rows = print_groups((("base", base, base_values), ("new", new, new_values)), metric)
    margin = print_difference(rows, metric, unit, args.margin)
    print_verdict(base_values, new_values, margin, metric, unit, args.alpha)
    return 0


if __name__ == "__main__":
    cli(main)
