#!/usr/bin/env python3
"""Preflight: run the configured recipe briefly on ONE device and say whether it fits an 8-GPU run.

  python scripts/preflight.py                                  # the default recipe, on one rented GPU
  NUM_LAYERS=12 python scripts/preflight.py --steps 30         # any train_gpt.py variables, as for the real run
  PRESET=tiny python scripts/preflight.py --steps 3 --val-tokens 8192   # the CPU proxy (what CI runs)

Reads the same environment variables as train_gpt.py and runs its stages in one process at the
full shape: setup, --steps training steps (after the configured WARMUP_STEPS, which prime
torch.compile; QAT switched on for the last third so its graph is exercised), checkpoint, GPTQ
export and the evaluation stages on a --val-tokens slice of validation. Then it prints, one line
each: ms/step and tokens/s on this device, MFU (CUDA), peak memory, the attention kernel that
ran, graphs compiled inside the timed loop, the projected steps of an --nproc-GPU run in
MAX_WALLCLOCK_SECONDS, the export time against EXPORT_RESERVE_SECONDS, the artifact bytes, and
every evaluation stage projected to the whole split against EVAL_BUDGET_SECONDS.

Projections divide this device's time by --nproc (default 8): with GRAD_ACCUM_STEPS=0 one step
here computes the same micro-batches that each of the 8 ranks computes in one step, so they are
compute-only (no all-reduce, no NCCL start-up); steps with looped layers (LOOP_LAYERS) are timed
and projected apart from the others. A stage's slice time is carried to the whole split by its
plan's work (TTT: its documents' token-positions, not its targets). On a CPU each evaluation
stage also gets scripts/clock_model.py's estimate for 8 x H100 (its plan on the FineWeb split's
documents, efficiencies calibrated on the records' logs). On a CPU torch gets the cores that are
free (OMP_NUM_THREADS if set): threads beyond them spin against each other. Exit 0: all green.
Exit 1: a red flag, one 'RED FLAG:' line each saying what to change. Exit 2: bad input (one
'error:' line). The logs and the artifact go to a temporary directory unless --log-dir is given.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import UserError, cli, import_trainer, peak_rss_bytes  # noqa: E402

H100_BF16_DENSE_TFLOPS = 989.0  # H100 SXM (and H200), bf16 dense tensor-core peak
CPU_SLICE_TOKENS = 1 << 15  # default --val-tokens without compile: no batch padding, any slice times fairly
NGRAM_PROBE_TOKENS = 1 << 18  # train_gpt.evaluate times n-gram counting on this long a prefix to estimate the stage
TTT_FIX = "lower TTT_SECONDS or set TTT_ENABLED=0"
STAGE_FIX = {"roundtrip": "use a smaller model or a shorter EVAL_SEQ_LEN (the roundtrip stage cannot be skipped)",
             "sliding": "raise EVAL_STRIDE (fewer, longer-stride windows)", "ttt": TTT_FIX,
             "ngram": "lower NGRAM_ORDER, or NGRAM_ORDER=0 to drop the n-gram stage",
             "other": "lower NGRAM_ORDER, or NGRAM_ORDER=0", "compile": "set COMPILE=0 for evaluation-heavy recipes"}
EVAL_STAGE_ORDER = ("roundtrip", "sliding", "ttt", "ngram")  # as reported
OTHER_HOW = "outside the stages: n-gram estimate, byte counts"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed training steps, >= 2 (default 20)")
    p.add_argument("--val-tokens", type=int, default=0, metavar="N",
                   help="validation tokens to evaluate and project from (default: 4 evaluation batches with "
                        f"COMPILE=1, else {CPU_SLICE_TOKENS:,}; at most the whole split)")
    p.add_argument("--nproc", type=int, default=8, help="GPUs of the real run to project to (default 8)")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                   help=f"device peak for MFU (default {H100_BF16_DENSE_TFLOPS:g}: H100 SXM bf16 dense)")
    p.add_argument("--log-dir", type=Path, default=None,
                   help="keep train_gpt.py's log, checkpoint and artifact here (default: a temporary directory)")
    p.add_argument("--verbose", action="store_true", help="show train_gpt.py's own log lines as they come")
    p.add_argument("--script", type=Path, default=Path(__file__).resolve().parent.parent / "train_gpt.py",
                   help="training script (default: the repo's train_gpt.py)")
    return p


class StepTimer:
    """Times each step of train()'s loop, from train_step's call to the end of on_train_step (so the QAT refresh
    is in), by standing in for the two module functions train() calls by name. Warm-up steps call train_step
    without on_train_step, so they are never recorded."""

    def __init__(self, T, sync):
        self.T, self.sync, self.start, self.steps = T, sync, 0.0, []  # steps: (seconds, QAT on, layers looped)
        self.train_step, self.on_train_step = T.train_step, T.on_train_step

    def step(self, *args, **kwargs):
        self.sync()
        self.start = time.perf_counter()
        return self.train_step(*args, **kwargs)

    def hook(self, run, step: int, lr_mult: float):
        qat = any(getattr(m, "qat_fmt", None) is not None for m in run.model.modules())
        looped = bool(run.model.looping)
        self.on_train_step(run, step, lr_mult)
        self.sync()
        self.steps.append((time.perf_counter() - self.start, qat, looped))

    def patched(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(mock.patch.object(self.T, "train_step", self.step))
        stack.enter_context(mock.patch.object(self.T, "on_train_step", self.hook))
        return stack


def attention_calls(T, run, torch) -> dict[str, int]:
    """Calls of flash-attn and of SDPA during one eager forward of the bare model under the run's autocast."""
    calls = {"flash-attn": 0, "sdpa": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(T.F, "scaled_dot_product_attention",
                                              counting("sdpa", T.F.scaled_dot_product_attention)))
        if T.flash_attn_func is not None:
            stack.enter_context(mock.patch.object(T, "flash_attn_func", counting("flash-attn", T.flash_attn_func)))
        idx = torch.zeros((1, run.hp.train_seq_len), dtype=torch.long, device=run.device)
        with torch.no_grad(), run.autocast():
            run.model(idx)
    return calls


