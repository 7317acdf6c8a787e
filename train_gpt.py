"""Parameter-golf trainer: one file, every feature switched by an environment variable.

Launch: torchrun --standalone --nproc_per_node=8 train_gpt.py   (CUDA: NCCL, bf16)
        PRESET=tiny torchrun --standalone --nproc_per_node=2 train_gpt.py   (CPU: gloo, fp32)
Sections follow the data: hyperparameters, optimizer, evaluation, quantization,
data loading, model, training stages (setup, train, export, evaluate, report).
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

# -----------------------------------------------------------------------------
# HYPERPARAMETERS
# -----------------------------------------------------------------------------
# Every field is read from the upper-cased environment variable of its name.
# The defaults ARE the default preset (the best 8x H100 recipe); other presets
# are plain dicts of overrides, and explicit variables override a preset.


class ConfigError(ValueError):
    """A bad input (env value, data file, artifact); the message names it and the fix."""


@dataclass
class Hyperparameters:
    # run and data
    preset: str = "default"
    run_id: str = ""
    seed: int = 1337
    log_dir: str = "logs"
    data_path: str = "./data/datasets/fineweb10B_sp1024"
    tokenizer_path: str = ""  # empty: taken from DATA_PATH/manifest.json or the public layout
    vocab_size: int = 1024
    # schedule
    iterations: int = 20000
    warmup_steps: int = 20  # compile-priming steps, then weights and optimizer are restored
    lr_warmup_steps: int = 0
    warmdown_iters: int = 3500
    max_wallclock_seconds: float = 600.0
    train_batch_tokens: int = 786432
    train_seq_len: int = 2048
    grad_accum_steps: int = 0  # 0: 8 // world_size, so the global batch is independent of world size
    train_log_every: int = 100
    val_loss_every: int = 0
    val_batch_tokens: int = 524288
    # model
    num_layers: int = 11
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: float = 3.0
    mlp_act: str = "leaky_relu2"
    tie_embeddings: bool = True
    tied_embed_init_std: float = 0.005
    rope_base: float = 10000.0
    rope_dims: int = 16  # rotary on the first k dims of each head; 0 = all
    logit_softcap: float = 30.0
    qk_gain_init: float = 1.5
    unet_skips: bool = True
    smear_gate: bool = True
    bigram_buckets: int = 2048
    bigram_dim: int = 128
    ve_layers: str = "-2,-1"  # python-style layer indices; empty = off
    ve_dim: int = 128
    xsa_last_n: int = 4
    ln_scale: bool = True
    ortho_init: bool = True
    # optimizer
    matrix_lr: float = 0.025
    scalar_lr: float = 0.025
    tied_embed_lr: float = 0.035
    embed_lr: float = 0.6
    head_lr: float = 0.008
    muon_momentum: float = 0.99
    muon_momentum_warmup_start: float = 0.92
    muon_momentum_warmup_steps: int = 1500
    muon_backend_steps: int = 5
    muon_wd: float = 0.04
    adam_wd: float = 0.04
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip_norm: float = 0.3
    ema_decay: float = 0.997  # 0 = off
    swa_every: int = 50  # 0 = off
    swa_threshold: float = 0.2  # SWA collects while the LR multiplier is below this
    weight_avg: str = "ema"  # which weights are exported: ema | swa | none
    compile: bool = True  # torch.compile (CUDA)
    # evaluation
    eval_seq_len: int = 2048
    eval_budget_seconds: float = 600.0

    def __post_init__(self):
        self.run_id = self.run_id or f"run_{time.strftime('%Y%m%d_%H%M%S')}_{uuid.uuid4().hex[:6]}"

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads


PRESETS: dict[str, dict[str, object]] = {
    "default": {},
    # CPU proxy: the default recipe at 4 layers, width 256, on the local Brown data.
    "tiny": dict(
        data_path="./data/datasets/brown_sp1024", num_layers=4, model_dim=256, num_heads=4,
        num_kv_heads=2, mlp_mult=2.0, train_seq_len=256, eval_seq_len=256, train_batch_tokens=8192,
        iterations=400, warmdown_iters=120, warmup_steps=0, lr_warmup_steps=10, xsa_last_n=2,
        bigram_buckets=1024, max_wallclock_seconds=0.0, train_log_every=20, val_batch_tokens=65536,
        compile=False, muon_momentum_warmup_steps=100, swa_every=10,
    ),
}

RULES = {  # field -> (predicate, what is expected); checked at start-up
    "num_layers": (lambda v: v >= 1, "an int >= 1"),
    "model_dim": (lambda v: v >= 8, "an int >= 8"),
    "num_heads": (lambda v: v >= 1, "an int >= 1"),
    "num_kv_heads": (lambda v: v >= 1, "an int >= 1"),
    "mlp_mult": (lambda v: v > 0, "a number > 0"),
    "mlp_act": (lambda v: v in ("relu2", "leaky_relu2"), "relu2 or leaky_relu2"),
    "vocab_size": (lambda v: 2 <= v <= 65536, "an int in [2, 65536] (tokens are uint16)"),
    "iterations": (lambda v: v >= 0, "an int >= 0"),
    "train_batch_tokens": (lambda v: v >= 1, "an int >= 1"),
    "train_seq_len": (lambda v: v >= 2, "an int >= 2"),
    "eval_seq_len": (lambda v: v >= 2, "an int >= 2"),
    "grad_accum_steps": (lambda v: v >= 0, "an int >= 0"),
    "logit_softcap": (lambda v: v >= 0, "a number >= 0 (0 = off)"),
    "ema_decay": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "weight_avg": (lambda v: v in ("ema", "swa", "none"), "ema, swa or none"),
    "max_wallclock_seconds": (lambda v: v >= 0, "a number >= 0 (0 = no cap)"),
}


def _parse(name: str, raw: str, kind: type):
    raw = raw.strip()
    if kind is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name.upper()}={raw!r}: expected 0 or 1")
    try:
        value = kind(float(raw)) if kind is int and float(raw).is_integer() else kind(raw)
    except ValueError:
        raise ConfigError(f"{name.upper()}={raw!r}: expected {kind.__name__}") from None
    return value


def load_hparams(env: dict[str, str] | None = None) -> Hyperparameters:
    """Defaults <- PRESET's overrides <- explicit environment variables, then validated."""
    env = dict(os.environ if env is None else env)
    preset = env.get("PRESET", "default")
    if preset not in PRESETS:
        raise ConfigError(f"PRESET={preset!r}: unknown; choose one of {', '.join(PRESETS)}")
    values: dict[str, object] = {"preset": preset, **PRESETS[preset]}
    for f in dataclasses.fields(Hyperparameters):
        if f.name.upper() in env and f.name != "preset":
            values[f.name] = _parse(f.name, env[f.name.upper()], type(getattr(Hyperparameters, f.name)))
    hp = Hyperparameters(**values)
    for name, (ok, expected) in RULES.items():
        if not ok(getattr(hp, name)):
            raise ConfigError(f"{name.upper()}={getattr(hp, name)!r}: expected {expected}")
    if hp.model_dim % hp.num_heads or hp.num_heads % hp.num_kv_heads or hp.head_dim % 2:
        raise ConfigError(f"MODEL_DIM={hp.model_dim}, NUM_HEADS={hp.num_heads}, NUM_KV_HEADS={hp.num_kv_heads}: "
                          "heads must divide MODEL_DIM into an even head size, kv heads must divide heads")
    if not 0 <= hp.rope_dims <= hp.head_dim or hp.rope_dims % 2:
        raise ConfigError(f"ROPE_DIMS={hp.rope_dims}: expected an even number in [0, head_dim={hp.head_dim}]")
    parse_layers(hp.ve_layers, hp.num_layers)
    return hp


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """'-2,-1' -> [num_layers-2, num_layers-1]; python-style indices so presets scale with depth."""
    try:
        idx = sorted({int(s) % num_layers for s in spec.split(",") if s.strip()})
        bad = [int(s) for s in spec.split(",") if s.strip() and not -num_layers <= int(s) < num_layers]
    except ValueError:
        bad = [spec]
    if bad:
        raise ConfigError(f"VE_LAYERS={spec!r}: expected comma-separated layer indices in [-{num_layers}, {num_layers})")
    return idx

