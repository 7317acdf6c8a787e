#!/usr/bin/env python3
"""Quantization benchmark on the CPU proxy: artifact bytes and val_bpb damage of each format.

    python scripts/bench_quant.py                  # train (or reuse) the tiny model, measure, update docs
    python scripts/bench_quant.py --steps 300 --val-tokens 0 --no-docs
    python scripts/bench_quant.py --ckpt logs/abl/abl_base_doc_mask0_seed1337.ckpt   # a real run's weights

Trains PRESET=tiny for --steps steps once and keeps the fp32 weights as a train_gpt.py checkpoint
(--out/<run>.ckpt, no pickle); later runs reuse it; --ckpt takes a training run's checkpoint and
configuration instead. Each variant is exported with train_gpt.export_artifact (GPTQ from
training-token Hessians where named; embedding GPTQ and LQER where named), reloaded from disk and
scored with eval_plain on the validation split; damage is against the fp32 weights on the same tokens. Writes a
markdown table to stdout and, unless --no-docs, into docs/BENCHMARKS.md under its own heading (replacing its previous
section).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
import train_gpt as T  # noqa: E402
from _common import UserError, cli  # noqa: E402

HEADING = "## Quantization: artifact bytes and val_bpb damage"
ROLES = ("attn_qk", "attn_vo", "mlp_up", "mlp_down", "embed", "aux")


def uniform(fmt: str, embed: str | None = None) -> str:
    return ",".join(f"{r}:{embed if r == 'embed' and embed else fmt}" for r in ROLES)


MIXED = "attn_qk:int6,attn_vo:int6,mlp_up:int5,mlp_down:int5,embed:int8,aux:int6"
CLIPPED = "attn_qk:int6@13,attn_vo:int6@13,mlp_up:int6@11.5,mlp_down:int6@11.5,embed:int7@14,aux:int6@12.85"  # 1.0611's
MATRIX_GPTQ, EMBED_GPTQ = dict(gptq_embed=False), dict(gptq_embed=True)
LQER = dict(gptq_embed=True, lqer_top=3, lqer_rank=4)
VARIANTS = [  # (label, QUANT_SPEC, GPTQ: None (off) or the overrides of its options)
    ("int8", uniform("int8"), None),
    ("int6", uniform("int6"), None),
    ("int5", uniform("int5"), None),
    ("int4", uniform("int4"), None),
    ("int5 MLP / int6 attn / int8 embed", MIXED, None),
    ("int5, int8 embed", uniform("int5", "int8"), None),
    ("int7@12 (set step), int8 embed", uniform("int7@12", "int8"), None),
    ("tq4 (TurboQuant)", uniform("tq4"), None),
    ("tq3 (TurboQuant)", uniform("tq3"), None),
    ("tq2 (TurboQuant)", uniform("tq2"), None),
    ("int6, int8 embed", uniform("int6", "int8"), None),
    ("GPTQ int6, int8 embed", uniform("int6", "int8"), MATRIX_GPTQ),
    ("GPTQ int5, int8 embed", uniform("int5", "int8"), MATRIX_GPTQ),
    ("GPTQ int5 MLP / int6 attn / int8 embed", MIXED, MATRIX_GPTQ),
    ("GPTQ int7@12, int8 embed", uniform("int7@12", "int8"), MATRIX_GPTQ),
    ("int4, int8 embed", uniform("int4", "int8"), None),
    ("int4+lr8, int8 embed (low-rank)", uniform("int4+lr8", "int8"), None),
    ("GPTQ int4+lr8, int8 embed", uniform("int4+lr8", "int8"), MATRIX_GPTQ),
    ("GPTQ mixed, GPTQ int8 embed", MIXED, EMBED_GPTQ),
    ("GPTQ mixed, GPTQ int7 embed", MIXED.replace("embed:int8", "embed:int7"), EMBED_GPTQ),
    ("GPTQ mixed + LQER (top 3, rank 4, int4 factors)", MIXED, LQER),
    ("GPTQ per-role clips (int6@13 attn, int6@11.5 MLP, int7@14 embed)", CLIPPED, EMBED_GPTQ),
    ("GPTQ per-role clips + LQER (top 3, rank 4)", CLIPPED, LQER),
    *((f"GPTQ mixed, GPTQ int8 embed, FREEZE_DRY={t}", MIXED, EMBED_GPTQ | dict(freeze_dry=t)) for t in (0, 1, 2)),
    *((f"2:4 MLP (sp{b}), GPTQ int6 attn / int8 embed", MIXED.replace("int5", f"sp{b}"), EMBED_GPTQ) for b in (4, 3)),
    ("GPTQ int4 MLP / int6 attn / int8 embed (dense, for the 2:4 rows)", MIXED.replace("int5", "int4"), EMBED_GPTQ),
]


def trained(hp: T.Hyperparameters) -> T.Run:
    """setup() and the fp32 weights: from RESUME_FROM or LOG_DIR/RUN_ID.ckpt, else trained now and saved there."""
    run = T.setup(hp)
    ckpt = Path(hp.resume_from or Path(hp.log_dir) / f"{hp.run_id}.ckpt")
    if ckpt.is_file():
        run.model.load_state_dict(T.read_checkpoint(ckpt)[1])
        print(f"reusing {ckpt}", file=sys.stderr)
    else:
        T.train(run)
        T.save_checkpoint(run)
    return run


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300, help="training steps of the tiny model (default 300)")
    ap.add_argument("--val-tokens", type=int, default=0, help="validation tokens scored (0 = the whole split)")
    ap.add_argument("--qat-threshold", type=float, default=0.0,
                    help="also train a model with QAT below this LR multiplier and export it (0 = skip)")
    ap.add_argument("--qat-spec", default=T.Hyperparameters.quant_spec, help="QUANT_SPEC of the QAT model")
    ap.add_argument("--ckpt", help="a training run's LOG_DIR/RUN_ID.ckpt: its weights and configuration (no training)")
    ap.add_argument("--out", default="logs/bench_quant", help="checkpoints, artifacts and results folder")
    ap.add_argument("--codec", default="auto")
    ap.add_argument("--only", help="comma-separated variant numbers (1-based) to run")
    ap.add_argument("--train-only", action="store_true", help="only make the checkpoints")
    ap.add_argument("--no-docs", action="store_true", help="do not write docs/BENCHMARKS.md")
    return ap


def trained_models(args, out: Path) -> tuple[T.Hyperparameters, T.Run, T.Run | None]:
    """(configuration, the run with the fp32 weights, the QAT run when --qat-threshold), trained or reused."""
    train = dict(RESUME_FROM=args.ckpt) if args.ckpt else dict(  # a checkpoint brings its own configuration
        ITERATIONS=str(args.steps), QAT_THRESHOLD="0")
    env = dict(PRESET="tiny", LOG_DIR=str(out), RUN_ID=f"bench_quant_{args.steps}steps", CODEC=args.codec,
               VAL_MAX_TOKENS=str(args.val_tokens), **train)
    env.update({k: v for k, v in os.environ.items() if k == "DATA_PATH"})
    try:
        hp = T.load_hparams(env)
        qhp = T.load_hparams({**env, "RUN_ID": f"bench_quant_{args.steps}steps_qat{args.qat_threshold:g}",
                              "QAT_THRESHOLD": str(args.qat_threshold), "QUANT_SPEC": args.qat_spec, "RESUME_FROM": ""})
        qrun = trained(qhp) if args.qat_threshold else None
        return hp, trained(hp), qrun
    except T.ConfigError as e:
        raise UserError(str(e)) from None


def measure_variant(run: T.Run, hp: T.Hyperparameters, spec: str, gptq: dict | None, model: torch.nn.Module,
                    path: Path, hessians: dict) -> tuple[dict, float]:
    """Export the model with QUANT_SPEC=spec (and the GPTQ options), reload it from disk and score it: (the export's
    report, val_bpb). hessians caches each model's, collected on its first GPTQ variant."""
    if gptq is not None and id(model) not in hessians:  # Hessians of the model's activations on training tokens
        hessians[id(model)] = T.collect_hessians(dataclasses.replace(
            run, model=model, hp=dataclasses.replace(hp, quant_spec=uniform("int8"), gptq_embed=True)))
    vhp = dataclasses.replace(hp, **{"quant_spec": spec, "lqer_top": 0, **(gptq or {})})
    hs = None if gptq is None else {k: v for k, v in hessians[id(model)].items() if vhp.gptq_embed or k != "tok_emb"}
    rep = T.export_artifact(model, vhp, path, hs)
    fresh = T.GPT(vhp)
    fresh.load_state_dict(T.load_artifact(path))
    return rep, T.eval_plain(run, fresh)[1]