def flops_per_token(T, model, hp, looping: bool) -> float:
    """Model FLOPs per training token: 6 x (weights used in matrix multiplies, once per application: a block's
    CastedLinears as often as the layer order runs the block, LOOP_COUNT times for looped layers when looping; the
    others and the tied embedding as the output head once) for forward + backward, plus causal attention 6 x T x d
    per block application (QK^T and AV are 2 x T x d multiply-adds per token over the full context, halved by the
    causal mask, x3 for forward + backward), T = TRAIN_SEQ_LEN, d = NUM_HEADS x head_dim. Parallel lanes run each
    block's attention and MLP once, as a plain block does: no extra FLOPs. Embedding lookups, norms and the
    optimizer are not counted (the usual MFU convention)."""
    order = model.layer_order(looping)
    block = lambda m: sum(x.weight.numel() for x in m.modules() if isinstance(x, T.CastedLinear))  # noqa: E731
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, T.CastedLinear))
    matmul += sum((order.count(i) - 1) * block(b) for i, b in enumerate(model.blocks))
    if model.lm_head is None:
        matmul += model.tok_emb.weight.numel()
    return 6.0 * matmul + 6.0 * len(order) * hp.train_seq_len * hp.num_heads * hp.head_dim


def cpu_threads() -> int:
    """Threads for torch on a CPU: OMP_NUM_THREADS when set, else the cores this process may run on less the load
    already running there (at least 1). More threads than free cores spin against each other: under load a step
    measured 67 s where it takes ~1.5 s."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, round(cores - os.getloadavg()[0])))


def split_lengths(T, run, toks) -> np.ndarray:
    """Targets per document of a token stream (a document starts at each boundary token)."""
    import torch
    return np.diff(T.doc_starts(run, torch.as_tensor(toks.astype(np.int64))), append=toks.size - 1)


def work_ratio(T, hp, run, full, part, nproc: int) -> dict[str, float]:
    """Per stage, the whole split's work on nproc ranks over the slice's on one (train_gpt.stage_estimates at one
    second per token-position): TTT's cost follows its documents' lengths, not its targets."""
    whole = T.stage_estimates(hp, split_lengths(T, run, full), nproc, 1.0)
    piece = T.stage_estimates(hp, split_lengths(T, run, part), 1, 1.0)
    return {k: whole[k] / max(piece[k], 1e-9) for k in ("sliding", "ttt")}


def clock_estimates(hp) -> tuple[dict[str, float], str]:
    """scripts/clock_model.py's seconds per evaluation stage on 8 x H100 for the configuration, on the FineWeb
    split's documents (an estimate: calibrated on the records' logs), and where the documents came from."""
    import clock_model
    T = clock_model.import_trainer(clock_model.ROOT / "train_gpt.py")
    lengths, source = clock_model.val_lengths(T, hp)
    return clock_model.our_eval(T, hp, lengths)["stages"], source


def warm_eval_model(run, torch, sync) -> float:
    """COMPILE=1: the call evaluate() makes before its stages to compile the evaluation model's one (padded) shape,
    made and timed here first, so the compilation is reported once per rank (as in the real run) instead of inside
    the slice's time that is scaled to the whole split; evaluate's own call then finds the graph compiled."""
    x = torch.as_tensor(run.val_tokens[:run.hp.eval_seq_len].astype("int64"), device=run.device)[None]
    t0 = time.perf_counter()
    with torch.no_grad(), run.autocast():
        run.eval_model(x)
    sync()
    return time.perf_counter() - t0


def short_run_hp(hp, steps: int, log_dir: Path):
    """The configured recipe for `steps` uncapped steps, with the LR warmdown placed so QAT (if on) switches on for
    the last third of them: its graph is then compiled, or not, inside the timed loop as in the real run."""
    warmdown = 0
    if hp.qat_threshold:  # on_train_step(step t) turns QAT on from step t+1 once lr_mult = (steps - t) / warmdown
        qat_from = steps - max(1, steps // 3)  # falls below QAT_THRESHOLD; t = qat_from - 1
        warmdown = math.floor((steps - qat_from + 1) / hp.qat_threshold) + 1
    return dataclasses.replace(  # eval_budget_seconds: every stage runs on the slice; the projection meets the budget
        hp, run_id="preflight", log_dir=str(log_dir), artifact_path="", iterations=steps, max_wallclock_seconds=0.0,
        lr_warmup_steps=0, warmdown_iters=warmdown, warmdown_frac=0.0, min_lr=0.0, val_loss_every=0,
        train_log_every=steps, eval_budget_seconds=1e9)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps < 2 or args.val_tokens < 0 or args.nproc < 1 or args.peak_tflops <= 0:
        raise UserError("--steps must be >= 2, --val-tokens >= 0, --nproc >= 1, --peak-tflops > 0")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("preflight measures one device: run it as `python scripts/preflight.py`, not under torchrun")
    T = import_trainer(args.script)
    try:
        hp = T.load_hparams()
        ga = T.grad_accum_steps(hp, 1), T.grad_accum_steps(hp, args.nproc)
    except T.ConfigError as e:
        raise UserError(f"bad configuration: {e}") from None
    if hp.resume_from:
        raise UserError(f"RESUME_FROM={hp.resume_from}: preflight trains; unset RESUME_FROM")
    with tempfile.TemporaryDirectory(prefix="preflight_") as tmp:
        log_dir = args.log_dir or Path(tmp)
        return preflight(T, hp, ga, args, log_dir)


@dataclasses.dataclass
class Measured:
    """The short run's raw figures: the run (results, model; val_tokens is the evaluated slice), per-step timings,
    attention calls, seconds and CUDA memory peaks."""
    run: object
    cuda: bool
    steps: list[tuple[float, bool, bool]]  # StepTimer.steps: (seconds, QAT on, layers looped) per timed step
    calls: dict[str, int]  # attention kernel calls in one eager forward
    train_call_s: float  # train()'s whole call: warm-up, compile and the timed loop
    train_peak: int | None  # CUDA bytes allocated at most in training
    after_peak: int | None  # ... in export and evaluation
    full: np.ndarray  # the whole validation split
    eval_compile_s: float  # COMPILE=1: the evaluation model's compilation, once
    eval_recompiles: int  # graphs compiled inside the evaluation stages

    @property
    def n_full(self) -> int:  # targets the configured evaluation scores
        return self.full.size - 1

    @property
    def n(self) -> int:  # targets of the slice evaluated here
        return self.run.val_tokens.size - 1


@dataclasses.dataclass
class Pace:
    """Median seconds per timed step: plain (unlooped, QAT off), with QAT, with layers looped; and step counts."""
    plain: float
    qat: float | None
    loop: float | None
    n_plain: int
    n_qat: int
    n_loop: int


def slice_targets(T, short, val_tokens: int, n_full: int) -> int:
    """Validation targets to time: --val-tokens, else 4 evaluation batches with COMPILE=1 and CPU_SLICE_TOKENS
    without; at least one window, at most the whole split."""
    rows_tokens = T.eval_rows(short) * short.eval_seq_len
    want = val_tokens or (4 * rows_tokens if short.compile else CPU_SLICE_TOKENS)
    return min(max(want, short.eval_seq_len), n_full)


def measure(T, short, val_tokens: int, torch) -> Measured:
    """Set up the short run, train it with every step timed, checkpoint and export it, then run the evaluation
    stages on a slice of validation (run.val_tokens becomes the slice)."""
    run = T.setup(short)
    cuda = run.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else lambda: None
    calls = attention_calls(T, run, torch)
    timer = StepTimer(T, sync)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with timer.patched():
        T.train(run)
    train_call_s = time.perf_counter() - t0
    train_peak = torch.cuda.max_memory_allocated() if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    T.save_checkpoint(run)
    run.results.update(T.export(run))
    full = run.val_tokens
    run.val_tokens = full[:slice_targets(T, short, val_tokens, full.size - 1) + 1]
    eval_compile_s = warm_eval_model(run, torch, sync) if short.compile else 0.0
    graphs = T.compiled_graphs()
    run.results.update(T.evaluate(run))
    eval_recompiles = T.compiled_graphs() - graphs
    after_peak = torch.cuda.max_memory_allocated() if cuda else None
    return Measured(run, cuda, timer.steps, calls, train_call_s, train_peak, after_peak, full, eval_compile_s,
                    eval_recompiles)


def failure_flag(T, e: BaseException, torch) -> str | None:
    """A short run's failure as a red flag (divergence, out of memory); a bad configuration is a UserError; None for
    anything else (the caller re-raises it)."""
    if isinstance(e, T.ConfigError):
        raise UserError(f"bad configuration: {e}") from None
    if isinstance(e, T.TrainingDiverged):
        return f"training diverged: {e}"
    if isinstance(e, torch.OutOfMemoryError):
        return (f"out of device memory ({str(e).splitlines()[0]}); lower TRAIN_BATCH_TOKENS or raise "
                "GRAD_ACCUM_STEPS (training), VAL_BATCH_TOKENS / EVAL_BATCH_SEQS (evaluation), or the model size")
    return None


def step_pace(steps: list[tuple[float, bool, bool]]) -> Pace:
    """Medians of the timed steps; looped layers (LOOP_LAYERS) run from LOOP_START on, so looped steps are apart."""
    plain = [s for s, q, _ in steps if not q] or [s for s, _, _ in steps]
    qat = [s for s, q, _ in steps if q]
    looped = [s for s, q, lp in steps if lp and not q]
    t_plain = statistics.median(plain)
    if looped and len(looped) < len(plain):
        t_plain = statistics.median([s for s, q, lp in steps if not lp and not q])
    return Pace(t_plain, statistics.median(qat) if qat else None, statistics.median(looped) if looped else None,
                len(plain) - len(looped), len(qat), len(looped))


def eval_projection(T, hp, m: Measured, nproc: int) -> dict[str, tuple[float, float, str]]:
    """Per evaluation stage that ran, then 'other' (evaluation time outside the stages) and 'compile' (COMPILE=1):
    (seconds here, seconds projected to the whole split on nproc ranks, how it was carried)."""
    stages, scale = m.run.results["stages"], m.n_full / m.n
    work = work_ratio(T, hp, m.run, m.full, m.run.val_tokens, nproc)  # the whole split's plan on N / the slice's on 1
    out: dict[str, tuple[float, float, str]] = {}
    for name in (name for name in EVAL_STAGE_ORDER if name in stages):
        s = stages[name]["seconds"]
        if name == "ngram":  # every rank counts the whole split
            projected, how = s * scale, "every rank counts the whole split: not divided"
        elif name in work:
            projected = s * work[name]
            how = f"x{work[name]:.3g}: the whole split's {name} plan on {nproc} ranks over the slice's on one"
        else:
            projected, how = s * scale / nproc, f"shared over {nproc} ranks"
        if name == "ttt":  # not capped: at the deadline TTT stops adapting and scores the rest plainly
            how += f"; adapting stops at TTT_SECONDS={hp.ttt_seconds:g} or when the budget runs short"
        out[name] = s, projected, how
    other = max(m.run.results.get("eval_seconds", 0.0) - sum(v["seconds"] for v in stages.values()), 0.0)
    if hp.ngram_order:  # the n-gram stage's time estimate counts a fixed-length prefix
        out["other"] = other, other * min(m.n_full, NGRAM_PROBE_TOKENS) / min(m.n, NGRAM_PROBE_TOKENS), OTHER_HOW
    else:
        out["other"] = other, other, OTHER_HOW
    if hp.compile:
        out["compile"] = m.eval_compile_s, m.eval_compile_s, "once per rank (the evaluation model's one shape)"
    return out


def echo_log(captured: io.StringIO) -> None:
    """train_gpt.py's own warnings, which the captured log would otherwise hide."""
    for line in captured.getvalue().splitlines():
        if line.startswith(("WARNING", "ERROR")):
            print(f"train_gpt: {line}")


