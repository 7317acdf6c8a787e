"""QUANTIZATION: quantizer accuracy against known optima, GPTQ, packing, the artifact file, QAT = export."""
import copy
import dataclasses
import math

import numpy as np
import pytest
import torch

import train_gpt as T
from conftest import tiny_env

LLOYD_MAX_MSE = {2: 0.1175, 3: 0.03454, 4: 0.009497}  # optimal scalar quantizer of a unit Gaussian


def mse(w, f, **kw):
    return float((T.dequantize(T.quantize(w, f, **kw), f) - w).square().mean())


def best_uniform_mse(w: torch.Tensor, q: int) -> float:
    """Reference: per row, brute-force the step of the symmetric uniform grid -q..q (coarse, then fine)."""
    steps = torch.logspace(-3, 0.5, 300)[:, None, None]
    for _ in range(2):
        err = ((w / steps).round().clamp(-q, q) * steps - w).square().mean(-1)  # (steps, rows)
        best = steps[err.argmin(0), :, 0][None]  # (1, rows, 1)
        steps = best * torch.linspace(0.97, 1.03, 121)[:, None, None]
    return float(err.min(0).values.mean())


@pytest.mark.parametrize("bits", range(2, 9))
def test_uniform_grid_mse_within_5pct_of_optimal_step(bits):
    w = torch.randn(48, 2048, generator=torch.Generator().manual_seed(bits))
    ratio = mse(w, T.Fmt("int", bits)) / best_uniform_mse(w, 2 ** (bits - 1) - 1)
    assert 0.99 <= ratio <= 1.05, ratio


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_turboquant_mse_within_5pct_of_lloyd_max(bits):
    # long rows: on short ones a per-row scale fits the sample's finite tail and beats the population optimum
    w = torch.randn(64, 2048, generator=torch.Generator().manual_seed(bits)) * 0.02
    ratio = mse(w, T.Fmt("tq", bits, seed=7)) / 0.02 ** 2 / LLOYD_MAX_MSE[bits]
    assert 0.95 <= ratio <= 1.05, ratio


def test_rotation_orthogonal_and_rebuilt_from_seed():
    r = T.rotation(64, 3, "cpu")
    assert torch.allclose(r @ r.T, torch.eye(64, dtype=torch.float64), atol=1e-12)
    T.rotation.cache_clear()
    assert torch.equal(T.rotation(64, 3, "cpu"), r) and not torch.equal(T.rotation(64, 4, "cpu"), r)


def test_a_set_clip_sets_the_scale():
    w = torch.randn(16, 256)
    codes, s = T.quantize_rows(w, T.grid(T.Fmt("int", 4)), T.Fmt("int", 4, clip=2.5))
    assert torch.allclose(s, (2.5 * w.square().mean(1).sqrt() / 7).half().float())


@pytest.mark.parametrize("fmt", ["int4", "int6", "tq3"])
def test_gptq_reduces_output_error_on_correlated_inputs(fmt):
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(128, 128, generator=g) * torch.logspace(0, -2, 128)[:, None]  # decaying spectrum
    x = torch.randn(4096, 128, generator=g) @ mix + 0.3 * torch.randn(4096, 128, generator=g)
    w = torch.randn(96, 128, generator=g)
    hp = T.load_hparams({})
    f = T.parse_fmt(fmt)
    plain = T.dequantize(T.quantize(w, f), f)
    gptq = T.dequantize(T.quantize(w, f, x.T @ x, hp), f)
    err_plain, err_gptq = (x @ (w - plain).T).norm(), (x @ (w - gptq).T).norm()
    assert err_gptq < 0.8 * err_plain, (err_gptq, err_plain)


def test_low_rank_correction_reduces_error():
    w = torch.randn(128, 256) + torch.randn(128, 4) @ torch.randn(4, 256)  # a few strong directions
    assert mse(w, T.parse_fmt("int3+lr8")) < 0.9 * mse(w, T.parse_fmt("int3"))


def test_lqer_int4_asymmetric_factors():
    w = torch.randn(128, 256) + torch.randn(128, 4) @ torch.randn(4, 256)
    f = T.parse_fmt("int3+lq4")
    parts = T.quantize(w, f)
    assert f.lq == 4 and f.tag == "int3+lq4" and T.grid(f.factors).tolist() == list(range(-8, 8))
    assert [(g, s) for g, s in T.layout([128, 256], f)][2:] == [("a4", [4, 128]), ("scales", [4]), ("a4", [4, 256]),
                                                                 ("scales", [4])]
    assert all(list(p.shape) == s for p, (_, s) in zip(parts, T.layout([128, 256], f)))
    assert int(parts[2].max()) <= 15 and {0, 15} & set(parts[2].unique().tolist())  # both ends of -8..7 reachable
    assert mse(w, f) < 0.9 * mse(w, T.parse_fmt("int3"))
    with pytest.raises(T.ConfigError, match="QUANT_SPEC"):
        T.parse_fmt("int3+lr4+lq4")