def results_table(args, hp: T.Hyperparameters, run: T.Run, n_params: int, bpb_fp: float, rows: list[dict]) -> str:
    """The Markdown table with its description: how the model was made and each variant measured."""
    qat_note = (f" QAT rows: a second model trained the same way with QAT_THRESHOLD={args.qat_threshold:g} and "
                f"QUANT_SPEC={args.qat_spec}; damage is against the first model's fp32 score."
                if args.qat_threshold else "")
    source = (f"the weights of `{args.ckpt}` ({hp.iterations} steps, QAT_THRESHOLD={hp.qat_threshold:g}, "
              f"WEIGHT_AVG={hp.weight_avg})" if args.ckpt else f"trained {args.steps} steps, QAT off")
    command = (f"{f'--ckpt {args.ckpt}' if args.ckpt else f'--steps {args.steps}'} --val-tokens {args.val_tokens}"
               f"{f' --qat-threshold {args.qat_threshold:g}' if args.qat_threshold else ''}")
    table = [f"PRESET={hp.preset} ({n_params:,} parameters: {hp.num_layers} layers, d={hp.model_dim}, "
             f"{'tied ' if hp.tie_embeddings else ''}embedding {hp.vocab_size}x{hp.model_dim}) on the Brown data, "
             f"{source}; fp32 val_bpb {bpb_fp:.4f} on {run.val_tokens.size - 1:,} "
             f"validation tokens (eval_plain). Each row: `export_artifact` with that QUANT_SPEC (CODEC={args.codec}), "
             f"reloaded from disk and scored; GPTQ rows use Hessians of {hp.gptq_tokens:,} training tokens, for the "
             "matrices only unless the row says `GPTQ ... embed` (GPTQ_EMBED=1: the tied embedding against the output "
             "head's input); LQER rows: LQER_TOP=3, LQER_RANK=4. "
             "Bits/param = model file bits / all parameters (scales, fp16 control tensors and header included)."
             f"{qat_note} Command: `python scripts/bench_quant.py {command}`.", "",
             "| variant | model bytes | bits/param | val_bpb | damage |", "|---|--:|--:|--:|--:|"]
    table += [f"| {r['label']} | {r['bytes']:,} | {r['bits']:.2f} | {r['val_bpb']:.4f} | {r['damage']:+.4f} |"
              for r in rows]
    return "\n".join(table)


