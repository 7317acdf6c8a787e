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
    val_max_tokens: int = 0  # 0 = the whole split (a score only counts on the whole split)
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
        base[i] = len((piece[1:] if space[i] else piece).replace("\u2581", " ").encode("utf-8"))  # marker = 1 byte
    return base, space, boundary


def count_bytes(prev: np.ndarray | Tensor, tgt: np.ndarray | Tensor, luts) -> int:
    """UTF-8 bytes that the target tokens stand for, given each one's previous token."""
    base, space, boundary = (torch.as_tensor(t, device=tgt.device) for t in luts) if isinstance(tgt, Tensor) else luts
    n = base[tgt].astype(np.int64) if isinstance(tgt, np.ndarray) else base[tgt].long()
    extra = space[tgt] & ~boundary[prev]
    return int((n + extra).sum())



@torch.no_grad()
def eval_plain(run: Run, model: nn.Module) -> tuple[float, float]:
    """Non-overlapping EVAL_SEQ_LEN windows, split over ranks; returns (val_loss nats, val_bpb)."""
    hp, toks = run.hp, run.val_tokens
    n_seq = (toks.size - 1) // hp.eval_seq_len
    per_batch = max(1, hp.val_batch_tokens // hp.eval_seq_len)
    lo, hi = n_seq * run.rank // run.world_size, n_seq * (run.rank + 1) // run.world_size
    nll = n_tok = n_bytes = 0.0
    model.eval()
    for s in range(lo, hi, per_batch):
        e = min(s + per_batch, hi)
        span = torch.from_numpy(toks[s * hp.eval_seq_len:e * hp.eval_seq_len + 1].astype(np.int64)).to(run.device)
        x, y = span[:-1].view(-1, hp.eval_seq_len), span[1:].view(-1, hp.eval_seq_len)
        with run.autocast():
            nll += float(token_nll(model(x), y).double().sum())
        n_tok += y.numel()
        n_bytes += count_bytes(x, y, run.luts)
    model.train()
    nll, n_tok, n_bytes = run.all_sum(nll, n_tok, n_bytes)
    return nll / n_tok, nll / n_tok / math.log(2) * n_tok / n_bytes

# -----------------------------------------------------------------------------
# QUANTIZATION
# -----------------------------------------------------------------------------
# Artifact: b"PGA1", u32 header length, JSON header, then raw buffers. No pickle.

ARTIFACT_MAGIC = b"PGA1"


def fake_quant(w: Tensor, fmt) -> Tensor:
    raise NotImplementedError("QAT formats arrive with the quantization section")


def on_train_step(run, step: int, lr_mult: float):
    """Per-step hook of the quantization section (progressive QAT)."""


def quantize_int8_rows(w: Tensor) -> tuple[np.ndarray, np.ndarray]:
    scale = (w.abs().amax(dim=1, keepdim=True) / 127).clamp_min(1e-12)
    return torch.round(w / scale).to(torch.int8).numpy(), scale.squeeze(1).to(torch.float16).numpy()


def export_artifact(state: dict[str, Tensor], path: str | Path) -> int:
    """Quantize matrices per row to int8 (control tensors fp16), zstd the buffers; returns the file's bytes."""
    import zstandard
    entries, blobs, offset = [], [], 0
    for name, t in state.items():
        t = t.detach().float().cpu()
        arrays = quantize_int8_rows(t) if t.ndim == 2 and t.numel() > 4096 else (t.to(torch.float16).numpy(),)
        for a in arrays:
            entries.append(dict(name=name, dtype=a.dtype.str, shape=list(a.shape), offset=offset, shape_of=list(t.shape)))
            blobs.append(a.tobytes())
            offset += len(blobs[-1])
    body = zstandard.ZstdCompressor(level=22).compress(b"".join(blobs))
    header = json.dumps(dict(entries=entries, raw_bytes=offset)).encode()
    data = ARTIFACT_MAGIC + len(header).to_bytes(4, "little") + header + body
    write_atomic(path, data)
    return len(data)


def load_artifact(path: str | Path) -> dict[str, Tensor]:
    import zstandard
    data = Path(path).read_bytes()
    if data[:4] != ARTIFACT_MAGIC:
        raise ConfigError(f"{path}: not a parameter-golf artifact (bad magic)")
    n = int.from_bytes(data[4:8], "little")
    header = json.loads(data[8:8 + n])
    raw = zstandard.ZstdDecompressor().decompress(data[8 + n:], max_output_size=header["raw_bytes"])
    arrays: dict[str, list[np.ndarray]] = {}
    for e in header["entries"]:
        a = np.frombuffer(raw, dtype=np.dtype(e["dtype"]), count=math.prod(e["shape"]), offset=e["offset"]).reshape(e["shape"])
        arrays.setdefault(e["name"], []).append(a)
    state = {}
    for name, parts in arrays.items():
        t = torch.from_numpy(parts[0].astype(np.float32))
        state[name] = t * torch.from_numpy(parts[1].astype(np.float32))[:, None] if len(parts) == 2 else t
    return state


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


def load_val_tokens(data_path: str, seq_len: int, max_tokens: int = 0) -> np.ndarray:
    tokens = np.concatenate([load_data_shard(f) for f in shard_files(os.path.join(data_path, "fineweb_val_*.bin"))])
    tokens = tokens[:max_tokens or None]
    if tokens.size < seq_len + 1:
        raise ConfigError(f"{data_path}: validation split has {tokens.size} tokens, fewer than EVAL_SEQ_LEN+1={seq_len + 1}")
    return tokens


class TokenStream:
    """Reads shards in order, wrapping around forever."""

    def __init__(self, pattern: str):
        self.files, self.file_idx = shard_files(pattern), 0
        self.tokens, self.pos = load_data_shard(self.files[0]), 0

    def take(self, n: int) -> np.ndarray:
        chunks = []
        while n > 0:
            if self.pos >= self.tokens.size:
                self.file_idx = (self.file_idx + 1) % len(self.files)
                self.tokens, self.pos = load_data_shard(self.files[self.file_idx]), 0
            k = min(n, self.tokens.size - self.pos)
            chunks.append(self.tokens[self.pos:self.pos + k])
            self.pos, n = self.pos + k, n - k
        return np.concatenate(chunks)


class DistributedTokenLoader:
    """Each step every rank takes the same global chunk and keeps its own contiguous span (+1 for targets)."""

    def __init__(self, pattern: str, rank: int, world_size: int, device: torch.device):
        self.stream, self.rank, self.world_size, self.device = TokenStream(pattern), rank, world_size, device

    def next_batch(self, global_tokens: int, seq_len: int, grad_accum_steps: int) -> tuple[Tensor, Tensor]:
        local = global_tokens // (self.world_size * grad_accum_steps)
        chunk = self.stream.take((local + 1) * self.world_size)
        span = torch.from_numpy(chunk[self.rank * (local + 1):(self.rank + 1) * (local + 1)].astype(np.int64))
        x, y = span[:-1].reshape(-1, seq_len), span[1:].reshape(-1, seq_len)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

# -----------------------------------------------------------------------------
# MODEL
# -----------------------------------------------------------------------------
# One forward path (tokens -> soft-capped logits) serves training, evaluation
# and test-time training.

try:  # flash-attn is optional; SDPA is the reference path
    from flash_attn_interface import flash_attn_func  # FlashAttention-3 (Hopper)
except ImportError:
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        flash_attn_func = None


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


class CastedLinear(nn.Linear):
    """Linear kept in fp32, computed in the activation dtype; `qat` (a format) fake-quantizes the weight."""

    qat = None

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight if self.qat is None else fake_quant(self.weight, self.qat)
        return F.linear(x, w.to(x.dtype))


class Rotary(nn.Module):
    def __init__(self, rot_dims: int, base: float):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / base ** (torch.arange(0, rot_dims, 2).float() / rot_dims), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """Rotate the first rot_dims of each head of x (B, T, H, D); the rest pass unchanged."""
        rd = self.inv_freq.numel() * 2
        freqs = torch.outer(torch.arange(x.size(1), device=x.device, dtype=torch.float32), self.inv_freq)
        cos, sin = freqs.cos()[None, :, None, :].to(x.dtype), freqs.sin()[None, :, None, :].to(x.dtype)
        x1, x2, rest = x[..., :rd // 2], x[..., rd // 2:rd], x[..., rd:]
        return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, rest), dim=-1)


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal GQA attention on (B, T, H, D) tensors; flash-attn on CUDA when importable, else SDPA."""
    if flash_attn_func is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        out = flash_attn_func(q, k, v, causal=True)
        return out[0] if isinstance(out, tuple) else out
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       enable_gqa=k.size(2) != q.size(2))
    return y.transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, hp: Hyperparameters, xsa: bool):
        super().__init__()
        self.h, self.kv, self.d = hp.num_heads, hp.num_kv_heads, hp.head_dim
        self.q = CastedLinear(hp.model_dim, self.h * self.d, bias=False)
        self.k = CastedLinear(hp.model_dim, self.kv * self.d, bias=False)
        self.v = CastedLinear(hp.model_dim, self.kv * self.d, bias=False)
        self.o = CastedLinear(self.h * self.d, hp.model_dim, bias=False)
        self.o.zero_init = True
        self.q_gain = nn.Parameter(torch.full((self.h,), hp.qk_gain_init))
        self.rotary = Rotary(hp.rope_dims or self.d, hp.rope_base)
        self.xsa = xsa

    def forward(self, x: Tensor, ve: Tensor | None) -> Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.h, self.d)
        k = self.k(x).view(B, T, self.kv, self.d)
        v = self.v(x) if ve is None else self.v(x) + ve
        v = v.view(B, T, self.kv, self.d)
        q = self.rotary(rms_norm(q)) * self.q_gain.to(x.dtype)[:, None]
        k = self.rotary(rms_norm(k))
        y = attention(q, k, v)
        if self.xsa:  # exclusive self-attention: drop each head's component along its own value vector
            vn = F.normalize(v, dim=-1).repeat_interleave(self.h // self.kv, dim=2)
            y = y - (y * vn).sum(-1, keepdim=True) * vn
        return self.o(y.reshape(B, T, self.h * self.d))


class MLP(nn.Module):
    def __init__(self, hp: Hyperparameters):
        super().__init__()
        hidden = int(round(hp.mlp_mult * hp.model_dim))
        self.up = CastedLinear(hp.model_dim, hidden, bias=False)
        self.down = CastedLinear(hidden, hp.model_dim, bias=False)
        self.down.zero_init = True
        self.slope = 0.5 if hp.mlp_act == "leaky_relu2" else 0.0

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.leaky_relu(self.up(x), self.slope).square())


class Block(nn.Module):
    def __init__(self, hp: Hyperparameters, layer: int):
        super().__init__()
        self.attn = Attention(hp, xsa=layer >= hp.num_layers - hp.xsa_last_n)
        self.mlp = MLP(hp)
        self.attn_scale = nn.Parameter(torch.ones(hp.model_dim))
        self.mlp_scale = nn.Parameter(torch.ones(hp.model_dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(hp.model_dim), torch.zeros(hp.model_dim))))
        self.norm_scale = 1.0 / math.sqrt(layer + 1) if hp.ln_scale else 1.0

    def forward(self, x: Tensor, x0: Tensor, ve: Tensor | None) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(rms_norm(x) * self.norm_scale, ve)
        return x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x) * self.norm_scale)


class BigramHash(nn.Module):
    """Embedding of a hash of (previous token, token), zero-initialized, projected to the model width."""

    def __init__(self, buckets: int, dim: int, model_dim: int):
        super().__init__()
        self.buckets = buckets
        self.embed = nn.Embedding(buckets, dim)
        nn.init.zeros_(self.embed.weight)
        self.proj = CastedLinear(dim, model_dim, bias=False)
        self.scale = nn.Parameter(torch.tensor(0.05))

    def forward(self, idx: Tensor) -> Tensor:
        prev = F.pad(idx[:, :-1], (1, 0), value=-1)
        h = torch.where(prev < 0, self.buckets - 1, torch.bitwise_xor(36313 * idx, 27191 * prev) % (self.buckets - 1))
        return self.proj(self.embed(h)) * self.scale.to(self.proj.weight.dtype)


class GPT(nn.Module):
    def __init__(self, hp: Hyperparameters):
        super().__init__()
        self.hp = hp
        self.tok_emb = nn.Embedding(hp.vocab_size, hp.model_dim)
        self.bigram = BigramHash(hp.bigram_buckets, hp.bigram_dim, hp.model_dim) if hp.bigram_buckets > 1 else None
        self.smear = nn.Parameter(torch.zeros(hp.model_dim)) if hp.smear_gate else None
        self.blocks = nn.ModuleList(Block(hp, i) for i in range(hp.num_layers))
        self.ve_layers = parse_layers(hp.ve_layers, hp.num_layers)
        if self.ve_layers:
            self.ve_embed = nn.Embedding(hp.vocab_size, hp.ve_dim)
            self.ve_proj = CastedLinear(hp.ve_dim, hp.num_kv_heads * hp.head_dim, bias=False)
            self.ve_scales = nn.Parameter(torch.full((len(self.ve_layers),), 0.1))
        self.n_enc = hp.num_layers // 2 if hp.unet_skips else 0
        self.skip_weights = nn.Parameter(torch.ones(min(self.n_enc, hp.num_layers - self.n_enc), hp.model_dim)) if self.n_enc else None
        self.lm_head = None if hp.tie_embeddings else CastedLinear(hp.model_dim, hp.vocab_size, bias=False)
        self._init_weights()

    def _init_weights(self):
        nn.init.normal_(self.tok_emb.weight, std=self.hp.tied_embed_init_std if self.hp.tie_embeddings else 1.0)
        for m in self.modules():
            if isinstance(m, CastedLinear):
                if getattr(m, "zero_init", False) or m is self.lm_head:
                    nn.init.zeros_(m.weight)
                elif self.hp.ortho_init:
                    nn.init.orthogonal_(m.weight)

    def forward(self, idx: Tensor) -> Tensor:
        """Token ids (B, T) -> soft-capped logits (B, T, vocab) in float32."""
        x = self.tok_emb(idx)
        if self.bigram is not None:
            x = x + self.bigram(idx)
        x = rms_norm(x)
        if self.smear is not None:  # SmearGate: blend each position with the previous one
            g = torch.sigmoid(self.smear.to(x.dtype))
            x = (1 - g) * x + g * F.pad(x[:, :-1], (0, 0, 1, 0))
        x0, skips = x, []
        ve = self.ve_proj(self.ve_embed(idx)) if self.ve_layers else None
        for i, block in enumerate(self.blocks):
            if self.n_enc and i >= self.n_enc and skips:  # U-Net decoder half pops encoder outputs
                x = x + self.skip_weights[i - self.n_enc].to(x.dtype) * skips.pop()
            layer_ve = ve * self.ve_scales[self.ve_layers.index(i)].to(x.dtype) if i in self.ve_layers else None
            x = block(x, x0, layer_ve)
            if i < self.n_enc:
                skips.append(x)
        x = rms_norm(x)
        logits = F.linear(x, self.tok_emb.weight.to(x.dtype)) if self.lm_head is None else self.lm_head(x)
        logits = logits.float()
        c = self.hp.logit_softcap
        return c * torch.tanh(logits / c) if c > 0 else logits


def token_nll(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-token negative log-likelihood in nats, same shape as targets."""
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none").view_as(targets)