def test_lqer_top_k_by_output_error(tmp_path):
    hp, model = small_model(SPEC.replace("+lr4", "").replace("+lr2", ""), CODEC="zstd", LQER_TOP="2", LQER_RANK="3")
    with torch.no_grad():
        model.blocks[1].mlp.up.weight.mul_(5)  # the largest error by far
    report = T.export_artifact(model, hp, tmp_path / "l.artifact")
    lq = report["lqer"]
    assert len(lq) == 2 and "blocks.1.mlp.up.weight" in lq
    state, sd = T.load_artifact(tmp_path / "l.artifact"), model.state_dict()
    fmts = T.quant_formats(hp, model)
    for name, r in lq.items():
        assert r["rank"] == 3 and r["output_err_after"] < r["output_err"] and r["values"] == 3 * sum(sd[name].shape)
        f = fmts[name][1]._replace(lq=3)
        assert torch.equal(state[name], T.dequantize(T.quantize(sd[name], f), f)), name
        assert float((state[name] - sd[name]).square().sum()) == pytest.approx(r["output_err_after"], rel=1e-4)
    others = {n: e for n, (role, f) in fmts.items() if role and n not in lq and f.kind != "fp16" for e in
              [float((T.dequantize(T.quantize(sd[n], f), f) - sd[n]).square().sum())]}
    assert min(r["output_err"] for r in lq.values()) >= max(others.values())
    plain = T.export_artifact(model, dataclasses.replace(hp, lqer_top=0), tmp_path / "p.artifact")
    assert plain["lqer"] == {} and report["groups"]["a4"]["n"] == sum(r["values"] for r in lq.values())
    assert report["bytes"] > plain["bytes"]


def test_gptq_embed_hessian_from_head_input_reduces_weighted_error(tiny_run):
    hs = T.collect_hessians(tiny_run)
    assert "tok_emb" in hs and hs["tok_emb"].shape == (tiny_run.hp.model_dim,) * 2
    off = dataclasses.replace(tiny_run, hp=dataclasses.replace(tiny_run.hp, gptq_embed=False))
    assert "tok_emb" not in T.collect_hessians(off)
    w, H, f = tiny_run.model.tok_emb.weight.detach(), hs["tok_emb"], T.parse_fmt("int5")
    weighted = lambda q: float(torch.einsum("ij,jk,ik->", (q - w).double(), H, (q - w).double()))  # noqa: E731
    plain, gptq = (T.dequantize(T.quantize(w, f, h, tiny_run.hp), f) for h in (None, H))
    assert weighted(gptq) < 0.9 * weighted(plain), (weighted(gptq), weighted(plain))


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_unpack_exact(bits):
    codes = np.random.default_rng(bits).integers(0, 2 ** bits, 1001).astype(np.uint8)
    for packing in ("u8", "bits"):
        assert np.array_equal(T.unpack(T.pack(codes, packing, bits), packing, bits, codes.size), codes)
    h = np.random.default_rng(0).standard_normal(513).astype(np.float16)
    assert np.array_equal(T.unpack(T.pack(h, "shuffle", 16), "shuffle", 16, h.size), h)


SPEC = "attn_qk:int6,attn_vo:tq3+lr4,mlp_up:int5,mlp_down:int4+lr2,embed:int8,aux:fp16,first:int7"


def small_model(spec=SPEC, **env):
    hp = T.load_hparams(dict(PRESET="tiny", NUM_LAYERS="2", MODEL_DIM="128", NUM_HEADS="2", NUM_KV_HEADS="1",
                             VOCAB_SIZE="256", BIGRAM_BUCKETS="256", QUANT_SPEC=spec, **env))
    torch.manual_seed(0)
    model = T.GPT(hp)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return hp, model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    hp, model = small_model(CODEC="zstd")
    path = tmp_path_factory.mktemp("art") / "m.artifact"
    report = T.export_artifact(model, hp, path)
    return hp, model, path, report


def test_save_load_bit_exact(exported, tmp_path):
    hp, model, path, report = exported
    state, fmts = T.load_artifact(path), T.quant_formats(hp, model)
    assert fmts["blocks.0.attn.q.weight"][1].bits == 7 and fmts["blocks.1.attn.q.weight"][1].bits == 6  # first:
    assert report["bytes"] == path.stat().st_size and set(report["groups"]) >= {"int5", "int7", "tq3", "fp16", "scales"}
    for name, t in model.state_dict().items():
        f = fmts.get(name, (None, T.Fmt("fp16")))[1]
        want = t.half().float() if f.kind == "fp16" else T.dequantize(T.quantize(t, f), f)
        assert torch.equal(state[name], want), name
    T.export_artifact(model, hp, tmp_path / "again.artifact")
    assert (tmp_path / "again.artifact").read_bytes() == path.read_bytes()  # deterministic
    for g in report["groups"].values():
        assert g["len"] > 0 and ("entropy_bits" not in g or g["entropy_bits"] <= g["bits"])


