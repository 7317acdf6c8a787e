#!/usr/bin/env python3
"""Benchmark training throughput of train_gpt.py's model on synthetic tokens (no data needed).

  python scripts/bench_train.py                         # PRESET=tiny on this machine
  python scripts/bench_train.py --preset default --world-size 8 --steps 20   # one H100 rank of the 8x recipe
  NUM_LAYERS=12 python scripts/bench_train.py --env MODEL_DIM=576 --json bench.json

Builds the model exactly as train_gpt.py does (its load_hparams, GPT, build_optimizers,
train_step, WeightAverager), then times --steps full optimizer steps (forward + backward over the
grad-accumulation micro-batches, Muon/AdamW step, EMA update) after --warmup untimed ones
(compilation happens there). Configuration: the environment, like train_gpt.py, plus --env;
the preset is --preset, else $PRESET, else tiny. --world-size W measures one rank of a W-process
run: its share of TRAIN_BATCH_TOKENS and the grad-accumulation train_gpt.py would use; the
all-reduce cost of the real run is not included. Reports ms/step, tokens/s (this process and
x W), peak memory (CUDA max_memory_allocated, and the process peak RSS) and the parameter count.
Nothing is written unless --json (the numbers) or --append-md (a dated section appended to a
Markdown file such as docs/BENCHMARKS.md) is given.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (UserError, append_md, cli, command_echo, import_trainer, parse_env_pairs,  # noqa: E402
                     peak_rss_bytes, write_atomic)


class SyntheticLoader:
    """Stands in for DistributedTokenLoader: uniform random tokens, one rank's share of each micro-batch."""

    def __init__(self, vocab: int, world_size: int, device, seed: int):
        import torch
        self.torch, self.vocab, self.world_size, self.device = torch, vocab, world_size, device
        self.gen = torch.Generator().manual_seed(seed)

    def next_batch(self, global_tokens: int, seq_len: int, grad_accum_steps: int):
        local = global_tokens // (self.world_size * grad_accum_steps)
        span = self.torch.randint(0, self.vocab, (local + 1,), generator=self.gen, dtype=self.torch.int64)
        x, y = span[:-1].reshape(-1, seq_len), span[1:].reshape(-1, seq_len)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help="PRESET to benchmark (default: $PRESET, else tiny)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VAL", help="extra setting (repeatable)")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first, incl. compilation (default 3)")
    p.add_argument("--world-size", type=int, default=1,
                   help="measure one rank of a run with this many processes (default 1)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if available")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--qat", action="store_true",
                   help="time steps with late-QAT fake quantization switched on (as at the end of training)")
    p.add_argument("--script", type=Path, default=None,
                   help="train_gpt.py to benchmark (default ./train_gpt.py, else the repo's)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the numbers as JSON")
    p.add_argument("--append-md", default=None, metavar="FILE",
                   help="append a dated section with the command and numbers to this Markdown file "
                        "(e.g. docs/BENCHMARKS.md)")
    return p


@dataclasses.dataclass
class Bench:
    """What the timed steps run: train_gpt.py's run (model, train_model), optimizers and weight averager."""
    run: object
    optimizers: object
    averager: object
    loader: SyntheticLoader
    compiled: bool
    n_params: int


@dataclasses.dataclass
class Timing:
    """The timed steps' figures."""
    times: list[float]  # seconds per timed step
    warm_s: float  # the warm-up steps, compilation included
    loss: float  # the last step's train loss
    local_tokens: int  # tokens per step on this rank
    cuda_peak: int | None  # CUDA bytes allocated at most
    rss: int  # the process's peak RSS in bytes

    @property
    def mean_s(self) -> float:
        return sum(self.times) / len(self.times)

    @property
    def med_s(self) -> float:
        return statistics.median(self.times)

    @property
    def tok_s(self) -> float:
        return self.local_tokens / self.mean_s