def report_training(hp, ga: tuple[int, int], m: Measured, pace: Pace) -> None:
    """The short run's steps, its ms/step and tokens/s on this device."""
    r = m.run.results
    micro = hp.train_batch_tokens // ga[0]
    if pace.n_qat:
        qat_note = f"; QAT on for the last {pace.n_qat} step(s)"
    else:
        qat_note = "" if hp.qat_threshold else "; QAT off (QAT_THRESHOLD=0)"
    print(f"train: {r['steps']} steps of {hp.train_batch_tokens:,} tokens ({ga[0]} micro-batch(es) of "
          f"{micro // hp.train_seq_len}x{hp.train_seq_len}) after {hp.warmup_steps} warm-up step(s) "
          f"({m.train_call_s - r['train_loop_seconds']:.1f}s incl. compile and optimizer set-up){qat_note}")
    loop_note = f"); {1000 * pace.loop:.1f} with layers looped (median of {pace.n_loop})" if pace.loop else ""
    qat_note = f"); {1000 * pace.qat:.1f} with QAT (median of {pace.n_qat})" if pace.n_qat else ")"
    print(f"ms/step: {1000 * pace.plain:.1f} on this device (median of {pace.n_plain} step(s){loop_note}{qat_note}")
    print(f"tokens/s: {hp.train_batch_tokens / pace.plain:,.0f} on this device")


