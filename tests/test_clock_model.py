"""scripts/clock_model.py: the calibration reproduces the records' logged figures within 15%, the script prints one
line per clock for the tiny and frontier configurations and exits 0 when they fit, 1 when a clock is exceeded, 2 on
bad input; the CPU probe counts graph breaks; preflight's FLOPs count looped layers."""
from __future__ import annotations

import os
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import clock_model as C  # noqa: E402
import train_gpt as T  # noqa: E402

SCRIPT = ROOT / "scripts" / "clock_model.py"
CLOCKS = ("train:", "export:", "eval compile:", "eval roundtrip:", "eval ttt:", "eval total:", "bytes:")


def clock(*args: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("PRESET", "SHAPE", "RESUME_FROM")}
    full.update(OMP_NUM_THREADS="1", **env)
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=600)


def test_calibration_reproduces_the_records_within_15_percent():
    rows = C.calibration_rows(T)
    figures = {(name, k) for name, k, *_ in rows}
    for rec in C.RECORDS:  # every logged figure of both records is compared, fitted or checked
        assert {(rec["name"], k) for k in rec["logged"]} <= figures
    for name, k, want, model, err, role in rows:
        assert err <= 0.15, (name, k, want, model, role)
    assert sum(role == "check" for *_, role in rows) >= 4  # figures no constant was fitted on


def test_fit_recovers_the_stated_constants():
    fitted = C.fit_constants(T)
    for name, value in fitted.items():
        assert getattr(C, name) == pytest.approx(value, rel=0.01), name


@pytest.mark.parametrize("preset", ["tiny", "frontier"])
def test_one_line_per_clock_and_exit_0(preset):
    proc = clock(PRESET=preset, CODEC="zstd")
    lines = proc.stdout.splitlines()
    for prefix in CLOCKS:
        assert sum(line.startswith(prefix) for line in lines) == 1, (prefix, proc.stdout, proc.stderr)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert lines[-1].startswith("clock model: every clock fits")


def test_an_exceeded_clock_exits_1():
    proc = clock("--no-bytes", PRESET="tiny", EVAL_BUDGET_SECONDS="1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    over = [line for line in proc.stdout.splitlines() if line.startswith("OVER: ")]
    assert any(line.startswith("OVER: eval:") and "EVAL_BUDGET_SECONDS=1" in line for line in over), proc.stdout
    assert "[OVER]" in next(line for line in proc.stdout.splitlines() if line.startswith("eval total:"))


def test_bad_input_is_one_line():
    proc = clock(PRESET="tiny", NUM_HEADS="x")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: bad configuration: NUM_HEADS='x': expected int"]
    proc = clock("--margin", "1.5")
    assert proc.returncode == 2 and proc.stderr.startswith("error: --margin")


def test_loop_repeats_are_counted():
    hp = T.load_hparams({"PRESET": "frontier"})  # layers 3-5 three times once looping; parallel lanes from layer 8
    plain, looped = C.forward_profile(T, hp, 256, False), C.forward_profile(T, hp, 256, True)
    with torch.device("meta"):
        extra = len(T.GPT(hp).layer_order(True)) - hp.num_layers
    d, kv, hidden = hp.model_dim, hp.num_kv_heads * hp.head_dim, int(round(hp.mlp_mult * hp.model_dim))
    block = 2 * d * d + 2 * d * kv + 2 * d * hidden + hp.attn_gate_window * hp.num_heads  # multiply-adds
    assert extra == 6 and looped.mm - plain.mm == pytest.approx(2 * extra * block)
    assert looped.attn / plain.attn == pytest.approx((hp.num_layers + extra) / hp.num_layers)


def test_preflight_flops_count_loop_repeats():
    import preflight
    hp = T.load_hparams({"PRESET": "frontier", "SHAPE": "tiny"})
    model = T.GPT(hp)
    plain, looped = preflight.flops_per_token(T, model, hp, False), preflight.flops_per_token(T, model, hp, True)
    block = sum(m.weight.numel() for m in model.blocks[0].modules() if isinstance(m, T.CastedLinear))
    extra = len(model.layer_order(True)) - hp.num_layers
    attn = 6.0 * hp.train_seq_len * hp.num_heads * hp.head_dim
    assert looped - plain == pytest.approx(extra * (6.0 * block + attn))


def test_stand_in_lengths_match_the_logged_split():
    n = C.stand_in_lengths(C.VAL_TOKENS["caseops"])
    assert len(n) == C.VAL_DOCS and abs(n.sum() / C.VAL_TOKENS["caseops"] - 1) < 1e-3
    s = np.sort(n)
    assert s[-1] + 1 == pytest.approx(97114, rel=0.01)  # the longest document the records logged
    assert s[(782 - 1) * 64 - 1] < s[-16]  # the 16 longest form the last batch of 64 (50,000 = 781 x 64 + 16)


def test_probe_counts_graph_breaks_and_host_syncs(brown_data, tmp_path):
    hp = T.load_hparams({"PRESET": "tiny"})
    real = T.Block.forward

    def broken(self, *args, **kwargs):  # one graph break in every block application
        torch._dynamo.graph_break()
        return real(self, *args, **kwargs)

    def syncing(run, step, lr_mult, inner=T.on_train_step):  # a host read of a reduced value every step
        run.all_reduce(float(step))
        return inner(run, step, lr_mult)
    with mock.patch.object(T.Block, "forward", broken), mock.patch.object(T, "on_train_step", syncing):
        got = C.probe(T, hp, tmp_path, data=brown_data)
    assert got["breaks_per_forward"] >= got["layer_apps"] and got["syncs_per_step"] == 1, got
    got = C.probe(T, hp, tmp_path, data=brown_data)  # the loop as it is: one graph, no read per step
    assert got["breaks_per_forward"] == 0 and got["syncs_per_step"] == 0, got
