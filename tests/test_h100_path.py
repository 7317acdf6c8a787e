"""The CUDA path's run-killers and slow-downs (issue 9), each reproduced on CPU: bf16 autocast on CPU stands in for
CUDA autocast, a recording flash_attn_func for flash-attn, a counting torch.compile backend for Inductor, the meta
device for a GPU (host-to-device copies), a fake process group for NCCL and skewed clocks for disagreeing ranks."""
import dataclasses
import functools
import itertools
import os
import socket
import subprocess
import sys
import threading
import time
import types
import warnings
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import train_gpt as T
from conftest import ROOT, tiny_env

SMALL = dict(MODEL_DIM=64, NUM_LAYERS=2, BIGRAM_DIM=16, VE_DIM=16, TRAIN_SEQ_LEN=64, EVAL_SEQ_LEN=64,
             TRAIN_BATCH_TOKENS=1024, VAL_BATCH_TOKENS=512, GPTQ_TOKENS=512, ITERATIONS=6, WARMDOWN_ITERS=4,
             WARMDOWN_FRAC=0)  # the step-count warmdown, not the tiny preset's fraction


def small_run(data, log_dir, **overrides) -> T.Run:
    """setup() of a 2-layer, width-64 tiny model (untrained) on the Brown data."""
    return T.setup(T.load_hparams(tiny_env(data, log_dir, **{**SMALL, **overrides})))


def bf16_autocast(monkeypatch):
    monkeypatch.setattr(T.Run, "autocast", lambda self: torch.autocast("cpu", dtype=torch.bfloat16))


