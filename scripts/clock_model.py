#!/usr/bin/env python3
"""Clock model: whether a configuration fits the rules' clocks and cap on 8x H100, predicted on a CPU, no GPU.

    python scripts/clock_model.py                       # the default recipe: one line per clock
    PRESET=frontier python scripts/clock_model.py       # any train_gpt.py variables, as for the real run
    python scripts/clock_model.py --calibration         # the records: logged figure, the model's, error
    PRESET=frontier python scripts/clock_model.py --probe   # + graph breaks / recompiles seen on CPU

From the configuration alone it counts the work of each clock: training FLOPs per step (every layer
application: loop repeats and parallel lanes counted, by running the model's forward on the meta
device under a counting dispatch mode), Newton-Schulz FLOPs per rank, each evaluation stage's
token-positions from its real plan (train_gpt's sliding_plan, ttt_plan, ttt_work) on the split's
document lengths, export work per group and codec, and the artifact's bytes (predict_size.py).
Work becomes 8x H100 seconds through per-kind efficiencies CALIBRATED on two public records' logs
(the constants below say which record and figure fixed each; --calibration prints the table).
Our implementation's overheads (graph breaks, recompiles, host syncs, unfused eager work, launch-
bound loops) are listed separately; --probe counts the graph breaks, recompiles and per-step host
syncs of the configuration at SHAPE=tiny on CPU (a counting torch.compile backend, flash-attn
stand-ins so the CUDA code path is traced), else they are taken as 0 (said in the output).

Every H100 figure is an ESTIMATE. Exit 0: every clock fits with --margin (default 10%) to spare;
1: a clock is exceeded or inside the margin (one 'OVER:' line each); 2: bad input.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import heapq
import io
import json
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
from _common import UserError, cli, import_trainer  # noqa: E402

# --- the machine (specifications) ------------------------------------------------------------------------------------
PEAK_FLOPS = 989e12  # H100 SXM bf16 dense tensor-core peak
HBM_BPS = 0.8 * 3.35e12  # ESTIMATE: 80% of the H100 SXM's 3.35 TB/s, what unfused elementwise kernels reach
WORLD = 8

# --- CALIBRATED on the records' logs (--calibration shows each fit and the checks; --fit recomputes them) ----------
EFF_TRAIN = 0.2695  # fraction of PEAK for training FLOPs (model fwd+bwd, Newton-Schulz): record 1's 84.5 ms/step
EFF_EVAL = 0.2750  # fraction of PEAK for evaluation forwards: record 1's sliding (73.2 s) with its roundtrip (5.8 s)
EVAL_COMPILE_S = 3.62  # compiling an evaluation forward (warm caches): record 1's roundtrip less its forwards
EFF_TTT = 0.1799  # fraction of PEAK for LoRA TTT chunks (forward-equivalents: 3 per adapted position): record 2's TTT
GLOBAL_STEP_S = 0.123  # one global SGD step of phased TTT on 4,096 tokens per rank, eager: record 2's tttg lines

# --- ESTIMATES (not calibratable on the records: stated, not fitted) -----------------------------------------------
LAUNCH_S = 6e-6  # host time of one eager PyTorch op on CUDA (dispatch + kernel launch)
GRAPH_BREAK_S = 3e-4  # per graph break per forward + backward: a device sync, then the next graph's launches
HOST_SYNC_S = 5e-4  # per host sync in the training step: the GPU idles while the host queues the next step
RECOMPILE_S = 42.0  # one compile of a training graph (forward + backward): record 2's TTT compile warm-up, 84-138 s
# for 2 shapes
SORT_PASSES = 8  # a GPU radix sort of 64-bit keys moves its keys this many times
HOST_CORES = 32  # cores of an 8x H100 box's host for the codec thread pool (DGX H100: 112), each taken to be as fast
# as this CPU's (codec rates are measured here) or faster
DISK_BPS = 1e9  # checkpoint write

# --- the validation split's documents ------------------------------------------------------------------------------
# (rank, tokens incl. the next document's BOS) of FineWeb's 50,000 validation documents in the SP8192 CaseOps
# tokenization, sorted by length: 25 knots whose log-linear interpolation reproduces, within 2%, all 1,512 document-
# length bounds ("dl:lo-hi" of 756 of 782 length-sorted 64-document batches) logged by the phased-TTT records of
# 2026-04-18 .. 2026-04-29 (47,851,520 tokens). Other tokenizations: the same shape scaled to their token count
# (checked: the plain SP8192 logs' 431 batches sit at 0.83-0.86 of the CaseOps lengths, the token ratio is 0.847).
DOC_KNOTS = ((0, 27), (63, 83), (127, 89), (319, 99), (831, 114), (1407, 126), (3839, 164), (7935, 222), (12607, 294),
             (20607, 457), (32383, 814), (39168, 1190), (43456, 1618), (45247, 1923), (46272, 2203), (47488, 2762),
             (48320, 3466), (48959, 4510), (49343, 5749), (49535, 6872), (49792, 10442), (49856, 13091),
             (49920, 17258), (49984, 30339), (49999, 97114))
VAL_DOCS = 50_000
VAL_TOKENS = {"sp1024": 62_021_632, "sp8192": 40_540_160, "caseops": 47_851_520}  # the records' logged val_tokens


def config_key(hp) -> str:
    """The configuration as a cache key (without the run's name)."""
    return json.dumps(dataclasses.asdict(dataclasses.replace(hp, run_id="-")), sort_keys=True, default=str)


def stand_in_lengths(total: int, seed: int = 0) -> np.ndarray:
    """Targets per document (its BOS to the next BOS) of the split, from DOC_KNOTS scaled to `total` targets, in a
    seeded random stream order (the split's order is not length-sorted)."""
    r, lo = np.arange(VAL_DOCS), np.array(DOC_KNOTS, dtype=np.float64)
    n = np.exp(np.interp(r, lo[:, 0], np.log(lo[:, 1]))) - 1
    n = np.maximum(1, np.round(n * total / n.sum())).astype(np.int64)
    return np.random.default_rng(seed).permutation(n)


def val_lengths(T, hp) -> tuple[np.ndarray, str]:
    """The split's targets per document: from DATA_PATH's validation shards when they hold FineWeb's (a document
    starts at every BOS), else the stand-in at the tokenizer's token count."""
    files = sorted(Path(hp.data_path).glob("fineweb_val_*.bin"))
    if files and "fineweb" in Path(hp.data_path).name:
        toks = np.concatenate([T.load_data_shard(f) for f in files])
        starts = np.flatnonzero(toks[:-1] == T.BOS_ID)
        starts = np.unique(np.concatenate(([0], starts)))
        return np.diff(starts, append=toks.size - 1), f"{len(starts):,} documents of {hp.data_path}"
    kind = "caseops" if "caseops" in hp.data_path else "sp8192" if hp.vocab_size == 8192 else "sp1024"
    total = VAL_TOKENS[kind]
    return stand_in_lengths(total), f"stand-in: FineWeb val document lengths at {total:,} tokens ({kind})"


def packed_context(lengths: np.ndarray, seq_len: int) -> float:
    """Mean positions a token attends to under document masking, documents packed end to end into seq_len rows."""
    ends = np.cumsum(lengths)
    cuts = np.union1d(ends, np.arange(seq_len, ends[-1], seq_len))
    pieces = np.diff(cuts, prepend=0)
    return float((pieces * (pieces + 1) / 2).sum() / pieces.sum())


# -----------------------------------------------------------------------------
# counting work: a dispatch mode that tallies what an eager run would launch
# -----------------------------------------------------------------------------

class Tally(TorchDispatchMode):
    """Matmul FLOPs (torch's formulas), and of every other non-view op one launch and the bytes it reads and writes,
    at CUDA's dtypes: 2 bytes per float (bf16 autocast) except vocabulary-wide tensors (float32 logits)."""

    def __init__(self, vocab: int = 0):
        super().__init__()
        self.vocab, self.flops, self.ops, self.bytes, self.sort_bytes = vocab, 0.0, 0, 0.0, 0.0

    def size(self, t: torch.Tensor) -> float:
        if not t.is_floating_point():
            return t.numel() * t.element_size()
        return t.numel() * (4 if self.vocab and t.dim() and t.size(-1) == self.vocab else 2)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        pk = func._overloadpacket
        if pk in flop_registry:
            self.flops += flop_registry[pk](*args, **kwargs, out_val=out)
        elif not func.is_view and "empty" not in pk.__name__:
            moved = sum(self.size(t) for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor))
            self.ops, self.bytes = self.ops + 1, self.bytes + moved
            if "sort" in pk.__name__:
                self.sort_bytes += moved
        return out


