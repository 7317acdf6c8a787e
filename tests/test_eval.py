"""Evaluation: sliding windows, the causal n-gram, score-first TTT, the stage budget, and the audit catching leaks."""
import copy
import dataclasses
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import train_gpt as T


def sub_run(run, n_tokens, **hp):
    """A copy of the run that sees the first n_tokens of the split, with hyperparameters replaced."""
    return dataclasses.replace(run, hp=dataclasses.replace(run.hp, **hp), val_tokens=run.val_tokens[:n_tokens],
                               results=dict(stages={}))


def stream(run):
    return torch.from_numpy(run.val_tokens.astype(np.int64))


def record_scored(monkeypatch) -> list:
    """Make window_logprobs log the target indices it scores."""
    seen, real = [], T.window_logprobs

    def spy(model, toks, first, ends, W):
        seen.extend(np.concatenate([np.arange(f, e) for f, e in zip(first, ends)]).tolist())
        return real(model, toks, first, ends, W)
    monkeypatch.setattr(T, "window_logprobs", spy)
    return seen


def brute_counts(toks, t, n):
    """(contexts, pairs, distinct continuations) of order n at position t, recounted from the prefix."""
    occ = [s for s in range(n - 1, t) if toks[s - n + 1:s] == toks[t - n + 1:t]] if t >= n - 1 else []
    return len(occ), sum(toks[s] == toks[t] for s in occ), len({toks[s] for s in occ})


@pytest.mark.parametrize("n,seq_len,stride", [(1000, 256, 64), (1024, 256, 256), (1023, 256, 100), (100, 256, 64),
                                              (257, 256, 1), (5000, 128, 300), (1000, 256, 512)])
def test_sliding_plan_scores_every_target_once_with_full_windows(n, seq_len, stride):
    W, first, ends = T.sliding_plan(n, seq_len, stride)
    assert W == min(seq_len, n)
    assert np.array_equal(np.concatenate([np.arange(f, e) for f, e in zip(first, ends)]), np.arange(n))
    assert first[0] == 0 and ends[0] == W and (ends - W >= 0).all() and (first >= ends - W).all()
    assert (ends > first).all()
    assert (ends[1:] - first[1:] <= min(stride, W)).all()


def test_plain_eval_scores_the_whole_windows_without_overlap(tiny_run):
    L = tiny_run.hp.eval_seq_len
    r = sub_run(tiny_run, 8 * L + 50)  # 8 whole windows and a tail of 49 targets that plain evaluation leaves out
    toks = stream(r)
    stats = T.plain_windows(r, r.model, toks)
    with torch.no_grad():
        nll = T.token_nll(r.model(toks[:8 * L].view(8, L)), toks[1:8 * L + 1].view(8, L)).flatten()
    assert stats.shape == (2, 8 * L) and torch.allclose(stats[0], nll, atol=1e-5)
    loss, bpb = T.eval_plain(r, r.model)
    n_bytes = T.count_bytes(r.val_tokens[:8 * L], r.val_tokens[1:8 * L + 1], r.luts)
    assert loss == pytest.approx(float(nll.double().mean()), rel=1e-6)
    assert bpb == pytest.approx(loss / np.log(2) * 8 * L / n_bytes, rel=1e-9)


def test_sliding_counts_every_token_and_byte_once_and_beats_plain(tiny_run, monkeypatch):
    r = sub_run(tiny_run, 3001, eval_batch_seqs=7)
    toks, M = stream(r), 3000
    seen = record_scored(monkeypatch)
    for world in (1, 3):  # each rank's share, as the ranks of a world of 3 would score them
        seen.clear()
        plan = T.sliding_plan(M, r.hp.eval_seq_len, r.hp.eval_stride)
        for rank in range(world):
            T.score_windows(dataclasses.replace(r, rank=rank, world_size=world), r.model, toks, plan, 0,
                            len(plan[2]), torch.zeros(2, M))
        idx = np.array(seen)
        assert np.array_equal(np.sort(idx), np.arange(M)) and np.array_equal(idx, np.arange(M))
        assert T.count_bytes(r.val_tokens[idx], r.val_tokens[idx + 1], r.luts) == \
            T.count_bytes(r.val_tokens[:-1], r.val_tokens[1:], r.luts)
    stats = T.eval_sliding(r, r.model, toks)
    plain = T.eval_sliding(r, r.model, toks, stride=r.hp.eval_seq_len)
    assert (stats[0] > 0).all() and stats[0].mean() < plain[0].mean()