def load_config(args) -> tuple[Path, dict[str, str], object, object, int]:
    """(script, --env settings, the trainer module, its Hyperparameters, grad-accumulation steps of one rank)."""
    script = args.script or (Path("train_gpt.py") if Path("train_gpt.py").is_file()
                             else Path(__file__).resolve().parent.parent / "train_gpt.py")
    extra = parse_env_pairs(args.env)
    env = dict(os.environ)
    env.update(extra)
    env["PRESET"] = args.preset or extra.get("PRESET") or os.environ.get("PRESET") or "tiny"
    env.setdefault("RUN_ID", "bench")
    trainer = import_trainer(script)
    try:
        hp = trainer.load_hparams(env)
        ga = trainer.grad_accum_steps(hp, args.world_size)
    except trainer.ConfigError as e:
        raise UserError(f"bad configuration: {e}") from None
    return script, extra, trainer, hp, ga


def bench_device(choice: str, torch) -> tuple[bool, object]:
    """(CUDA?, the device) for --device."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    cuda = choice == "cuda" or (choice == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return cuda, device


def build_bench(trainer, hp, args, device, cuda: bool, torch) -> Bench:
    """The model, optimizers and weight averager as train_gpt.py builds them, on rank 0 of world 1 (no process group,
    no DDP), with QAT switched on when --qat."""
    class BenchRun(trainer.Run):
        def log(self, msg: str):  # the trainer's hooks may log; keep it on the console, write no file
            print(f"  [train_gpt] {msg}")

    torch.manual_seed(hp.seed)
    run = BenchRun(hp, device)
    run.model = trainer.GPT(hp).to(device)
    n_params = sum(p.numel() for p in run.model.parameters())
    compiled = bool(hp.compile and cuda)
    run.train_model = torch.compile(run.model, dynamic=False) if compiled else run.model
    optimizers = trainer.build_optimizers(run)
    averager = trainer.WeightAverager(run.model, hp) if hasattr(trainer, "WeightAverager") else None
    loader = SyntheticLoader(hp.vocab_size, args.world_size, device, hp.seed)
    if args.qat:
        hook = getattr(trainer, "on_train_step", None)
        if hook is None or not getattr(hp, "qat_threshold", 0):
            raise UserError("--qat: this train_gpt.py has no late QAT (on_train_step / QAT_THRESHOLD) to switch on")
        hook(run, max(hp.lr_warmup_steps, 0), 0.0)
    return Bench(run, optimizers, averager, loader, compiled, n_params)


def time_steps(trainer, b: Bench, ga: int, warmup: int, steps: int, cuda: bool,
               torch) -> tuple[list[float], float, float]:
    """(seconds of each timed step, seconds of the warm-up, the last train loss)."""
    sync = torch.cuda.synchronize if cuda else lambda: None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, t0 = [], time.perf_counter()
    for step in range(warmup + steps):
        timed = step >= warmup
        if step == warmup:
            sync()
            warm_s = time.perf_counter() - t0
            if warmup:
                print(f"warm-up: {warmup} step(s) in {warm_s:.2f}s")
        t = time.perf_counter()
        loss = trainer.train_step(b.run, b.loader, b.optimizers, ga, 1.0, step)
        if b.averager is not None:
            b.averager.update(step, 1.0)
        if timed:
            sync()
            times.append(time.perf_counter() - t)
    return times, warm_s, float(loss)


def print_timing(args, hp, b: Bench, t: Timing) -> str:
    """The timed steps' lines; returns the peak memory as the Markdown table gives it."""
    if not math.isfinite(t.loss):
        print(f"warning: train loss is {t.loss} after {args.warmup + args.steps} steps", file=sys.stderr)
    print(f"timed: {args.steps} step(s): ms/step mean {1000 * t.mean_s:.1f}, median {1000 * t.med_s:.1f}, "
          f"min {1000 * min(t.times):.1f}, max {1000 * max(t.times):.1f}")
    scaled = (f"; x{args.world_size} ranks = {t.tok_s * args.world_size:,.0f} tokens/s (without all-reduce cost)"
              if args.world_size > 1 else "")
    print(f"throughput: {t.tok_s:,.0f} tokens/s this process{scaled}")
    rss_mib = f"{t.rss / 2**20:,.0f} MiB"
    mem = f"{t.cuda_peak / 2**30:.2f} GiB CUDA" if t.cuda_peak is not None else f"{rss_mib} RSS"
    print(f"peak memory: {mem + ' allocated; ' if t.cuda_peak is not None else ''}process peak RSS {rss_mib}")
    print(f"parameters: {b.n_params:,}; last train loss {t.loss:.4f} (random tokens: ~ln(vocab) = "
          f"{math.log(hp.vocab_size):.2f})")
    return mem


