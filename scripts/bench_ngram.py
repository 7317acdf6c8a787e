#!/usr/bin/env python3
"""Benchmark train_gpt.py's causal n-gram stage: throughput, and its val_bpb gain over sliding-window eval.

  python scripts/bench_ngram.py                                  # Brown data, a tiny model trained here
  python scripts/bench_ngram.py --artifact logs/RUN.artifact --orders 5,7,9 --append-md docs/BENCHMARKS.md

Throughput: ngram_nll (exact counts of orders 1..K, interpolated absolute discounting, the online fit of the
mixing weights) over the first --tokens train tokens with stand-in model statistics, reported as tokens/s and
tokens/s per thread (torch's CPU threads, or the GPU). Gain: the model's sliding-window statistics on the whole
validation split, then the mix stage per order K, in val_bpb. The model is --artifact (an artifact of
train_gpt.py, same configuration) or the PRESET (default tiny) trained here for --iterations steps. Configuration:
the environment, like train_gpt.py, plus --env. Nothing is written unless --append-md is given.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import UserError, append_md, cli, command_echo, import_trainer, parse_env_pairs  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="DATA_PATH (default: $DATA_PATH, else the preset's)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VAL", help="extra setting (repeatable)")
    p.add_argument("--artifact", default=None, help="evaluate this artifact instead of training a model")
    p.add_argument("--iterations", type=int, default=150, help="training steps when no --artifact (default 150)")
    p.add_argument("--orders", default="3,5,7,9", help="n-gram orders K to compare (default 3,5,7,9)")
    p.add_argument("--tokens", type=int, default=1 << 21, help="train tokens for the throughput (default 2^21)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--append-md", default=None, metavar="FILE", help="append a dated section to this Markdown file")
    return p


def parse_orders(args) -> list[int]:
    try:
        orders = [int(k) for k in args.orders.split(",")]
    except ValueError:
        orders = []
    if not orders or min(orders) < 1 or args.tokens < 2 or args.iterations < 0:
        raise UserError("--orders must be comma-separated ints >= 1, --tokens >= 2, --iterations >= 0")
    return orders


def set_up(T, args):
    """(configuration, the run set up by train_gpt.py (with --artifact's weights), the first --tokens + 1 train
    tokens)."""
    env = {**os.environ, **parse_env_pairs(args.env)}
    env.setdefault("PRESET", "tiny")
    env.update(RUN_ID="bench_ngram", LOG_DIR=tempfile.mkdtemp(), ITERATIONS=str(args.iterations),
               **({"DATA_PATH": args.data} if args.data else {}))
    try:
        hp = T.load_hparams(env)
        run = T.setup(hp)
        first = T.shard_files(os.path.join(hp.data_path, "fineweb_train_*.bin"))[0]
        train = T.load_data_shard(first)[:args.tokens + 1]
        if args.artifact:
            run.model.load_state_dict(T.load_artifact(args.artifact))
    except T.ConfigError as e:
        raise UserError(str(e)) from None
    return hp, run, train


def throughput(T, hp, toks, orders: list[int], where: str, threads: int, torch) -> dict[int, float]:
    """Tokens/s of ngram_nll per order on the train tokens, with stand-in model statistics (printed as measured)."""
    gen = torch.Generator().manual_seed(0)
    fake = torch.stack((torch.rand(toks.numel() - 1, generator=gen) * 8,
                        torch.rand(toks.numel() - 1, generator=gen) * 6)).to(toks.device)  # stand-in NLL and entropy
    rates = {}
    T.ngram_nll(hp, toks[:4097], fake[:, :4096])  # warm-up: first-call allocations are not throughput
    for K in orders:
        t = time.perf_counter()
        T.ngram_nll(dataclasses.replace(hp, ngram_order=K), toks, fake)
        rates[K] = (toks.numel() - 1) / (time.perf_counter() - t)
        print(f"throughput K={K}: {rates[K]:,.0f} tokens/s on {where} = {rates[K] / threads:,.0f} per thread "
              f"({toks.numel() - 1:,} tokens)")
    return rates


def gains(T, hp, run, orders: list[int], torch, np) -> tuple[float, int, list[tuple[int, str]]]:
    """Sliding-window val_bpb of the model on the validation split, then the mix stage's per order: (sliding val_bpb,
    targets, [(K, 'mix val_bpb (gain)')])."""
    toks = torch.from_numpy(run.val_tokens.astype(np.int64)).to(run.device)
    M, n_bytes = toks.numel() - 1, T.count_bytes(run.val_tokens[:-1], run.val_tokens[1:], run.luts)
    bpb = lambda nll: float(nll.double().sum()) / math.log(2) / n_bytes  # noqa: E731
    stats = T.eval_sliding(run, run.model, toks)
    base = bpb(stats[0])
    print(f"val: {M:,} targets; sliding (stride {hp.eval_stride}) val_bpb {base:.4f}")
    rows = []
    for K in orders:
        mix = bpb(T.ngram_nll(dataclasses.replace(hp, ngram_order=K), toks, stats)[0])
        rows.append((K, f"{mix:.4f} ({mix - base:+.4f})"))
        print(f"K={K}: mix val_bpb {mix:.4f} ({mix - base:+.4f})")
    return base, M, rows


def md_section(argv, args, hp, where: str, threads: int, base: float, M: int, rates: dict[int, float], rows,
               torch) -> list[str]:
    """A dated Markdown section: the command, the model and data, a row per order."""
    model = f"`{args.artifact}`" if args.artifact else f"PRESET={hp.preset} trained {args.iterations} steps here"
    lines = [f"## bench_ngram.py: {where}, {time.strftime('%Y-%m-%d', time.gmtime())}", "",
             f"`{command_echo('bench_ngram.py', argv)}` "
             f"(torch {torch.__version__}); data `{hp.data_path}`, {M:,} validation targets; model {model}; "
             f"sliding val_bpb {base:.4f} (stride {hp.eval_stride}, window {hp.eval_seq_len}); "
             f"D = {hp.ngram_discount}.", "",
             "| K | tokens/s | tokens/s per thread | mix val_bpb (gain) |",
             "|---:|---:|---:|---:|"]
    return lines + [f"| {K} | {rates[K]:,.0f} | {rates[K] / threads:,.0f} | {mix} |" for K, mix in rows]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    orders = parse_orders(args)
    T = import_trainer(Path(__file__).resolve().parent.parent / "train_gpt.py")
    import numpy as np
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    hp, run, train = set_up(T, args)
    dev, threads = run.device, torch.get_num_threads() if run.device.type == "cpu" else 1
    where = (torch.cuda.get_device_name(dev) if dev.type == "cuda" else
             f"CPU ({os.cpu_count()} cores, {threads} torch threads)")
    rates = throughput(T, hp, torch.from_numpy(train.astype(np.int64)).to(dev), orders, where, threads, torch)
    if not args.artifact:
        T.train(run)
    base, M, rows = gains(T, hp, run, orders, torch, np)
    if args.append_md:
        append_md(args.append_md, md_section(argv, args, hp, where, threads, base, M, rates, rows, torch))
    return 0


if __name__ == "__main__":
    cli(main)