def report_mfu_memory(T, hp, args, m: Measured, pace: Pace, torch) -> None:
    """Model FLOPs per token and MFU (CUDA); peak memory."""
    tok_s = hp.train_batch_tokens / pace.plain
    fpt = flops_per_token(T, m.run.model, hp, False)
    fpt_loop = flops_per_token(T, m.run.model, hp, True) if m.run.model.loop else fpt
    loop_note = f", {fpt_loop / 1e9:.4g} looped" if fpt_loop != fpt else ""
    if m.cuda:
        mfu = f"{fpt * tok_s / (args.peak_tflops * 1e12):.1%}"
        if pace.loop:
            mfu += f", {fpt_loop * hp.train_batch_tokens / pace.loop / (args.peak_tflops * 1e12):.1%} looped"
        print(f"MFU: {mfu} ({fpt / 1e9:.4g} GFLOP/token{loop_note} x {tok_s:,.0f} tokens/s / {args.peak_tflops:g} "
              "TFLOP/s peak)")
    else:
        print(f"MFU: n/a on CPU (model FLOPs {fpt / 1e9:.4g} GFLOP/token{loop_note})")
    rss = f"process peak RSS {peak_rss_bytes() / 2**20:,.0f} MiB"
    if m.cuda:
        total = torch.cuda.get_device_properties(m.run.device).total_memory
        print(f"peak memory: {m.train_peak / 2**30:.2f} GiB CUDA allocated in training, {m.after_peak / 2**30:.2f} GiB "
              f"in export and evaluation (device {total / 2**30:.0f} GiB); {rss}")
    else:
        print(f"peak memory: {rss} (CPU)")


