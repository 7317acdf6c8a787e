"""Model architecture switches, Muon, hyperparameter parsing, schedules and weight averaging."""
import math

import pytest
import torch

import train_gpt as T

SMALL = dict(PRESET="tiny", NUM_LAYERS="4", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2", BIGRAM_DIM="16",
             VE_DIM="16", BIGRAM_BUCKETS="64", UNET_SKIPS="1", LN_SCALE="1")  # the default recipe's skips and scale


def small_hp(**overrides) -> T.Hyperparameters:
    return T.load_hparams({**SMALL, **{k: str(v) for k, v in overrides.items()}})


def expected_params(hp: T.Hyperparameters) -> int:
    """Parameter count written out from the architecture, independently of the module code."""
    d, kvd, V = hp.model_dim, hp.num_kv_heads * hp.head_dim, hp.vocab_size
    hidden = int(round(hp.mlp_mult * d))
    per_layer = 2 * d * d + 2 * d * kvd + 2 * d * hidden + hp.num_heads + 2 * d + 2 * d
    n = hp.num_layers * per_layer + V * d
    n += hp.bigram_buckets * hp.bigram_dim + hp.bigram_dim * d + 1 if hp.bigram_buckets > 1 else 0
    n += d if hp.smear_gate else 0
    ve = T.parse_layers(hp.ve_layers, hp.num_layers)
    n += V * hp.ve_dim + hp.ve_dim * kvd + len(ve) if ve else 0
    enc = hp.num_layers // 2 if hp.unet_skips else 0
    n += min(enc, hp.num_layers - enc) * d
    n += 0 if hp.tie_embeddings else V * d
    return n


SWITCHES = [
    {}, dict(MLP_ACT="relu2"), dict(MLP_MULT=3.5), dict(TIE_EMBEDDINGS=0), dict(ROPE_DIMS=0), dict(ROPE_DIMS=8),
    dict(LOGIT_SOFTCAP=0), dict(UNET_SKIPS=0), dict(SMEAR_GATE=0), dict(BIGRAM_BUCKETS=0), dict(VE_LAYERS=""),
    dict(VE_LAYERS="0,-1"), dict(XSA_LAST_N=0), dict(XSA_LAST_N=4), dict(LN_SCALE=0), dict(ORTHO_INIT=0),
    dict(NUM_KV_HEADS=4), dict(NUM_KV_HEADS=1), dict(NUM_LAYERS=5),
]


@pytest.mark.parametrize("overrides", SWITCHES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_switch_forward_backward_and_param_count(overrides):
    torch.manual_seed(0)
    hp = small_hp(**overrides)
    model = T.GPT(hp)
    assert sum(p.numel() for p in model.parameters()) == expected_params(hp)
    x = torch.randint(0, hp.vocab_size, (2, 32))
    logits = model(x)
    assert logits.shape == (2, 32, hp.vocab_size) and logits.dtype == torch.float32
    if hp.logit_softcap:
        assert logits.abs().max() <= hp.logit_softcap
    T.token_nll(logits, x).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_default_config_is_the_27m_recipe():
    hp = T.load_hparams({})
    assert (hp.num_layers, hp.model_dim, hp.num_heads, hp.num_kv_heads, hp.mlp_mult) == (11, 512, 8, 4, 3.0)
    with torch.device("meta"):
        n = sum(p.numel() for p in T.GPT(hp).parameters())
    assert n == expected_params(hp)


def test_model_is_causal():
    torch.manual_seed(0)
    model = T.GPT(small_hp())
    x = torch.randint(0, 1024, (1, 48))
    y = x.clone()
    y[0, 30:] = (y[0, 30:] + 7) % 1024
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[0, :30], b[0, :30])
    assert not torch.allclose(a[0, 30:], b[0, 30:])


def test_xsa_removes_self_value_component():
    torch.manual_seed(0)
    hp = small_hp(XSA_LAST_N=4)
    attn = T.GPT(hp).blocks[0].attn
    captured = {}
    attn.o.register_forward_hook(lambda m, i, o: captured.setdefault("y", i[0]))
    x = torch.randn(1, 16, hp.model_dim)
    attn(x, None)
    y = captured["y"].view(1, 16, hp.num_heads, hp.head_dim)
    v = attn.v(x).view(1, 16, hp.num_kv_heads, hp.head_dim).repeat_interleave(hp.num_heads // hp.num_kv_heads, 2)
    along_v = (y * torch.nn.functional.normalize(v, dim=-1)).sum(-1)
    assert along_v.abs().max() < 1e-5 * y.abs().max()


def test_newton_schulz_orthogonalizes():
    torch.manual_seed(0)
    G = torch.randn(64, 128) @ torch.diag(torch.logspace(-2, 1, 128))
    s = torch.linalg.svdvals(T.zeropower_via_newtonschulz5(G, steps=5))
    assert s.min() > 0.5 and s.max() < 1.3, (s.min(), s.max())
    s_tall = torch.linalg.svdvals(T.zeropower_via_newtonschulz5(G.T, steps=5))
    torch.testing.assert_close(s_tall, s, atol=1e-4, rtol=1e-4)


def test_muon_step_moves_matrix_along_orthogonalized_update():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(32, 16))
    opt = T.Muon([p], lr=0.1, momentum=0.0, backend_steps=5, weight_decay=0.5)
    before = p.detach().clone()
    p.grad = torch.randn(32, 16)
    opt.step()
    update = (before * (1 - 0.1 * 0.5) - p.detach()) / 0.1  # undo decoupled weight decay
    expected = T.zeropower_via_newtonschulz5(p.grad) * math.sqrt(32 / 16)
    torch.testing.assert_close(update, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name,value,needle", [
    ("NUM_LAYERS", "abc", "NUM_LAYERS='abc': expected int"),
    ("NUM_LAYERS", "0", "NUM_LAYERS=0: expected an int >= 1"),
    ("MLP_ACT", "gelu", "MLP_ACT='gelu'"),
    ("TIE_EMBEDDINGS", "maybe", "TIE_EMBEDDINGS='maybe': expected 0 or 1"),
    ("NUM_KV_HEADS", "3", "kv heads must divide heads"),
    ("ROPE_DIMS", "7", "ROPE_DIMS=7"),
    ("VE_LAYERS", "9", "VE_LAYERS='9'"),
    ("PRESET", "huge", "PRESET='huge': unknown"),
    ("WEIGHT_AVG", "best", "WEIGHT_AVG='best'"),
    ("EMA_DECAY", "1.5", "EMA_DECAY=1.5"),
])
def test_bad_env_values_name_the_variable(name, value, needle):
    with pytest.raises(T.ConfigError, match=None) as err:
        T.load_hparams({**SMALL, name: value})
    assert needle in str(err.value)