# -----------------------------------------------------------------------------
# TRAINING
# -----------------------------------------------------------------------------
# main() runs named stages over one shared Run: setup, train, export, evaluate, report.

ARTIFACT_CAP_BYTES = 16_000_000


class TrainingDiverged(RuntimeError):
    pass


@dataclass
class Schedule:
    """LR multiplier: linear warm-up, flat, then linear warmdown to 0 by iterations or by the wall-clock cap."""
    iterations: int
    warmdown_iters: int
    lr_warmup_steps: int
    wallclock_s: float  # 0 = no cap

    def lr_mult(self, step: int, elapsed_s: float) -> float:
        warm = min(1.0, (step + 1) / self.lr_warmup_steps) if self.lr_warmup_steps else 1.0
        if self.warmdown_iters <= 0:
            return warm
        if self.wallclock_s > 0 and step > 0:  # warmdown spans the last warmdown_iters steps at the current pace
            warmdown_s = self.warmdown_iters * elapsed_s / step
            remaining_s = max(self.wallclock_s - elapsed_s, 0.0)
            down = remaining_s / warmdown_s if remaining_s < warmdown_s else 1.0
        else:
            start = self.iterations - self.warmdown_iters
            down = max(self.iterations - step, 0) / self.warmdown_iters if step >= start else 1.0
        return min(warm, down)