def report_kernels(T, hp, m: Measured) -> list[str]:
    """The attention kernel that ran and the graphs compiled in the timed loop and in evaluation; their red flags."""
    calls, flags = m.calls, []
    ran = [k for k, v in calls.items() if v]
    print(f"attention kernel: {' + '.join(ran) or 'none seen'} (flash-attn {calls['flash-attn']} call(s), SDPA "
          f"{calls['sdpa']} in one eager forward; ATTN_KERNEL={hp.attn_kernel}, flash-attn "
          f"{'importable' if T.flash_attn_func is not None else 'not installed'})")
    if hp.attn_kernel != "sdpa" and m.cuda and T.flash_attn_func is not None and calls["sdpa"]:
        flags.append(f"SDPA ran although flash-attn is importable and ATTN_KERNEL={hp.attn_kernel}: the attention "
                     "inputs are not bf16/fp16 under autocast; check the model's dtypes, or set ATTN_KERNEL=flash to "
                     "make it an error")
    if not hp.compile:
        print("recompiles in the timed loop: n/a (COMPILE=0)")
        return flags
    rec = m.run.results.get("recompiles_in_loop", 0)
    print(f"recompiles in the timed loop: {rec}; in the evaluation stages: {m.eval_recompiles}")
    if rec:
        fix = ("set WARMUP_STEPS to at least 2 so warm-up primes the QAT graph too" if hp.warmup_steps < 2 else
               "rerun with TORCH_LOGS=recompiles to see what changed shape or guard")
        flags.append(f"{rec} graph(s) compiled inside the timed loop (each costs training seconds): {fix}")
    if m.eval_recompiles:
        flags.append(f"{m.eval_recompiles} graph(s) compiled inside the evaluation stages (their seconds size the "
                     "later stages, which may then be skipped): rerun with TORCH_LOGS=recompiles to see why")
    return flags