def write_json(path: str, script: Path, hp, device, args, b: Bench, ga: int, t: Timing, extra: dict, torch) -> None:
    write_atomic(path, json.dumps(dict(
        script=str(script), preset=hp.preset, device=str(device), torch=torch.__version__, compile=b.compiled,
        qat=args.qat, params=b.n_params, world_size=args.world_size, grad_accum=ga, tokens_per_step=t.local_tokens,
        steps=args.steps, warmup=args.warmup, warmup_seconds=round(t.warm_s, 4),
        ms_per_step_mean=round(1000 * t.mean_s, 3), ms_per_step_median=round(1000 * t.med_s, 3),
        tokens_per_second=round(t.tok_s, 1), cuda_peak_bytes=t.cuda_peak, peak_rss_bytes=t.rss, last_loss=t.loss,
        env=extra), indent=2))
    print(f"wrote {path}")


def md_section(argv, hp, device, args, b: Bench, ga: int, t: Timing, mem: str, torch) -> list[str]:
    """A dated Markdown section with the command and the numbers."""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    qat = ", QAT on" if args.qat else ""
    return [f"## bench_train.py: PRESET={hp.preset}, {where}, {time.strftime('%Y-%m-%d', time.gmtime())}", "",
            f"`{command_echo('bench_train.py', argv)}` (torch {torch.__version__}, compile "
            f"{'on' if b.compiled else 'off'}{qat})", "",
            "| parameters | world size | tokens/step (this rank) | grad accum | ms/step (mean / median) "
            "| tokens/s (this rank) | peak memory |",
            "|---:|---:|---:|---:|---:|---:|---:|",
            f"| {b.n_params:,} | {args.world_size} | {t.local_tokens:,} | {ga} | {1000 * t.mean_s:.1f} / "
            f"{1000 * t.med_s:.1f} | {t.tok_s:,.0f} | {mem} |"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.world_size < 1 or (args.threads is not None and args.threads < 1):
        raise UserError("--steps must be >= 1, --warmup >= 0, --world-size >= 1, --threads >= 1")
    script, extra, trainer, hp, ga = load_config(args)
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda, device = bench_device(args.device, torch)
    b = build_bench(trainer, hp, args, device, cuda, torch)
    local_tokens = hp.train_batch_tokens // args.world_size
    print(f"bench: {script} PRESET={hp.preset}, {b.n_params:,} parameters, device {device}"
          f"{'' if cuda else f' ({torch.get_num_threads()} threads)'}, torch {torch.__version__}, "
          f"compile {'on' if b.compiled else 'off'}{', QAT on' if args.qat else ''}")
    print(f"batch: {hp.train_batch_tokens:,} tokens/step global; this rank of {args.world_size}: {local_tokens:,} "
          f"tokens/step in {ga} micro-batch(es) of {local_tokens // ga // hp.train_seq_len}x{hp.train_seq_len}")
    times, warm_s, loss = time_steps(trainer, b, ga, args.warmup, args.steps, cuda, torch)
    t = Timing(times, warm_s, loss, local_tokens, torch.cuda.max_memory_allocated(device) if cuda else None,
               peak_rss_bytes())
    mem = print_timing(args, hp, b, t)
    if args.json:
        write_json(args.json, script, hp, device, args, b, ga, t, extra, torch)
    if args.append_md:
        append_md(args.append_md, md_section(argv, hp, device, args, b, ga, t, mem, torch))
    return 0


if __name__ == "__main__":
    cli(main)
