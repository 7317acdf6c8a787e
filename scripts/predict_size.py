#!/usr/bin/env python3
"""Predict the artifact size of a config before training it.

    python scripts/predict_size.py                          # default config, its QUANT_SPEC + alternatives
    PRESET=tiny python scripts/predict_size.py
    NUM_LAYERS=12 python scripts/predict_size.py --spec "mlp_up:int5,mlp_down:int5,embed:int8" --codec zstd

The model is built on the meta device (true parameter counts, nothing allocated); every quantized
matrix costs its measured bits per weight: unit-Gaussian weights of the same row length quantized
and compressed exactly as train_gpt.py does (same quantizer, packing and CODEC), plus its fp16 row
scales (also measured) and low-rank factors; control tensors cost 16 bits each; the JSON header
is counted exactly; the code is the bytes of train_gpt.py. Gaussian weights are a proxy: trained
weights with heavier tails compress better under a searched clip, GPTQ codes slightly worse.
Prints the per-format bits, each spec's per-role table and whether it fits 16,000,000 bytes (if not,
the narrower spec QUANT_FIT would fall back to).
Exit code 0 if the first spec fits, 1 if not, 2 on a bad input.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
import train_gpt as T  # noqa: E402
from _common import UserError, cli  # noqa: E402
from pack_code import pack  # noqa: E402

ALTERNATIVES = [
    "attn_qk:int8,attn_vo:int8,mlp_up:int8,mlp_down:int8,embed:int8,aux:int8,head:int8",
    "attn_qk:int6,attn_vo:int6,mlp_up:int6,mlp_down:int6,embed:int8,aux:int6,head:int8",
    "attn_qk:int6,attn_vo:int6,mlp_up:int5,mlp_down:int5,embed:int8,aux:int6,head:int8",
    "attn_qk:int5,attn_vo:int5,mlp_up:int5,mlp_down:int5,embed:int8,aux:int5,head:int8",
    "attn_qk:int7@12,attn_vo:int7@12,mlp_up:int7@12,mlp_down:int7@12,embed:int8,aux:int7@12,head:int8",
    "attn_qk:tq4,attn_vo:tq4,mlp_up:tq4,mlp_down:tq4,embed:int8,aux:tq4,head:int8",
]
FORMATS = ["int8", "int7", "int6", "int5", "int4", "int3", "int2", "tq4", "tq3", "tq2", "int8@24", "int7@12", "int6@6"]


class Meter:
    """Measured compressed bits per code of (format, row length), and per fp16 scale, on Gaussian weights."""

    def __init__(self, codec: str):
        self.codec, self.cache = codec, {}

    def __call__(self, f: T.Fmt, cols: int) -> tuple[float, float, float]:
        key = (f.base._replace(seed=0), cols)
        if key not in self.cache:
            w = torch.randn(max(64, 2 ** 19 // cols), cols, generator=torch.Generator().manual_seed(cols))
            codes, scales = T.quantize(w, key[0])
            groups = {f.name: codes.numpy().ravel(), "scales": scales.half().numpy()}
            meta, _, _ = T.encode_groups(groups, self.codec)
            self.cache[key] = (8 * meta[f.name]["len"] / codes.numel(), 8 * meta["scales"]["len"] / scales.numel(),
                               T.code_entropy(groups[f.name]))
        return self.cache[key]


def predict(hp: T.Hyperparameters, model: torch.nn.Module, meter: Meter, code_bytes: int = T.CODE_BYTES) -> dict:
    fmts, state = T.quant_formats(hp, model), model.state_dict()
    roles, control, tensors = {}, 0, []
    for name, t in state.items():
        role, f = fmts.get(name, (None, T.Fmt("fp16")))
        tensors.append([name, list(t.shape), f.tag])
        if role is None:
            control += t.numel()
            continue
        n = t.numel()
        if f.kind == "fp16":
            bits = 16.0 * n
        else:
            code, scale, _ = meter(f, t.shape[1])
            bits = code * n + scale * t.shape[0]
            if r := f.rank or f.lq:  # low-rank factors: int8 per row (+lr) or LQER int4, a scale per component
                fb, _, _ = meter(f.factors, r)
                bits += fb * r * sum(t.shape) + scale * (t.shape[0] + r if f.rank else 2 * r)
        r = roles.setdefault(f"{role}:{f.tag}", dict(params=0, bits=0.0))
        r["params"] += n
        r["bits"] += bits
    if hp.lqer_top:  # LQER_TOP picks its matrices from trained errors: priced here as the largest ones
        fb, scale, _ = meter(T.Fmt("a", 4), hp.lqer_rank)
        sizes = sorted((sum(state[n].shape) for n, (_, f) in fmts.items() if f.kind != "fp16"), reverse=True)
        roles[f"lqer:top{hp.lqer_top}+lq{hp.lqer_rank}"] = dict(params=sum(sizes[:hp.lqer_top]) * hp.lqer_rank, bits=(
            fb * hp.lqer_rank * sum(sizes[:hp.lqer_top]) + 2 * scale * hp.lqer_rank * len(sizes[:hp.lqer_top])))
    header = len(json.dumps(dict(seed=hp.quant_seed, tensors=tensors, groups={g: dict(codec="brotli", pack="shuffle", bits=16, n=10 ** 8, raw=10 ** 8, len=10 ** 8) for g in {f.name for _, f in fmts.values()} | {"scales", "fp16"}}), separators=(",", ":")))
    model = sum(r["bits"] for r in roles.values()) / 8 + 2 * control + header + 44
    return dict(roles=roles, control=control, header=header, model=model, code=code_bytes, total=model + code_bytes)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", action="append", help="QUANT_SPEC to predict (repeatable); default: the config's + alternatives")
    ap.add_argument("--codec", help="override CODEC (auto tries every installed codec: slowest, smallest)")
    ap.add_argument("--packed", action="store_true",
                    help="count the code as packed by scripts/pack_code.py (what a run launched from it counts)")
    args = ap.parse_args(argv)
    code_bytes = len(pack(T.CODE)[0]) if args.packed else T.CODE_BYTES
    try:
        hp = T.load_hparams({**os.environ, **({"CODEC": args.codec} if args.codec else {})})
        specs = args.spec or [hp.quant_spec] + [s for s in ALTERNATIVES if s != hp.quant_spec]
        for s in specs:
            T.parse_spec(s)
    except T.ConfigError as e:
        raise UserError(str(e)) from None
    with torch.device("meta"):  # shapes only
        model = T.GPT(hp)
    state = model.state_dict()
    meter = Meter(hp.codec)
    n = sum(t.numel() for t in state.values())
    print(f"config: PRESET={hp.preset} {hp.num_layers}L d={hp.model_dim} MLP {hp.mlp_mult}x vocab {hp.vocab_size}: "
          f"{n:,} parameters; CODEC={hp.codec}; cap {T.ARTIFACT_CAP_BYTES:,} bytes\n")
    print(f"Gaussian weights, rows of {hp.model_dim}: compressed bits per weight (code entropy = ideal coder)\n")
    print("| format | bits/weight | code entropy | fp16 scale bits |\n|---|---|---|---|")
    for s in FORMATS:
        code, scale, ent = meter(T.parse_fmt(s), hp.model_dim)
        print(f"| {s} | {code:.3f} | {ent:.3f} | {scale:.2f} |")
    fits_first = None
    for s in specs:
        p = predict(dataclasses.replace(hp, quant_spec=s), model, meter, code_bytes)
        fits = p["total"] <= T.ARTIFACT_CAP_BYTES
        fits_first = fits if fits_first is None else fits_first
        print(f"\nQUANT_SPEC={s}\n\n| role:format | params | bits/weight | bytes |\n|---|---|---|---|")
        for k, r in p["roles"].items():
            print(f"| {k} | {r['params']:,} | {r['bits'] / r['params']:.3f} | {r['bits'] / 8:,.0f} |")
        print(f"| control tensors (fp16) | {p['control']:,} | 16 | {2 * p['control']:,} |")
        print(f"| header + prefix | | | {p['header'] + 44:,} |\n| code (train_gpt.py{', packed' * args.packed}) | | | {p['code']:,} |")
        print(f"| **total** | | | **{p['total']:,.0f}** |")
        verdict = "fits" if fits else "DOES NOT FIT"
        print(f"\npredicted artifact {p['total']:,.0f} bytes: {verdict} "
              f"({T.ARTIFACT_CAP_BYTES - p['total']:+,.0f} bytes of margin)")
        fit, q = s, p
        while hp.quant_fit and q["total"] > T.ARTIFACT_CAP_BYTES and (
                nxt := T.narrower_spec(dataclasses.replace(hp, quant_spec=fit), model, q["total"] - T.ARTIFACT_CAP_BYTES)):
            fit, q = nxt, predict(dataclasses.replace(hp, quant_spec=nxt), model, meter, code_bytes)
        if fit != s:
            print(f"QUANT_FIT=1 would re-export it as QUANT_SPEC={fit}: predicted {q['total']:,.0f} bytes "
                  f"({'fits' if q['total'] <= T.ARTIFACT_CAP_BYTES else 'still over the cap at the int4 floor'})")
    return 0 if fits_first else 1


if __name__ == "__main__":
    cli(main)
