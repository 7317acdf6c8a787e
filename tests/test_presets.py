"""Seed presets (issue 12): each builds its system, trains 3 steps at a reduced width on CPU, exports and reloads."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

import train_gpt as T
from conftest import ROOT

SEEDS = {  # preset -> (parameters at full size, a format group its QUANT_SPEC must produce)
    "baseline": (17_059_912, "int8"), "turboquant_mixed": (33_580_123, "int4"), "turboquant_13l": (44_258_603, "tq2"),
    "int5_qat_576": (27_090_066, "a5"), "int5_mlp_12l": (29_191_777, "a5"), "gptq_int6_ttt": (35_985_008, "int6"),
}


@pytest.mark.parametrize("name", SEEDS)
def test_seed_preset_trains_exports_and_reloads(name, tmp_path, brown_data):
    hp = T.load_hparams({"PRESET": name})
    with torch.device("meta"):
        assert sum(p.numel() for p in T.GPT(hp).parameters()) == SEEDS[name][0]  # the seed's model at full size
    width = 16 * hp.num_heads  # the preset's depth and heads; head size 16 holds the rotary dims
    env = dict(os.environ, PRESET=name, DATA_PATH=str(brown_data), VOCAB_SIZE="1024", MODEL_DIM=str(width),
               BIGRAM_DIM="16", VE_DIM="16", ATTN_GATE_WINDOW=str(min(hp.attn_gate_window, width)), ITERATIONS="3",
               TRAIN_SEQ_LEN="128", EVAL_SEQ_LEN="128", EVAL_STRIDE="64", TRAIN_BATCH_TOKENS="1024",
               WARMDOWN_ITERS="2", WARMDOWN_FRAC="0", WARMUP_STEPS="0", COMPILE="0", MAX_WALLCLOCK_SECONDS="0",
               VAL_MAX_TOKENS="4097", GPTQ_TOKENS="2048", TTT_CHUNK_TOKENS="512", LOG_DIR=str(tmp_path), RUN_ID="r")
    proc = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["status"] == "ok" and res["steps"] == 3 and res["config"]["preset"] == name
    assert res["config"]["quant_spec"] == hp.quant_spec and SEEDS[name][1] in res["quant"]["groups"]
    assert "roundtrip" in res["stages"]  # scored from the artifact as reloaded
    if name == "int5_mlp_12l":  # QAT_THRESHOLD=1: fake-quantized from the first step, as the seed trained
        assert res["qat_stages"][0] == [1, 0]
    if name == "turboquant_mixed":  # depth roles: blocks 0-1 and 9-10 at int5, V/O between at int4
        tags = {n: tag for n, _, tag in T.read_groups(res["artifact_path"])[0]["tensors"]}
        assert [tags[f"blocks.{i}.attn.v.weight"] for i in (0, 1, 2, 8, 9, 10)] == ["int5"] * 2 + ["int4"] * 2 + ["int5"] * 2


def test_shape_tiny_puts_any_preset_at_the_cpu_proxy_size():
    tiny, shaped = (dataclasses.asdict(T.load_hparams(e)) for e in ({"PRESET": "tiny"}, {"SHAPE": "tiny"}))
    # tiny = the default at SHAPE=tiny, less the two switches the proxy measured worse at 4 layers
    assert {k for k in tiny if tiny[k] != shaped[k]} == {"preset", "shape", "run_id", "unet_skips", "ln_scale"}
    assert not tiny["unet_skips"] and not tiny["ln_scale"] and shaped["unet_skips"] and shaped["ln_scale"]
    hp = T.load_hparams({"PRESET": "frontier", "SHAPE": "tiny", "ITERATIONS": "50"})  # explicit variables still win
    assert (hp.num_layers, hp.model_dim, hp.iterations, hp.vocab_size, hp.data_path) == (
        4, 256, 50, 1024, "./data/datasets/brown_sp1024")
    assert (hp.loop_layers, hp.parallel_start, hp.xsa_last_n, hp.bigram_buckets, hp.swa_every) == ("1-2", 3, 4, 0, 0)
    assert hp.muon_polar and hp.quant_spec == T.PRESETS["frontier"]["quant_spec"]  # the recipe stays
    spec = T.load_hparams({"PRESET": "turboquant_mixed", "SHAPE": "tiny"}).quant_spec  # 11 layers -> 4
    assert spec.endswith("layers0-0:int5,layers3-3:int5")
    assert T.load_hparams({"PRESET": "turboquant_13l", "SHAPE": "tiny"}).ve_layers == "3"  # 9,10 of 13
    with pytest.raises(T.ConfigError, match="SHAPE='huge'"):
        T.load_hparams({"SHAPE": "huge"})