def test_ngram_counts_equal_brute_force_prefix_counts():
    gen = np.random.default_rng(0)
    for vocab in (2, 5, 50):
        toks = gen.integers(0, vocab, 400)
        counts, match = T.ngram_counts(torch.from_numpy(toks), 6)
        tl = toks.tolist()
        for t in range(400):
            for n in range(1, 7):
                assert tuple(int(x[t]) for x in counts[n - 1]) == brute_counts(tl, t, n), (vocab, t, n)
            longest = max([n for n in range(1, 7) if brute_counts(tl, t, n)[0]], default=0)
            assert int(match[t]) == longest


def test_ngram_distribution_sums_to_one_over_the_vocabulary(tiny_run):
    toks, V = stream(tiny_run)[:301], tiny_run.hp.vocab_size
    for t in (1, 150, 300):
        subst, p = toks.clone(), []
        for v in range(V):
            subst[t] = v
            p.append(T.ngram_prob(T.ngram_counts(subst, 7)[0], 0.75, V)[t])
        assert float(torch.stack(p).sum()) == pytest.approx(1.0, abs=1e-12)


def test_mix_is_normalized():
    gen = torch.Generator().manual_seed(0)
    lp = torch.randn(1024, generator=gen, dtype=torch.float64).log_softmax(0)
    p_ng = torch.rand(1024, generator=gen, dtype=torch.float64)
    p_ng /= p_ng.sum()
    for z in (-3.0, 0.0, 2.5):
        z = torch.tensor(z, dtype=torch.float64)
        assert float(torch.exp(-T.mix_nll(-lp, p_ng, z)).sum()) == pytest.approx(1.0, abs=1e-12)


def test_online_fit_uses_only_earlier_targets():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(5000, generator=gen, dtype=torch.float64)
    fit = lambda data: T.fit_online(lambda th, i: (data[i] - th[..., 0]) ** 2, 5000,  # noqa: E731
                                    torch.zeros(1, dtype=torch.float64))
    a, y = fit(x), x.clone()
    y[3000:] = 10
    b = fit(y)
    assert torch.equal(a[:4096], b[:4096]) and not torch.equal(a[4096:], b[4096:])
    assert a[1500, 0] == pytest.approx(float(x[:1024].mean()), abs=1e-6)  # block [1024, 2048): fitted on < 1024


def test_ngram_stage_gains_on_brown(tiny_run):
    r = sub_run(tiny_run, 12001)
    toks = stream(r)
    stats = T.eval_sliding(r, r.model, toks)
    nll = T.ngram_nll(r.hp, toks, stats)[0]
    assert torch.isfinite(nll).all() and nll.mean() < stats[0].double().mean()


def test_audit_passes_on_the_real_code(tiny_run):
    res = T.audit(sub_run(tiny_run, None), tiny_run.model, n_pos=1)
    assert res["passed"], res
    assert {"norm_model", "norm_ngram", "norm_mix", "causal_model_row", "causal_sliding", "causal_ttt",
            "causal_ngram", "prefix_counts", "ttt_weights"} <= set(res["checks"])


def test_audit_passes_with_lora_ttt(tiny_run):
    res = T.audit(sub_run(tiny_run, None, ttt_mode="lora"), tiny_run.model, n_pos=1)
    assert res["passed"] and "norm_mix" in res["checks"], res


def test_audit_fails_on_a_full_rescore_ngram_cache(tiny_run, monkeypatch):
    """Seed 001's leak: counts from a table of every validation token, then every token rescored against it."""
    real = T.ngram_counts

    def leaky(toks, order):  # counts at t in the second copy have seen the whole stream
        counts, match = real(torch.cat((toks, toks)), order)
        n = toks.numel()
        return [tuple(x[n:] for x in c) for c in counts], match[n:]
    monkeypatch.setattr(T, "ngram_counts", leaky)
    res = T.audit(sub_run(tiny_run, None, ttt_enabled=False), tiny_run.model, n_pos=1)
    assert not res["passed"]
    assert res["checks"]["norm_ngram"] > 1e-3 and res["checks"]["prefix_counts"] > 0
    assert res["checks"]["causal_ngram"] > 1e-5