@dataclasses.dataclass
class Forward:
    """One forward per position at width w: matmul FLOPs (LoRA excluded), attention applications x heads x head_dim
    (attention FLOPs = 4 x that x mean context), eager ops per forward, eager bytes per position, and the
    CastedLinear applications (in, out, calls) for LoRA."""
    mm: float
    attn: float
    ops: int
    bytes: float
    linears: list

    def flops(self, ctx: float, lora: int = 0) -> float:
        """Forward FLOPs per position at mean context ctx, with rank-`lora` adapters on every block linear."""
        return self.mm + 4 * self.attn * ctx + sum(2 * lora * (i + o) * k for i, o, k in self.linears)


_FORWARDS: dict = {}


def forward_profile(T, hp, width: int, looping: bool) -> Forward:
    """Run the configured model's forward on the meta device (nothing computed) at one row of `width` tokens."""
    key = (id(T), config_key(hp), width, looping)
    if key in _FORWARDS:
        return _FORWARDS[key]
    with torch.device("meta"):
        model = T.GPT(hp)
    model.looping = looping and model.loop is not None
    apps, calls = [], Counter()

    def attention(q, k, v, kernel="auto", docs=None):
        apps.append(q.size(2) * q.size(3))
        return torch.empty_like(q)

    hooks = [m.register_forward_hook(lambda m, i, o: calls.update([m])) for m in model.blocks.modules()
             if isinstance(m, T.CastedLinear)]
    tally = Tally(hp.vocab_size)
    with mock.patch.object(T, "attention", attention), torch.no_grad(), tally:
        model(torch.zeros(1, width, dtype=torch.long, device="meta"))
    for h in hooks:
        h.remove()
    out = Forward(tally.flops / width, float(sum(apps)), tally.ops, tally.bytes / width,
                  [(m.in_features, m.out_features, k) for m, k in calls.items()])
    _FORWARDS[key] = out
    return out


def newton_schulz(T, hp, world: int) -> dict:
    """Muon's orthogonalization per step on the busiest rank (matrices go round-robin, one per rank per bucket):
    FLOPs, eager ops and bytes, counted on meta tensors of each matrix's shape."""
    with torch.device("meta"):
        model = T.GPT(hp)
    shapes = [tuple(m.weight.shape) for m in model.modules()
              if isinstance(m, T.CastedLinear) and m is not model.lm_head]
    per_rank = [Tally() for _ in range(world)]
    for i, shape in enumerate(shapes):
        with per_rank[i % world]:
            T.zeropower_via_newtonschulz5(torch.empty(shape, device="meta"), hp.muon_backend_steps, polar=hp.muon_polar)
    busiest = max(per_rank, key=lambda t: t.flops)
    return dict(flops=busiest.flops, ops=busiest.ops, bytes=busiest.bytes, matrices=len(shapes))


# -----------------------------------------------------------------------------
# the calibration records: their configurations (as our variables), plans and logged figures
# -----------------------------------------------------------------------------
# Read from github.com/openai/parameter-golf, records/track_10min_16mb/<folder>: README, train logs, train_gpt.py.
RECORD_1 = dict(
    name="2026-03-22 11L EMA GPTQ-lite (1.1233)", folder="2026-03-22_11L_EMA_GPTQ-lite_warmdown3500_QAT015_1.1233",
    env=dict(PRESET="default", MLP_ACT="relu2"),  # the same model as our default (relu^2 has the same FLOPs)
    val="sp1024", doc_mask=False, loop_from=None, train_s=600.0,
    # train_seed{1337,42,2024}.log: final step_avg 84.56/84.48/84.53 ms, steps 7096/7103/7099; sliding (stride 64,
    # windows of 2048 in batches of 32, torch.compile'd forward_logits) eval_time 73133/73133/73179 ms; roundtrip
    # (plain 2048-token windows, freshly compiled model) 5788/5814/5773 ms
    logged=dict(ms_unlooped=84.52, steps=7099.3, sliding_s=73.15, roundtrip_s=5.79),
)
RECORD_2 = dict(
    name="2026-04-27 SP8192 LQER SparseGate (1.0611)",
    folder="2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611",
    env=dict(PRESET="frontier"),  # our frontier preset is this record's stack
    val="caseops", doc_mask=True, loop_from=0.35, train_s=599.5,  # GPTQ_RESERVE_SECONDS=0.5
    # train_seed{42,0,1234}.log: cumulative tok/s at step 2000 (unlooped) 8,167,705/8,198,088/8,151,701 -> 96.23 ms;
    # steps 2500 -> 4500 (looped) 140.95/141.37/141.54 ms; steps 4945/4932/4917; TTT eval_time 508.8/455.1/470.0 s
    # ("ttpp" phase 1 at 209.3/202.7/207.7 s, pd 1296/2128/2960 documents done at the 3 pauses, global passes of
    # 131/219/289 chunks of 32,768 tokens)
    logged=dict(ms_unlooped=96.23, ms_looped=141.29, steps=4931.3, ttt_s=477.97, ttt_pause1_s=206.6,
                ttt_pause_docs=(1296, 2128, 2960), ttt_global_chunks=(131, 219, 289)),
    # its TTT (eval_val_ttt_phased): documents sorted by length in batches of 64, claimed longest first by the
    # next free rank; chunks of 48 targets, each a forward over the document's last min(48 (i + 1), 2048)
    # tokens for all 64 rows, then (all but the last) a backward; LoRA rank 80 on Q/K/V/O/MLP and the head;
    # after 833/1666/2500 documents are done every rank pauses for a global SGD pass over the first of them
    ttt=dict(batch=64, chunk=48, width=2048, lora=80, phases=(833, 1666, 2500), global_chunk=32768),
)
RECORDS = (RECORD_1, RECORD_2)


def record_hp(T, rec):
    return T.load_hparams({**rec["env"], "DATA_PATH": "./data/datasets/fineweb10B_" + rec["val"]})


def train_step_s(T, hp, looping: bool, ctx: float, world: int = WORLD) -> float:
    """Seconds of one training step's compute on a rank: the model's forward + backward on its share of the batch
    and the busiest rank's Newton-Schulz, at EFF_TRAIN."""
    f = forward_profile(T, hp, hp.train_seq_len, looping)
    flops = hp.train_batch_tokens / world * 3 * f.flops(ctx) + newton_schulz(T, hp, world)["flops"]
    return flops / (PEAK_FLOPS * EFF_TRAIN)


