#!/usr/bin/env python3
"""Export time at full size: what EXPORT_RESERVE_SECONDS must cover, without a GPU or training.

    python scripts/bench_export.py                       # the default recipe's shape and QUANT_SPEC
    NUM_LAYERS=12 python scripts/bench_export.py --std 0.02 --append-md docs/BENCHMARKS.md
    PRESET=frontier python scripts/bench_export.py --auto-only --fit   # + QUANT_FIT's re-exports against the cap

Builds the configured model (train_gpt.py's variables), draws every matrix N(0, --std) (not
trained weights: their codes compress a little differently), quantizes every matrix by
QUANT_SPEC with plain rounding (GPTQ needs Hessians of a trained model), then times each
(group, codec) compression job alone on one thread, and the whole export_artifact with each
codec and with CODEC=auto, on every whole group (CODEC_SAMPLE_BYTES=0) and picking on samples (the configured
CODEC_SAMPLE_BYTES: then only the pick runs on the whole group). On a many-core host the jobs run in parallel,
so one export takes about its longest job; QUANT_FIT, when the artifact is over the cap, exports again:
--fit runs its loop (train_gpt.fit_spec, the configured CODEC) against --cap less the packed code and times each
export (quantized parts cached across them, as in a run).
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
from pack_code import pack  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--std", type=float, default=0.02, help="std of the drawn weights (default 0.02)")
    p.add_argument("--append-md", type=Path, help="append the table to this Markdown file")
    p.add_argument("--auto-only", action="store_true",
                   help="only the whole export with CODEC=auto, sampled (CODEC_SAMPLE_BYTES) and on every whole group")
    p.add_argument("--fit", action="store_true", help="then QUANT_FIT's exports from QUANT_SPEC against --cap")
    p.add_argument("--cap", type=int, help="artifact cap in bytes for --fit (default train_gpt's, 16,000,000)")
    p.add_argument("--script", type=Path, default=Path(__file__).resolve().parent.parent / "train_gpt.py")
    return p


def drawn_model(T, hp, std: float):
    """The configured model with every matrix drawn N(0, std) (seeded)."""
    torch.manual_seed(0)
    model = T.GPT(hp)
    with torch.no_grad():
        for w in model.parameters():
            if w.dim() == 2:
                w.normal_(0, std)
    return model


def quantize_groups(T, hp, model) -> tuple[list[list[str]], dict[str, list]]:
    """Every matrix quantized by QUANT_SPEC (plain rounding), its codes gathered per format group: (the timing's row,
    the groups)."""
    state, groups = model.state_dict(), {}
    t0 = time.perf_counter()
    for name, (_, f) in T.quant_formats(hp, model).items():
        groups.setdefault(f.name, []).append(T.quantize(state[name], f)[0].numpy().ravel())
    rows = [["quantize every matrix (plain rounding)", fmt(time.perf_counter() - t0, 1), "-", ""]]
    return rows, groups


def group_jobs(T, groups: dict) -> list[list[str]]:
    """Rows: each (group, codec) compression job alone (the codecs are single-threaded)."""
    rows = []
    for g, parts in groups.items():
        a = np.concatenate(parts)
        for c, (compress, _) in T.codecs().items():
            t0 = time.perf_counter()
            n = len(compress(T.pack(a, "u8", 8)))
            rows.append([f"{g} group ({a.size:,} codes), {c}, one thread", fmt(time.perf_counter() - t0, 1), f"{n:,}",
                         ""])
    return rows


def whole_exports(T, hp, model, path: Path, auto_only: bool) -> list[list[str]]:
    """Rows: export_artifact with each codec (unless auto_only), then CODEC=auto on every whole group and on
    samples."""
    rows = []
    runs = [] if auto_only else [(c, 0) for c in T.codecs()]
    for codec, sample in [*runs, ("auto", 0), ("auto", hp.codec_sample_bytes)]:
        t0 = time.perf_counter()
        rep = T.export_artifact(model, dataclasses.replace(hp, codec=codec, codec_sample_bytes=sample), path)
        picks = ", ".join(f"{g} {m['codec']}" for g, m in rep["groups"].items())
        sampled = f" CODEC_SAMPLE_BYTES={sample}" if codec == "auto" else ""
        rows.append([f"whole export, CODEC={codec}{sampled} ({os.cpu_count()} cores)", fmt(time.perf_counter() - t0, 1),
                     f"{rep['bytes']:,}", picks])
    return rows


def fit_exports(T, hp, model, path: Path, cap: int | None) -> tuple[list[list[str]], list]:
    """QUANT_FIT's loop from QUANT_SPEC against cap less the packed code: (a row per export, the specs tried)."""
    rows, tried, fit, cache = [], [], (hp.quant_spec, 1.0), {}
    room = (cap or T.ARTIFACT_CAP_BYTES) - len(pack(T.CODE)[0])  # what a run of the packed script counts
    while fit:
        t0 = time.perf_counter()
        rep = T.export_artifact(model, dataclasses.replace(hp, quant_spec=fit[0]), path, cache=cache)
        tried.append([fit[0], rep["bytes"], fit[1]])
        rows.append([f"QUANT_FIT export {len(tried)}: steps x{fit[1]:g} ({os.cpu_count()} cores)",
                     fmt(time.perf_counter() - t0, 1), f"{rep['bytes']:,}", f"{room - rep['bytes']:+,} to the cap"])
        fit = T.fit_spec(hp, model, tried, room)
    return rows, tried


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    T = import_trainer(args.script)
    try:
        hp = T.load_hparams()
    except T.ConfigError as e:
        raise UserError(str(e)) from None
    model = drawn_model(T, hp, args.std)
    rows, groups = quantize_groups(T, hp, model)
    if not args.auto_only:
        rows += group_jobs(T, groups)
    tried = []
    with tempfile.TemporaryDirectory() as tmp:
        rows += whole_exports(T, hp, model, Path(tmp) / "a.artifact", args.auto_only)
        if args.fit:
            fit_rows, tried = fit_exports(T, hp, model, Path(tmp) / "a.artifact", args.cap)
            rows += fit_rows
    out = [f"`{command_echo('bench_export.py', argv)}`: {sum(w.numel() for w in model.parameters()):,} "
           f"parameters, QUANT_SPEC={hp.quant_spec}, weights N(0, {args.std:g}), torch {torch.__version__}, "
           f"{os.cpu_count()} cores", "", table(["step", "seconds", "bytes", "codec per group / room"], rows)]
    if tried:
        out.append(f"\nQUANT_FIT keeps QUANT_SPEC={tried[-1][0]} (QUANT_FIT_MARGIN={hp.quant_fit_margin:,})")
    print("\n".join(out))
    if args.append_md:
        append_md(args.append_md, out)
    return 0


if __name__ == "__main__":
    cli(main)