class CountingCompile:
    """torch.compile with a backend that records each graph dynamo captures and runs it eagerly."""

    def __init__(self, monkeypatch):
        self.graphs, real = [], torch.compile
        monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, backend=self.backend, **kw))

    def backend(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def output_shapes(self, gm) -> list:
        out = next(n for n in gm.graph.nodes if n.op == "output")
        vals = torch.fx.node.map_arg(out.args[0], lambda n: n.meta.get("example_value"))
        return [tuple(v.shape) for v in torch.utils._pytree.tree_leaves(vals) if isinstance(v, torch.Tensor)]


# 1. GPTQ Hessians: float64 outside autocast; GPTQ never raises.


def test_hessians_are_float64_sums_outside_bf16_autocast(brown_data, tmp_path, monkeypatch):
    run = small_run(brown_data, tmp_path)
    bf16_autocast(monkeypatch)
    seen = []
    hook = run.model.blocks[1].mlp.down.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    hs = T.collect_hessians(run)
    hook.remove()
    assert seen and all(s.dtype == torch.bfloat16 for s in seen)  # autocast is on: the inputs are bf16
    x = torch.cat([s.reshape(-1, s.size(-1)) for s in seen]).double()
    H = hs["blocks.1.mlp.down"]
    assert H.dtype == torch.float64
    assert torch.allclose(H, x.T @ x, rtol=1e-12, atol=1e-9)
    assert (torch.linalg.eigvalsh(H) > -1e-9 * H.diagonal().max()).all()  # positive semi-definite


def test_gptq_falls_back_instead_of_raising():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(32, 48, generator=gen)
    hp = T.load_hparams({})
    f = T.parse_fmt("int5")
    plain = T.quantize(w, f)
    a = torch.randn(48, 48, generator=gen, dtype=torch.float64)
    for H, expect in ((-torch.eye(48, dtype=torch.float64), "plain rounding"),  # never positive definite
                      (a @ a.T - 0.02 * torch.eye(48, dtype=torch.float64) * (a @ a.T).diagonal().mean(), "damping 0.1"),
                      (torch.full((48, 48), float("nan"), dtype=torch.float64), "plain rounding")):
        parts, notes = T.quantize(w, f, H, hp), []  # does not raise
        assert torch.equal(T.quantize(w, f, H, hp, notes)[0], parts[0])
        assert notes and notes[0].startswith(expect), notes
        if expect == "plain rounding":
            assert torch.equal(parts[0], plain[0])
    notes = []
    T.quantize(w, f, a @ a.T, hp, notes)
    assert notes == []  # a healthy Hessian takes GPTQ_DAMP silently


def test_export_with_a_broken_hessian_still_writes_the_artifact(brown_data, tmp_path):
    run = small_run(brown_data, tmp_path)
    hs = {n: torch.eye(m.in_features, dtype=torch.float64) for n, m in run.model.named_modules()
          if isinstance(m, T.CastedLinear)}
    hs["blocks.0.attn.q"] = -hs["blocks.0.attn.q"]
    rep = T.export_artifact(run.model, run.hp, tmp_path / "a.artifact", hs)
    assert rep["gptq_fallbacks"] == {"blocks.0.attn.q.weight": "plain rounding (Hessian not positive definite)"}
    assert set(T.load_artifact(tmp_path / "a.artifact")) == set(run.model.state_dict())


# 2. flash-attn is taken under autocast.


def test_flash_attn_is_called_under_bf16_autocast(brown_data, tmp_path, monkeypatch):
    run = small_run(brown_data, tmp_path, NUM_HEADS=4, NUM_KV_HEADS=2)
    calls = []

    def flash(q, k, v, causal):  # the flash-attn layout (B, T, H, D), GQA by fewer k/v heads
        calls.append((q.dtype, k.dtype, v.dtype, q.shape, k.shape, causal))
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                           enable_gqa=True)
        return y.transpose(1, 2)

    monkeypatch.setattr(T, "flash_attn_func", flash)
    x = torch.from_numpy(run.val_tokens[:2 * 64].astype(np.int64)).view(2, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run.model(x)
    assert len(calls) == run.hp.num_layers
    assert all(c[:3] == (torch.bfloat16,) * 3 and c[3][2] == 4 and c[4][2] == 2 and c[5] for c in calls)
    for m in run.model.modules():
        if isinstance(m, T.Attention):
            m.kernel = "sdpa"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = run.model(x)
    assert len(calls) == run.hp.num_layers  # ATTN_KERNEL=sdpa never calls it
    assert torch.allclose(out, ref)
    assert not T.use_flash("auto", torch.float32)  # CPU fp32 runs take SDPA


# 3 and 5b. QAT's graph is compiled in warm-up, not in the timed loop; the loss is computed inside the graph.


def test_compiled_training_compiles_nothing_in_the_loop_and_returns_per_token_loss(brown_data, tmp_path, monkeypatch):
    counter = CountingCompile(monkeypatch)
    run = small_run(brown_data, tmp_path, COMPILE=1, WARMUP_STEPS=4, ITERATIONS=6, WARMDOWN_ITERS=4,
                    QAT_THRESHOLD=0.6, LR_WARMUP_STEPS=0)
    T.train(run)
    assert run.results["qat_stages"] and run.results["qat_stages"][0][0] > 1  # QAT switched on inside the loop
    assert run.results["recompiles_in_loop"] == 0
    assert len(counter.graphs) == 2  # without and with QAT, both in warm-up
    V = run.hp.vocab_size
    for gm in counter.graphs:  # the graph ends in per-token losses (B, T): no (B, T, V) logits leave it
        shapes = counter.output_shapes(gm)
        assert (2, 64) in shapes and not any(V in s for s in shapes), shapes  # 1024 tokens / grad_accum 8


class CrossDeviceCopies(TorchDispatchMode):
    """Records every copy of a CPU tensor onto another device."""

    def __init__(self):
        super().__init__()
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            src = args[0] if func is torch.ops.aten._to_copy.default else args[1]
            dst = kwargs.get("device") if func is torch.ops.aten._to_copy.default else args[0].device
            self.copies += isinstance(src, torch.Tensor) and src.device.type == "cpu" and dst is not None and \
                torch.device(dst).type != "cpu"
        return func(*args, **kwargs)


def test_qat_refresh_makes_no_host_to_device_copy_per_matrix(brown_data, tmp_path):
    run = small_run(brown_data, tmp_path)
    run.model = run.model.to("meta")  # the meta device stands in for the GPU: a CPU constant must be copied to it
    T.on_train_step(run, 100, 0.0)  # QAT switches on
    assert sum(getattr(m, "qat", None) is not None for m in run.model.modules()) >= 12
    with CrossDeviceCopies() as mode:
        T.on_train_step(run, 101, 0.0)  # a step's refresh
    assert mode.copies == 0


# 4. The ranks decide together which evaluation stages run.


def _skewed_clock_worker(rank, port, model, hp, luts, val, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=600))
    if rank == 1:  # this rank's clock runs a million times fast: no later stage fits its budget
        real = time.perf_counter
        T.time.perf_counter = lambda: real() * 1e6
    run = T.Run(hp, torch.device("cpu"), rank, 2, model=model, luts=luts, val_tokens=val, results=dict(stages={}))
    stages = T.evaluate(run)["stages"]
    torch.save({k: v["val_loss"] for k, v in stages.items()}, f"{out}.{rank}")
    dist.barrier()  # no rank tears gloo down while its peer still talks to it (an intermittent SIGABRT)
    dist.destroy_process_group()