def train_context(hp, lengths: np.ndarray, doc_mask: bool) -> float:
    """Mean attended positions per training token: causal over the row, or within documents (DOC_MASK)."""
    return packed_context(lengths, hp.train_seq_len) if doc_mask else (hp.train_seq_len + 1) / 2


def record_train(T, rec) -> dict:
    hp = record_hp(T, rec)
    ctx = train_context(hp, stand_in_lengths(VAL_TOKENS[rec["val"]]), rec["doc_mask"])
    u = train_step_s(T, hp, False, ctx)
    if rec["loop_from"] is None:
        return dict(ms_unlooped=1e3 * u, steps=rec["train_s"] / u)
    lp = train_step_s(T, hp, True, ctx)
    f = rec["loop_from"]
    return dict(ms_unlooped=1e3 * u, ms_looped=1e3 * lp, steps=f * rec["train_s"] / u + (1 - f) * rec["train_s"] / lp)


def eval_forward_s(T, hp, positions: float, ctx: float, looping: bool) -> float:
    """Seconds of evaluation forwards over `positions` token-positions on a rank at mean context ctx."""
    return positions * forward_profile(T, hp, hp.eval_seq_len, looping).flops(ctx) / (PEAK_FLOPS * EFF_EVAL)


def record_eval(T, rec) -> dict:
    """Record 1's sliding windows (every 64 tokens a window of 2048, padded) and plain windows, shared by 8 ranks;
    each stage compiles its forward once."""
    hp, M = record_hp(T, rec), VAL_TOKENS[rec["val"]]
    L, ctx = hp.eval_seq_len, (hp.eval_seq_len + 1) / 2
    windows = len(range(0, M, hp.eval_stride))
    return dict(sliding_s=EVAL_COMPILE_S + eval_forward_s(T, hp, windows * L / WORLD, ctx, False),
                roundtrip_s=EVAL_COMPILE_S + eval_forward_s(T, hp, M // L * L / WORLD, ctx, False))


def chunk_windows(n_max: int, c: int, L: int) -> np.ndarray:
    """Window widths of the chunks of a batch whose longest document has n_max targets (chunks of c targets, each
    over the document's last min((i + 1) c, L) tokens)."""
    return np.minimum((np.arange(-(-n_max // c)) + 1) * c, L)


def record_ttt(T, rec, lengths: np.ndarray | None = None) -> dict:
    """Record 2's phased TTT as its code runs it: per batch the chunks' forward-equivalents (3 for an adapted chunk,
    1 for the last) at EFF_TTT, batches claimed longest first by the first free rank, pauses for the global passes
    (GLOBAL_STEP_S a step; the pass skips its last chunk) once the phase's documents are done."""
    t, hp = rec["ttt"], record_hp(T, rec)
    n = stand_in_lengths(VAL_TOKENS[rec["val"]]) if lengths is None else lengths
    f = forward_profile(T, hp, t["width"], True)
    head = 2 * t["lora"] * (hp.model_dim + hp.vocab_size)
    order = np.argsort(n, kind="stable")
    batches = [order[i:i + t["batch"]] for i in range(0, len(n), t["batch"])]

    def seconds(b) -> float:
        w = chunk_windows(int(n[b].max()), t["chunk"], t["width"])
        mult = np.where(np.arange(len(w)) < len(w) - 1, 3.0, 1.0)
        per_row = (mult * (w * (f.flops(0, t["lora"]) + head) + 4 * f.attn * w * (w + 1) / 2)).sum()
        return len(b) * per_row / (PEAK_FLOPS * EFF_TTT)

    queue = sorted(range(len(batches)), key=lambda i: -n[batches[i]].max())[::-1]  # popped from the end
    running = [(seconds(batches[b]), r, b) for r, b in enumerate(queue.pop() for _ in range(WORLD))]
    heapq.heapify(running)
    done, scored, pauses, chunks, clock = 0, [], [], [], 0.0
    while running:
        clock, r, b = heapq.heappop(running)
        done += len(batches[b])
        scored.append(b)
        pausing = len(pauses) < len(t["phases"]) and done >= t["phases"][len(pauses)]
        if queue and not pausing:
            heapq.heappush(running, (clock + seconds(batches[queue[-1]]), r, queue.pop()))
        elif pausing and not running:  # every rank has finished its batch: the global pass, then all go on
            docs = [int(d) for b in sorted(scored) for d in batches[b]][:t["phases"][len(pauses)]]
            chunks.append(-(-int((n[docs] + 1).sum()) // t["global_chunk"]))
            pauses.append((clock, done))
            clock += (chunks[-1] - 1) * GLOBAL_STEP_S
            starts = [queue.pop() for _ in range(min(WORLD, len(queue)))]
            running = [(clock + seconds(batches[b]), r, b) for r, b in enumerate(starts)]
            heapq.heapify(running)
    return dict(ttt_s=clock, ttt_pause1_s=pauses[0][0] if pauses else math.nan,
                ttt_pause_docs=tuple(d for _, d in pauses), ttt_global_chunks=tuple(chunks))


# -----------------------------------------------------------------------------
# our implementation: training
# -----------------------------------------------------------------------------

def qat_refresh(T, hp) -> dict:
    """One QAT refresh (refresh_qat: every quantized matrix quantized and dequantized, outside the graph): its eager
    ops and bytes per step, counted on CPU for the preset at SHAPE=tiny and scaled to the configured model (ops by
    matrices, bytes by weights)."""
    tiny = T.load_hparams({"PRESET": hp.preset, "SHAPE": "tiny"})
    small, tally = T.GPT(tiny), Tally()
    T.set_qat(mock.Mock(hp=tiny, model=small), 0)
    with torch.no_grad(), tally:
        T.refresh_qat(small)
    with torch.device("meta"):
        full = T.GPT(hp)

    def quantized(m) -> list[int]:  # weights of each quantized matrix
        return [m.get_parameter(n).numel() for n, (_, f) in T.quant_formats(m.hp, m).items() if f.kind != "fp16"]
    a, b = quantized(full), quantized(small)
    return dict(ops=tally.ops * len(a) / max(1, len(b)), bytes=tally.bytes * sum(a) / max(1, sum(b)))


def step_overheads(T, hp, probe: dict | None, looping: bool) -> dict[str, float]:
    """Seconds per training step that our implementation adds to the compute the records' efficiency covers. The
    probe's graph breaks (at SHAPE=tiny, unlooped) scale with the layer applications of a forward."""
    ga = T.grad_accum_steps(hp, WORLD)
    p = probe or {}
    ns = newton_schulz(T, hp, WORLD)
    with torch.device("meta"):
        apps = len(T.GPT(hp).layer_order(looping))
    breaks = p.get("breaks_per_forward", 0) * apps / p.get("layer_apps", apps)
    out = {"graph breaks": breaks * ga * GRAPH_BREAK_S,
           "host syncs": p.get("syncs_per_step", 0) * HOST_SYNC_S,
           "eager Newton-Schulz": 0.0 if ns_compiled(T, hp) else ns["bytes"] / HBM_BPS}
    if p.get("eager_fallback"):
        f = forward_profile(T, hp, hp.train_seq_len, False)
        out["eager fallback (recompile limit)"] = 3 * f.bytes * hp.train_batch_tokens / WORLD / HBM_BPS
    return out


def ns_compiled(T, hp) -> bool:
    """Whether Muon's Newton-Schulz runs compiled on CUDA: Muon has the option and COMPILE=1 sets it there."""
    import inspect
    return hp.compile and "compile" in inspect.signature(T.Muon.__init__).parameters


def simulate_training(T, hp, step_s) -> int:
    """Steps the wall-clock loop makes: train_gpt's own Schedule (warmdown, QAT threshold) and LOOP_START, with
    step_s(looping, qat) seconds a step, in train_budget(hp) seconds (or ITERATIONS steps without a cap)."""
    cap = T.train_budget(hp)
    sched = T.Schedule(hp.iterations, hp.warmdown_iters, hp.lr_warmup_steps, cap, hp.warmdown_frac, hp.min_lr)
    has_loop = hp.loop_count > 1 and T.parse_loop(hp.loop_layers, hp.num_layers) is not None
    step, t, looping, qat = 0, 0.0, has_loop and hp.loop_start <= 0, False
    while step < hp.iterations and (not cap or t < cap):
        lr = sched.warmdown_mult(step, sched.lr_mult(step, t))
        t += step_s(looping, qat)
        qat = qat or bool(hp.qat_threshold and lr <= hp.qat_threshold)
        step += 1
        looping = looping or has_loop and (t / cap if cap else step / hp.iterations) >= hp.loop_start
    return step


def our_train(T, hp, lengths: np.ndarray, probe: dict | None) -> dict:
    ctx = train_context(hp, lengths, hp.doc_mask)
    base = {lp: train_step_s(T, hp, lp, ctx) for lp in (False, True)}
    over = {lp: step_overheads(T, hp, probe, lp) for lp in (False, True)}
    qat = qat_refresh(T, hp) if hp.qat_threshold else dict(ops=0, bytes=0.0)
    qat_s = max(qat["bytes"] / HBM_BPS, qat["ops"] * LAUNCH_S)
    lost = (probe or {}).get("recompiles_in_loop", 0) * RECOMPILE_S
    cut = dataclasses.replace(hp, max_wallclock_seconds=max(hp.max_wallclock_seconds - lost, 1.0)
                              if hp.max_wallclock_seconds else 0.0)
    ours = lambda lp, q: base[lp] + sum(over[lp].values()) + q * qat_s  # noqa: E731
    bare = lambda lp, q: base[lp]  # noqa: E731
    whole = dataclasses.replace(hp, export_reserve_seconds=0.0)  # the records' loops ran the whole 600 s
    return dict(ms_unlooped=1e3 * ours(False, False), ms_looped=1e3 * ours(True, False), ms_qat=1e3 * qat_s,
                steps=simulate_training(T, cut, ours), steps_bare=simulate_training(T, hp, bare),
                steps_whole=simulate_training(T, whole, bare),
                overheads={**{k: 1e3 * v for k, v in over[False].items()}, "QAT refresh (QAT steps)": 1e3 * qat_s},
                recompile_s=lost, budget=T.train_budget(hp))


# -----------------------------------------------------------------------------
# our implementation: evaluation
# -----------------------------------------------------------------------------

def scoring_tally(T, hp, rows: int = 64) -> Tally:
    """What scoring costs per target beyond the model: window_logprobs' log-softmax and target_stats, on meta."""
    tally = Tally(hp.vocab_size)
    lp = torch.empty(rows, hp.vocab_size, device="meta")
    with tally:
        T.target_stats(lp.float().log_softmax(-1), torch.zeros(rows, dtype=torch.long, device="meta"))
    tally.bytes, tally.ops = tally.bytes / rows, tally.ops
    return tally


def windows_s(T, hp, positions: float, scored: float, looping: bool) -> float:
    """Seconds on a rank of compiled evaluation forwards over `positions` (windows of EVAL_SEQ_LEN) that score
    `scored` targets (their float log-softmax and statistics outside the graph)."""
    return (eval_forward_s(T, hp, positions, (hp.eval_seq_len + 1) / 2, looping)
            + scored * scoring_tally(T, hp).bytes / HBM_BPS)


def ngram_s(T, hp, targets: int) -> float:
    """The n-gram stage on every rank over the whole split: its eager tensor work counted on CPU on a 2^14-token
    stream (bytes and sorts scale with the tokens; fit_online adds an L-BFGS level per doubling)."""
    if not hp.ngram_order:
        return 0.0
    n = 1 << 14
    toks = torch.randint(hp.vocab_size, (n + 1,), generator=torch.Generator().manual_seed(0))
    stats = torch.rand(2, n, generator=torch.Generator().manual_seed(1))
    tally = Tally()
    with tally:
        T.ngram_nll(hp, toks, stats)
    scale, levels = targets / n, math.log2(targets / n)
    moved = (tally.bytes - tally.sort_bytes + SORT_PASSES * tally.sort_bytes) * scale
    return moved / HBM_BPS + tally.ops * (1 + levels / max(1.0, math.log2(n / 1024))) * LAUNCH_S


def ttt_chunks(f: Forward, n_max: int, rows: int, c: int, L: int, E: int, lora: int) -> dict:
    """A TTT batch (rows documents, the longest n_max targets) adapted chunk by chunk as lora_batch runs it, eager:
    FLOPs and unfused bytes (forward-equivalents: 1 + 2 per backward, E epochs on every chunk but the last), and
    per chunk max(GPU time, host launch time) at EFF_TTT."""
    w = chunk_windows(n_max, c, L)
    mult = np.where(np.arange(len(w)) < len(w) - 1, 3.0 * E, 1.0)
    flops = rows * mult * (w * f.flops(0, lora) + 4 * f.attn * w * (w + 1) / 2)
    moved = rows * mult * w * f.bytes
    lora_ops = 3 * sum(k for _, _, k in f.linears)  # two einsums and an add per adapted linear
    host = mult * (f.ops + lora_ops) * LAUNCH_S + 40 * LAUNCH_S  # + the scoring and AdamW steps
    gpu = flops / (PEAK_FLOPS * EFF_TTT) + moved / HBM_BPS
    return dict(flops=flops.sum(), compute=(flops / (PEAK_FLOPS * EFF_TTT)).sum(), eager=(moved / HBM_BPS).sum(),
                launch=np.maximum(host - gpu, 0).sum(), seconds=np.maximum(gpu, host).sum(), chunks=len(w))


def old_plan_positions(T, hp, lengths: np.ndarray, world: int = WORLD) -> float:
    """Forward token-positions of one pass of TTT as commit 8661491 planned it (before ttt_plan), in batches of
    VAL_BATCH_TOKENS / (8 EVAL_SEQ_LEN) documents, each as long as its longest document. phased: in stream order, a
    batch per rank per round, rounds not straddling a phase boundary; lora: each rank's contiguous share, longest
    first."""
    c, L = min(hp.ttt_chunk_tokens, hp.eval_seq_len), hp.eval_seq_len
    per, D = hp.eval_batch_seqs or max(1, hp.val_batch_tokens // (8 * L)), len(lengths)
    if hp.ttt_mode == "lora":
        shares = [-np.sort(-lengths[D * r // world:D * (r + 1) // world]) for r in range(world)]
    else:
        cuts = sorted({min(D, hp.ttt_prefix_docs) * (i + 1) // hp.ttt_phases for i in range(hp.ttt_phases)} - {0, D})
        shares = np.split(lengths, cuts)
    return float(sum(len(b) * int(T.doc_positions(int(b.max()), c, L))
                     for share in shares for b in np.split(share, range(per, len(share), per))))


def our_ttt(T, hp, lengths: np.ndarray, world: int = WORLD) -> dict:
    """lora / phased TTT by ttt_plan on these documents (full TTT: our_eval): each phase ends when its slowest rank
    ends (the ranks meet for the global pass), global passes at GLOBAL_STEP_S a step."""
    for name in ("ttt_plan", "ttt_work", "doc_positions"):
        if not hasattr(T, name):
            raise UserError(f"train_gpt.py has no {name}(): this clock model needs the TTT plan (git merge main)")
    f = forward_profile(T, hp, hp.eval_seq_len, True)
    c, L, E = min(hp.ttt_chunk_tokens, hp.eval_seq_len), hp.eval_seq_len, hp.ttt_epochs
    plan = T.ttt_plan(lengths, hp, world)
    adapt, plain, passes = T.ttt_work(hp, lengths, plan)
    phases, parts = [], Counter()
    for ranks in plan:
        per_rank = []
        for batches in ranks:
            work = [ttt_chunks(f, int(lengths[b[0]]), len(b), c, L, E, hp.ttt_lora_rank) for b in batches]
            per_rank.append(sum(w["seconds"] for w in work))
            for w in work:
                parts.update({k: w[k] for k in ("compute", "eager", "launch", "chunks")})
        phases.append(max(per_rank))
    steps = int(sum(-(-int(p) // hp.ttt_global_chunk_tokens) for p in passes)) * E
    plain_s = plain.max() * f.flops((L + 1) / 2) / (PEAK_FLOPS * EFF_EVAL) + plain.max() * f.bytes / HBM_BPS
    busiest = max(range(world), key=lambda r: adapt[r])
    return dict(seconds=sum(phases) + steps * GLOBAL_STEP_S, global_s=steps * GLOBAL_STEP_S, global_steps=steps,
                pass_positions=float(adapt.sum()) / (3 * E), pass_before=old_plan_positions(T, hp, lengths),
                positions=float(adapt.sum()), positions_busiest=float(adapt[busiest]), plain_s=float(plain_s),
                parts={k: v / world for k, v in parts.items()}, phases=len(plan))


# -----------------------------------------------------------------------------
# our implementation: export (the train clock's reserve) and bytes
# -----------------------------------------------------------------------------
CODEC_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "parameter-golf" / "clock_codecs.json"
CODEC_SAMPLE = 1 << 20  # bytes each codec's rate is measured on


def codec_rates(T, kinds: list[str], path: Path | None = CODEC_CACHE) -> dict:
    """(kind, codec) -> (compress s/MB, decompress s/MB, compressed/raw) on this CPU, in this thread's CPU time (so a
    loaded machine measures the same), on 1 MB of the kind: intN/aN codes of unit-Gaussian rows quantized as export
    does (one byte each), fp16 for 'scales'/'fp16'. Measured once per kind and codec versions, cached in path."""
    versions = repr([getattr(T.optional_import(m), "__version__", None) for m in T.CODEC_MODULES.values()])
    disk = {}
    if path and path.is_file():
        with contextlib.suppress(ValueError):
            disk = json.loads(path.read_text())
    out, cs, new = {}, T.codecs(), False
    for kind in kinds:
        for name, (enc, dec) in cs.items():
            key = f"{kind}|{name}|{CODEC_SAMPLE}|{versions}"
            if key not in disk:
                raw = sample_bytes(T, kind)
                t0 = time.thread_time()
                packed = enc(raw)
                t1 = time.thread_time()
                dec(packed, len(raw))
                t2 = time.thread_time()
                mb = len(raw) / 2**20
                disk[key], new = [(t1 - t0) / mb, (t2 - t1) / mb, len(packed) / len(raw)], True
            out[kind, name] = tuple(disk[key])
    if new and path:
        T.write_atomic(path, json.dumps(disk, indent=0))
    return out


def sample_bytes(T, kind: str) -> bytes:
    g = torch.Generator().manual_seed(0)
    if kind in ("scales", "fp16"):
        return (torch.randn(CODEC_SAMPLE // 2, generator=g) * 0.01).half().numpy().tobytes()
    f = T.parse_fmt(kind if kind[0] != "a" else "int4")._replace(kind="int" if kind[0] != "a" else "a")
    codes = T.quantize(torch.randn(CODEC_SAMPLE // 512, 512, generator=g), f)[0]
    return codes.numpy().tobytes()


def export_groups(T, hp, model) -> dict[str, int]:
    """Raw bytes of each stored group (one byte per code, two per fp16 value) of the configured export."""
    sizes, state = Counter(), model.state_dict()
    fmts = T.quant_formats(hp, model)
    for name, t in state.items():
        f = fmts.get(name, (None, T.Fmt("fp16")))[1]
        for g, shape in T.layout(list(t.shape), f):
            sizes[g] += math.prod(shape) * (2 if g in T.FP16_GROUPS else 1)
    return dict(sizes)


def compress_s(T, hp, sizes: dict[str, int], rates: dict) -> dict:
    """encode_groups' wall time on the host: CODEC=auto runs every codec on each group (or on a CODEC_SAMPLE_BYTES
    sample of it, then the smallest on all of it), CODEC=x one codec; jobs in a pool of HOST_CORES threads; ac holds
    the GIL, so its jobs run one after another. Returns seconds and each group's pick."""
    kind = lambda g: "fp16" if g in T.FP16_GROUPS else g  # noqa: E731
    names = sorted({c for _, c in rates})
    sample = getattr(hp, "codec_sample_bytes", 0)
    jobs, picks = [], {}
    for g, n in sizes.items():
        cand = names if hp.codec == "auto" else [hp.codec]
        picks[g] = min(cand, key=lambda c: rates[kind(g), c][2])
        part = min(n, sample) if hp.codec == "auto" and sample else n
        jobs += [(c, part * rates[kind(g), c][0] / 2**20) for c in cand]
        if part < n:
            jobs.append((picks[g], n * rates[kind(g), picks[g]][0] / 2**20))
    total, longest = sum(s for _, s in jobs), max(s for _, s in jobs)
    gil = sum(s for c, s in jobs if c == "ac")
    decode = sum(n * rates[kind(g), picks[g]][1] / 2**20 for g, n in sizes.items())
    return dict(seconds=max(longest, total / HOST_CORES, gil), decode=decode, picks=picks, jobs=len(jobs))


def gptq_ops_per_column(T, hp) -> float:
    """Eager ops gptq_codes launches per column (the column loop), counted on a small CPU matrix."""
    cols, tally = 64, Tally()
    w = torch.randn(32, cols, generator=torch.Generator().manual_seed(0))
    H = w.T @ w + torch.eye(cols)
    f = T.parse_fmt("int6")
    levels = T.grid(f)
    s = T.quantize_rows(w, levels)[1]
    with tally:
        T.gptq_codes(w, H, levels, s, dataclasses.replace(hp, gptq_block=32))
    return tally.ops / cols


def our_export(T, hp, model, sizes: dict, rates: dict, refits: int) -> dict:
    """Checkpoint, GPTQ Hessians (eager forwards over GPTQ_TOKENS, float64 X^T X per linear input), the row quantizer
    (clip search) and GPTQ's column loop on rank 0 (launch-bound), compression, and the reload's decompression;
    QUANT_FIT re-exports repeat the quantization of what changed (taken as all of it) and the compression."""
    params = sum(p.numel() for p in model.parameters())
    f = forward_profile(T, hp, hp.train_seq_len, True)
    tokens = -(-hp.gptq_tokens // (WORLD * hp.train_seq_len)) * hp.train_seq_len
    apps, d, hidden = len(model.layer_order(True)), hp.model_dim, int(round(hp.mlp_mult * hp.model_dim))
    fp64 = 0.5 * 67e12  # ESTIMATE: half of the H100's FP64 tensor-core peak for the float64 X^T X products
    xtx = 2 * tokens * (apps * (3 * d * d + hidden * hidden) + d * d) / fp64  # q, k, v share their input
    hess = tokens * (f.flops((hp.train_seq_len + 1) / 2) / (PEAK_FLOPS * EFF_EVAL) + f.bytes / HBM_BPS) + xtx
    fmts = T.quant_formats(hp, model)
    cols = sum(model.get_parameter(n).shape[1] for n, (_, fm) in fmts.items() if fm.kind != "fp16")
    gptq = cols * gptq_ops_per_column(T, hp) * LAUNCH_S if hp.gptq else 0.0
    q = qat_refresh(T, hp)  # the same quantizer, once per matrix
    comp = compress_s(T, hp, sizes, rates)
    parts = {"checkpoint": 4 * params / DISK_BPS, "Hessians": hess,
             "quantize": max(q["bytes"] / HBM_BPS, q["ops"] * LAUNCH_S) * (1 + refits), "GPTQ": gptq * (1 + refits),
             "compress": comp["seconds"] * (1 + refits), "reload": comp["decode"]}
    return dict(seconds=sum(parts.values()), parts=parts, picks=comp["picks"], jobs=comp["jobs"])


def predicted_bytes(T, hp, model) -> dict:
    """predict_size.py's prediction of the artifact (Gaussian weights) and QUANT_FIT's re-exports to fit it."""
    import inspect
    import predict_size as P
    args = inspect.signature(P.Meter.__init__).parameters
    meter = P.Meter(hp.codec, getattr(hp, "codec_sample_bytes", 0), P.CACHE) if "cache" in args else P.Meter(hp.codec)
    if hasattr(P, "quant_fit"):
        with contextlib.redirect_stderr(io.StringIO()):
            trials = P.quant_fit(hp, model, meter, T.CODE_BYTES)
        return dict(total=trials[-1][1]["total"], own=trials[0][1]["total"], refits=len(trials) - 1, spec=trials[-1][0])
    p = own = P.predict(hp, model, meter, T.CODE_BYTES)
    spec, refits = hp.quant_spec, 0
    while hp.quant_fit and p["total"] > T.ARTIFACT_CAP_BYTES and (
            nxt := T.narrower_spec(dataclasses.replace(hp, quant_spec=spec), model, p["total"] - T.ARTIFACT_CAP_BYTES)):
        spec, refits = nxt, refits + 1
        p = P.predict(dataclasses.replace(hp, quant_spec=spec), model, meter, T.CODE_BYTES)
    return dict(total=p["total"], own=own["total"], refits=refits, spec=spec)


# -----------------------------------------------------------------------------
# the CPU probe: graph breaks, recompiles and host syncs of the training loop, at SHAPE=tiny
# -----------------------------------------------------------------------------

def flash_stand_ins():
    """CPU stand-ins for flash-attn's two calls (SDPA inside, one graph node each as the real custom ops are), so
    the probe traces the CUDA code path: attention() takes them when use_flash says so."""
    @torch._dynamo.allow_in_graph
    def flash(q, k, v, causal=True):
        y = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                             is_causal=True, enable_gqa=k.size(2) != q.size(2))
        return y.transpose(1, 2)

    @torch._dynamo.allow_in_graph
    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=True):
        doc = torch.searchsorted(cu_q[1:-1].long(), torch.arange(q.size(0)), right=True)
        mask = (doc[:, None] == doc[None, :]) & torch.ones(q.size(0), q.size(0), dtype=torch.bool).tril()
        y = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                                             v.transpose(0, 1)[None], attn_mask=mask,
                                                             enable_gqa=k.size(1) != q.size(1))
        return y[0].transpose(0, 1)
    return flash, varlen


def probe_hp(T, hp, log_dir: Path, data: Path | None, steps: int):
    """The configured recipe at SHAPE=tiny, compiled, with its warm-up (at most 6 steps), then `steps` uncapped steps
    (preflight's short run: QAT, if on, for the last third; looping from LOOP_START of them)."""
    from preflight import short_run_hp
    tiny = T.load_hparams({"PRESET": hp.preset, "SHAPE": "tiny", "COMPILE": "1", "TRAIN_BATCH_TOKENS": "2048",
                           "WARMUP_STEPS": str(min(hp.warmup_steps, 6)), "RUN_ID": "probe",
                           "DATA_PATH": str(data or ROOT / "data/datasets/brown_sp1024")})
    if not (Path(tiny.data_path) / "manifest.json").is_file():
        raise UserError(f"--probe needs the Brown data at {tiny.data_path} (python scripts/prepare_data.py local)")
    return short_run_hp(tiny, steps, log_dir)


@dataclasses.dataclass
class ProbeCounts:
    """What the probe's patches count while the short run trains."""
    graphs: int = 0  # graphs handed to the compile backend so far
    syncs: int = 0  # host syncs (all_reduce, train_gpt.py's item()) so far
    marks: list = dataclasses.field(default_factory=list)  # (graphs, syncs) at each timed step's start
    first: list = dataclasses.field(default_factory=list)  # graphs compiled by each train_step call


def probe_patches(T, tiny, c: ProbeCounts) -> contextlib.ExitStack:
    """Patches into T and torch, undone when the returned stack closes: torch.compile with a backend that counts the
    graphs it is given (and runs them uncompiled), all_reduce and item() counted as host syncs, a mark at each timed
    step's start, and (unless ATTN_KERNEL=sdpa) flash-attn's calls stood in for on CPU."""
    real_compile, real_reduce, real_item = torch.compile, T.Run.all_reduce, torch.Tensor.item
    real_step, real_hook = T.train_step, T.on_train_step

    def backend(gm, example_inputs):
        c.graphs += 1
        return gm.forward

    def counted(fn, anywhere: bool):  # item(): from train_gpt.py only (torch's own CPU-side calls sync no device)
        def wrapper(*a, **k):
            c.syncs += anywhere or sys._getframe(1).f_code.co_filename == T.__file__
            return fn(*a, **k)
        return wrapper

    def on_step(run, step, lr_mult):
        c.marks.append((c.graphs, c.syncs))
        return real_hook(run, step, lr_mult)

    def train_step(*a, **k):  # the graphs the first forward (and its backward) is cut into; the timed loop's start
        if len(c.first) == tiny.warmup_steps:
            c.marks.append((c.graphs, c.syncs))
        g = c.graphs
        out = real_step(*a, **k)
        c.first.append(c.graphs - g)
        return out

    stack = contextlib.ExitStack()
    patch = lambda *a, **k: stack.enter_context(mock.patch.object(*a, **k))  # noqa: E731
    patch(torch, "compile", lambda m, **k: real_compile(m, backend=backend, dynamic=k.get("dynamic")))
    patch(T.Run, "all_reduce", counted(real_reduce, True))
    patch(torch.Tensor, "item", counted(real_item, False))
    patch(T, "on_train_step", on_step)
    patch(T, "train_step", train_step)
    if tiny.attn_kernel != "sdpa":
        flash, varlen = flash_stand_ins()
        stack.enter_context(mock.patch.multiple(T, flash_attn_func=flash, flash_attn_varlen_func=varlen,
                                                use_flash=lambda kernel, dtype: kernel != "sdpa"))
    return stack


def probe(T, hp, log_dir: Path, data: Path | None = None) -> dict:
    """The configured recipe at SHAPE=tiny on CPU, torch.compile'd with a backend that counts the graphs it is given
    (and runs them uncompiled): warm-up (as configured), then steps through the loop switch and QAT. Returns graph
    breaks per forward, graphs compiled in the timed loop, host syncs (all_reduce / item) per step."""
    tiny = probe_hp(T, hp, log_dir, data, steps=6)
    c = ProbeCounts()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with probe_patches(T, tiny, c), contextlib.redirect_stdout(io.StringIO()):
        run = T.setup(tiny)
        T.train(run)
    per_step = np.diff(np.array(c.marks), axis=0)  # step k's body and step k-1's loop tail
    return dict(breaks_per_forward=max(0, c.first[0] - 1), layer_apps=len(run.model.layer_order(False)),
                recompiles_in_loop=int(per_step[:, 0].sum()), syncs_per_step=float(np.median(per_step[:, 1])),
                eager_fallback=bool(per_step[-2:, 0].all()), steps=len(per_step))


PROBE_CACHE = CODEC_CACHE.with_name("clock_probe.json")


def probe_cached(T, hp, run: bool) -> tuple[dict | None, str]:
    """The probe's counts for this train_gpt.py and configuration: measured now (run), else from the cache."""
    import hashlib
    key = hashlib.sha256(T.CODE + config_key(hp).encode()).hexdigest()
    disk = {}
    if PROBE_CACHE.is_file():
        with contextlib.suppress(ValueError):
            disk = json.loads(PROBE_CACHE.read_text())
    if run:
        import tempfile
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="clock_probe_") as tmp:
            disk[key] = probe(T, hp, Path(tmp))
        T.write_atomic(PROBE_CACHE, json.dumps(disk, indent=0))
        return disk[key], f"probe: measured at SHAPE=tiny on CPU in {time.perf_counter() - t0:.0f}s"
    if key in disk:
        return disk[key], "probe: this code and configuration's counts, cached by an earlier --probe"
    return None, "probe: off: graph breaks, recompiles and host syncs counted as 0 (--probe counts them, ~1 min)"


# -----------------------------------------------------------------------------
# calibration table
# -----------------------------------------------------------------------------
# figure -> (how it is used, the record); "fit": a constant was set from it; "check": predicted from the others
ROLES = {"ms_unlooped": "fit EFF_TRAIN", "sliding_s": "fit EFF_EVAL", "roundtrip_s": "fit EVAL_COMPILE_S",
         "ttt_s": "fit EFF_TTT (+ GLOBAL_STEP_S)", "steps": "check", "ms_looped": "check", "ttt_pause1_s": "check",
         "ttt_pause_docs": "check", "ttt_global_chunks": "check"}


def record_figures(T, rec) -> dict:
    out = record_train(T, rec)
    if "sliding_s" in rec["logged"]:
        out.update(record_eval(T, rec))
    if "ttt" in rec:
        out.update(record_ttt(T, rec))
    return out


def calibration_rows(T) -> list[tuple[str, str, object, object, float, str]]:
    """(record, figure, logged, model, relative error, role) for every logged figure of the records."""
    rows = []
    for rec in RECORDS:
        got = record_figures(T, rec)
        for k, want in rec["logged"].items():
            model = got[k]
            err = max(abs(m / w - 1) for m, w in zip(np.atleast_1d(model), np.atleast_1d(want)))
            role = ROLES[k] if k != "ms_unlooped" or rec is RECORD_1 else "check"
            rows.append((rec["name"], k, want, model, err, role))
    return rows


def fit_constants(T) -> dict[str, float]:
    """The calibrated constants recomputed from the records' logged figures (times are linear in 1/efficiency)."""
    global EFF_TRAIN, EFF_EVAL, EVAL_COMPILE_S, EFF_TTT
    saved = EFF_TRAIN, EFF_EVAL, EVAL_COMPILE_S, EFF_TTT
    try:
        EFF_TRAIN = EFF_EVAL = EFF_TTT = 1.0
        EVAL_COMPILE_S = 0.0
        r1, r2 = RECORD_1["logged"], RECORD_2["logged"]
        eff_train = record_train(T, RECORD_1)["ms_unlooped"] / r1["ms_unlooped"]
        e = record_eval(T, RECORD_1)  # sliding = C + a / eff, roundtrip = C + b / eff
        eff_eval = (e["sliding_s"] - e["roundtrip_s"]) / (r1["sliding_s"] - r1["roundtrip_s"])
        compile_s = r1["roundtrip_s"] - e["roundtrip_s"] / eff_eval
        t = record_ttt(T, RECORD_2)
        fixed = (sum(t["ttt_global_chunks"]) - len(t["ttt_global_chunks"])) * GLOBAL_STEP_S
        eff_ttt = (t["ttt_s"] - fixed) / (r2["ttt_s"] - fixed)
    finally:
        EFF_TRAIN, EFF_EVAL, EVAL_COMPILE_S, EFF_TTT = saved
    return dict(EFF_TRAIN=eff_train, EFF_EVAL=eff_eval, EVAL_COMPILE_S=compile_s, EFF_TTT=eff_ttt)


def fmt_value(v) -> str:
    if isinstance(v, (tuple, list)):
        return "/".join(fmt_value(x) for x in v)
    return f"{v:,.0f}" if abs(v) >= 1000 or float(v).is_integer() else f"{v:.1f}"


def print_calibration(T) -> float:
    print("| record | figure | logged | model | error | role |\n|---|---|---|---|---|---|")
    worst = 0.0
    for name, k, want, model, err, role in calibration_rows(T):
        print(f"| {name} | {k} | {fmt_value(want)} | {fmt_value(model)} | {err:.1%} | {role} |")
        worst = max(worst, err)
    return worst


# -----------------------------------------------------------------------------
# the report
# -----------------------------------------------------------------------------

def our_eval(T, hp, lengths: np.ndarray) -> dict:
    """Each evaluation stage's seconds as evaluate() runs them (compile first, then roundtrip, TTT or sliding,
    n-gram), and TTT's deadline: the budget less the other stages."""
    M, L = int(lengths.sum()), hp.eval_seq_len
    looping = hp.loop_count > 1 and T.parse_loop(hp.loop_layers, hp.num_layers) is not None and hp.loop_start < 1
    stages = {"compile": EVAL_COMPILE_S if hp.compile else 0.0,
              "roundtrip": windows_s(T, hp, M // L * L / WORLD, M // L * L / WORLD, looping)}
    detail, ttt = {}, None
    if hp.ttt_enabled and hp.ttt_seconds > 0 and hp.ttt_mode != "full":
        ttt = our_ttt(T, hp, lengths)
        stages["ttt"] = ttt["seconds"]
    else:
        n_windows = len(T.sliding_plan(M, L, hp.eval_stride)[2])
        sliding = windows_s(T, hp, n_windows * min(L, M) / WORLD, M / WORLD, looping)
        if hp.ttt_enabled and hp.ttt_mode == "full":  # every target adapted on: TTT_EPOCHS forward + backward, eager
            f = forward_profile(T, hp, L, looping)
            per = f.flops((L + 1) / 2) / (PEAK_FLOPS * EFF_TRAIN) + f.bytes / HBM_BPS
            adapt = 3 * hp.ttt_epochs * M / WORLD * per
            stages["ttt"] = sliding + adapt
        else:
            stages["sliding"] = sliding
        detail["sliding positions"] = n_windows * min(L, M)
    stages["ngram"] = ngram_s(T, hp, M)
    deadline = hp.eval_budget_seconds - sum(v for k, v in stages.items() if k != "ttt")
    return dict(stages=stages, ttt=ttt, deadline=deadline, targets=M, detail=detail)


def verdict(seconds: float, limit: float, margin: float) -> str:
    return "ok" if seconds <= (1 - margin) * limit else "OVER" if seconds > limit else "TIGHT"


def report(T, hp, args) -> int:
    lengths, source = val_lengths(T, hp)
    probed, probe_note = probe_cached(T, hp, args.probe)
    with torch.device("meta"):
        model = T.GPT(hp)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"clock model: PRESET={hp.preset}, {n_params:,} parameters, on {WORLD} x H100 (ESTIMATES: efficiencies "
          f"calibrated on {len(RECORDS)} records' logs, --calibration); documents: {source}; {probe_note}")
    flags, m = [], args.margin
    tr = our_train(T, hp, lengths, probed)
    lost = 1 - tr["steps"] / max(tr["steps_bare"], 1)
    v = "ok" if lost <= m else "OVER"
    over = "; ".join(f"{k} {x:.2f} ms/step" for k, x in tr["overheads"].items() if x) or "none counted"
    print(f"train: {tr['ms_unlooped']:.1f} ms/step unlooped, {tr['ms_looped']:.1f} looped (+{tr['ms_qat']:.1f} in QAT "
          f"steps); {tr['steps']:,} steps in {tr['budget']:.0f}s, {lost:.1%} fewer than the same recipe without our "
          f"overheads ({tr['steps_bare']:,}; in the whole {hp.max_wallclock_seconds:g}s, as the records' loops ran: "
          f"{tr['steps_whole']:,}) [{v}]\n  overheads: {over}; recompiles in the loop "
          f"{(probed or {}).get('recompiles_in_loop', 0)} x {RECOMPILE_S:.0f}s")
    if v != "ok":
        flags.append(f"train: our overheads cost {lost:.0%} of the steps (> {m:.0%}): {over}")
    sizes = export_groups(T, hp, model)
    kinds = sorted({"fp16" if g in T.FP16_GROUPS else g for g in sizes})
    size = predicted_bytes(T, hp, model) if not args.no_bytes else None
    ex = our_export(T, hp, model, sizes, codec_rates(T, kinds), size["refits"] if size else 0)
    v = verdict(ex["seconds"], hp.export_reserve_seconds, m)
    parts = ", ".join(f"{k} {x:.1f}" for k, x in ex["parts"].items())
    print(f"export: {ex['seconds']:.1f}s of EXPORT_RESERVE_SECONDS={hp.export_reserve_seconds:g} ({parts}; CODEC="
          f"{hp.codec}: {ex['jobs']} compression jobs) [{v}]")
    if v != "ok":
        flags.append(f"export: {ex['seconds']:.0f}s against EXPORT_RESERVE_SECONDS={hp.export_reserve_seconds:g}")
    flags += eval_lines(T, hp, lengths, m)
    if size:
        v = "ok" if size["total"] <= T.ARTIFACT_CAP_BYTES else "OVER"
        fit = f" after {size['refits']} QUANT_FIT re-export(s) (own spec {size['own']:,.0f})" if size["refits"] else ""
        print(f"bytes: {size['total']:,.0f} of {T.ARTIFACT_CAP_BYTES:,} predicted (Gaussian weights){fit} [{v}]")
        if v != "ok":
            flags.append(f"bytes: {size['total']:,.0f} over the {T.ARTIFACT_CAP_BYTES:,} cap")
    else:
        print("bytes: not predicted (--no-bytes)")
    for f in flags:
        print(f"OVER: {f}")
    print(f"clock model: {len(flags)} clock(s) over or inside the {m:.0%} margin" if flags else
          f"clock model: every clock fits with {m:.0%} to spare")
    return 1 if flags else 0


def eval_lines(T, hp, lengths: np.ndarray, margin: float) -> list[str]:
    ev, budget, flags = our_eval(T, hp, lengths), hp.eval_budget_seconds, []
    for name, s in ev["stages"].items():
        note = ""
        if name == "ttt" and ev["ttt"]:
            t = ev["ttt"]
            limit = min(ev["deadline"], hp.ttt_seconds)
            p = t["parts"]
            note = (f" ({t['phases']} phase(s): {t['pass_positions'] / 1e9:.2f}G token-positions a pass (8661491's "
                    f"plan: {t['pass_before'] / 1e9:.2f}G), {t['positions_busiest'] / 1e9:.3f}G "
                    f"forward-equivalents on the busiest rank; global passes {t['global_s']:.0f}s "
                    f"({t['global_steps']} steps); uncompiled: unfused traffic {p['eager']:.0f}s, launch-bound chunks "
                    f"{p['launch']:.0f}s a rank; adapting must end within min(TTT_SECONDS, what the budget leaves) = "
                    f"{limit:.0f}s; scoring plainly instead: {t['plain_s']:.0f}s)")
            v = verdict(s, limit, margin)
            note += f" [{v}]"
            if v != "ok":
                flags.append(f"eval ttt: adapting every document needs ~{s:.0f}s of {limit:.0f}s" + (
                    f": TTT would stop adapting after ~{limit / s:.0%} of its work and score the rest plainly"
                    if s > limit else f" (less than {margin:.0%} to spare)"))
        print(f"eval {name}: {s:.1f}s{note}")
    total = sum(ev["stages"].values())
    v = verdict(total, budget, margin)
    print(f"eval total: {total:.1f}s of EVAL_BUDGET_SECONDS={budget:g} ({1 - total / budget:.0%} to spare) [{v}]")
    if v != "ok":
        flags.append(f"eval: {total:.0f}s against EVAL_BUDGET_SECONDS={budget:g} (stages: "
                     + ", ".join(f"{k} {x:.0f}s" for k, x in ev["stages"].items()) + ")")
    return flags


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calibration", action="store_true", help="print the calibration table (records) and exit")
    p.add_argument("--fit", action="store_true", help="recompute the calibrated constants from the records' logs")
    p.add_argument("--probe", action="store_true", help="count graph breaks, recompiles and host syncs on CPU (~1 min)")
    p.add_argument("--margin", type=float, default=0.10, help="time a clock must keep to spare (default 0.10)")
    p.add_argument("--no-bytes", action="store_true", help="skip predict_size.py's byte prediction")
    p.add_argument("--script", type=Path, default=ROOT / "train_gpt.py", help="training script (default: the repo's)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 <= args.margin < 1:
        raise UserError(f"--margin {args.margin}: expected a fraction in [0, 1)")
    T = import_trainer(args.script)
    if args.fit:
        for k, v in fit_constants(T).items():
            print(f"{k} = {v:.4g}")
        return 0
    if args.calibration:
        worst = print_calibration(T)
        print(f"calibration: worst error {worst:.1%} (15% allowed)")
        return 0 if worst <= 0.15 else 1
    try:
        hp = T.load_hparams()
    except T.ConfigError as e:
        raise UserError(f"bad configuration: {e}") from None
    return report(T, hp, args)


if __name__ == "__main__":
    cli(main)