def update_docs(text: str, run: T.Run) -> None:
    """docs/BENCHMARKS.md with the table under HEADING, dated, replacing the section's previous table."""
    date = time.strftime("%Y-%m-%d", time.gmtime())
    where = torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    docs = ROOT / "docs/BENCHMARKS.md"
    old = docs.read_text() if docs.is_file() else "# Benchmarks\n"
    start = old.find(HEADING)
    end = old.find("\n## ", start + 1) if start >= 0 else -1
    section = f"{HEADING} ({date}, {where})\n\n{text}\n"
    if start >= 0:
        new = old[:start] + section + (old[end + 1:] if end >= 0 else "")
    else:
        new = old.rstrip("\n") + "\n\n" + section
    T.write_atomic(docs, new)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = ROOT / args.out
    hp, run, qrun = trained_models(args, out)
    if args.train_only:
        return 0
    variants = [(label, spec, gptq, run.model) for label, spec, gptq in VARIANTS]
    if qrun is not None:
        variants += [(f"QAT {args.qat_threshold:g} + {'GPTQ ' if g else ''}{args.qat_spec}", args.qat_spec, g,
                      qrun.model) for g in (None, MATRIX_GPTQ)]
    t0 = time.perf_counter()
    _, bpb_fp = T.eval_plain(run, run.model)
    print(f"fp32: val_bpb {bpb_fp:.4f} ({time.perf_counter() - t0:.0f}s per eval)", file=sys.stderr)
    rows, only = [], {int(i) for i in args.only.split(",")} if args.only else None
    n_params = sum(t.numel() for t in run.model.state_dict().values())
    hessians = {}
    for i, (label, spec, gptq, model) in enumerate(variants, 1):
        if only and i not in only:
            continue
        rep, bpb = measure_variant(run, hp, spec, gptq, model, out / f"variant{i}.artifact", hessians)
        rows.append(dict(label=label, spec=spec, gptq=gptq, bytes=rep["bytes"], bits=8 * rep["bytes"] / n_params,
                         val_bpb=bpb, damage=bpb - bpb_fp, lqer=rep["lqer"], freeze_dry=rep["freeze_dry"]))
        print(f"{label}: {rep['bytes']:,} bytes, val_bpb {bpb:.4f} ({bpb - bpb_fp:+.4f})", file=sys.stderr)
    T.write_atomic(out / "results.json", json.dumps(dict(fp32_val_bpb=bpb_fp, params=n_params, rows=rows), indent=1))
    text = results_table(args, hp, run, n_params, bpb_fp, rows)
    print(text)
    if not args.no_docs and not only:
        update_docs(text, run)
    return 0


if __name__ == "__main__":
    cli(main)