# -----------------------------------------------------------------------------
# MUON OPTIMIZER
# -----------------------------------------------------------------------------


def zeropower_via_newtonschulz5(G: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Approximately orthogonalize G (push its singular values towards 1) by a quintic Newton-Schulz iteration."""
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G.bfloat16() if G.is_cuda else G.float()
    X = X / (X.norm() + eps)
    transposed = G.size(0) > G.size(1)
    if transposed:
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return (X.T if transposed else X).to(G.dtype)


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, orthogonalized per matrix; ranks split the matrices and all-reduce the updates."""

    def __init__(self, params, lr: float, momentum: float, backend_steps: int, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        distributed = dist.is_available() and dist.is_initialized()
        world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
        for group in self.param_groups:
            params = group["params"]
            if not params:
                continue
            flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device, dtype=torch.float32)
            offset = 0
            for i, p in enumerate(params):
                if i % world == rank and p.grad is not None:
                    state = self.state[p]
                    buf = state.setdefault("momentum_buffer", torch.zeros_like(p.grad))
                    buf.mul_(group["momentum"]).add_(p.grad)
                    g = p.grad.add(buf, alpha=group["momentum"])  # nesterov
                    g = zeropower_via_newtonschulz5(g, steps=group["backend_steps"])
                    g = g * max(1.0, g.size(0) / g.size(1)) ** 0.5
                    flat[offset:offset + p.numel()] = g.reshape(-1).float()
                offset += p.numel()
            if distributed:
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for p in params:
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(flat[offset:offset + p.numel()].view_as(p).to(p.dtype), alpha=-group["lr"])
                offset += p.numel()

# -----------------------------------------------------------------------------
# EVALUATION SETUP
# -----------------------------------------------------------------------------
# val_bpb = (mean token NLL / ln 2) * (tokens / bytes). Bytes per target token:
# UTF-8 length of its piece without the leading-space marker (1 for a byte
# token, 0 for control/unknown), plus 1 for the marker unless the previous
# token is a control/unknown token.


def build_byte_luts(sp, vocab_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-token lookup tables: (base_bytes int16, has_leading_space bool, is_boundary bool)."""
    if sp.vocab_size() > vocab_size:
        raise ConfigError(f"tokenizer has {sp.vocab_size()} pieces but VOCAB_SIZE={vocab_size}: "
                          "set VOCAB_SIZE to the tokenizer's size or use the matching tokenizer")
    base = np.zeros(vocab_size, dtype=np.int16)
    space = np.zeros(vocab_size, dtype=bool)
    boundary = np.ones(vocab_size, dtype=bool)  # ids past the tokenizer are never emitted
    for i in range(sp.vocab_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        space[i] = piece.startswith("\u2581")
        base[i] = len(piece.lstrip("\u2581").encode("utf-8")) if space[i] else len(piece.encode("utf-8"))
    return base, space, boundary


def count_bytes(prev: np.ndarray | Tensor, tgt: np.ndarray | Tensor, luts) -> int:
    """UTF-8 bytes that the target tokens stand for, given each one's previous token."""
    base, space, boundary = (torch.as_tensor(t, device=tgt.device) for t in luts) if isinstance(tgt, Tensor) else luts
    n = base[tgt].astype(np.int64) if isinstance(tgt, np.ndarray) else base[tgt].long()
    extra = space[tgt] & ~boundary[prev]
    return int((n + extra).sum())

# -----------------------------------------------------------------------------
# DATA LOADING
# -----------------------------------------------------------------------------
# Shard: 256 little-endian int32 header (magic 20240520, version 1, token count),
# then the tokens as little-endian uint16.

SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256


def load_data_shard(path: str | Path) -> np.ndarray:
    """Read one shard, refusing a wrong magic, version or length with the file's name."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: shard not found; build data with scripts/prepare_data.py")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header.size != HEADER_INTS:
        raise ConfigError(f"{path}: truncated header ({header.size * 4} of {HEADER_INTS * 4} bytes); rebuild the shard")
    if header[0] != SHARD_MAGIC:
        raise ConfigError(f"{path}: wrong magic {header[0]} (expected {SHARD_MAGIC}); not a token shard")
    if header[1] != SHARD_VERSION:
        raise ConfigError(f"{path}: unsupported version {header[1]} (expected {SHARD_VERSION})")
    expected = HEADER_INTS * 4 + int(header[2]) * 2
    if path.stat().st_size != expected:
        raise ConfigError(f"{path}: size {path.stat().st_size} bytes but header says {header[2]} tokens "
                          f"({expected} bytes); the shard is truncated or corrupt")
    return np.fromfile(path, dtype="<u2", count=int(header[2]), offset=HEADER_INTS * 4)


def shard_files(pattern: str) -> list[str]:
    files = sorted(glob.glob(pattern))
    if not files:
        raise ConfigError(f"no shards match {pattern}; set DATA_PATH or run scripts/prepare_data.py")
    return files


def load_val_tokens(data_path: str, seq_len: int) -> np.ndarray:
    tokens = np.concatenate([load_data_shard(f) for f in shard_files(os.path.join(data_path, "fineweb_val_*.bin"))])
    if tokens.size < seq_len + 1:
        raise ConfigError(f"{data_path}: validation split has {tokens.size} tokens, fewer than EVAL_SEQ_LEN+1={seq_len + 1}")
    return tokens