class Peeking(nn.Module):
    """A model that looks at the token it is asked to predict."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx):
        return self.model(idx) + 5.0 * F.one_hot(idx.roll(-1, 1), self.model.hp.vocab_size).float()


def test_audit_catches_a_future_peeking_model(tiny_run):
    res = T.audit(sub_run(tiny_run, None, ttt_enabled=False, ngram_order=0), Peeking(tiny_run.model), n_pos=1)
    assert not res["passed"] and res["checks"]["causal_model_row"] > 1e-3


def observing(r, ledger: list):
    """r with the audit's hook: every (kind, key, value) the TTT loops report lands in ledger."""
    return dataclasses.replace(r, observe=lambda *entry: ledger.append(entry))


def test_ttt_scores_once_and_chunk_weights_ignore_the_chunk(tiny_run, monkeypatch):
    r = sub_run(tiny_run, 2049, ttt_mode="full", ttt_chunk_tokens=512, ttt_lr=0.01)
    toks, M = stream(r), 2048
    seen = record_scored(monkeypatch)
    ledger = []
    a = T.eval_ttt(observing(r, ledger), r.model, toks)
    assert sorted(seen) == list(range(M)) and (a[0] > 0).all()
    scored = {key: cs for kind, key, cs in ledger if kind == "score"}
    adapted = {key: cs for kind, key, cs in ledger if kind == "adapt"}
    assert len(scored) == 4 and all(cs == adapted[(0, c - 1)] for (_, c), cs in scored.items())
    assert len(set(scored.values())) == 4  # the weights did change between chunks
    _, first, ends = T.sliding_plan(M, r.hp.eval_seq_len, r.hp.eval_stride)
    lo, hi = first[16], ends[23]  # chunk 2 (8 windows per chunk)
    pert = toks.clone()
    pert[lo + 1:hi + 1] = torch.randint(r.hp.vocab_size, (hi - lo,), generator=torch.Generator().manual_seed(1))
    ledger2 = []
    b = T.eval_ttt(observing(r, ledger2), r.model, pert)
    scored2 = {key: cs for kind, key, cs in ledger2 if kind == "score"}
    assert all(scored2[(0, c)] == scored[(0, c)] for c in (0, 1, 2)) and scored2[(0, 3)] != scored[(0, 3)]
    assert torch.equal(a[:, :lo], b[:, :lo])
    assert torch.equal(r.model.state_dict()["tok_emb.weight"], tiny_run.model.state_dict()["tok_emb.weight"])


