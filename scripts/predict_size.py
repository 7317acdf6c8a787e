#!/usr/bin/env python3
"""Predict the artifact size of a config before training it, and whether the run will end with a legal artifact.

    python scripts/predict_size.py                          # the configured recipe: its verdict first, then the tables
    PRESET=frontier python scripts/predict_size.py --packed  # count the code as packed (what a record run counts)
    python scripts/predict_size.py --ckpt logs/run.ckpt     # price a trained checkpoint's weights, not Gaussian ones
    NUM_LAYERS=12 python scripts/predict_size.py --spec "mlp_up:int5,mlp_down:int5,embed:int8" --codec zstd
    python scripts/predict_size.py --alternatives           # also the per-format table and a few other specs

The first line of the output is the verdict: whether the run ends with an artifact under the 16,000,000-byte cap,
and at which QUANT_SPEC, its own or the one QUANT_FIT re-exports (train_gpt.fit_spec, run on predicted bytes as
train_gpt.py runs it on measured ones). The model is built on the meta device (true parameter counts, nothing
allocated); every quantized matrix costs its measured bits per weight: unit-Gaussian rows of the same length
(with --ckpt: values drawn from the checkpoint's matrices of the same role, each row divided by its RMS, and the
new rows scaled by real rows' RMS), quantized and compressed exactly as train_gpt.py does (same quantizer, packing,
CODEC and CODEC_SAMPLE_BYTES), plus fp16 row scales (also measured) and low-rank factors; control tensors cost 16
bits each; the JSON header is counted exactly; the code is the bytes of train_gpt.py (--packed: as packed).
Gaussian weights are a proxy: trained weights, heavier-tailed, compress better under a clip in row RMS (intN@K)
and about the same under a searched clip; GPTQ codes slightly worse; --ckpt measures a real distribution (with
plain rounding, not GPTQ). Gaussian rates are cached on disk (--cache), keyed by codec, sample size, format, row
length and a hash of the quantizer and codec code, so a later run prices from the cache. Progress goes to stderr.
Exit code: 0 if the config's own QUANT_SPEC fits (with --spec: the first); 1 if only QUANT_FIT's re-export fits
(the run still ends with a legal artifact, at that spec); 3 if nothing fits (the run would end over_cap, as
train_gpt.py's exit 3); 2 on a bad input.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
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
SAMPLE = 2 ** 19  # values per measurement
PRICED_BY = ("grid", "clip_ratios", "row_clips", "dedup", "prune", "rotation", "nearest", "quantize_rows", "quantize",
             "pack", "sample_values", "encode_groups", "codecs", "adaptive_coder", "crc_framed",
             "code_entropy")  # what a rate depends on
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "parameter-golf" / "predict_size.json"


def code_version() -> str:
    """Hash of the code a measured rate depends on (train_gpt's quantizer and codecs, the codec modules' versions)."""
    src = "".join(inspect.getsource(getattr(T, n)) for n in PRICED_BY) + repr((T.AC_BLOCK, T.AC_DECAY, SAMPLE))
    src += repr([getattr(T.optional_import(m), "__version__", None) for m in T.CODEC_MODULES.values()])
    return hashlib.sha256(src.encode()).hexdigest()[:16]


def checkpoint_pools(path: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """role -> (the values of its matrices' rows, each row divided by its RMS; those rows' RMS) of a checkpoint."""
    try:
        hp, (_, state) = T.load_hparams({"RESUME_FROM": path}), T.read_checkpoint(path)
    except T.ConfigError as e:
        raise UserError(f"--ckpt {e}") from None
    with torch.device("meta"):
        roles = T.matrix_roles(T.GPT(hp))
    pools = {}
    for name, role in roles.items():
        w = state[name].float()
        rms = w.square().mean(1, keepdim=True).sqrt().clamp_min(1e-12)
        pools.setdefault(role, []).append((w / rms, rms))
    return {r: (torch.cat([v.ravel() for v, _ in p]), torch.cat([s.ravel() for _, s in p])) for r, p in pools.items()}


class Meter:
    """Measured compressed bits per code of (format, row length), and per fp16 scale: on unit-Gaussian rows, or, for
    a role in pools (checkpoint_pools), on rows drawn from that role's values; QUANT_PRUNE's fraction of them zeroed
    first, as export does. Gaussian rates live in a disk cache."""

    def __init__(self, codec: str, sample_bytes: int = 0, cache: Path | None = None, pools: dict | None = None,
                 prune: float = 0.0):
        self.codec, self.sample, self.path, self.pools, self.cache = codec, sample_bytes, cache, pools or {}, {}
        self.prune = prune
        self.version, self.disk = code_version(), {}
        if cache and cache.is_file():
            try:
                self.disk = json.loads(cache.read_text())
            except ValueError:  # a damaged cache is measured again
                pass

    def rows(self, cols: int, role: str | None) -> torch.Tensor:
        g, n = torch.Generator().manual_seed(cols), max(64, SAMPLE // cols)
        if role is None:
            return torch.randn(n, cols, generator=g)
        values, rms = self.pools[role]
        w = values[torch.randint(len(values), (n, cols), generator=g)]
        return w / w.square().mean(1, keepdim=True).sqrt() * rms[torch.randint(len(rms), (n, 1), generator=g)]

    def __call__(self, f: T.Fmt, cols: int, role: str | None = None) -> tuple[float, float, float]:
        key = (f.base._replace(seed=0), cols, role if role in self.pools else None)
        f = key[0]  # the tag does not carry QUANT_CLIP_QUANTILE, QUANT_DEDUP_STEP or QUANT_PRUNE
        disk_key = f"{self.codec}|{self.sample}|{f.tag}|{f.quantile:g}|{f.dedup}|{self.prune:g}|{cols}|{self.version}"
        if key not in self.cache and key[2] is None and disk_key in self.disk:
            self.cache[key] = tuple(self.disk[disk_key])
        if key not in self.cache:
            print(f"predict_size: measuring {key[0].tag} on rows of {cols} "
                  f"({key[2] + ' rows of the checkpoint' if key[2] else 'Gaussian'})", file=sys.stderr, flush=True)
            codes, scales = T.quantize(T.prune(self.rows(cols, key[2]), self.prune), key[0])
            groups = {f.name: codes.numpy().ravel(), "scales": scales.half().numpy()}
            meta, _, _ = T.encode_groups(groups, self.codec, self.sample)
            self.cache[key] = (8 * meta[f.name]["len"] / codes.numel(), 8 * meta["scales"]["len"] / scales.numel(),
                               T.code_entropy(groups[f.name]))
            if key[2] is None and self.path:
                self.disk[disk_key] = self.cache[key]
                T.write_atomic(self.path, json.dumps(self.disk, indent=0))
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
            code, scale, _ = meter(f, t.shape[1], role)
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
    widest = dict(codec="brotli", pack="shuffle", bits=16, n=10 ** 8, raw=10 ** 8, len=10 ** 8)  # the longest entry
    groups = {g: widest for g in {f.name for _, f in fmts.values()} | {"scales", "fp16"}}
    header = len(json.dumps(dict(seed=hp.quant_seed, tensors=tensors, groups=groups), separators=(",", ":")))
    model = sum(r["bits"] for r in roles.values()) / 8 + 2 * control + header + 44
    return dict(roles=roles, control=control, header=header, model=model, code=code_bytes, total=model + code_bytes)


def quant_fit(hp: T.Hyperparameters, model: torch.nn.Module, meter: Meter, code_bytes: int) -> list[tuple[str, dict]]:
    """The specs the run would export, in order, as QUANT_FIT chooses them (train_gpt.fit_spec) on predicted bytes;
    the last is what the run keeps."""
    out, tried, spec, factor = [], [], hp.quant_spec, 1.0
    while True:
        print(f"predict_size: pricing QUANT_SPEC={spec}", file=sys.stderr, flush=True)
        out.append((spec, p := predict(dataclasses.replace(hp, quant_spec=spec), model, meter, code_bytes)))
        tried.append([spec, round(p["model"]), factor])
        if not hp.quant_fit or not (nxt := T.fit_spec(hp, model, tried, T.ARTIFACT_CAP_BYTES - code_bytes)):
            return out
        spec, factor = nxt


def verdict(hp: T.Hyperparameters, trials: list[tuple[str, dict]], weights: str) -> tuple[int, str]:
    """(exit code, one line): does the run end with a legal artifact, and at which spec."""
    cap, (spec, p), own = T.ARTIFACT_CAP_BYTES, trials[-1], trials[0][1]
    room = f"predicted {p['total']:,.0f} bytes, {cap - p['total']:,.0f} under the {cap:,} cap ({weights})"
    if own["total"] <= cap:
        return 0, f"verdict: FITS at its own QUANT_SPEC: {room}"
    if p["total"] <= cap:
        return 1, (f"verdict: FITS after QUANT_FIT, at QUANT_SPEC={spec}: {room}; its own QUANT_SPEC is predicted "
                   f"{own['total']:,.0f}, {own['total'] - cap:,.0f} over, so the run re-exports {len(trials) - 1} "
                   "time(s)")
    return 3, (f"verdict: DOES NOT FIT: {p['total']:,.0f} bytes predicted, {p['total'] - cap:,.0f} over the {cap:,} "
               f"cap {'even after QUANT_FIT' if hp.quant_fit else 'with QUANT_FIT=0'} ({weights}); the run would end "
               "over_cap: use lower-bit formats or a smaller model")


def table(spec: str, p: dict, packed: bool) -> str:
    rows = [f"QUANT_SPEC={spec}\n\n| role:format | params | bits/weight | bytes |\n|---|---|---|---|"]
    rows += [f"| {k} | {r['params']:,} | {r['bits'] / r['params']:.3f} | {r['bits'] / 8:,.0f} |"
             for k, r in p["roles"].items()]
    code = "train_gpt.py, packed" if packed else "train_gpt.py"
    rows += [f"| control tensors (fp16) | {p['control']:,} | 16 | {2 * p['control']:,} |",
             f"| header + prefix | | | {p['header'] + 44:,} |\n| code ({code}) | | | {p['code']:,} |",
             f"| **total** | | | **{p['total']:,.0f}** |"]
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", action="append", help="QUANT_SPEC to predict (repeatable); default: the config's")
    ap.add_argument("--alternatives", action="store_true", help="also the per-format table and a few other specs")
    ap.add_argument("--codec", help="override CODEC (auto tries every installed codec on a sample of each group)")
    ap.add_argument("--packed", action="store_true",
                    help="count the code as packed by scripts/pack_code.py (what a run launched from it counts)")
    ap.add_argument("--ckpt", help="a train_gpt.py checkpoint (LOG_DIR/RUN_ID.ckpt): price its weights' distribution, "
                                   "per role, at the configured shape instead of Gaussian weights")
    ap.add_argument("--cache", type=Path, default=CACHE, help=f"the measured Gaussian rates (default {CACHE})")
    ap.add_argument("--no-cache", action="store_true", help="measure every rate again; read and write no cache")
    return ap


def load_config(args) -> tuple[T.Hyperparameters, list[str]]:
    """The configuration (environment, --codec) and the QUANT_SPECs to price, each checked."""
    try:
        hp = T.load_hparams({**os.environ, **({"CODEC": args.codec} if args.codec else {})})
        others = [s for s in ALTERNATIVES if s != hp.quant_spec] if args.alternatives else []
        specs = args.spec or [hp.quant_spec] + others
        for s in specs:
            T.parse_spec(s)
    except T.ConfigError as e:
        raise UserError(str(e)) from None
    return hp, specs


def print_formats(hp: T.Hyperparameters, meter: Meter, weights: str) -> None:
    """Compressed bits per weight of each format, on rows of MODEL_DIM."""
    print(f"\n{weights}, rows of {hp.model_dim}: compressed bits per weight (code entropy = ideal coder)\n")
    print("| format | bits/weight | code entropy | fp16 scale bits |\n|---|---|---|---|")
    for s in FORMATS:
        c, scale, ent = meter(T.parse_fmt(s), hp.model_dim, "mlp_up")
        print(f"| {s} | {c:.3f} | {ent:.3f} | {scale:.2f} |")


def print_spec(spec: str, trials: list[tuple[str, dict]], packed: bool) -> None:
    """A spec's table and predicted artifact, and the specs QUANT_FIT would try after it."""
    cap, own, (last, p) = T.ARTIFACT_CAP_BYTES, trials[0][1], trials[-1]
    print(f"\n{table(spec, own, packed)}\n\npredicted artifact {own['total']:,.0f} bytes: "
          f"{'fits' if own['total'] <= cap else 'DOES NOT FIT'} ({cap - own['total']:+,.0f} bytes of margin)")
    for tried, q in trials[1:-1]:
        print(f"QUANT_FIT would try QUANT_SPEC={tried}: predicted {q['total']:,.0f} bytes")
    if len(trials) > 1:
        print(f"QUANT_FIT=1 would re-export it as QUANT_SPEC={last}: predicted {p['total']:,.0f} bytes "
              f"({'fits' if p['total'] <= cap else 'still over the cap'})\n\n{table(last, p, packed)}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    code_bytes = len(pack(T.CODE)[0]) if args.packed else T.CODE_BYTES
    hp, specs = load_config(args)
    pools = checkpoint_pools(args.ckpt) if args.ckpt else None
    with torch.device("meta"):  # shapes only
        model = T.GPT(hp)
    meter = Meter(hp.codec, hp.codec_sample_bytes, None if args.no_cache else args.cache, pools, hp.quant_prune)
    weights = f"weights drawn from {args.ckpt} per role" if args.ckpt else "Gaussian weights"
    fits = [quant_fit(dataclasses.replace(hp, quant_spec=s), model, meter, code_bytes) for s in specs[:1]]
    code, line = verdict(hp, fits[0], weights)
    print(line, flush=True)
    n = sum(t.numel() for t in model.state_dict().values())
    print(f"\nconfig: PRESET={hp.preset} {hp.num_layers}L d={hp.model_dim} MLP {hp.mlp_mult}x vocab {hp.vocab_size}: "
          f"{n:,} parameters; CODEC={hp.codec}; cap {T.ARTIFACT_CAP_BYTES:,} bytes; {weights}")
    if args.alternatives:
        print_formats(hp, meter, weights)
    for s in specs:
        print_spec(s, fits.pop(0) if fits else quant_fit(dataclasses.replace(hp, quant_spec=s), model, meter,
                                                         code_bytes), args.packed)
    return code


if __name__ == "__main__":
    cli(main)