def report_projection(T, hp, ga: tuple[int, int], nproc: int, pace: Pace, target: str) -> None:
    """ms/step and the steps of the real run on nproc GPUs (this device's step time / nproc, compute only)."""
    p_plain, p_qat, p_loop = pace.plain / nproc, (pace.qat or pace.plain) / nproc, (pace.loop or pace.plain) / nproc
    loop_note = f", {1000 * p_loop:.1f} with layers looped" if pace.loop else ""
    qat_note = f", {1000 * p_qat:.1f} with QAT" if pace.qat else ""
    print(f"projected ms/step on {target}: {1000 * p_plain:.1f} (this device's / {nproc}, compute only: all-reduce "
          f"not included; GRAD_ACCUM {ga[0]} here, {ga[1]} per rank there){loop_note}{qat_note}")
    if hp.grad_accum_steps:
        print(f"note: GRAD_ACCUM_STEPS={hp.grad_accum_steps} is fixed, so {nproc} ranks run smaller micro-batches "
              "than measured here; the projection is rougher")
    budget = T.train_budget(hp)
    if budget > 0:  # train_gpt's own schedule: looping from LOOP_START, QAT from its LR threshold
        from clock_model import simulate_training
        steps = simulate_training(T, hp, lambda lp, qat: p_qat if qat and pace.qat else p_loop if lp else p_plain)
        verdict = (f"< ITERATIONS={hp.iterations:,}: the wall-clock warmdown governs" if steps < hp.iterations else
                   f">= ITERATIONS={hp.iterations:,}: training ends at ITERATIONS")
        print(f"projected steps in {budget:.0f}s (MAX_WALLCLOCK_SECONDS={hp.max_wallclock_seconds:g} - "
              f"EXPORT_RESERVE_SECONDS={hp.export_reserve_seconds:g}) on {target}: {steps:,.0f} ({verdict})")
    else:
        q = min(hp.qat_threshold * hp.warmdown_iters if pace.qat else 0.0, hp.iterations)  # steps in QAT
        need = (hp.iterations - q) * p_plain + q * p_qat
        print(f"projected steps: ITERATIONS={hp.iterations:,} (MAX_WALLCLOCK_SECONDS=0: no cap) take ~{need:.0f}s "
              f"on {target}")