@pytest.mark.parametrize("optimizer,blocks", [("adamw", 1), ("sgd", 2), ("adamw", 0)])
def test_ttt_scope_trains_only_the_named_blocks(tiny_run, monkeypatch, optimizer, blocks):
    """TTT_BLOCKS=N: full TTT changes the last N blocks' weights and nothing else (0: every weight), with the
    TTT_OPTIMIZER asked for."""
    r = sub_run(tiny_run, 2049, ttt_mode="full", ttt_chunk_tokens=512, ttt_lr=0.01, ttt_optimizer=optimizer,
                ttt_blocks=blocks)
    seen, real = {}, T.adapt_full

    def spy(run, model, opt, span, lr):
        seen.update(model=model, opt=opt)
        return real(run, model, opt, span, lr)
    monkeypatch.setattr(T, "adapt_full", spy)
    T.eval_ttt(r, r.model, stream(r))
    assert type(seen["opt"]) is {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[optimizer]
    before, after = r.model.state_dict(), seen["model"].state_dict()
    n = r.hp.num_layers
    named = {k for k in before if blocks and any(k.startswith(f"blocks.{i}.") for i in range(n - blocks, n))}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == named if blocks else len(changed) > len(before) // 2, sorted(changed)
    assert all(any(k.startswith(f"blocks.{i}.") and k in changed for k in before) for i in range(n - blocks, n))


def test_ttt_with_zero_lr_is_sliding_eval(tiny_run):
    r = sub_run(tiny_run, 2049, ttt_mode="full", ttt_chunk_tokens=512, ttt_lr=0.0)
    assert torch.allclose(T.eval_ttt(r, r.model, stream(r)), T.eval_sliding(r, r.model, stream(r)), atol=1e-5)


def test_lora_ttt_scores_every_target_once(tiny_run):
    r = sub_run(tiny_run, 4001, ttt_mode="lora", ttt_chunk_tokens=128, eval_batch_seqs=4)
    ledger = []
    stats = T.eval_ttt(observing(r, ledger), r.model, stream(r))
    assert (stats[0] > 0).all() and torch.isfinite(stats).all()
    adapted = {key: cs for kind, key, cs in ledger if kind == "adapt"}
    assert all(cs == adapted[(b, i - 1)] for kind, (b, i), cs in ledger if kind == "score")


def phased(run, n_tokens=23000, **hp):  # ~5 Brown documents; global passes after documents 2 and 4 (prefix 4, 2 phases)
    return sub_run(run, n_tokens, **dict(ttt_mode="phased", ttt_chunk_tokens=128, eval_batch_seqs=2, ttt_prefix_docs=4,
                                         ttt_phases=2, ttt_global_chunk_tokens=4096) | hp)


def test_phased_ttt_global_passes_only_over_scored_documents(tiny_run, monkeypatch):
    r = phased(tiny_run)
    toks, passes, real = stream(r), [], T.global_pass

    def spy(run, model, span, scored, docs):
        passes.append((docs, span.numel() - 1, int(scored[:span.numel() - 1].sum()), int(scored.sum())))
        return real(run, model, span, scored, docs)
    monkeypatch.setattr(T, "global_pass", spy)
    ledger = []
    stats = T.eval_ttt(observing(r, ledger), r.model, toks)
    starts = np.flatnonzero(r.luts[2][r.val_tokens[:-1]])
    assert [p[0] for p in passes] == [2, 4] and [p[1] for p in passes] == [starts[2], starts[4]]
    assert all(n == inside == total for _, n, inside, total in passes)  # exactly the documents before it, all scored
    assert [cs for kind, _, cs in ledger if kind == "global"] == [0.0, 0.0]
    adapted = {key: cs for kind, key, cs in ledger if kind == "adapt"}
    assert all(cs == adapted[(b, i - 1)] for kind, (b, i), cs in ledger if kind == "score")
    assert (stats[0] > 0).all() and torch.isfinite(stats).all()
    lora = T.eval_ttt(dataclasses.replace(r, hp=dataclasses.replace(r.hp, ttt_mode="lora")), r.model, toks)
    assert torch.equal(stats[:, :starts[2]], lora[:, :starts[2]])  # before the first pass: per-document LoRA alone
    assert not torch.allclose(stats[:, starts[2]:], lora[:, starts[2]:])  # after it: a changed base model
    still = T.eval_ttt(dataclasses.replace(r, hp=dataclasses.replace(r.hp, ttt_global_lr=0.0, ttt_momentum=0.0)),
                       r.model, toks)
    assert torch.allclose(still, lora, atol=1e-5)


def test_audit_passes_phased_ttt_and_catches_a_pass_over_unscored_documents(tiny_run, monkeypatch):
    r = phased(tiny_run, None, eval_seq_len=1280, ttt_prefix_docs=2, ngram_order=0)  # audit slice: 2 documents
    real = T.global_pass
    passes = []
    monkeypatch.setattr(T, "global_pass", lambda *a: passes.append(a[-1]) or real(*a))
    res = T.audit(r, tiny_run.model, n_pos=1)
    assert passes and res["passed"] and res["checks"]["ttt_weights"] == 0, res

    def leaky(run, model, span, scored, docs):  # trains one chunk past the documents scored so far
        full = torch.from_numpy(run.val_tokens[:scored.numel() + 1].astype(np.int64))
        return real(run, model, full, scored, docs)
    monkeypatch.setattr(T, "global_pass", leaky)
    res = T.audit(r, tiny_run.model, n_pos=1)
    assert not res["passed"] and res["checks"]["ttt_weights"] > 0, res


def sliding_128(run, x):
    short = dataclasses.replace(run, hp=dataclasses.replace(run.hp, eval_seq_len=128))
    return T.Scored(T.eval_sliding(short, x.model, x.toks))


def peeking(run, x):  # target p sees p+2
    return T.Scored(T.eval_sliding(run, x.model, torch.cat((x.toks[1:], x.toks[-1:]))))


def test_a_stage_added_to_the_registry_is_evaluated_and_audited(tiny_run, monkeypatch):
    stages = T.EVAL_STAGES
    for name, run, passed in (("sliding_128", sliding_128, True), ("peeking", peeking, False)):
        monkeypatch.setattr(T, "EVAL_STAGES", stages + (T.EvalStage(name, T.always_on, T.first_estimate, run),))
        r = sub_run(tiny_run, 3001, ttt_enabled=False, ngram_order=0, eval_audit=True)
        r.results.update(T.evaluate(r))
        assert list(r.results["stages"]) == ["roundtrip", "sliding", name]
        assert r.results["val_bpb"] == r.results["stages"][name]["val_bpb"]
        checks = r.results["audit"]["checks"]
        assert r.results["audit"]["passed"] == passed and (checks[f"causal_{name}"] <= 1e-5) == passed, checks


def test_evaluate_runs_the_stages_and_keeps_the_last_score_within_budget(tiny_run):
    # TTT_LR=0: the ttt stage's scoring alone, windows of 256 with 192 tokens of context (what adapting adds to a
    # 60-step model depends on its lr: test_lora_ttt_* and the phased tests cover it)
    r = sub_run(tiny_run, 3001, ttt_chunk_tokens=64, ttt_lr=0.0, eval_audit=True)
    r.results.update(T.evaluate(r))
    stages = r.results["stages"]
    assert list(stages) == ["roundtrip", "ttt", "ngram"]  # TTT's scoring is the sliding one: not scored twice
    assert r.results["val_bpb"] == stages["ngram"]["val_bpb"] and r.results["audit"]["passed"]
    assert stages["ttt"]["val_bpb"] < stages["roundtrip"]["val_bpb"]
    assert stages["ngram"]["val_bpb"] < stages["ttt"]["val_bpb"]
    r = sub_run(tiny_run, 3001, ttt_enabled=False)
    r.results.update(T.evaluate(r))
    assert list(r.results["stages"]) == ["roundtrip", "sliding", "ngram"]
    r = sub_run(tiny_run, 3001, ttt_seconds=0.0)  # no adaptation box left: TTT is skipped, sliding runs instead
    r.results.update(T.evaluate(r))
    assert list(r.results["stages"]) == ["roundtrip", "sliding", "ngram"]
    r = sub_run(tiny_run, 3001, eval_budget_seconds=1e-9)
    r.results.update(T.evaluate(r))
    assert list(r.results["stages"]) == ["roundtrip"]
    assert r.results["val_bpb"] == r.results["stages"]["roundtrip"]["val_bpb"]


def _worker(rank, port, model, hp, luts, toks, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    run = T.Run(hp, torch.device("cpu"), rank, 2, luts=luts)
    lora = dataclasses.replace(run, hp=dataclasses.replace(hp, ttt_mode="lora", ttt_chunk_tokens=128, eval_batch_seqs=2))
    phase = dataclasses.replace(lora, hp=dataclasses.replace(lora.hp, ttt_mode="phased", ttt_prefix_docs=1, ttt_phases=1))
    result = (T.eval_sliding(run, model, toks), T.eval_ttt(run, model, toks), T.eval_ttt(lora, model, toks),
              T.eval_ttt(phase, model, toks))
    if rank == 0:
        torch.save(result, out)
    dist.barrier()  # no rank tears gloo down while its peer still talks to it (an intermittent SIGABRT)
    dist.destroy_process_group()


def test_two_processes_match_one(tiny_run, tmp_path):
    r = sub_run(tiny_run, 6001, ttt_mode="full", ttt_chunk_tokens=1024, eval_batch_seqs=3)
    r.model, toks = copy.deepcopy(r.model), stream(r)
    for m in r.model.modules():  # as reloaded from the artifact: no QAT, whose rounding amplifies float noise
        m.qat = None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, r.model, r.hp, r.luts, toks, tmp_path / "two.pt"), nprocs=2)
    sliding, full, lora, phase = torch.load(tmp_path / "two.pt")
    assert torch.equal(sliding, T.eval_sliding(r, r.model, toks))
    assert torch.allclose(full, T.eval_ttt(r, r.model, toks), atol=1e-4)
    one = dataclasses.replace(r, hp=dataclasses.replace(r.hp, ttt_mode="lora", ttt_chunk_tokens=128, eval_batch_seqs=2))
    assert torch.allclose(lora, T.eval_ttt(one, r.model, toks), atol=1e-4)
    one = dataclasses.replace(one, hp=dataclasses.replace(one.hp, ttt_mode="phased", ttt_prefix_docs=1, ttt_phases=1))
    assert torch.allclose(phase, T.eval_ttt(one, r.model, toks), atol=1e-4)


