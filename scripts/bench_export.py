#!/usr/bin/env python3
"""Export time at full size: what EXPORT_RESERVE_SECONDS must cover, without a GPU or training.

    python scripts/bench_export.py                       # the default recipe's shape and QUANT_SPEC
    NUM_LAYERS=12 python scripts/bench_export.py --std 0.02 --append-md docs/BENCHMARKS.md

Builds the configured model (train_gpt.py's variables), draws every matrix N(0, --std) (not
trained weights: their codes compress a little differently), quantizes every matrix by
QUANT_SPEC with plain rounding (GPTQ needs Hessians of a trained model), then times each
(group, codec) compression job alone on one thread, and the whole export_artifact with each
codec and with CODEC=auto. On a many-core host CODEC=auto runs its jobs in parallel, so one
export takes about its longest job; QUANT_FIT, when the artifact is over the cap, exports again.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import UserError, append_md, cli, command_echo, fmt, import_trainer, table  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--std", type=float, default=0.02, help="std of the drawn weights (default 0.02)")
    p.add_argument("--append-md", type=Path, help="append the table to this Markdown file")
    p.add_argument("--script", type=Path, default=Path(__file__).resolve().parent.parent / "train_gpt.py")
    args = p.parse_args(argv)
    T = import_trainer(args.script)
    try:
        hp = T.load_hparams()
    except T.ConfigError as e:
        raise UserError(str(e)) from None
    torch.manual_seed(0)
    model = T.GPT(hp)
    with torch.no_grad():
        for w in model.parameters():
            if w.dim() == 2:
                w.normal_(0, args.std)
    state, rows = model.state_dict(), []
    t0, groups = time.perf_counter(), {}
    for name, (_, f) in T.quant_formats(hp, model).items():
        groups.setdefault(f.name, []).append(T.quantize(state[name], f)[0].numpy().ravel())
    rows.append(["quantize every matrix (plain rounding)", fmt(time.perf_counter() - t0, 1), "-"])
    for g, parts in groups.items():  # the codecs are single-threaded: each job alone
        a = np.concatenate(parts)
        for c, (compress, _) in T.codecs().items():
            t0 = time.perf_counter()
            n = len(compress(T.pack(a, "u8", 8)))
            rows.append([f"{g} group ({a.size:,} codes), {c}, one thread", fmt(time.perf_counter() - t0, 1), f"{n:,}"])
    with tempfile.TemporaryDirectory() as tmp:
        for codec in [*T.codecs(), "auto"]:
            t0 = time.perf_counter()
            rep = T.export_artifact(model, dataclasses.replace(hp, codec=codec), Path(tmp) / "a.artifact")
            rows.append([f"whole export, CODEC={codec} ({os.cpu_count()} cores)", fmt(time.perf_counter() - t0, 1),
                         f"{rep['bytes']:,}"])
    out = [f"`{command_echo('bench_export.py', argv)}`: {sum(w.numel() for w in model.parameters()):,} "
           f"parameters, QUANT_SPEC={hp.quant_spec}, weights N(0, {args.std:g}), torch {torch.__version__}, "
           f"{os.cpu_count()} cores", "", table(["step", "seconds", "bytes"], rows)]
    print("\n".join(out))
    if args.append_md:
        append_md(args.append_md, out)
    return 0


if __name__ == "__main__":
    cli(main)
