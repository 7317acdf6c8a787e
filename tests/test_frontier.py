"""Issue 10's switches: each changes the computation when on, is the old computation when off, and keeps shapes."""
import json
import os
import subprocess
import sys

import pytest
import torch

import train_gpt as T
from conftest import ROOT

TINY = dict(PRESET="tiny", MODEL_DIM="64", NUM_LAYERS="3", NUM_HEADS="4", NUM_KV_HEADS="2", BIGRAM_DIM="16",
            VE_DIM="16", VOCAB_SIZE="64", UNET_SKIPS="1", LN_SCALE="1")  # the default recipe's skips and scale


def model(**env) -> T.GPT:
    torch.manual_seed(0)
    m = T.GPT(T.load_hparams({**TINY, **{k: str(v) for k, v in env.items()}}))
    with torch.no_grad():  # zero-initialized projections would hide what a switch changes
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def two_docs(seed: int, n_a: int = 20, n_b: int = 30) -> torch.Tensor:
    """[BOS, document A (seeded), BOS, document B (fixed)] as one row."""
    a = torch.randint(4, 64, (n_a,), generator=torch.Generator().manual_seed(seed))
    b = torch.randint(4, 64, (n_b,), generator=torch.Generator().manual_seed(99))
    return torch.cat((torch.tensor([T.BOS_ID]), a, torch.tensor([T.BOS_ID]), b))[None]


@torch.no_grad()
def test_document_logits_ignore_the_previous_document_with_doc_mask():
    x, y = two_docs(1), two_docs(2)
    m = model(DOC_MASK=1)
    start = 21  # document B's BOS
    assert torch.allclose(m(x)[0, start:], m(y)[0, start:], atol=1e-5)
    m_off = model(DOC_MASK=0)  # without the mask the second document sees the first
    assert not torch.allclose(m_off(x)[0, start:], m_off(y)[0, start:], atol=1e-3)
    assert torch.equal(m_off(x), model()(x))  # off is the default computation


@torch.no_grad()
def test_smeargate_and_bigram_never_reach_across_a_bos():
    m = model(DOC_MASK=1, BIGRAM_BUCKETS=64)
    x, y = two_docs(1), two_docs(2)
    y[0, 20] = (x[0, 20] + 1 - 4) % 60 + 4  # only the last token before document B's BOS differs
    assert torch.allclose(m(x)[0, 21:], m(y)[0, 21:], atol=1e-5)