def test_ttt_plan_batches_sorted_documents_with_little_padding():
    hp = T.load_hparams(dict(PRESET="frontier"))  # chunks of 48 targets, windows of 2048
    lengths = np.random.default_rng(0).pareto(1.2, 3000).astype(np.int64) * 300 + 20  # skewed: most short, a long tail
    pos = T.doc_positions(lengths, hp.ttt_chunk_tokens, hp.eval_seq_len)
    plans = {world: T.ttt_plan(lengths, hp, world) for world in (1, 8)}
    cuts = [0, 833, 1666, 2500, 3000]  # TTT_PREFIX_DOCS=2500 in TTT_PHASES=3, then the rest
    for world, plan in plans.items():
        assert len(plan) == 4 and all(len(ranks) == world for ranks in plan)
        for (lo, hi), ranks in zip(zip(cuts, cuts[1:]), plan):
            batches = [b for bs in ranks for b in bs]
            assert sorted(np.concatenate(batches).tolist()) == list(range(lo, hi))  # every document once, in its phase
            for b in batches:
                assert pos[b].sum() >= 0.9 * len(b) * pos[b].max()  # padding at most 10% of the token-positions
    one, eight = ([sorted(map(tuple, (b for bs in ranks for b in bs))) for ranks in plans[w]] for w in (1, 8))
    assert one == eight  # the same batches at any world size
    stream_order = sum(len(b) * pos[b].max() for b in np.array_split(np.arange(3000), 3000 // 32))
    assert sum(pos[b[0]] * len(b) for ranks in plans[1] for b in ranks[0]) < 0.5 * stream_order


def test_ttt_ends_inside_its_deadline_and_scores_the_rest_plainly(tiny_run, monkeypatch):
    r = sub_run(tiny_run, 40001, ttt_mode="lora", ttt_chunk_tokens=128, eval_batch_seqs=2)
    toks, now, tau = stream(r), [0.0], 1e-6  # a fake clock: tau per token-position forward, 3 tau with a backward
    real_forward, real_batch, adapted = T.GPT.forward, T.lora_batch, []

    def timed_forward(self, idx, targets=None):
        now[0] += tau * idx.numel() * (3 if torch.is_grad_enabled() else 1)
        return real_forward(self, idx, targets)

    def spy(run, model, toks, docs, lora, stats, scored, c, adapt, bi):
        adapted.append(adapt)
        return real_batch(run, model, toks, docs, lora, stats, scored, c, adapt, bi)
    monkeypatch.setattr(T.GPT, "forward", timed_forward)
    monkeypatch.setattr(T, "lora_batch", spy)
    lengths = np.diff(T.doc_starts(r, toks), append=toks.numel() - 1)
    work = T.stage_estimates(r.hp, lengths, 1, tau)
    deadline = work["ttt_min"] + 0.4 * (work["ttt"] - work["ttt_min"])
    stats = T.eval_ttt(r, r.model, toks, budget=T.TTTBudget(deadline, rate=tau, clock=lambda: now[0]))
    assert now[0] <= deadline and (stats[0] > 0).all() and torch.isfinite(stats).all()
    assert any(adapted) and not all(adapted)  # the batches that fitted were adapted on, the others scored plainly
    plain = T.eval_ttt(r, r.model, toks, budget=T.TTTBudget(0.0, clock=lambda: now[0]))  # no time: all plain
    assert (plain[0] > 0).all() and not any(adapted[-len(adapted) // 2:])
    frozen = T.eval_ttt(dataclasses.replace(r, hp=dataclasses.replace(r.hp, ttt_lr=0.0)), r.model, toks)
    assert plain[0].mean() > frozen[0].mean()  # windows of EVAL_SEQ_LEN without overlap: less context than chunks


def test_phased_scores_do_not_depend_on_the_documents_that_follow(tiny_run):
    short, long = (phased(tiny_run, n, ttt_prefix_docs=50, ttt_phases=3) for n in (23000, 40001))
    a, b = (T.eval_ttt(r, r.model, stream(r)) for r in (short, long))
    end = T.doc_starts(short, stream(short))[-1]  # the documents wholly inside the shorter stream
    assert torch.allclose(a[:, :end], b[:, :end], atol=1e-6)