def report_export(T, hp, r: dict, nproc: int) -> list[str]:
    """Checkpoint + export seconds against EXPORT_RESERVE_SECONDS, and the artifact's bytes; their red flags."""
    flags = []
    calib = r.get("gptq_calib_seconds", 0.0)
    after = r.get("checkpoint_seconds", 0.0) + calib / nproc + r["export_seconds"] - calib
    quant_s = r["quant"]["seconds"] if "quant" in r else float("nan")
    print(f"export: checkpoint {r.get('checkpoint_seconds', 0.0):.1f}s + GPTQ calibration {calib:.1f}s + the rest "
          f"{r['export_seconds'] - calib:.1f}s (quantize + compress {quant_s:.1f}s) here; projected {after:.1f}s on "
          f"{nproc} ranks (calibration shared out, quantization on rank 0) of EXPORT_RESERVE_SECONDS="
          f"{hp.export_reserve_seconds:g}")
    if hp.max_wallclock_seconds and after > hp.export_reserve_seconds:
        flags.append(f"checkpoint + export take ~{after:.1f}s > EXPORT_RESERVE_SECONDS={hp.export_reserve_seconds:g}:"
                     f" set EXPORT_RESERVE_SECONDS to at least {math.ceil(after * 1.2)}")
    cap = T.ARTIFACT_CAP_BYTES
    print(f"artifact: {r['artifact_bytes']:,} bytes (model {r['model_bytes']:,} + code {r['code_bytes']:,}) of the "
          f"{cap:,} cap, after {r['steps']} steps (trained weights compress differently; see predict_size.py)")
    if r["artifact_bytes"] > cap:
        flags.append(f"artifact {r['artifact_bytes']:,} bytes is {r['artifact_bytes'] - cap:,} over the cap even "
                     "after QUANT_FIT: use lower-bit QUANT_SPEC formats or a smaller model")
    return flags