def write_atomic(path: str | Path, data: bytes | str):
    """Write to a temp file beside the target, then rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


@dataclass
class Run:
    """State the stages share."""
    hp: Hyperparameters
    device: torch.device
    rank: int = 0
    world_size: int = 1
    model: nn.Module | None = None  # the bare model (what is exported and evaluated)
    train_model: nn.Module | None = None  # compiled / DDP-wrapped view of it
    luts: tuple | None = None
    val_tokens: np.ndarray | None = None
    results: dict = field(default_factory=dict)
    log_lines: list = field(default_factory=list)

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def log(self, msg: str):
        if self.master:
            print(msg, flush=True)
            with open(Path(self.hp.log_dir) / f"{self.hp.run_id}.txt", "a") as f:
                f.write(msg + "\n")

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def all_sum(self, *values: float) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.distributed:
            dist.all_reduce(t)
        return t.tolist()


def resolve_tokenizer(hp: Hyperparameters) -> str:
    if hp.tokenizer_path:
        return hp.tokenizer_path
    manifest = Path(hp.data_path) / "manifest.json"
    if manifest.is_file():
        return str(manifest.parent / json.loads(manifest.read_text())["tokenizer_path"])
    return str(Path(hp.data_path).parent.parent / "tokenizers" / f"fineweb_{hp.vocab_size}_bpe.model")


def setup(hp: Hyperparameters) -> Run:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    run = Run(hp, device, rank, world)
    Path(hp.log_dir).mkdir(parents=True, exist_ok=True)
    run.log(f"config: {json.dumps(dataclasses.asdict(hp), sort_keys=True)}")
    run.log(f"runtime: torch {torch.__version__} device {device} world_size {world} "
            f"attention {'flash-attn' if flash_attn_func is not None and cuda else 'sdpa'}")
    run.results.update(run_id=hp.run_id, seed=hp.seed, status="running", config=dataclasses.asdict(hp), stages={})
    run.val_tokens = load_val_tokens(hp.data_path, hp.eval_seq_len, hp.val_max_tokens)
    import sentencepiece as spm
    tok_path = resolve_tokenizer(hp)
    if not Path(tok_path).is_file():
        raise ConfigError(f"TOKENIZER_PATH={tok_path}: file not found; set TOKENIZER_PATH or build data with scripts/prepare_data.py")
    run.luts = build_byte_luts(spm.SentencePieceProcessor(model_file=tok_path), hp.vocab_size)
    if int(run.val_tokens.max()) >= hp.vocab_size:
        raise ConfigError(f"{hp.data_path}: validation token {int(run.val_tokens.max())} >= VOCAB_SIZE={hp.vocab_size}; "
                          "the data and tokenizer/vocab do not match")
    torch.manual_seed(hp.seed)
    np.random.seed(hp.seed)
    run.model = GPT(hp).to(device)
    n_params = sum(p.numel() for p in run.model.parameters())
    run.results["params"] = n_params
    run.log(f"model: {n_params:,} parameters")
    return run


def build_optimizers(run: Run) -> list[torch.optim.Optimizer]:
    """Muon for the CastedLinear matrices; AdamW for embeddings, head and control tensors."""
    hp, model = run.hp, run.model
    matrices = [m.weight for m in model.modules() if isinstance(m, CastedLinear) and m is not model.lm_head]
    embeds = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
    head = [model.lm_head.weight] if model.lm_head is not None else []
    taken = {id(p) for p in matrices + embeds + head}
    scalars = [p for p in model.parameters() if id(p) not in taken]
    embed_lr = hp.tied_embed_lr if hp.tie_embeddings else hp.embed_lr
    groups = [dict(params=embeds, lr=embed_lr), dict(params=scalars, lr=hp.scalar_lr)]
    groups += [dict(params=head, lr=hp.head_lr)] if head else []
    adam = torch.optim.AdamW([dict(g, base_lr=g["lr"]) for g in groups], betas=(hp.beta1, hp.beta2), eps=hp.adam_eps,
                             weight_decay=hp.adam_wd, fused=run.device.type == "cuda")
    muon = Muon(matrices, lr=hp.matrix_lr, momentum=hp.muon_momentum, backend_steps=hp.muon_backend_steps, weight_decay=hp.muon_wd)
    for g in muon.param_groups:
        g["base_lr"] = hp.matrix_lr
    return [adam, muon]


class WeightAverager:
    """EMA of the weights every step, and an SWA mean of checkpoints taken during warmdown."""

    def __init__(self, model: nn.Module, hp: Hyperparameters):
        self.params = [p for p in model.state_dict().values() if p.is_floating_point()]
        self.ema = [p.detach().float().clone() for p in self.params] if hp.ema_decay > 0 else None
        self.swa, self.swa_count, self.hp = None, 0, hp

    @torch.no_grad()
    def update(self, step: int, lr_mult: float):
        if self.ema is not None:  # decay warms up so short runs do not average in the initialization
            decay = min(self.hp.ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(self.ema, [p.float() for p in self.params], 1 - decay)
        if self.hp.swa_every and lr_mult < self.hp.swa_threshold and step % self.hp.swa_every == 0:
            if self.swa is None:
                self.swa = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
            torch._foreach_add_(self.swa, [p.float() for p in self.params])
            self.swa_count += 1

    @torch.no_grad()
    def apply(self, kind: str) -> str:
        """Copy the chosen average into the model; returns what was used."""
        avg = {"ema": self.ema, "swa": self.swa and [s / self.swa_count for s in self.swa]}.get(kind)
        if not avg:
            return "none"
        for p, a in zip(self.params, avg):
            p.copy_(a.to(p.dtype))
        return kind


def grad_accum_steps(hp: Hyperparameters, world: int) -> int:
    ga = hp.grad_accum_steps or max(1, 8 // world)
    if hp.train_batch_tokens % (world * ga * hp.train_seq_len):
        raise ConfigError(f"TRAIN_BATCH_TOKENS={hp.train_batch_tokens}: must divide into world_size({world}) x "
                          f"grad_accum({ga}) x TRAIN_SEQ_LEN({hp.train_seq_len}) sequences")
    return ga


def train_step(run: Run, loader, optimizers, ga: int, lr_mult: float, step: int) -> Tensor:
    hp, model = run.hp, run.train_model
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    total = torch.zeros((), device=run.device)
    for micro in range(ga):
        x, y = loader.next_batch(hp.train_batch_tokens, hp.train_seq_len, ga)
        if run.distributed:
            model.require_backward_grad_sync = micro == ga - 1
        with run.autocast():
            loss = token_nll(model(x), y).mean()
        (loss / ga).backward()
        total += loss.detach() / ga
    frac = min(step / hp.muon_momentum_warmup_steps, 1.0) if hp.muon_momentum_warmup_steps else 1.0
    optimizers[1].param_groups[0]["momentum"] = (1 - frac) * hp.muon_momentum_warmup_start + frac * hp.muon_momentum
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_mult
    if hp.grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), hp.grad_clip_norm)
    for opt in optimizers:
        opt.step()
    return total


def train(run: Run):
    hp = run.hp
    ga = grad_accum_steps(hp, run.world_size)
    model = torch.compile(run.model, dynamic=False) if hp.compile and run.device.type == "cuda" else run.model
    if run.distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    run.train_model = model
    optimizers = build_optimizers(run)
    pattern = os.path.join(hp.data_path, "fineweb_train_*.bin")
    if hp.warmup_steps:  # prime compilation / kernels, then restore the initial state so priming is free
        saved = ([t.clone() for t in run.model.state_dict().values()], [o.state_dict() for o in optimizers])
        loader = DistributedTokenLoader(pattern, run.rank, run.world_size, run.device)
        for i in range(hp.warmup_steps):
            train_step(run, loader, optimizers, ga, 1.0, i)
        for t, s in zip(run.model.state_dict().values(), saved[0]):
            t.copy_(s)
        for o, s in zip(optimizers, saved[1]):
            o.load_state_dict(s)
    loader = DistributedTokenLoader(pattern, run.rank, run.world_size, run.device)
    sched = Schedule(hp.iterations, hp.warmdown_iters, hp.lr_warmup_steps, hp.max_wallclock_seconds)
    averager = WeightAverager(run.model, hp)
    run.log(f"train: grad_accum {ga}, {hp.train_batch_tokens} tokens/step, {hp.iterations} iterations, "
            f"wall-clock cap {hp.max_wallclock_seconds:.0f}s")
    step, train_s, stop = 0, 0.0, False
    t0 = time.perf_counter()
    while step < hp.iterations and not stop:
        lr_mult = sched.lr_mult(step, train_s)
        loss = train_step(run, loader, optimizers, ga, lr_mult, step)
        averager.update(step, lr_mult)
        on_train_step(run, step, lr_mult)
        step += 1
        train_s = time.perf_counter() - t0
        capped = hp.max_wallclock_seconds > 0 and train_s >= hp.max_wallclock_seconds
        stop = run.all_sum(float(capped))[0] > 0  # every rank stops on the same step
        if step % hp.train_log_every == 0 or step == hp.iterations or stop:
            loss_v = run.all_sum(loss.item())[0] / run.world_size
            if not math.isfinite(loss_v):
                raise TrainingDiverged(f"train loss is {loss_v} at step {step}; lower the learning rates or check the data")
            tok_s = step * hp.train_batch_tokens / train_s
            eta = (hp.iterations - step) * train_s / step
            run.log(f"step {step}/{hp.iterations} loss {loss_v:.4f} lr_mult {lr_mult:.3f} tok/s {tok_s:,.0f} "
                    f"ms/step {1000 * train_s / step:.1f} eta {eta:.0f}s")
        if hp.val_loss_every and step % hp.val_loss_every == 0:
            loss_v, bpb = eval_plain(run, run.model)
            run.log(f"step {step} val_loss {loss_v:.4f} val_bpb {bpb:.4f}")
            t0 = time.perf_counter() - train_s  # evaluation time is not training time
    if stop:
        run.log(f"stopping at step {step}: wall-clock cap {hp.max_wallclock_seconds:.0f}s reached")
    used = averager.apply(hp.weight_avg)
    run.results.update(steps=step, train_seconds=round(train_s, 3), weights=used)
    run.log(f"train: done, {step} steps in {train_s:.1f}s; exporting {used} weights")


def export(run: Run):
    """Write the artifact, count artifact bytes, then reload it into a fresh model for evaluation."""
    hp = run.hp
    path = Path(hp.log_dir) / f"{hp.run_id}.artifact"
    model_bytes = export_artifact(run.model.state_dict(), path) if run.master else 0
    if run.distributed:
        dist.barrier()
    model_bytes = int(run.all_sum(model_bytes)[0])
    code_bytes = len(Path(__file__).read_bytes())
    run.results.update(artifact_path=str(path), code_bytes=code_bytes, model_bytes=model_bytes,
                       artifact_bytes=code_bytes + model_bytes)
    run.log(f"export: {path} model {model_bytes:,} + code {code_bytes:,} = {code_bytes + model_bytes:,} bytes "
            f"(cap {ARTIFACT_CAP_BYTES:,})")
    if code_bytes + model_bytes > ARTIFACT_CAP_BYTES:
        run.results["status"] = "over_cap"
        run.log(f"ERROR: artifact is {code_bytes + model_bytes - ARTIFACT_CAP_BYTES:,} bytes over the cap; "
                "use lower-bit formats or a smaller model")
    fresh = GPT(hp).to(run.device)
    fresh.load_state_dict(load_artifact(path))
    run.model = fresh


def evaluate(run: Run):
    """Evaluation stages in order; the last one that ran is the reported, legal score."""
    t0 = time.perf_counter()
    stage_t = time.perf_counter()
    loss, bpb = eval_plain(run, run.model)
    run.results["stages"]["roundtrip"] = dict(val_loss=loss, val_bpb=bpb, seconds=round(time.perf_counter() - stage_t, 3))
    run.log(f"eval roundtrip: val_loss {loss:.4f} val_bpb {bpb:.4f}")
    run.results.update(val_loss=loss, val_bpb=bpb, eval_seconds=round(time.perf_counter() - t0, 3))


def report(run: Run):
    if run.master:
        write_atomic(Path(run.hp.log_dir) / f"{run.hp.run_id}.json", json.dumps(run.results, indent=2, default=str))
        run.log(f"results: {Path(run.hp.log_dir) / (run.hp.run_id + '.json')} status {run.results['status']} "
                f"val_bpb {run.results.get('val_bpb', float('nan')):.4f}")


def main() -> int:
    try:
        hp = load_hparams()
        run = setup(hp)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        train(run)
        export(run)
        evaluate(run)
        if run.results["status"] == "running":
            run.results["status"] = "ok"
    except (TrainingDiverged, ConfigError) as e:
        run.results.update(status="failed", error=str(e))
        run.log(f"ERROR: {e}")
    finally:
        report(run)
        if run.distributed:
            dist.destroy_process_group()
    return {"ok": 0, "over_cap": 3}.get(run.results["status"], 1)


if __name__ == "__main__":
    sys.exit(main())