def spawn_two(worker, args: tuple, where: str):
    """worker(rank, port, *args) on two gloo ranks; the test fails if they deadlock."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.spawn(worker, nprocs=2, join=False, args=(port, *args))
    deadline = time.time() + 900  # a deadlock, not a slow machine
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"ranks deadlocked {where}")


def test_ranks_with_disagreeing_clocks_run_the_same_stages(brown_data, tmp_path):
    run = small_run(brown_data, tmp_path, TTT_CHUNK_TOKENS=64)
    spawn_two(_skewed_clock_worker, (run.model, run.hp, run.luts, run.val_tokens[:2049], str(tmp_path / "stages")),
              "in evaluation")
    a, b = (torch.load(tmp_path / f"stages.{r}") for r in (0, 1))
    assert a == b and list(a) == ["roundtrip"]


# 5a, c, d, e. Compiled fixed-shape evaluation, overlapped bf16 Muon reduction, shard prefetch, no DDP buffers.


def test_evaluation_model_is_compiled_with_one_batch_shape(brown_data, tmp_path, monkeypatch):
    counter = CountingCompile(monkeypatch)
    run = small_run(brown_data, tmp_path, COMPILE=1, GPTQ=0, EVAL_BATCH_SEQS=3)
    run.results.update(T.export(run))
    r = dataclasses.replace(run, val_tokens=run.val_tokens[:7 * 64 + 1])  # 7 sequences: batches of 3, 3, 1
    T.eval_plain(r, r.eval_model)
    T.eval_sliding(r, r.eval_model, torch.from_numpy(r.val_tokens.astype(np.int64)))
    assert len(counter.graphs) == 1
    assert T.eval_plain(r, r.eval_model) == pytest.approx(T.eval_plain(r, r.model), rel=1e-6)
    stages = T.evaluate(dataclasses.replace(r, hp=dataclasses.replace(r.hp, ttt_enabled=False, ngram_order=0)))["stages"]
    assert list(stages) == ["roundtrip", "sliding"] and len(counter.graphs) == 1


class FakeWork:
    def __init__(self, log, i):
        self.log, self.i = log, i

    def wait(self):
        self.log.append(("wait", self.i))


def test_muon_reduces_bf16_buckets_asynchronously(monkeypatch):
    log = []

    def all_reduce(t, op=None, async_op=False):
        log.append(("reduce", t.dtype, async_op))
        return FakeWork(log, len(log)) if async_op else None

    for name, fn in (("is_initialized", lambda: True), ("get_world_size", lambda: 2), ("get_rank", lambda: 0),
                     ("all_reduce", all_reduce)):
        monkeypatch.setattr(T.dist, name, fn)
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(16, 8, generator=gen)) for _ in range(5)]
    for p in params:
        p.grad = torch.randn(16, 8, generator=gen)
    T.Muon(params, lr=0.1, momentum=0.9, backend_steps=5, comm_dtype=torch.bfloat16).step()
    reduces = [e for e in log if e[0] == "reduce"]
    assert reduces == [("reduce", torch.bfloat16, True)] * 3  # buckets of 2, 2, 1 matrices
    assert [e[0] for e in log] == ["reduce"] * 3 + ["wait"] * 3  # every reduction is in flight before the first wait


def test_next_shard_loads_in_the_background(tmp_path, monkeypatch):
    for i in range(2):
        header = np.zeros(T.HEADER_INTS, dtype="<i4")
        header[:3] = T.SHARD_MAGIC, T.SHARD_VERSION, 1000
        (tmp_path / f"fineweb_train_{i:06d}.bin").write_bytes(header.tobytes() + np.full(1000, i, "<u2").tobytes())
    loads, real = [], T.load_data_shard
    monkeypatch.setattr(T, "load_data_shard", lambda p: loads.append(
        (os.path.basename(p), threading.current_thread() is threading.main_thread())) or real(p))
    stream, t0 = T.TokenStream(str(tmp_path / "fineweb_train_*.bin")), time.time()
    while len(loads) < 2 and time.time() < t0 + 300:  # shard 1 loads before anything asks for it
        time.sleep(0.01)
    assert loads == [("fineweb_train_000000.bin", True), ("fineweb_train_000001.bin", False)]
    assert np.array_equal(stream.take(1500), np.repeat([0, 1], [1000, 500]))


def test_model_has_no_buffers_for_ddp_to_broadcast():
    model = T.GPT(T.load_hparams({"PRESET": "tiny"}))
    assert list(model.buffers()) == []


# 6. GPTQ_TOKENS is honoured.


def test_gptq_uses_gptq_tokens(brown_data, tmp_path):
    run = small_run(brown_data, tmp_path, GPTQ_TOKENS=3 * 64, TRAIN_BATCH_TOKENS=8192)
    rows = []
    hook = run.model.blocks[0].attn.q.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[:2]))
    T.collect_hessians(run)
    hook.remove()
    assert sum(b * t for b, t in rows) == 3 * 64
    assert run.results["gptq_tokens_used"] == 3 * 64


# 7. Export is train time.


def test_export_is_counted_as_train_time(brown_data, tmp_path):
    run = small_run(brown_data, tmp_path, MAX_WALLCLOCK_SECONDS=1e-3, EXPORT_RESERVE_SECONDS=0)
    run.results.update(train_loop_seconds=0.5, checkpoint_seconds=0.25)
    run.results.update(T.export(run))
    r = run.results
    assert r["export_seconds"] >= r["gptq_calib_seconds"] + r["quant"]["seconds"] > 0
    assert r["train_seconds"] == pytest.approx(0.75 + r["export_seconds"], abs=2e-3)
    assert r["within_wallclock"] is False
    assert "set EXPORT_RESERVE_SECONDS to at least" in (tmp_path / "test.txt").read_text()


# 8. Nothing of a finished training is lost; what the run needs is checked before training.


def test_checkpoint_round_trips_exactly_and_refuses_corruption(brown_data, tmp_path):
    run = small_run(brown_data, tmp_path)
    run.results.update(steps=6, train_loop_seconds=1.5)
    T.save_checkpoint(run)
    path = tmp_path / "test.ckpt"
    header, state = T.read_checkpoint(path)
    assert header["config"] == dataclasses.asdict(run.hp) and header["results"]["steps"] == 6
    assert state.keys() == run.model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in run.model.state_dict().items())
    hp = T.load_hparams({"RESUME_FROM": str(path), "EVAL_STRIDE": "32"})  # the checkpoint's configuration
    assert hp.model_dim == 64 and hp.num_layers == 2 and hp.eval_stride == 32 and hp.resume_from == str(path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(T.ConfigError, match="checksum"):
        T.read_checkpoint(path)


def run_without(module: str, tmp_path, brown_data, **env):
    """train_gpt.py as a fresh process in which `module` cannot be imported."""
    code = f"import sys; sys.modules[{module!r}] = None; sys.argv = ['train_gpt.py']; import runpy; " \
           f"runpy.run_path({str(ROOT / 'train_gpt.py')!r}, run_name='__main__')"
    full = {**os.environ, **tiny_env(brown_data, tmp_path, **{**SMALL, "ITERATIONS": 2, "VAL_MAX_TOKENS": 2049,
                                                              "TTT_ENABLED": 0, "NGRAM_ORDER": 0}, **env)}
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=600)


def test_missing_codec_is_found_before_training(brown_data, tmp_path):
    proc = run_without("brotli", tmp_path, brown_data, CODEC="brotli")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == ["error: CODEC=brotli: module brotli is not installed; "
                                                "pip install brotli or set CODEC=auto"]
    assert not (tmp_path / "test.txt").exists()  # refused before anything is written
    proc = run_without("brotli", tmp_path, brown_data, CODEC="auto", RUN_ID="auto")
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = (tmp_path / "auto.txt").read_text()
    assert "codecs brotli not installed" in log and "brotli/" not in log


def test_flash_required_without_flash_attn_is_a_startup_error(brown_data, tmp_path):
    with pytest.raises(T.ConfigError, match="ATTN_KERNEL=flash: flash-attn is not importable"):
        small_run(brown_data, tmp_path, ATTN_KERNEL="flash")


def test_too_little_disk_is_a_startup_error(brown_data, tmp_path, monkeypatch):
    monkeypatch.setattr(T.shutil, "disk_usage", lambda p: type("Usage", (), dict(free=10**6))())
    with pytest.raises(T.ConfigError, match="bytes free, the checkpoint and artifact need"):
        small_run(brown_data, tmp_path)


def test_looping_switches_on_in_the_loop_with_its_graph_primed(brown_data, tmp_path, monkeypatch):
    counter = CountingCompile(monkeypatch)
    run = small_run(brown_data, tmp_path, COMPILE=1, WARMUP_STEPS=6, ITERATIONS=6, WARMDOWN_ITERS=4,
                    QAT_THRESHOLD=0.6, LR_WARMUP_STEPS=0, LOOP_LAYERS="1-1", LOOP_COUNT=2, LOOP_START=0.5)
    T.train(run)
    assert run.results["looping_from_step"] == 4 and run.model.looping
    assert run.results["recompiles_in_loop"] == 0 and len(counter.graphs) == 3  # plain, looped, looped + QAT


# 9. Issue 23: whole compiled graphs with DOC_MASK and the loop switch, Newton-Schulz compiled on CUDA, no per-step
# device read for the cap, no deprecated DDP argument.


def within_pieces(q, k, v, cu):
    """Causal attention of (N, H, D) tokens within the pieces cu_seqlens cuts them into, written in torch."""
    n = q.size(0)
    piece = torch.searchsorted(cu, torch.arange(n, dtype=cu.dtype, device=q.device), right=True)
    mask = (piece[:, None] == piece[None, :]) & torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    y = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), attn_mask=mask, enable_gqa=True)
    return y[0].transpose(0, 1).contiguous()


@torch.library.custom_op("pgtest::flash_varlen", mutates_args=())
def flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_seqlen: int) -> torch.Tensor:
    """A stand-in for flash-attn's varlen kernel as flash-attn registers it: an opaque operator in the graph."""
    return within_pieces(q, k, v, cu)