def test_adaptive_coder_round_trips_bit_exactly_and_refuses_corrupt_streams(exported, tmp_path):
    compress, decompress = T.codecs()["ac"]
    rng = np.random.default_rng(0)
    codes = (np.clip(np.round(rng.standard_normal(60_000) * np.repeat([2, 7, 4], 20_000)), -31, 31) + 32).astype(np.uint8)
    for raw in (codes.tobytes(), b"", bytes(range(256)) * 40 + b"\x07"):
        assert decompress(compress(raw), len(raw)) == raw
    z = compress(codes.tobytes())
    flipped = bytearray(z)
    flipped[len(z) // 2] ^= 0x10
    for bad in (bytes(flipped), z[:len(z) // 2]):
        with pytest.raises(ValueError, match="ac stream: corrupt"):
            decompress(bad, codes.size)
    hp, model, path, _ = exported  # a whole artifact in this codec loads to the same tensors
    T.export_artifact(model, dataclasses.replace(hp, codec="ac"), tmp_path / "m.artifact")
    state, want = T.load_artifact(tmp_path / "m.artifact"), T.load_artifact(path)
    assert all(torch.equal(state[k], want[k]) for k in want)


def test_adaptive_coder_beats_order0_where_statistics_drift():
    rng = np.random.default_rng(1)  # three "tensors" of different spread, as a group concatenates them
    codes = (np.clip(np.round(rng.standard_normal(300_000) * np.repeat([2, 7, 4], 100_000)), -31, 31) + 32).astype(np.uint8)
    p = np.bincount(codes) / codes.size
    order0_bytes = -(p[p > 0] * np.log2(p[p > 0])).sum() * codes.size / 8
    assert len(T.codecs()["ac"][0](codes.tobytes())) < 0.97 * order0_bytes


def test_mlp_sort_keeps_the_function_and_its_column_storage_shrinks_ac(tmp_path):
    """Hidden units ordered by down-projection column RMS: the same outputs; stored column by column, a down
    projection whose units differ in spread costs ac fewer bytes than the unsorted one stored row by row."""
    hp, model = small_model("mlp_down:int5", CODEC="ac")
    with torch.no_grad():
        for b in model.blocks:
            n = b.mlp.down.weight.size(1)
            b.mlp.down.weight.mul_(torch.logspace(math.log10(0.05), math.log10(2.0), n)[torch.randperm(n)])
    x = torch.randint(0, hp.vocab_size, (2, 64))
    want, plain = model(x), T.export_artifact(model, dataclasses.replace(hp, mlp_sort=False), tmp_path / "p.artifact")
    for b in model.blocks:
        b.mlp.sort_units()
        assert (b.mlp.down.weight.square().sum(0).diff() >= 0).all()
    assert torch.allclose(model(x), want, atol=1e-5)
    report = T.export_artifact(model, hp, tmp_path / "s.artifact")
    header, _ = T.read_groups(tmp_path / "s.artifact")
    assert header["colmajor"] == [f"blocks.{i}.mlp.down.weight" for i in range(hp.num_layers)]
    assert report["groups"]["int5"]["len"] < 0.98 * plain["groups"]["int5"]["len"]
    state, fmts = T.load_artifact(tmp_path / "s.artifact"), T.quant_formats(hp, model)
    for name in header["colmajor"]:
        assert torch.equal(state[name], T.dequantize(T.quantize(model.state_dict()[name], fmts[name][1]), fmts[name][1]))


def test_two_four_keeps_the_two_largest_of_each_block_within_half_a_step():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    f = T.parse_fmt("sp6@10")  # a clip of 10 row RMS clips nothing: every kept value is rounded, never cut
    codes, scales, pos = T.quantize(w, f)
    assert codes.shape == (32, 32) and pos.shape == (32, 16) and int(pos.max()) <= 5
    deq = T.dequantize([codes, scales, pos], f)
    blocks, kept = w.view(32, 16, 4), T.dense24(torch.ones(32, 32), pos).view(32, 16, 4) != 0  # (a kept value may round to 0)
    assert not deq.view(32, 16, 4)[~kept].any()
    top2 = torch.zeros_like(kept).scatter_(2, blocks.abs().topk(2, dim=2).indices, True)
    assert torch.equal(kept, top2)
    err = (deq - w).abs() - scales[:, None] / 2
    assert (err[kept.flatten(1)] <= 1e-6).all()
    with pytest.raises(T.ConfigError, match="multiple of 4"):
        T.quantize(torch.randn(4, 6), f)
    with pytest.raises(T.ConfigError, match="not with sp"):
        T.parse_fmt("sp3+lq4")


def test_two_four_stores_half_the_codes_and_reloads_exactly(tmp_path):
    hp, model = small_model("mlp_up:sp3,mlp_down:sp3", CODEC="zstd")
    rep = T.export_artifact(model, hp, tmp_path / "s.artifact")
    n = sum(t.numel() for k, t in model.state_dict().items() if k.endswith(("up.weight", "down.weight")))
    assert rep["groups"]["sp3"]["n"] == n // 2 and rep["groups"]["pos"]["n"] == n // 4
    state, fmts = T.load_artifact(tmp_path / "s.artifact"), T.quant_formats(hp, model)
    for name, (_, f) in fmts.items():
        assert torch.equal(state[name], T.dequantize(T.quantize(model.state_dict()[name], f), f)), name


def test_dedup_floors_codes_as_seed_004_and_reloads_exactly(tmp_path):
    """QUANT_DEDUP_STEP=2: every code's level is its plain level floored to an even one (the seed's Q // 2 * 2),
    except that -Q (odd, the grid's lowest) goes up to -Q+1; the artifact reloads those codes exactly."""
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(5))
    w[0, 0] = -50.0  # a row whose clip leaves its minimum at -Q
    for f in (T.parse_fmt("int6@12.85"), T.parse_fmt("a5"), T.parse_fmt("int5@3")):
        levels = T.grid(f)
        plain, dd = (levels[T.quantize(w, f._replace(dedup=d))[0].long()] for d in (0, 2))
        want = torch.div(plain, 2, rounding_mode="floor") * 2
        want = torch.where(want < levels[0], want + 2, want)
        assert torch.equal(dd, want) and (dd % 2 == 0).all() and (plain % 2 != 0).any()
    hp, model = small_model("attn_qk:int6,attn_vo:a6,mlp_up:int5@20,mlp_down:int6@mean,embed:int8", CODEC="zstd",
                            QUANT_DEDUP_STEP="2")
    T.export_artifact(model, hp, tmp_path / "d.artifact")
    state, fmts = T.load_artifact(tmp_path / "d.artifact"), T.quant_formats(hp, model)
    for name, (_, f) in fmts.items():
        codes = T.quantize(model.state_dict()[name], f)
        assert f.dedup == 2 and (T.grid(f)[codes[0].long()] % 2 == 0).all(), name
        assert torch.equal(state[name], T.dequantize(codes, f)), name


def test_32_level_grid_uses_every_code_and_round_trips(tmp_path):
    """aN: all 2^N codes, -2^(N-1)..2^(N-1)-1 (seeds 002/003's int5 -16..15): a clip that cuts the tails uses the
    extra -16; at the row max (QUANT_CLIP_QUANTILE=1, the seeds' scale max/15) it is never reached, as in their runs."""
    f = T.parse_fmt("a5")
    assert f.tag == "a5" and T.grid(f).tolist() == list(range(-16, 16)) and T.parse_fmt("a6@mean").mean
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(2))
    levels = T.grid(f)[T.quantize(w, f)[0].long()]
    assert levels.min() == -16 and levels.max() == 15
    assert T.grid(f)[T.quantize(w, f._replace(quantile=1.0))[0].long()].min() == -15
    hp, model = small_model("attn_qk:a6,attn_vo:a5,mlp_up:a5+lr2,mlp_down:a4,embed:int8", CODEC="zstd")
    rep = T.export_artifact(model, hp, tmp_path / "a.artifact")
    assert {"a4", "a5", "a6"} <= set(rep["groups"])
    state, fmts = T.load_artifact(tmp_path / "a.artifact"), T.quant_formats(hp, model)
    for name, (_, f) in fmts.items():
        assert torch.equal(state[name], T.dequantize(T.quantize(model.state_dict()[name], f), f)), name
    assert T.narrower_spec(hp, model, 10 ** 9).startswith("mlp_up:a4+lr2,mlp_down:a4,attn_vo:a4")  # QUANT_FIT narrows aN


def test_clip_rules_quantile_and_mean():
    """QUANT_CLIP_QUANTILE=q: each row's clip is the least-MSE one among its |w| quantiles q..1 (1: the row max);
    @mean: every row clipped at the mean over rows of their least-MSE clips, in row RMS (seed 004)."""
    w = torch.randn(32, 512, generator=torch.Generator().manual_seed(4)) * torch.linspace(0.5, 2, 32)[:, None]
    levels = T.grid(T.Fmt("int", 5))
    _, s = T.quantize_rows(w, levels, T.Fmt("int", 5, quantile=1.0))
    assert torch.equal(s, (w.abs().amax(1) / 15).half().float())
    _, s = T.quantize_rows(w, levels, T.Fmt("int", 5, quantile=0.999))
    cand = torch.quantile(w.abs(), torch.tensor([0.999, 0.9995, 0.9999, 0.99999, 1.0]), dim=1).T / 15
    assert all(torch.isclose(cand[i].half().float(), s[i]).any() for i in range(32))
    _, best = T.quantize_rows(w, levels)
    rms = w.square().mean(1).sqrt()
    codes, s = T.quantize_rows(w, levels, T.parse_fmt("int5@mean"))
    assert torch.allclose(s, ((best / rms).mean() * rms).half().float()) and not torch.allclose(s, best)
    assert torch.equal(codes.long(), T.nearest(w / s[:, None], levels)[0])


def test_prune_zeroes_the_stated_fraction_of_each_matrix(tmp_path):
    w = torch.randn(96, 200, generator=torch.Generator().manual_seed(6))
    p = T.prune(w, 0.05)
    zero = p == 0
    assert int(zero.sum()) == int(0.05 * w.numel()) and torch.equal(p[~zero], w[~zero])
    assert w[zero].abs().max() <= w[~zero].abs().min()  # the smallest ones
    assert T.prune(w, 0.0) is w
    hp, model = small_model("attn_qk:int8,attn_vo:int8,mlp_up:int8,mlp_down:int8,embed:int8", CODEC="zstd",
                            QUANT_PRUNE="0.05", QUANT_CLIP_QUANTILE="1")  # int8 steps of max/127: only pruned ones round to 0
    T.export_artifact(model, hp, tmp_path / "p.artifact")
    state = T.load_artifact(tmp_path / "p.artifact")
    for name in T.quant_formats(hp, model):
        assert float((state[name] == 0).float().mean()) == pytest.approx(0.05, abs=1 / state[name].numel()), name


@pytest.mark.parametrize("spec", [SPEC, "mlp_up:sp4,mlp_down:tq3"])
def test_freeze_dry_at_tolerance_0_restores_every_code_exactly(exported, tmp_path, spec):
    hp, model, path, _ = exported
    hp = dataclasses.replace(hp, quant_spec=spec)
    plain, dried = T.export_artifact(model, hp, tmp_path / "p.artifact"), T.export_artifact(
        model, dataclasses.replace(hp, freeze_dry=0), tmp_path / "fd.artifact")
    assert "fd" in dried["groups"] and dried["freeze_dry"]["changed"] == 0 and plain["freeze_dry"] is None
    want, got = T.load_artifact(tmp_path / "p.artifact"), T.load_artifact(tmp_path / "fd.artifact")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_freeze_dry_drops_what_its_fit_predicts_and_bounds_the_rest():
    """A matrix whose odd columns are the mean of their neighbours is stored in fewer bytes, exactly; on Gaussian
    codes, tolerance k moves a code by at most k steps and fits (stores 0 for) more of them."""
    g = torch.Generator().manual_seed(0)
    even = torch.randn(256, 65, generator=g)
    redundant = torch.stack((even[:, :64], (even[:, :64] + even[:, 1:]) / 2), -1).flatten(1)
    f = T.parse_fmt("int6")
    codes = T.quantize(redundant, f)[0]
    stored = T.freeze_dry(codes, len(T.grid(f)), 0)
    assert torch.equal(T.thaw(*stored, len(T.grid(f))), codes) and (stored[1] == 0).float().mean() > 0.5
    size = lambda parts: sum(len(T.codecs()["zstd"][0](p.numpy().tobytes())) for p in parts)
    assert size(stored) < 0.9 * size([codes])
    codes = T.quantize(torch.randn(256, 64, generator=g), f)[0]
    fitted = []
    for tol in (0, 1, 2):
        stored = T.freeze_dry(codes, len(T.grid(f)), tol)
        moved = T.thaw(*stored, len(T.grid(f))).int() - codes.int()
        assert moved.abs().max() <= tol and (tol or not moved.any())
        fitted.append(float((stored[1] == 0).float().mean()))
    assert fitted[0] < fitted[1] < fitted[2]


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign", "missing"])
def test_refuses_damaged_or_foreign_file(exported, tmp_path, damage):
    path = tmp_path / "bad.artifact"
    data = bytearray(exported[2].read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x10
    if damage != "missing":
        path.write_bytes(bytes(data[:len(data) - 100]) if damage == "truncate" else
                         b"\x93NUMPY" + bytes(200) if damage == "foreign" else bytes(data))
    with pytest.raises(T.ConfigError, match="bad magic|checksum|missing") as e:
        T.load_artifact(path)
    assert str(path) in str(e.value) and "re-export" in str(e.value) and "\n" not in str(e.value)


def test_qat_forward_equals_exported_forward(tmp_path):
    hp, model = small_model(SPEC.replace("+lr4", "").replace("+lr2", ""), QAT_THRESHOLD="0.5", QAT_STEPS="3", CODEC="zstd")
    run = T.Run(hp, torch.device("cpu"))
    run.model, run.log = model, lambda msg: None
    bits = []  # the bit width of two roles after each step: int5 and tq3 exports, 3 stages down to them
    for step, lr in enumerate([1.0, 0.45, 0.3, 0.25, 0.1, 0.0]):
        T.on_train_step(run, 100 + step, lr)
        bits.append([getattr(m, "qat_fmt", None) and m.qat_fmt.bits for m in (model.blocks[1].mlp.up, model.blocks[1].attn.v)])
    assert run.results["qat_stages"] == [[102, 2], [103, 1], [105, 0]]
    assert bits == [[None, None], [7, 4], [6, 4], [6, 4], [5, 3], [5, 3]]  # tq is capped at tq4
    assert model.blocks[1].mlp.up.qat_fmt == T.Fmt("int", 5) and model.blocks[1].attn.v.qat_fmt.kind == "tq"
    x = torch.randint(0, hp.vocab_size, (2, 64))
    model(x).square().mean().backward()  # straight-through gradients reach the fp32 weights
    assert model.blocks[1].mlp.up.weight.grad.abs().sum() > 0
    with torch.no_grad():  # an optimizer step; the hook after it refreshes the fake-quantized weights
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    T.on_train_step(run, 106, 0.0)
    T.export_artifact(model, hp, tmp_path / "q.artifact")
    state = T.load_artifact(tmp_path / "q.artifact")
    fresh = T.GPT(hp)
    fresh.load_state_dict(state)
    with torch.no_grad():  # tensors QAT does not touch (embeddings, gains) take the exported values
        for name, t in model.state_dict().items():
            m = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else None
            if isinstance(m, T.CastedLinear) and m.qat is not None:
                assert torch.equal(T.fake_quant(m.weight, m.qat), state[name]), name  # forward value = export's
            else:
                t.copy_(state[name])
        assert torch.equal(model(x), fresh(x))


def test_bad_quant_env_fails_naming_the_variable():
    for env, var in [({"QUANT_SPEC": "mlp_up:int9"}, "QUANT_SPEC"), ({"QUANT_SPEC": "mlp:int5"}, "QUANT_SPEC"),
                     ({"CODEC": "gzip"}, "CODEC"), ({"QAT_THRESHOLD": "1.5"}, "QAT_THRESHOLD"),
                     ({"QUANT_SPEC": "layers3-1:int5"}, "QUANT_SPEC"), ({"QUANT_SPEC": "layers11:int5"}, "QUANT_SPEC")]:
        with pytest.raises(T.ConfigError, match=var):
            T.load_hparams(env)


@pytest.mark.parametrize("preset", sorted(T.PRESETS))
def test_every_matrix_module_declares_its_quant_role(preset):
    """Roles come from the modules, not attribute names: a renamed or new Linear / Embedding without one fails here
    (it would otherwise be exported as fp16)."""
    hp = T.load_hparams({"PRESET": preset, "ATTN_GATE_WINDOW": "12", "TIE_EMBEDDINGS": "0", "VE_LAYERS": "-1"})
    with torch.device("meta"):
        model = T.GPT(hp)
    mats = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]
    assert len(mats) >= 7 * hp.num_layers and all(getattr(m, "role", None) in T.ROLES for m in mats)
    weights = {n for n, p in model.named_parameters() if p.dim() == 2 and n.endswith(".weight")}
    assert weights == set(T.quant_formats(hp, model))


def test_depth_roles_override_by_block_last_match_wins():
    hp = T.load_hparams({"NUM_LAYERS": "6", "QUANT_SPEC": "mlp_up:int4,layers1-4:int5,last:int7,layers4:int6"})
    with torch.device("meta"):
        fmts = T.quant_formats(hp, T.GPT(hp))
    up = [fmts[f"blocks.{i}.mlp.up.weight"] for i in range(6)]
    assert [f.tag for _, f in up] == ["int4", "int5", "int5", "int5", "int6", "int7"]
    assert {role for role, _ in up} == {"mlp_up"}  # the role stays the matrix's own


def test_export_reserve_comes_off_the_training_cap():
    assert T.train_budget(T.load_hparams({"MAX_WALLCLOCK_SECONDS": "600", "EXPORT_RESERVE_SECONDS": "12"})) == 588
    assert T.train_budget(T.load_hparams({"MAX_WALLCLOCK_SECONDS": "600", "GPTQ": "0"})) == 540  # compression is export too
    assert T.train_budget(T.load_hparams({"MAX_WALLCLOCK_SECONDS": "0"})) == 0


def test_export_stage_roundtrip_and_over_cap(tiny_run, brown_data, tmp_path, monkeypatch):
    """The real export stage (GPTQ on training tokens, default spec): reloaded weights score close to the
    trained ones, results carry the quant report, and an artifact over the cap marks the run over_cap."""
    hp = T.load_hparams(tiny_env(brown_data, tmp_path, ARTIFACT_PATH=str(tmp_path / "x.artifact"), CODEC="zstd",
                                 QUANT_FIT="0"))
    val = tiny_run.val_tokens[:32 * hp.eval_seq_len + 1]
    run = dataclasses.replace(tiny_run, hp=hp, val_tokens=val, results=dict(status="running", train_seconds=1.0),
                              model=copy.deepcopy(tiny_run.model))  # export sorts the MLP units of the model it gets
    trained = run.model
    monkeypatch.setattr(T, "ARTIFACT_CAP_BYTES", 1000)
    run.results.update(T.export(run))
    assert all((b.mlp.down.weight.square().sum(0).diff() >= 0).all() for b in trained.blocks)  # MLP_SORT
    assert run.model is not tiny_run.model and run.results["artifact_path"] == str(tmp_path / "x.artifact")
    assert run.results["status"] == "over_cap" and run.results["artifact_bytes"] > 1000
    q = run.results["quant"]
    assert q["gptq"] and run.results["gptq_calib_seconds"] > 0 and {"int5", "int6", "int8"} <= set(q["groups"])
    _, bpb_fp = T.eval_plain(run, tiny_run.model)
    _, bpb_q = T.eval_plain(run, run.model)
    assert math.isfinite(bpb_q) and abs(bpb_q - bpb_fp) < 0.05, (bpb_fp, bpb_q)


def test_narrower_spec_steps_least_sensitive_roles_first():
    hp = T.load_hparams({"PRESET": "tiny"})
    model = T.GPT(hp)
    mlp_up = sum(t.numel() for n, t in model.state_dict().items() if n.endswith("up.weight"))
    spec = T.parse_spec(T.narrower_spec(hp, model, 1))
    assert spec["mlp_up"] == "int4" and spec["mlp_down"] == "int5" and spec["attn_qk"] == "int6"
    spec = T.parse_spec(T.narrower_spec(hp, model, mlp_up // 8 + 1))  # one role's saving is not enough
    assert spec["mlp_up"] == spec["mlp_down"] == "int4" and spec["attn_vo"] == "int6"
    floor = T.narrower_spec(hp, model, 10**9)
    assert all(T.parse_fmt(f).bits == 4 for r, f in T.parse_spec(floor).items() if r != "head")
    assert T.narrower_spec(dataclasses.replace(hp, quant_spec=floor), model, 1) is None
    assert T.parse_spec(T.narrower_spec(dataclasses.replace(hp, quant_spec="mlp_up:int7@12"), model, 1))["mlp_up"] == "int6@12"
    spec = T.parse_spec(T.narrower_spec(dataclasses.replace(hp, quant_spec=hp.quant_spec + ",layers0-3:int6"), model, 1))
    assert spec["mlp_up"] == "int5" and spec["aux"] == "int5"  # every block's matrices keep the override: aux narrows


def test_quant_fit_reexports_narrower_until_under_the_cap(tiny_run, brown_data, tmp_path, monkeypatch):
    """An artifact a byte over the cap is re-exported with MLP-up one bit narrower and fits; one that cannot
    fit even at the int4 floor still ends over_cap, with every spec tried in the results."""
    hp = T.load_hparams(tiny_env(brown_data, tmp_path, CODEC="zstd", GPTQ="0", MLP_SORT="0"))  # the model as given
    first = T.export_artifact(tiny_run.model, hp, tmp_path / "probe.artifact")["bytes"]
    run = dataclasses.replace(tiny_run, hp=hp, results=dict(status="running"))
    monkeypatch.setattr(T, "ARTIFACT_CAP_BYTES", T.CODE_BYTES + first - 1)
    run.results.update(T.export(run))
    (spec0, bytes0, _), (spec1, bytes1, factor) = run.results["quant_fit"]
    assert bytes0 == first and T.parse_spec(spec1)["mlp_up"] == "int4" and bytes1 < first and factor == 1.0
    assert run.results["status"] == "running" and run.results["quant"]["spec"] == spec1
    monkeypatch.setattr(T, "ARTIFACT_CAP_BYTES", 1000)
    run = dataclasses.replace(tiny_run, hp=hp, results=dict(status="running"))
    run.results.update(T.export(run))
    assert run.results["status"] == "over_cap" and set(run.results["quant"]["groups"]) <= {"int4", "scales", "fp16"}


SET_STEPS = "attn_qk:int6@12,attn_vo:int6@12,mlp_up:int6@12,mlp_down:int6@12,embed:int8,aux:int6@12"


def test_quant_fit_widens_set_steps_to_land_under_the_cap(tiny_run, brown_data, tmp_path, monkeypatch):
    """Over the cap with set-step formats (intN@K), QUANT_FIT widens every such step by one factor, found by a
    secant on the measured bytes, and lands QUANT_FIT_MARGIN..2x that under the cap within QUANT_FIT_TRIALS
    re-exports; the int8 embedding (no set step) keeps its format."""
    hp = T.load_hparams(tiny_env(brown_data, tmp_path, CODEC="ac", GPTQ="0", MLP_SORT="0", QUANT_SPEC=SET_STEPS,
                                 QUANT_FIT_MARGIN="5000"))
    first = T.export_artifact(tiny_run.model, hp, tmp_path / "probe.artifact")["bytes"]
    room = first - 120_000  # ~7% smaller: about a third of a bit per weight
    monkeypatch.setattr(T, "ARTIFACT_CAP_BYTES", T.CODE_BYTES + room)
    run = dataclasses.replace(tiny_run, hp=hp, results=dict(status="running"))
    run.results.update(T.export(run))
    tried, spec = run.results["quant_fit"], T.parse_spec(run.results["quant"]["spec"])
    assert tried[0] == [SET_STEPS, first, 1.0] and 2 <= len(tried) <= 2 + T.QUANT_FIT_TRIALS, tried
    assert room - 10_000 <= run.results["model_bytes"] <= room - 5_000, (room, tried)
    assert run.results["status"] == "running" and spec["embed"] == "int8"
    factor = tried[-1][2]
    assert factor > 1 and {spec[r] for r in ("attn_qk", "attn_vo", "mlp_up", "mlp_down", "aux")} == {
        f"int6@{round(12 * factor, 3):g}"}


def fit_trials(sizes, margin: int = 1000, room: int = 1_000_000) -> list[list]:
    """fit_spec driven by a byte model sizes(factor) instead of exports, on the tiny model at SET_STEPS."""
    hp = T.load_hparams({"PRESET": "tiny", "QUANT_SPEC": SET_STEPS, "QUANT_FIT_MARGIN": str(margin)})
    with torch.device("meta"):
        model = T.GPT(hp)
    tried, nxt = [], (hp.quant_spec, 1.0)
    while nxt:
        tried.append([nxt[0], sizes(nxt[1]), nxt[1]])
        nxt = T.fit_spec(hp, model, tried, room)
    return tried


def test_fit_spec_lands_in_the_window_or_keeps_the_largest_fit():
    smooth = fit_trials(lambda f: round(1_150_000 - 250_000 * math.log(f) ** 0.9))  # entropy falls ~ log of the step
    assert len(smooth) <= 1 + T.QUANT_FIT_TRIALS and 998_000 <= smooth[-1][1] <= 999_000, smooth
    cliff = fit_trials(lambda f: 1_200_000 if f < 1.3 else 900_000 + round(10_000 * (2 - f)))  # nothing lands
    fits = [t for t in cliff if t[1] <= 1_000_000]
    assert len(cliff) <= 2 + T.QUANT_FIT_TRIALS and cliff[-1][1] == max(t[1] for t in fits), cliff
    assert fit_trials(lambda f: 999_999) == [[SET_STEPS, 999_999, 1.0]]  # under the cap: nothing to do
    hp = T.load_hparams({"PRESET": "tiny", "QUANT_SPEC": SET_STEPS, "QUANT_FIT_MARGIN": "1000"})
    short, landed = [T.widened(hp, 1.2), 999_950, 1.2], [T.widened(hp, 1.25), 998_400, 1.25]
    assert T.fit_spec(hp, T.GPT(hp), [[SET_STEPS, 1_200_000, 1.0], short, landed], 1_000_000) is None  # kept, not short
    mixed = T.load_hparams({"PRESET": "tiny", "QUANT_SPEC": "mlp_up:int6@12,mlp_down:int6"})  # set steps: a minority
    assert T.set_step_params(mixed, T.GPT(mixed)) == 0


def test_sampled_codec_choice_within_half_percent_of_every_codec_on_every_group(tiny_run, brown_data, tmp_path):
    """CODEC=auto picking each group's codec on a sample (64 KB here, so the trained tiny model's int5, int6 and int8
    groups are sampled) stores the same values within 0.5% of the bytes of trying every codec on every whole
    group; the report says what was sampled and what each candidate made of it."""
    hp, cache = T.load_hparams(tiny_env(brown_data, tmp_path, CODEC_SAMPLE_BYTES="65536")), {}
    full = T.export_artifact(tiny_run.model, dataclasses.replace(hp, codec_sample_bytes=0), tmp_path / "f", cache=cache)
    sampled = T.export_artifact(tiny_run.model, hp, tmp_path / "s", cache=cache)
    assert abs(sampled["bytes"] - full["bytes"]) <= 0.005 * full["bytes"], (sampled["bytes"], full["bytes"])
    picked = [g for g, m in sampled["groups"].items() if m["sampled"]["values"] < m["n"]]
    assert {"int5", "int6", "int8"} <= set(picked) and all(m["sampled"]["values"] == m["n"] for m in full["groups"].values())
    for g in picked:
        m = sampled["groups"][g]
        assert m["sampled"]["values"] == 65536 and len(m["sampled"]["bytes"]) == len(T.codecs())
        assert min(m["sampled"]["bytes"], key=m["sampled"]["bytes"].get) == f"{m['pack']}/{m['codec']}"
    a, b = T.load_artifact(tmp_path / "s"), T.load_artifact(tmp_path / "f")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sample_values_evenly_spaced_and_fixed_codecs_see_whole_groups():
    a = np.arange(1000)
    s = T.sample_values(a, 160)
    assert s.size == 160 and s[0] == 0 and s[-1] == 999 and (np.diff(s.reshape(16, 10), axis=1) == 1).all()
    assert T.sample_values(a, 1000) is a
    codes = {"int6": np.random.default_rng(0).integers(20, 43, 300_000).astype(np.uint8)}
    meta, _, seen = T.encode_groups(codes, "zstd", 4096)
    assert seen["int6"]["values"] == 300_000 and list(seen["int6"]["bytes"]) == ["u8/zstd"]
    meta, _, seen = T.encode_groups(codes, "auto", 4096)
    assert seen["int6"]["values"] == 4096 and meta["int6"]["n"] == 300_000


def test_gptq_block_updates_run_without_tf32(monkeypatch):
    """setup() allows TF32 for training matmuls on CUDA; GPTQ turns it off for its rounding and block updates and
    restores it after (on CPU the flag changes nothing)."""
    seen, nearest, g = [], T.nearest, torch.Generator().manual_seed(0)
    x, w, levels = torch.randn(512, 64, generator=g), torch.randn(32, 64, generator=g), T.grid(T.Fmt("int", 4))
    scales, hp, before = T.quantize_rows(w, levels)[1], T.load_hparams({"GPTQ_BLOCK": "16"}), torch.backends.cuda.matmul.allow_tf32
    monkeypatch.setattr(T, "nearest", lambda x, levels: seen.append(torch.backends.cuda.matmul.allow_tf32) or
                        nearest(x, levels))
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        codes, _ = T.gptq_codes(w, x.T @ x, levels, scales, hp)
        assert codes is not None and len(seen) == 64 and not any(seen) and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
