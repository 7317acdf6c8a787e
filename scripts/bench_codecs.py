#!/usr/bin/env python3
"""Codec table of an artifact: each group's bytes per coder against its codes' order-0 entropy, with timings.

    python scripts/bench_codecs.py logs/<run>.artifact
    python scripts/bench_codecs.py logs/<run>.artifact --append-md docs/BENCHMARKS.md

Decodes every group of a train_gpt.py artifact, then compresses each group's packed bytes again
with every codec train_gpt.py ships (CODEC=...) and with PPMd at orders 2 and 4 when pyppmd is
importable (a context-modelling coder that train_gpt.py does not ship), one job at a time on one
thread. Per group and coder: bytes, bits per value, the ratio to the order-0 entropy of the codes
(the limit of any coder that treats codes as independent draws from one table; below 1 means the
coder found structure beyond it), encode and decode seconds (decoding counts in the evaluation
budget), and whether decoding gave the bytes back (exit code 1 if a shipped codec did not). Two
more rows per code group bound what context modelling could add: the ideal bits of coding each
matrix row by row (or column by column), each line with its own adaptive model started from its
tensor's histogram.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import UserError, append_md, cli, command_echo, fmt, import_trainer, table  # noqa: E402

PPMD_MEM = 256 << 20


def context_bound(T, header: dict, arrays: dict, g: str, axis: int, strength: float) -> float:
    """Ideal bits per value of group g coded row by row (axis 0) or column by column (axis 1) of each matrix, each line
    with its own adaptive model (Dirichlet prior: strength x its tensor's histogram), plus ~10 bits per table entry."""
    a, K = arrays[g], int(arrays[g].max()) + 1
    lg = lambda x: torch.lgamma(torch.as_tensor(x, dtype=torch.float64))  # noqa: E731
    bits = 0.0
    for _, _, parts in T.stored_parts(header, arrays):
        for part, codes in parts:
            if part != g:
                continue
            lines = torch.from_numpy(codes.reshape(codes.shape[0], -1).astype(np.int64))
            lines = lines if axis == 0 else lines.T
            alpha = strength * (torch.bincount(lines.flatten(), minlength=K) + 0.5) / (lines.numel() + 0.5 * K)
            counts = torch.zeros(lines.shape[0], K, dtype=torch.float64).scatter_add_(
                1, lines, torch.ones(lines.shape, dtype=torch.float64))
            ll = lg(strength) - lg(strength + lines.shape[1]) + (lg(alpha + counts) - lg(alpha)).sum(1)
            bits += float(-ll.sum()) / math.log(2) + 10 * K
    return bits / a.size


def all_coders(T) -> dict:
    """name -> (compress, decompress): every codec train_gpt.py ships, and PPMd at orders 2 and 4 when importable."""
    coders = dict(T.codecs())
    if ppmd := T.optional_import("pyppmd"):
        for k in (2, 4):
            coders[f"ppmd-o{k}"] = (lambda b, k=k: ppmd.compress(b, max_order=k, mem_size=PPMD_MEM),
                                    lambda b, n, k=k: ppmd.decompress(b, max_order=k, mem_size=PPMD_MEM))
    return coders


def coder_rows(T, header: dict, arrays: dict, g: str, coders: dict, h0: float | None) -> tuple[list[list], list[str]]:
    """Group g's packed bytes compressed and decompressed by each coder, timed, against its codes' order-0 entropy h0
    (None for fp16 groups): (its rows, the shipped codecs whose round trip failed)."""
    a, m, shipped = arrays[g], header["groups"][g], T.codecs()
    packed = T.pack(a, m["pack"], m["bits"])
    rows, failed = [], []
    for name, (compress, decompress) in coders.items():
        t0 = time.perf_counter()
        z = compress(packed)
        t1 = time.perf_counter()
        try:
            ok = decompress(z, len(packed)) == packed
        except ValueError:  # a coder that cannot decode its own stream
            ok = False
        t2 = time.perf_counter()
        if not ok and name in shipped:
            failed.append(f"{g}/{name}")
        rows.append([g, a.size, m["pack"], f"{name} (stored)" if name == m["codec"] else name, len(z),
                     fmt(8 * len(z) / a.size, 3), fmt(h0, 3), fmt(8 * len(z) / a.size / h0, 4) if h0 else "-",
                     fmt(t1 - t0, 2), fmt(t2 - t1, 2), "yes" if ok else "NO"])
    return rows, failed


def context_rows(T, header: dict, arrays: dict, g: str, h0: float) -> list[list]:
    """What any coder with a per-row or per-column adaptive model could reach at best on code group g (order-0
    entropy h0)."""
    a, rows = arrays[g], []
    for axis, what in ((0, "row"), (1, "column")):
        k, best = min(((k, context_bound(T, header, arrays, g, axis, k)) for k in (64, 256, 1024)),
                      key=lambda kb: kb[1])
        rows.append([g, a.size, "-", f"ideal per-{what} adaptive model (prior {k})", "-", fmt(best, 3), fmt(h0, 3),
                     fmt(best / h0, 4), "-", "-", "-"])
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifact", type=Path, help="an artifact written by train_gpt.py")
    p.add_argument("--append-md", type=Path, help="append the table to this Markdown file")
    p.add_argument("--script", type=Path, default=Path(__file__).resolve().parent.parent / "train_gpt.py")
    args = p.parse_args(argv)
    T = import_trainer(args.script)
    try:
        header, arrays = T.read_groups(args.artifact)
    except T.ConfigError as e:
        raise UserError(str(e)) from None
    coders, rows, failed = all_coders(T), [], []
    for g, a in arrays.items():
        h0 = None if g in T.FP16_GROUPS else T.code_entropy(a)
        group_rows, group_failed = coder_rows(T, header, arrays, g, coders, h0)
        rows, failed = rows + group_rows, failed + group_failed
        if h0:
            rows += context_rows(T, header, arrays, g, h0)
    out = [f"`{command_echo('bench_codecs.py', argv)}`: {args.artifact.stat().st_size:,} bytes, one thread per job",
           "", table(["group", "values", "packing", "coder", "bytes", "bits/value", "order-0 bits", "/ order-0",
                      "encode s", "decode s", "round trip"], rows)]
    print("\n".join(out))
    if args.append_md:
        append_md(args.append_md, out)
    if failed:
        print(f"round trip FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    cli(main)