flash_varlen.register_fake(lambda q, k, v, cu, max_seqlen: torch.empty_like(q))


def _varlen_grad(ctx, g):
    with torch.enable_grad():
        qkv = [t.detach().requires_grad_() for t in ctx.saved_tensors[:3]]
        return (*torch.autograd.grad(within_pieces(*qkv, ctx.saved_tensors[3]), qkv, g), None, None)


flash_varlen.register_autograd(_varlen_grad, setup_context=lambda ctx, inputs, output: ctx.save_for_backward(*inputs[:4]))


def fake_flash(monkeypatch, calls: list | None = None):
    """flash-attn's two entry points: the dense one as SDPA, varlen as the flash_varlen operator (calls: each varlen
    call's (cu_seqlens dtype, length, max_seqlen), recorded in eager runs only)."""
    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal):
        assert cu_q is cu_k and max_q == max_k and causal
        if calls is not None:
            calls.append((cu_q.dtype, cu_q.numel(), max_q))
        return flash_varlen(q, k, v, cu_q, max_q)

    monkeypatch.setattr(T, "flash_attn_func", lambda q, k, v, causal: F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, enable_gqa=True).transpose(1, 2))
    monkeypatch.setattr(T, "flash_attn_varlen_func", varlen)


def varlen_calls(gm) -> list[tuple]:
    """(cu_seqlens shape, max_seqlen) of each flash_varlen call in a captured graph."""
    return [(tuple(n.args[3].meta["example_value"].shape), n.args[4]) for n in gm.graph.nodes
            if n.op == "call_function" and n.target in (flash_varlen, torch.ops.pgtest.flash_varlen,
                                                        torch.ops.pgtest.flash_varlen.default)]