def tokens(n: int = 48, rows: int = 2) -> torch.Tensor:
    return torch.randint(4, 64, (rows, n), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def test_depth_recurrence_repeats_the_block_with_the_same_weights():
    m = model(LOOP_LAYERS="1-1", LOOP_COUNT=3, LOOP_START=0.5)
    assert not m.looping and model(LOOP_LAYERS="1-1", LOOP_COUNT=3).looping  # LOOP_START=0: from the start
    assert m.layer_order(True) == [0, 1, 1, 1, 2] and m.layer_order(False) == [0, 1, 2]
    assert m.skip_weights.shape[0] == 2  # U-Net halves of the looped order: [0, 1] | [1, 1, 2]
    x = tokens()
    flat = m(x)
    m.looping = True
    looped = m(x)
    assert looped.shape == flat.shape and not torch.allclose(looped, flat, atol=1e-4)
    plain = model()  # looping off is the plain model (its skip weights are the first of the looped model's)
    plain.load_state_dict({k: v[:plain.skip_weights.shape[0]] if k == "skip_weights" else v
                           for k, v in m.state_dict().items()})
    assert torch.equal(plain(x), flat)
    assert sum(p.numel() for p in m.parameters()) == sum(p.numel() for p in plain.parameters()) + 64  # one skip


@torch.no_grad()
def test_parallel_lanes_from_their_layer_on():
    m, off = model(PARALLEL_START=2), model()
    assert [b.lanes is not None for b in m.blocks] == [False, False, True]
    assert m.blocks[2].lanes.shape == (3, 2)
    x = tokens()
    assert not torch.allclose(m(x), off(x), atol=1e-4)
    b, x0 = m.blocks[2], torch.randn(2, 48, 64)
    with torch.no_grad():  # attention writes lane 0 only: lane 1 must not depend on lane 0
        b.lanes.copy_(torch.tensor([[1.1, 1.1], [1.0, 0.0], [1.0, 1.0]]))
    l1 = torch.randn(2, 48, 64)
    a = b.parallel([torch.randn(2, 48, 64), l1], x0, None, None)
    c = b.parallel([torch.randn(2, 48, 64), l1], x0, None, None)
    assert torch.equal(a[1], c[1]) and not torch.allclose(a[0], c[0])


def test_attention_gate_shapes_gradient_and_int8_role():
    fresh = T.GPT(T.load_hparams({**TINY, "ATTN_GATE_WINDOW": "12"})).blocks[0].attn.gate
    assert fresh.weight.shape == (4, 12) and not fresh.weight.any()  # heads x window, zero: every head halved
    m, off = model(ATTN_GATE_WINDOW=12), model()
    gate = m.blocks[0].attn.gate
    x = tokens()
    with torch.no_grad():
        assert not torch.allclose(m(x), off(x), atol=1e-4)
    m.train()
    T.token_nll(m(x[:, :-1]), x[:, 1:]).mean().backward()
    assert gate.weight.grad.abs().sum() > 0
    fmts = T.quant_formats(m.hp, m)
    assert fmts["blocks.0.attn.gate.weight"] == ("gate", T.Fmt("int", 8))
    assert off.blocks[0].attn.gate is None


def test_polar_express_is_closer_to_orthogonal_and_row_norm_changes_the_update():
    g = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    g[:, :5] *= 50  # a few dominant directions, as gradients have
    dev = {p: (torch.linalg.svdvals(T.zeropower_via_newtonschulz5(g, 5, polar=p)) - 1).abs().mean() for p in (0, 1)}
    assert dev[1] < 0.6 * dev[0]
    updates = []
    for row_norm in (False, True):
        w = torch.nn.Parameter(torch.zeros(16, 8))
        w.grad = torch.randn(16, 8, generator=torch.Generator().manual_seed(1)) * torch.arange(1, 17.)[:, None]
        T.Muon([w], lr=1.0, momentum=0.0, backend_steps=5, row_norm=row_norm).step()
        updates.append(w.detach().clone())
    assert not torch.allclose(*updates, atol=1e-3)


@torch.no_grad()
def test_rope_yarn_scales_the_base_only_beyond_the_trained_length():
    on, off = model(ROPE_YARN=1, TRAIN_SEQ_LEN=32), model(TRAIN_SEQ_LEN=32)
    assert torch.equal(on(tokens(32)), off(tokens(32)))  # up to the trained length: the trained rotation
    assert not torch.allclose(on(tokens(64)), off(tokens(64)), atol=1e-4)
    rd = on.hp.rope_dims
    x = torch.randn(1, 64, 2, on.hp.head_dim)  # twice the length: base * 2^(rd/(rd-2)), the slowest frequency halved
    assert torch.allclose(T.Rotary(rd, 10000.0, 32)(x), T.Rotary(rd, 10000.0 * 2 ** (rd / (rd - 2)))(x))
    with pytest.raises(T.ConfigError, match="ROPE_YARN"):
        T.load_hparams({**TINY, "ROPE_YARN": "1", "ROPE_DIMS": "2"})


def test_warmdown_fraction_and_lr_floor():
    s = T.Schedule(iterations=100, warmdown_iters=0, lr_warmup_steps=0, wallclock_s=0, warmdown_frac=0.5, min_lr=0.1)
    assert [round(s.lr_mult(k, 0.0), 6) for k in (0, 50, 75, 95, 99)] == [1.0, 1.0, 0.5, 0.1, 0.1]
    w = T.Schedule(iterations=10**6, warmdown_iters=0, lr_warmup_steps=0, wallclock_s=100.0, warmdown_frac=0.85,
                   min_lr=0.1)
    assert w.lr_mult(10, 15.0) == 1.0 and w.lr_mult(10, 57.5) == pytest.approx(0.5) and w.lr_mult(10, 99.0) == 0.1
    old = T.Schedule(iterations=100, warmdown_iters=20, lr_warmup_steps=0, wallclock_s=0)
    assert old.lr_mult(90, 0.0) == pytest.approx(0.5) and old.lr_mult(100, 0.0) == 0.0  # no floor by default


def test_frontier_preset_is_the_record_shape():
    hp = T.load_hparams({"PRESET": "frontier"})
    with torch.device("meta"):
        m = T.GPT(hp)
    assert (hp.num_layers, hp.model_dim, hp.num_heads, hp.num_kv_heads, hp.vocab_size, hp.mlp_mult) == (
        11, 512, 8, 4, 8192, 4.0)
    assert m.layer_order(True) == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]
    assert abs(sum(p.numel() for p in m.parameters()) - 35_945_671) < 10_000  # the record's count, within its extras
    with pytest.raises(T.ConfigError, match="LOOP_LAYERS"):
        T.load_hparams({"PRESET": "frontier", "LOOP_LAYERS": "5-3"})


def test_frontier_preset_end_to_end_at_reduced_width(brown_data, tmp_path):
    """Every switch of the preset at once (loops, lanes, gate, doc mask, Polar-Express + MuonEq-R, warmdown
    fraction with a floor, int6/int7 at set clips): train, loop switch-on, export, every stage, the audit."""
    env = {**os.environ, "PRESET": "frontier", "DATA_PATH": str(brown_data), "VOCAB_SIZE": "1024", "MODEL_DIM": "64",
           "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "TRAIN_SEQ_LEN": "128", "EVAL_SEQ_LEN": "128",
           "TRAIN_BATCH_TOKENS": "2048", "ITERATIONS": "6", "WARMUP_STEPS": "0", "COMPILE": "0",
           "MAX_WALLCLOCK_SECONDS": "0", "VAL_MAX_TOKENS": "4097", "TTT_CHUNK_TOKENS": "48", "GPTQ_TOKENS": "4096",
           "EVAL_AUDIT": "1", "LOG_DIR": str(tmp_path), "RUN_ID": "f"}
    proc = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "f.json").read_text())
    assert res["status"] == "ok" and res["looping_from_step"] == 4 and res["audit"]["passed"]
    assert list(res["stages"]) == ["roundtrip", "ttt"]  # NGRAM_ORDER=0, as the record; TTT scores the windows
    assert {"embed:int7@14.4", "gate:int8", "mlp_up:int6@11.85"} <= {r.split("+")[0] for r in res["quant"]["roles"]}
    assert len(res["quant"]["lqer"]) == 3 and {r["rank"] for r in res["quant"]["lqer"].values()} == {4}  # LQER top 3