def report_eval(hp, m: Measured, nproc: int, proj: dict[str, tuple[float, float, str]]) -> list[str]:
    """Each evaluation stage on the slice and projected to the whole split (with clock_model.py's 8 x H100 estimate
    on a CPU), the total against EVAL_BUDGET_SECONDS; its red flag."""
    print(f"eval: {m.n:,} of {m.n_full:,} validation targets timed (x{m.n_full / m.n:.2f} to the whole split); "
          f"projected on {nproc} ranks against EVAL_BUDGET_SECONDS={hp.eval_budget_seconds:g}:")
    h100, docs = clock_estimates(hp) if not m.cuda else ({}, "")
    for name in (*EVAL_STAGE_ORDER, "other"):
        if name not in proj:
            print(f"  {name:<9} {'scored by ttt' if name == 'sliding' and 'ttt' in proj else 'off'}")
            continue
        s, projected, how = proj[name]
        print(f"  {name:<9} {s:8.2f}s on the slice -> {projected:8.1f}s projected ({how})")
        if name in h100:
            print(f"  {'':<9} ~{h100[name]:.3g}s on 8 x H100 for the FineWeb split (scripts/clock_model.py's estimate "
                  f"from the stage's plan; {docs})")
    if "compile" in proj:
        print(f"  {'compile':<9} {proj['compile'][0]:8.2f}s {proj['compile'][2]}")
    total = sum(projected for _, projected, _ in proj.values())
    print(f"eval total: {total:.1f}s projected of EVAL_BUDGET_SECONDS={hp.eval_budget_seconds:g}")
    if total <= hp.eval_budget_seconds:
        return []
    worst = max(proj, key=lambda k: proj[k][1])
    over = total - hp.eval_budget_seconds
    fix = STAGE_FIX[worst]
    if worst == "ttt" and hp.ttt_seconds > over:
        fix = f"set TTT_SECONDS to at most {math.floor(hp.ttt_seconds - over)} (or TTT_ENABLED=0)"
    return [f"evaluation needs ~{total:.0f}s > EVAL_BUDGET_SECONDS={hp.eval_budget_seconds:g} (the {worst} stage "
            f"~{proj[worst][1]:.0f}s is the largest; later stages would be cut): {fix}"]


def report(T, hp, ga: tuple[int, int], args, log_dir: Path, m: Measured, captured: io.StringIO, torch) -> int:
    """Print every figure of the measured short run and its red flags; 1 if there are any, else 0."""
    device = torch.cuda.get_device_name(m.run.device) if m.cuda else None
    print(f"preflight: {args.script.name} PRESET={hp.preset}, {m.run.results['params']:,} parameters, "
          f"{device or f'CPU ({torch.get_num_threads()} threads)'}, torch {torch.__version__}, compile "
          f"{'on' if hp.compile else 'off'}; logs in "
          f"{log_dir if args.log_dir else 'a temporary directory (--log-dir keeps them)'}")
    echo_log(captured)
    pace = step_pace(m.steps)
    report_training(hp, ga, m, pace)
    report_mfu_memory(T, hp, args, m, pace, torch)
    flags = report_kernels(T, hp, m)
    report_projection(T, hp, ga, args.nproc, pace, f"{args.nproc} x {device or 'this device'}")
    flags += report_export(T, hp, m.run.results, args.nproc)
    flags += report_eval(hp, m, args.nproc, eval_projection(T, hp, m, args.nproc))
    for f in flags:
        print(f"RED FLAG: {f}")
    print(f"preflight: {len(flags)} red flag(s)" if flags else "preflight: all green")
    return 1 if flags else 0


def preflight(T, hp, ga: tuple[int, int], args, log_dir: Path) -> int:
    """Measure the short run (train_gpt.py's log captured unless --verbose), then report it; a failed run is a red
    flag (exit 1) or a bad configuration (UserError)."""
    import torch
    if not torch.cuda.is_available():
        torch.set_num_threads(cpu_threads())
    captured = io.StringIO()
    try:
        with contextlib.nullcontext() if args.verbose else contextlib.redirect_stdout(captured):
            m = measure(T, short_run_hp(hp, args.steps, log_dir), args.val_tokens, torch)
    except BaseException as e:
        echo_log(captured)
        flag = failure_flag(T, e, torch)
        if flag is None:
            raise
        print(f"RED FLAG: {flag}")
        return 1
    return report(T, hp, ga, args, log_dir, m, captured, torch)


if __name__ == "__main__":
    cli(main)