def test_doc_spans_cut_each_row_at_its_bos_tokens_in_one_shape():
    idx = torch.full((2, 128), 7)
    idx[0, [0, 50, 51]] = idx[1, 100] = T.BOS_ID
    docs, cu = T.doc_spans(idx)  # K = 128 // 64 + 1 = 3 pieces per row
    assert torch.equal(docs, torch.cumsum(idx == T.BOS_ID, 1))
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 50, 51, 128, 228, 256, 256]  # row 1's third piece empty
    idx[0, ::16] = T.BOS_ID  # 8 documents in row 0: the last 6 stay in its third piece, rows are never joined
    assert T.doc_spans(idx)[1].tolist() == [0, 16, 32, 128, 228, 256, 256]


def test_flash_varlen_doc_mask_matches_the_sdpa_mask(monkeypatch):
    calls = []
    fake_flash(monkeypatch, calls)
    torch.manual_seed(0)
    model = T.GPT(T.load_hparams({"PRESET": "frontier", "SHAPE": "tiny", "MODEL_DIM": "64", "NUM_HEADS": "4"}))
    with torch.no_grad():  # zero-initialized projections would hide the attention
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randint(4, 1024, (3, 128), generator=torch.Generator().manual_seed(1))
    x[0, [0, 40, 90]] = x[1, 64] = x[2, 127] = T.BOS_ID

    def logits(kernel: str, doc_mask: bool) -> torch.Tensor:
        for m in model.modules():
            if isinstance(m, T.Attention):
                m.kernel = kernel
        model.hp.doc_mask = doc_mask
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x).float()

    flash, sdpa = logits("auto", True), logits("sdpa", True)
    assert calls and set(calls) == {(torch.int32, 3 * 3 + 1, 128)}
    assert (flash - sdpa).abs().max() < 0.05
    assert (logits("auto", False) - sdpa).abs().max() > 0.5  # without the mask the documents see each other