def test_preset_defaults_and_explicit_overrides():
    default = T.Hyperparameters(run_id="x")
    assert T.load_hparams({"RUN_ID": "x"}) == default  # the default run IS the default preset
    tiny = T.load_hparams({"PRESET": "tiny", "RUN_ID": "x", "MODEL_DIM": "128"})
    assert (tiny.num_layers, tiny.model_dim, tiny.num_heads, tiny.num_kv_heads) == (4, 128, 4, 2)
    assert (tiny.mlp_mult, tiny.train_seq_len, tiny.train_batch_tokens) == (2.0, 256, 8192)


def test_schedule_warmup_warmdown_by_iterations_and_wallclock():
    s = T.Schedule(iterations=100, warmdown_iters=20, lr_warmup_steps=10, wallclock_s=0)
    assert s.lr_mult(0, 0) == pytest.approx(0.1) and s.lr_mult(50, 0) == 1.0
    assert s.lr_mult(90, 0) == pytest.approx(0.5) and s.lr_mult(100, 0) == 0.0
    w = T.Schedule(iterations=10**6, warmdown_iters=100, lr_warmup_steps=0, wallclock_s=100.0)
    assert w.lr_mult(100, 50.0) == 1.0  # 0.5 s/step: warmdown needs 50 s, 50 s remain
    assert w.lr_mult(180, 90.0) == pytest.approx(0.2)  # 10 s of 50 s remain


def test_weight_averager_ema_and_swa():
    model = torch.nn.Linear(3, 2, bias=False)
    torch.nn.init.zeros_(model.weight)
    hp = T.Hyperparameters(run_id="x", ema_decay=0.5, swa_every=2, swa_threshold=0.5)
    avg = T.WeightAverager(model, hp)
    values = [1.0, 2.0, 3.0, 4.0]
    ema = 0.0
    with torch.no_grad():
        for step, v in enumerate(values):
            model.weight.fill_(v)
            avg.update(step, lr_mult=0.1 if step >= 2 else 1.0)
            decay = min(0.5, (1 + step) / (10 + step))
            ema = decay * ema + (1 - decay) * v
    assert avg.apply("swa") == "swa"
    torch.testing.assert_close(model.weight, torch.full((2, 3), 3.0))  # only step 2 is both late and on the grid
    assert avg.apply("ema") == "ema"
    torch.testing.assert_close(model.weight, torch.full((2, 3), ema))
    warm = T.WeightAverager(model, T.Hyperparameters(run_id="x", swa_every=2, swa_threshold=0.5, lr_warmup_steps=3))
    sched = T.Schedule(iterations=5, warmdown_iters=0, lr_warmup_steps=3, wallclock_s=0.0, warmdown_frac=1.0)
    mults = [sched.lr_mult(step, 0.0) for step in range(5)]  # 1/3, 2/3, 0.6, 0.4, 0.2
    with torch.no_grad():  # the LR multiplier is low in warm-up too: those steps are not SWA's
        for step, v in enumerate([100.0, 1.0, 2.0, 3.0, 4.0]):
            model.weight.fill_(v)
            warm.update(step, sched.warmdown_mult(step, mults[step]))
    assert mults[0] < 0.5 and warm.apply("swa") == "swa"
    torch.testing.assert_close(model.weight, torch.full((2, 3), 4.0))  # step 4 only, not step 0 (100) or 2


@pytest.mark.skipif(not (torch.cuda.is_available() and T.flash_attn_func is not None), reason="needs CUDA and flash-attn")
def test_flash_attention_matches_sdpa():
    torch.manual_seed(0)
    q = torch.randn(2, 128, 8, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 128, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    flash = T.attention(q, k, v)
    sdpa = T.F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                            enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(flash, sdpa, atol=2e-2, rtol=2e-2)