def test_frontier_tiny_trains_and_evaluates_in_whole_graphs_with_doc_mask_and_loop_switch(brown_data, tmp_path,
                                                                                          monkeypatch):
    """PRESET=frontier SHAPE=tiny compiled on the flash-attn path (bf16 autocast, a stand-in operator for its varlen
    kernel): DOC_MASK and the loop switch mid-run; warm-up primes both graphs, 20 timed steps compile none, nothing
    breaks a graph; then the compiled evaluation model (FixedBatch) compiles one graph, unbroken."""
    counter = CountingCompile(monkeypatch)
    fake_flash(monkeypatch)
    bf16_autocast(monkeypatch)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    env = dict(PRESET="frontier", SHAPE="tiny", DATA_PATH=str(brown_data), LOG_DIR=str(tmp_path), RUN_ID="test",
               COMPILE="1", WARMUP_STEPS="2", ITERATIONS="20", TRAIN_BATCH_TOKENS="1024", GRAD_ACCUM_STEPS="1",
               TRAIN_LOG_EVERY="20", GPTQ="0", EVAL_BATCH_SEQS="4")
    run = T.setup(T.load_hparams(env))
    assert run.hp.doc_mask and run.model.loop and not run.model.looping and run.hp.max_wallclock_seconds == 0
    assert run.hp.qat_threshold == 0  # the preset trains without QAT: no QAT graph to prime
    T.train(run)
    assert run.results["steps"] == 20 and run.results["looping_from_step"] == 8  # LOOP_START 0.35 of 20 steps
    assert run.results["recompiles_in_loop"] == 0
    assert len(counter.graphs) == 2 and not torch._dynamo.utils.counters["graph_break"]  # plain and looped, whole
    call = ((4 * (256 // T.DOC_MIN_TOKENS + 1) + 1,), 256)  # 4 rows of 256 tokens; max_seqlen a constant
    assert [varlen_calls(gm) for gm in counter.graphs] == [[call] * 4, [call] * 8]  # every attention in the graph
    run.results.update(T.export(run))
    r = dataclasses.replace(run, val_tokens=run.val_tokens[:9 * 256 + 1])  # 9 windows: batches of 4, 4, 1 (padded)
    T.eval_plain(r, r.eval_model)
    T.eval_sliding(r, r.eval_model, torch.from_numpy(r.val_tokens.astype(np.int64)))
    assert len(counter.graphs) == 3 and not torch._dynamo.utils.counters["graph_break"]
    assert varlen_calls(counter.graphs[2]) == [call] * 8


def test_newton_schulz_compiles_once_per_matrix_shape_and_computes_the_same(brown_data, tmp_path, monkeypatch):
    counter = CountingCompile(monkeypatch)
    torch._dynamo.reset()
    shapes = [(16, 8), (8, 16), (16, 8), (12, 12)]
    a, b = ([torch.nn.Parameter(torch.randn(*s, generator=torch.Generator().manual_seed(i)))
             for i, s in enumerate(shapes)] for _ in range(2))
    compiled = T.Muon(a, lr=0.1, momentum=0.9, backend_steps=5, polar=True, compile=True)
    eager = T.Muon(b, lr=0.1, momentum=0.9, backend_steps=5, polar=True)
    gen = torch.Generator().manual_seed(7)
    for step in range(2):
        for pa, pb in zip(a, b):
            pa.grad = torch.randn(pa.shape, generator=gen)
            pb.grad = pa.grad.clone()
        compiled.step()
        eager.step()
        assert len(counter.graphs) == 3  # one graph per shape, all in the first step
    assert all(torch.equal(pa, pb) for pa, pb in zip(a, b))
    run = small_run(brown_data, tmp_path, COMPILE=1)
    assert T.build_optimizers(run)[1].orthogonalize is T.zeropower_via_newtonschulz5  # compiled on CUDA only


def _capped_worker(rank, port, env, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    if rank == 1:  # this rank's clock (train_gpt's alone) moves a second per reading: LOOP_START and the cap come
        clock = itertools.count()  # within a few steps; rank 0's, real, never reaches them
        T.time = types.SimpleNamespace(strftime=time.strftime, sleep=time.sleep, perf_counter=lambda: float(next(clock)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = T.setup(T.load_hparams(env))
        T.train(run)
    torch.save(dict(steps=run.results["steps"], loop=run.results.get("looping_from_step"),
                    warnings=[str(w.message) for w in caught]), f"{out}.{rank}")
    dist.barrier()  # no rank tears gloo down while its peer still talks to it
    dist.destroy_process_group()


def test_ranks_with_skewed_clocks_stop_and_loop_on_the_same_step(brown_data, tmp_path):
    env = tiny_env(brown_data, tmp_path, **{**SMALL, "ITERATIONS": 50, "MAX_WALLCLOCK_SECONDS": 10,
                                            "EXPORT_RESERVE_SECONDS": 0, "LOOP_LAYERS": "1-1", "LOOP_COUNT": 2,
                                            "LOOP_START": 0.3})
    spawn_two(_capped_worker, (env, str(tmp_path / "capped")), "in training: they stopped on different steps")
    a, b = (torch.load(tmp_path / f"capped.{r}") for r in (0, 1))
    assert (a["steps"], a["loop"]) == (b["steps"], b["loop"]) and 2 < a["loop"] <= a["steps"] < 50, (a, b)
    assert (tmp_path / "test.txt").read_text().count("loop: from step") == 1  # switched on once
    assert not [w for w in a["warnings"] + b["warnings"] if "broadcast_buffers" in w]  # deprecated in torch 2.13
