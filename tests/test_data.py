"""Data foundation: scripts/prepare_data.py, the shard format, and val_bpb byte accounting.

Fixtures: `small` builds a tiny dataset from a few --text/--jsonl documents (seconds);
`brown` is the full Brown dataset at data/datasets/brown_sp1024 (built if missing; CI builds it
first with `python scripts/prepare_data.py local`); `brown_at(vocab)` is the Brown dataset at any
vocabulary (1024: `brown`; others built once per session into a temp dir, ~2 s each).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "prepare_data.py"
BROWN = ROOT / "data" / "datasets" / "brown_sp1024"
sys.path.insert(0, str(ROOT))
import train_gpt  # noqa: E402

_spec = importlib.util.spec_from_file_location("prepare_data", SCRIPT)
pd = importlib.util.module_from_spec(_spec)
sys.modules["prepare_data"] = pd
_spec.loader.exec_module(pd)


def run_cli(*args: str, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


def split_at_bos(stream: np.ndarray) -> list[np.ndarray]:
    """Each document's tokens including its leading BOS."""
    starts = np.flatnonzero(stream == pd.BOS_ID).tolist() + [stream.size]
    assert starts[0] == 0, "a shard stream must start with BOS"
    return [stream[a:b] for a, b in zip(starts[:-1], starts[1:])]


def read_split(folder: Path, split: str) -> np.ndarray:
    files = train_gpt.shard_files(str(folder / f"fineweb_{split}_*.bin"))
    return np.concatenate([train_gpt.load_data_shard(f) for f in files]).astype(np.int64)


# Short real-language documents, some with non-ASCII text so that NFKC normalization and
# byte fallback are exercised (ligature, full-width digits, accents, CJK, emoji).
SMALL_TEXTS = [
    "The river rose all night, and by morning the lower road was under water.\n\n"
    "Farmers moved their cattle to the ridge; the school stayed closed until Thursday.",
    "She opened the letter slowly. It was from her brother, who had not written in ten years, "
    "and it began with an apology she had stopped expecting.",
    "Prices at the market climbed again in March: bread cost 12 cents more than in January, "
    "and coffee was up by nearly a third.",
    "Le café était fermé, alors nous avons marché jusqu'à la gare. Naïve hope, perhaps.",
    "The ﬁle was saved twice. Room numbers: １０１ and ２０２. Tokyo is 東京.",
    "We laughed 😀 and sang until the lamps went out; then the house was quiet.",
    "Committee members argued that the new bridge would cost too much, but the mayor "
    "insisted it was the only way to keep the town connected during the floods.",
    "A small boat drifted past the pier. Nobody claimed it, and by evening it had sunk.",
]
SMALL_JSONL = [
    "The library extended its hours during the examination period, to the relief of students.",
    "In 1961 the company built a second plant near the coast, doubling its output of steel pipe.",
    "He said the experiment had failed, although the data suggested otherwise; nobody believed him.",
    "Winter came early that year. Snow covered the fields before the harvest was in.",
]
SMALL_ARGS = ["--vocab-size", "400", "--val-docs", "3", "--shard-tokens", "400", "--seed", "7"]


@pytest.fixture(scope="session")
def small_inputs(tmp_path_factory) -> tuple[list[Path], Path]:
    d = tmp_path_factory.mktemp("small_src")
    texts = []
    for i, t in enumerate(SMALL_TEXTS):
        p = d / f"doc{i}.txt"
        p.write_text(t, encoding="utf-8")
        texts.append(p)
    jl = d / "docs.jsonl"
    jl.write_text("\n".join(json.dumps({"text": t}) for t in SMALL_JSONL) + "\n\n", encoding="utf-8")
    return texts, jl


@pytest.fixture(scope="session")
def small(small_inputs, tmp_path_factory) -> Path:
    texts, jl = small_inputs
    out = tmp_path_factory.mktemp("small_out")
    r = run_cli("local", "--text", *map(str, texts), "--jsonl", str(jl), "--out", str(out), "--name", "small",
                *SMALL_ARGS)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(out / "small")
    return out / "small"


@pytest.fixture(scope="session")
def brown() -> Path:
    if not (BROWN / "manifest.json").is_file():
        r = run_cli("local")
        assert r.returncode == 0, r.stderr
    return BROWN


@pytest.fixture(scope="session")
def brown_at(brown, tmp_path_factory):
    built = {1024: brown}

    def get(vocab: int) -> Path:
        if vocab not in built:
            out = tmp_path_factory.mktemp(f"brown_sp{vocab}")
            r = run_cli("local", "--vocab", str(vocab), "--out", str(out))
            assert r.returncode == 0, r.stderr
            assert r.stdout.strip().splitlines()[-1] == str(out / f"brown_sp{vocab}")
            built[vocab] = out / f"brown_sp{vocab}"
        return built[vocab]

    return get


def load_sp(folder: Path):
    m = json.loads((folder / "manifest.json").read_text())
    return spm.SentencePieceProcessor(model_file=str(folder / m["tokenizer_path"])), m


# -----------------------------------------------------------------------------
# Brown tag stripping and detokenization
# -----------------------------------------------------------------------------

def test_strip_tag_splits_at_last_slash():
    assert pd.strip_tag("1-1/2/cd") == "1-1/2"
    assert pd.strip_tag("and/or/cc") == "and/or"
    assert pd.strip_tag("//in") == "/"
    assert pd.strip_tag("Atlanta's/np$") == "Atlanta's"
    assert pd.strip_tag("untagged") == "untagged"


def test_detokenize_punctuation_quotes_clitics():
    words = ["``", "Only", "a", "handful", "''", ",", "the", "jury", "said", "(", "1", ")", ";", ";", "it",
             "was", "n't", "Ann", "'s", "'", "pro", "'", "view", "--", "really", "?", "Jr.", "."]
    assert pd.detokenize(words) == '"Only a handful", the jury said (1); it wasn\'t Ann\'s \'pro\' view -- really? Jr.'


def test_brown_doc_to_text_keeps_paragraphs():
    raw = ("\n\n\tThe/at jury/nn said/vbd ``/`` no/at ''/'' ./.\nIt/pps cost/vbd 1-1/2/cd dollars/nns ./.\n\n\n"
           "\tSecond/od paragraph/nn ;/. ;/. done/vbn !/.\n")
    assert pd.brown_doc_to_text(raw) == 'The jury said "no". It cost 1-1/2 dollars.\nSecond paragraph; done!'


def test_read_brown_documents(brown):
    tarball = ROOT / "data" / "cache" / pd.BROWN_TARBALL
    docs = pd.read_brown(tarball)
    assert len(docs) == 500 and docs[0][0] == "ca01" and docs[-1][0] == "cr09"
    assert docs[0][1].startswith('The Fulton County Grand Jury said Friday an investigation of Atlanta\'s '
                                 'recent primary election produced "no evidence" that any irregularities took place.\n')
    text = "\n".join(t for _, t in docs)
    assert 5_500_000 < len(text) < 6_500_000  # ~6.0 MB of plain text
    for leftover in ("/at ", "/nn ", "/vbd ", "``", " '' ", " ,", " .", "; ;"):  # 10'' (inches) is a word
        assert leftover not in text, leftover
    assert "1-1/2" in text  # slashes inside words survive


# -----------------------------------------------------------------------------
# Split and determinism
# -----------------------------------------------------------------------------

def test_split_is_deterministic_and_disjoint():
    docs = [(f"d{i}", f"text {i}") for i in range(100)]
    tr1, va1 = pd.split_docs(docs, 10, 1337)
    tr2, va2 = pd.split_docs(docs, 10, 1337)
    assert (tr1, va1) == (tr2, va2)
    assert len(va1) == 10 and len(tr1) == 90 and not set(tr1) & set(va1)
    assert pd.split_docs(docs, 10, 1338)[1] != va1


def test_small_dataset_is_deterministic(small, small_inputs, tmp_path):
    texts, jl = small_inputs
    r = run_cli("local", "--text", *map(str, texts), "--jsonl", str(jl), "--out", str(tmp_path), "--name", "again",
                *SMALL_ARGS)
    assert r.returncode == 0, r.stderr
    for name in ("fineweb_train_000000.bin", "fineweb_val_000000.bin", "tokenizer.model", "tokenizer.vocab"):
        assert (small / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    a, b = (json.loads((d / "manifest.json").read_text())["shards"] for d in (small, tmp_path / "again"))
    assert a == b


def test_brown_rebuild_gives_identical_shards(brown, tmp_path):
    r = run_cli("local", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    fresh = json.loads((tmp_path / "brown_sp1024" / "manifest.json").read_text())
    built = json.loads((brown / "manifest.json").read_text())
    assert fresh["shards"] == built["shards"], f"{brown} is stale: rebuild it with scripts/prepare_data.py local"
    assert (tmp_path / "brown_sp1024" / "tokenizer.model").read_bytes() == (brown / "tokenizer.model").read_bytes()


# -----------------------------------------------------------------------------
# Manifest and shards
# -----------------------------------------------------------------------------

def test_brown_manifest(brown):
    sp, m = load_sp(brown)
    assert m["tokenizer_path"] == "tokenizer.model" and m["vocab_size"] == sp.vocab_size() == 1024
    assert (m["train_docs"], m["val_docs"], m["seed"]) == (450, 50, 1337)
    assert 1_900_000 < m["train_tokens"] < 2_300_000 and 200_000 < m["val_tokens"] < 260_000
    for s in m["shards"]:
        p = brown / s["name"]
        assert hashlib.sha256(p.read_bytes()).hexdigest() == s["sha256"]
        assert train_gpt.load_data_shard(p).size == s["tokens"]
    assert m["tokenizer_settings"]["normalization_rule_name"] == "nmt_nfkc"
    assert train_gpt.resolve_tokenizer(train_gpt.load_hparams({"DATA_PATH": str(brown)})) == str(brown / "tokenizer.model")


def test_small_shards_hold_bos_plus_tokens_of_each_doc(small):
    sp, m = load_sp(small)
    assert (m["train_docs"], m["val_docs"]) == (len(SMALL_TEXTS) + len(SMALL_JSONL) - 3, 3)
    names = sorted(p.name for p in small.glob("fineweb_train_*.bin"))
    assert len(names) > 1, "shard-tokens 400 must split the train stream"
    assert all(s["tokens"] == 400 for s in m["shards"] if s["split"] == "train" and s["name"] != names[-1])
    val = read_split(small, "val")
    assert val.size == m["val_tokens"] and len(split_at_bos(val)) == 3
    train = read_split(small, "train")
    assert train.size == m["train_tokens"] and int((train == pd.BOS_ID).sum()) == m["train_docs"]


def test_val_stream_equals_encoded_val_docs(small, small_inputs):
    texts, jl = small_inputs
    sp, m = load_sp(small)
    docs = dict(pd.read_text_files(texts) + pd.read_jsonl_files([jl]))
    expect = [t for name in m["val_doc_ids"] for t in [pd.BOS_ID, *sp.encode(docs[name])]]
    assert read_split(small, "val").tolist() == expect


def test_written_shard_reads_back_bit_exactly(tmp_path):
    tokens = np.array([1, 0, 65535, 300, 2, 1, 7], dtype=np.uint16)
    path = tmp_path / "fineweb_train_000000.bin"
    pd.write_shard(path, tokens)
    header = np.zeros(256, dtype="<i4")
    header[:3] = 20240520, 1, tokens.size
    assert path.read_bytes() == header.tobytes() + tokens.astype("<u2").tobytes()
    got = train_gpt.load_data_shard(path)
    assert got.dtype == np.dtype("<u2") and got.tolist() == tokens.tolist()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind


@pytest.mark.parametrize("damage, needle", [
    ("magic", "magic"), ("version", "version"), ("body", "truncated"), ("header", "truncated header"),
    ("empty", "truncated header"), ("extra", "size"),
])
def test_bad_shards_are_refused_with_their_name(tmp_path, damage, needle):
    path = tmp_path / f"fineweb_val_{damage}.bin"
    pd.write_shard(path, np.arange(100, dtype=np.uint16))
    raw = bytearray(path.read_bytes())
    if damage == "magic":
        raw[0:4] = np.array([12345], "<i4").tobytes()
    elif damage == "version":
        raw[4:8] = np.array([2], "<i4").tobytes()
    elif damage == "body":
        raw = raw[:-2]
    elif damage == "header":
        raw = raw[:100]
    elif damage == "empty":
        raw = b""
    elif damage == "extra":
        raw += b"\0\0"
    path.write_bytes(bytes(raw))
    with pytest.raises(train_gpt.ConfigError) as e:
        train_gpt.load_data_shard(path)
    assert path.name in str(e.value) and needle in str(e.value)
    with pytest.raises(pd.PrepError, match=path.name):
        pd.read_shard(path)


# -----------------------------------------------------------------------------
# Byte accounting (val_bpb denominator)
# -----------------------------------------------------------------------------
# Per target token: UTF-8 bytes of its piece without the leading-space marker (1 for a byte-fallback
# token, 0 for BOS), plus 1 for the marker unless the previous token is a control token. Summed over
# each document's tokens after BOS, this must equal the UTF-8 size of sp.decode(doc tokens).
# Exact, explained differences from the RAW document text (not from the decoded text):
#  * nmt_nfkc normalization: NFKC (e.g. the ligature "ﬁ" -> "fi", full-width "１" -> "1") and
#    whitespace cleanup (runs of spaces/newlines -> one space, leading/trailing whitespace removed).
#    So we compare against the decoded text, which is the text the model is actually scored on,
#    exactly as upstream does; for the ASCII Brown Corpus the decoded doc equals
#    " ".join(raw.split()) exactly (checked below).
#  * The first token of a doc follows BOS (a control token), so a leading-space marker there is
#    not counted; with add_dummy_prefix=False and leading whitespace stripped by normalization
#    the first piece has no marker anyway, and sp.decode drops nothing.

def assert_accounting_matches(folder: Path, split: str = "val") -> int:
    sp, m = load_sp(folder)
    luts = train_gpt.build_byte_luts(sp, m["vocab_size"])
    val = read_split(folder, split)
    total = 0
    for doc in split_at_bos(val):
        counted = train_gpt.count_bytes(doc[:-1], doc[1:], luts)
        decoded = sp.decode(doc[1:].tolist()).encode("utf-8")
        assert counted == len(decoded), sp.decode(doc[1:].tolist())[:200]
        total += counted
    # whole stream at once (BOS as a target counts 0 bytes), numpy and torch paths
    assert train_gpt.count_bytes(val[:-1], val[1:], luts) == total
    t = torch.from_numpy(val)
    assert train_gpt.count_bytes(t[:-1], t[1:], luts) == total
    return total


@pytest.mark.parametrize("vocab", [1024, 4096, 8192])
def test_byte_accounting_brown_val(brown_at, vocab):
    brown = brown_at(vocab)
    total = assert_accounting_matches(brown)
    sp, m = load_sp(brown)
    assert m["vocab_size"] == sp.vocab_size() == vocab
    raw = dict(pd.read_brown(ROOT / "data" / "cache" / pd.BROWN_TARBALL))
    docs = split_at_bos(read_split(brown, "val"))
    for name, doc in zip(m["val_doc_ids"], docs):
        assert sp.decode(doc[1:].tolist()) == " ".join(raw[name].split()), name
    assert total == sum(len(" ".join(raw[n].split())) for n in m["val_doc_ids"])


def test_byte_accounting_non_ascii(small):
    assert_accounting_matches(small, "val")
    assert_accounting_matches(small, "train")  # all 12 docs between the two splits, non-ASCII ones included
    sp, _ = load_sp(small)
    raw = "The ﬁle: １０１ 東京 😀 Ωß"
    ids = sp.encode(raw)
    # NFKC: "ﬁ" (3 bytes) -> "fi" (2), "１０１" (9) -> "101" (3): the scored text is 7 bytes shorter
    assert sp.decode(ids) == "The file: 101 東京 😀 Ωß"
    assert len(raw.encode()) - len(sp.decode(ids).encode()) == 7
    assert any(sp.is_byte(i) for i in ids)  # characters unseen in training fall back to bytes
    doc = np.array([pd.BOS_ID, *ids])
    luts = train_gpt.build_byte_luts(sp, sp.vocab_size())
    assert train_gpt.count_bytes(doc[:-1], doc[1:], luts) == len(sp.decode(ids).encode())


@pytest.mark.parametrize("vocab", [1024, 4096, 8192])
def test_competition_tokenizer_has_no_multi_marker_pieces(brown_at, vocab):
    # split_by_whitespace (default) keeps "▁" only at the start of a piece, and nmt_nfkc collapses
    # whitespace runs, so for the competition settings the LUT equals upstream's (strip one marker).
    sp, _ = load_sp(brown_at(vocab))
    pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    assert not [p for p in pieces if "\u2581" in p[1:]]


def test_byte_accounting_counts_each_space_marker_once(tmp_path):
    # Outside the competition settings (remove_extra_whitespaces=False, split_by_whitespace=False)
    # pieces like "▁▁d" and "a▁▁b" exist; every marker stands for one space byte when decoded.
    # (The earlier LUT, lstrip of all markers, counted "▁▁d" as 2 bytes instead of 3; upstream's
    # piece[1:] counts it as 5, because an inner "▁" is 3 bytes of UTF-8.)
    text = ["def f(x):\n    return  x  +  1\n\n" * 30, "a  b   c    d     e" * 40]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text * 5), model_prefix=str(tmp_path / "ws"),
                                   vocab_size=300, model_type="bpe", byte_fallback=True,
                                   add_dummy_prefix=False, remove_extra_whitespaces=False,
                                   split_by_whitespace=False, logstream=open(os.devnull, "w"))
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "ws.model"))
    luts = train_gpt.build_byte_luts(sp, 300)
    for t in text:
        doc = np.array([1, *sp.encode(t)])
        assert train_gpt.count_bytes(doc[:-1], doc[1:], luts) == len(sp.decode(doc[1:].tolist()).encode())


# -----------------------------------------------------------------------------
# CLI errors: exit code 2, one line on stderr naming the input and the fix
# -----------------------------------------------------------------------------

def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_cli_missing_text_file(tmp_path):
    assert_one_line_error(run_cli("local", "--text", str(tmp_path / "nope.txt"), "--out", str(tmp_path)),
                          "--text", "nope.txt", "not found")
    assert not list(tmp_path.iterdir())


def test_cli_missing_jsonl_file(tmp_path):
    assert_one_line_error(run_cli("local", "--jsonl", str(tmp_path / "gone.jsonl"), "--out", str(tmp_path)),
                          "--jsonl", "gone.jsonl", "not found")


def test_cli_bad_jsonl_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "fine"}\n{"txt": "no text field"}\n')
    assert_one_line_error(run_cli("local", "--jsonl", str(p), "--out", str(tmp_path)), "bad.jsonl:2", '"text"')


@pytest.mark.parametrize("vocab, needle", [("70000", "uint16"), ("65537", "uint16"), ("100", "too small"),
                                           ("0", "too small")])
def test_cli_bad_vocab_size(tmp_path, small_inputs, vocab, needle):
    texts, _ = small_inputs
    r = run_cli("local", "--text", *map(str, texts), "--vocab-size", vocab, "--out", str(tmp_path))
    assert_one_line_error(r, f"--vocab-size {vocab}", needle)


@pytest.mark.parametrize("val_docs, needle", [("8", "train split would be empty"), ("9", "train split would be empty"),
                                              ("0", "validation split would be empty")])
def test_cli_empty_split(tmp_path, small_inputs, val_docs, needle):
    texts, _ = small_inputs  # 8 documents
    r = run_cli("local", "--text", *map(str, texts), "--val-docs", val_docs, "--out", str(tmp_path))
    assert_one_line_error(r, f"--val-docs {val_docs}", needle)
    assert not list(tmp_path.iterdir()), "nothing may be left behind"


def test_cli_bad_shard_tokens(tmp_path, small_inputs):
    texts, _ = small_inputs
    r = run_cli("local", "--text", *map(str, texts), "--shard-tokens", "0", "--out", str(tmp_path))
    assert_one_line_error(r, "--shard-tokens 0")


def test_cli_npm_missing(tmp_path):
    bare = tmp_path / "bin"
    bare.mkdir()
    env = {**os.environ, "PATH": str(bare)}
    r = run_cli("local", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), env=env)
    assert_one_line_error(r, "npm not found", pd.BROWN_TARBALL)


# -----------------------------------------------------------------------------
# fineweb: everything around the one network call
# -----------------------------------------------------------------------------

def test_fineweb_file_list_defaults():
    files, tok = pd.fineweb_files("sp1024", 3)
    assert files == ["datasets/datasets/fineweb10B_sp1024/fineweb_val_000000.bin",
                     *[f"datasets/datasets/fineweb10B_sp1024/fineweb_train_{i:06d}.bin" for i in range(3)],
                     "datasets/tokenizers/fineweb_1024_bpe.model", "datasets/tokenizers/fineweb_1024_bpe.vocab"]
    assert tok == "datasets/tokenizers/fineweb_1024_bpe.model"
    assert len(pd.fineweb_files("sp1024", 80)[0]) == 80 + 1 + 2
    assert pd.local_path_for_remote(files[0], Path("data")) == Path("data/datasets/fineweb10B_sp1024/fineweb_val_000000.bin")
    assert pd.local_path_for_remote(tok, Path("data")) == Path("data/tokenizers/fineweb_1024_bpe.model")


def test_fineweb_file_list_from_hub_manifest():
    manifest = {"datasets": [{"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024",
                              "stats": {"files_train": 5, "files_val": 2}}],
                "tokenizers": [{"name": "sp_bpe_1024", "model_path": "tokenizers/fineweb_1024_bpe.model"}]}
    files, tok = pd.fineweb_files("sp1024", 5, manifest)
    assert sum("_val_" in f for f in files) == 2 and sum("_train_" in f for f in files) == 5
    assert files[-1] == tok == "datasets/tokenizers/fineweb_1024_bpe.model"
    with pytest.raises(pd.PrepError, match="--train-shards 6"):
        pd.fineweb_files("sp1024", 6, manifest)
    with pytest.raises(pd.PrepError, match="sp4096"):
        pd.fineweb_files("sp4096", 1, manifest)


def fake_hub(monkeypatch, hub: Path, cache: Path, repo_id: str = pd.HF_REPO_ID) -> list[str]:
    calls: list[str] = []
    expected_repo = repo_id

    def hf_hub_download(repo_id, filename, subfolder=None, repo_type=None):
        assert repo_id == expected_repo and repo_type == "dataset"
        rel = f"{subfolder}/{filename}" if subfolder else filename
        calls.append(rel)
        src = hub / rel
        if not src.is_file():
            raise FileNotFoundError(f"404 {rel}")
        blob = cache / "blobs" / hashlib.sha256(rel.encode()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(src.read_bytes())
        link = cache / "snapshots" / rel  # like the HF cache: a symlink to the blob
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(blob)
        return str(link)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=hf_hub_download))
    return calls


def test_fineweb_download_layout_and_manifest(small, tmp_path, monkeypatch, capsys):
    hub = tmp_path / "hub" / "datasets"  # the remote repo's datasets/ folder
    ds = hub / "datasets" / "fineweb10B_sp1024"
    ds.mkdir(parents=True)
    (hub / "tokenizers").mkdir()
    trains = sorted(small.glob("fineweb_train_*.bin"))
    for i, p in enumerate(trains):
        (ds / f"fineweb_train_{i:06d}.bin").write_bytes(p.read_bytes())
    (ds / "fineweb_val_000000.bin").write_bytes((small / "fineweb_val_000000.bin").read_bytes())
    (hub / "tokenizers" / "fineweb_1024_bpe.model").write_bytes((small / "tokenizer.model").read_bytes())
    (hub / "tokenizers" / "fineweb_1024_bpe.vocab").write_bytes((small / "tokenizer.vocab").read_bytes())
    calls = fake_hub(monkeypatch, hub.parent, tmp_path / "hfcache")
    data = tmp_path / "data"
    assert pd.main(["fineweb", "--train-shards", "2", "--data-dir", str(data)]) == 0
    dest = data / "datasets" / "fineweb10B_sp1024"
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(dest)
    assert calls[0] == "datasets/manifest.json"  # absent on this fake hub: falls back to the known layout
    assert sorted(p.name for p in dest.glob("*.bin")) == ["fineweb_train_000000.bin", "fineweb_train_000001.bin",
                                                          "fineweb_val_000000.bin"]
    assert not any(p.is_symlink() for p in dest.iterdir())
    m = json.loads((dest / "manifest.json").read_text())
    assert m["tokenizer_path"] == "../../tokenizers/fineweb_1024_bpe.model"
    assert (dest / m["tokenizer_path"]).resolve() == (data / "tokenizers" / "fineweb_1024_bpe.model").resolve()
    assert m["train_tokens"] == sum(train_gpt.load_data_shard(dest / f"fineweb_train_{i:06d}.bin").size for i in range(2))
    assert m["val_docs"] == 3 and m["vocab_size"] == 1024
    for s in m["shards"]:
        assert s["sha256"] == hashlib.sha256((dest / s["name"]).read_bytes()).hexdigest()
    # the same manifest code as `local`
    assert m["shards"] == pd.describe_shards(dest)["shards"]
    # a second run downloads only what is missing (the absent hub manifest)
    calls.clear()
    assert pd.main(["fineweb", "--train-shards", "2", "--data-dir", str(data)]) == 0
    assert calls == ["datasets/manifest.json"]


def test_fineweb_without_huggingface_hub(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    assert pd.main(["fineweb", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "huggingface_hub" in err[0] and "pip install" in err[0]


def test_fineweb_download_failure_is_one_line(monkeypatch, tmp_path, capsys):
    fake_hub(monkeypatch, tmp_path / "empty_hub", tmp_path / "hfcache")
    assert pd.main(["fineweb", "--train-shards", "1", "--data-dir", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: datasets/datasets/fineweb10B_sp1024/fineweb_val_000000.bin: download")


# -----------------------------------------------------------------------------
# Larger vocabularies: local --vocab, fineweb --variant sp4096/sp8192, retokenize
# -----------------------------------------------------------------------------

def read_raw_shard(path: Path) -> np.ndarray:
    """Header checked byte by byte here, independently of both readers."""
    raw = path.read_bytes()
    magic, version, count = np.frombuffer(raw[:12], dtype="<i4").tolist()
    assert (magic, version) == (20240520, 1), path
    assert len(raw) == 256 * 4 + 2 * count and not any(raw[12:1024]), path
    return np.frombuffer(raw, dtype="<u2", offset=1024)


def assert_valid_dataset(folder: Path, vocab: int) -> dict:
    """Shards valid, every token < vocab, manifest = what the shards hold, tokenizer of that size."""
    sp, m = load_sp(folder)
    assert m["vocab_size"] == sp.vocab_size() == vocab and m["bos_id"] == pd.BOS_ID == sp.bos_id()
    names = sorted(p.name for p in folder.glob("fineweb_*.bin"))
    assert sorted(s["name"] for s in m["shards"]) == names
    for split in ("train", "val"):
        tokens = docs = 0
        for s in (s for s in m["shards"] if s["split"] == split):
            arr = read_raw_shard(folder / s["name"])
            assert arr.size == s["tokens"] and int((arr == pd.BOS_ID).sum()) == s["docs"]
            assert s["sha256"] == hashlib.sha256((folder / s["name"]).read_bytes()).hexdigest()
            assert int(arr.max()) < vocab
            assert train_gpt.load_data_shard(folder / s["name"]).tolist() == arr.tolist()
            tokens, docs = tokens + arr.size, docs + s["docs"]
        assert (m[f"{split}_tokens"], m[f"{split}_docs"]) == (tokens, docs) and docs > 0
        assert read_split(folder, split)[0] == pd.BOS_ID
    return m


@pytest.mark.parametrize("vocab", [4096, 8192])
def test_brown_dataset_at_larger_vocab(brown_at, vocab):
    folder = brown_at(vocab)
    assert folder.name == f"brown_sp{vocab}"
    m = assert_valid_dataset(folder, vocab)
    base = json.loads((brown_at(1024) / "manifest.json").read_text())
    assert (m["train_docs"], m["val_docs"], m["seed"]) == (450, 50, 1337)
    assert m["val_doc_ids"] == base["val_doc_ids"]  # the split does not depend on the vocabulary
    assert m["requested_vocab_size"] == m["tokenizer_settings"]["vocab_size"] == vocab
    assert m["tokenizer_train_docs"] == 450 and m["tokenizer_includes_val"] is False
    assert m["val_tokens"] < base["val_tokens"] and m["train_tokens"] < base["train_tokens"]
    hp = train_gpt.load_hparams({"DATA_PATH": str(folder), "VOCAB_SIZE": str(vocab)})
    assert train_gpt.resolve_tokenizer(hp) == str(folder / "tokenizer.model")


def test_val_tokens_shrink_with_vocab(brown_at):
    val = [json.loads((brown_at(v) / "manifest.json").read_text())["val_tokens"] for v in (1024, 4096, 8192)]
    assert val[0] > val[1] > val[2]


def test_local_vocab_is_an_alias_of_vocab_size(brown_at, tmp_path):
    r = run_cli("local", "--vocab-size", "4096", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    for name in ("tokenizer.model", "fineweb_train_000000.bin", "fineweb_val_000000.bin"):
        assert (tmp_path / "brown_sp4096" / name).read_bytes() == (brown_at(4096) / name).read_bytes(), name


def test_retokenize_brown_is_the_local_build(brown_at, tmp_path):
    r = run_cli("retokenize", "--brown", "--vocab", "4096", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    dest = tmp_path / "brown_sp4096"
    assert r.stdout.strip().splitlines()[-1] == str(dest)
    for name in ("tokenizer.model", "tokenizer.vocab", "fineweb_train_000000.bin", "fineweb_val_000000.bin"):
        assert (dest / name).read_bytes() == (brown_at(4096) / name).read_bytes(), name


@pytest.fixture(scope="session")
def brown_jsonl(brown, tmp_path_factory) -> tuple[Path, list[str]]:
    """The Brown documents in file order as a docs jsonl, plus an empty document (3rd) and a blank line."""
    texts = [t for _, t in pd.read_brown(ROOT / "data" / "cache" / pd.BROWN_TARBALL)]
    texts.insert(2, "")
    lines = [json.dumps({"text": t}) for t in texts]
    lines.insert(10, "")
    path = tmp_path_factory.mktemp("docs") / "docs_selected.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, texts


@pytest.fixture(scope="session")
def retok8192(brown_jsonl, tmp_path_factory) -> Path:
    path, _ = brown_jsonl
    out = tmp_path_factory.mktemp("retok")
    r = run_cli("retokenize", "--docs", str(path), "--vocab", "8192", "--val-docs", "51", "--shard-tokens", "400000",
                "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(out / "docs_selected_sp8192")
    return out / "docs_selected_sp8192"


def test_retokenize_jsonl_first_docs_are_val(retok8192, brown_jsonl):
    path, texts = brown_jsonl
    m = assert_valid_dataset(retok8192, 8192)
    sp, _ = load_sp(retok8192)
    assert (m["val_docs"], m["train_docs"]) == (51, 450)  # the empty document counts (BOS only)
    assert m["tokenizer_train_docs"] == 450 and m["tokenizer_includes_val"] is False
    assert m["source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and m["seed"] is None
    assert sum(s["split"] == "train" for s in m["shards"]) == 4  # 400,000-token shards
    expect = lambda docs: [t for d in docs for t in [pd.BOS_ID, *sp.encode(d)]]  # noqa: E731
    assert read_split(retok8192, "val").tolist() == expect(texts[:51])
    assert read_split(retok8192, "train").tolist() == expect(texts[51:])


def test_byte_accounting_retokenized(retok8192):
    assert_accounting_matches(retok8192, "val")


@pytest.mark.parametrize("include_val, expect", [(False, slice(3, 7)), (True, slice(0, 4))])
def test_retokenize_tokenizer_documents(tmp_path, monkeypatch, capfd, include_val, expect):
    # The tokenizer sees the first --tokenizer-train-docs train documents (or, like the public tool,
    # the first ones of the file), cleaned as upstream: NUL -> space, stripped, empty ones dropped.
    texts = [*SMALL_TEXTS[:2], "  x\x00y  ", "   ", *SMALL_TEXTS[2:], *SMALL_JSONL]
    jl = tmp_path / "d.jsonl"
    jl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    seen: list[list[str]] = []
    real = pd.train_tokenizer

    def spy(make, *a, **k):
        seen.append(list(make()))
        return real(make, *a, **k)

    monkeypatch.setattr(pd, "train_tokenizer", spy)
    args = ["retokenize", "--docs", str(jl), "--vocab", "400", "--val-docs", "3", "--tokenizer-train-docs", "4",
            "--out", str(tmp_path), "--name", "d"]
    assert pd.main(args + ["--tokenizer-include-val"] * include_val) == 0, capfd.readouterr().err
    cleaned = [t.replace("\x00", " ").strip() for t in texts[expect]]
    assert seen == [[t for t in cleaned if t]]
    m = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert (m["val_docs"], m["train_docs"]) == (3, len(texts) - 3)
    assert m["tokenizer_train_docs"] == len(seen[0]) and m["tokenizer_includes_val"] is include_val


def test_retokenize_from_hub_docs(small_inputs, tmp_path, monkeypatch, capfd):
    texts = [*SMALL_TEXTS, *SMALL_JSONL]
    hub = tmp_path / "hub"
    (hub / "datasets").mkdir(parents=True)
    docs = hub / "datasets" / "docs_selected.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    sidecar = {"num_docs": len(texts), "docs_val": 4, "docs_sha256": hashlib.sha256(docs.read_bytes()).hexdigest()}
    (hub / "datasets" / "docs_selected.source_manifest.json").write_text(json.dumps(sidecar))
    monkeypatch.setenv("MATCHED_FINEWEB_REPO_ID", "someone/pg-docs")
    calls = fake_hub(monkeypatch, hub, tmp_path / "hfcache", repo_id="someone/pg-docs")
    data, out = tmp_path / "data", tmp_path / "out"
    args = ["retokenize", "--vocab", "400", "--data-dir", str(data), "--out", str(out), "--shard-tokens", "300"]
    assert pd.main(args) == 0, capfd.readouterr().err
    dest = out / "fineweb_retok_sp400"
    assert capfd.readouterr().out.strip().splitlines()[-1] == str(dest)
    assert calls == ["datasets/docs_selected.jsonl", "datasets/docs_selected.source_manifest.json"]
    assert (data / "docs_selected.jsonl").read_bytes() == docs.read_bytes()  # the public layout
    m = assert_valid_dataset(dest, json.loads((dest / "manifest.json").read_text())["vocab_size"])
    assert (m["val_docs"], m["train_docs"]) == (4, len(texts) - 4)  # docs_val from the sidecar
    assert m["docs_sidecar"] == sidecar and m["source"] == "hf:someone/pg-docs/datasets/docs_selected.jsonl"
    assert_accounting_matches(dest, "val")
    assert_accounting_matches(dest, "train")
    # a docs file that is not the published one is refused before any training
    (data / "docs_selected.jsonl").write_text(docs.read_text() + json.dumps({"text": "extra"}) + "\n")
    assert pd.main(args + ["--name", "bad"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "sidecar" in err[-1] and not (out / "bad").exists()


@pytest.mark.parametrize("args, needles", [
    (["--vocab", "100"], ["--vocab 100", "too small"]),
    (["--vocab", "70000"], ["--vocab 70000", "uint16"]),
    (["--vocab", "4096", "--docs", "MISSING"], ["--docs", "nope.jsonl", "not found"]),
    (["--vocab", "400", "--docs", "DOCS", "--val-docs", "12"], ["--val-docs 12", "train split would be empty"]),
    (["--vocab", "400", "--docs", "DOCS", "--tokenizer-train-docs", "0"], ["--tokenizer-train-docs 0"]),
    (["--vocab", "400", "--docs", "BAD", "--val-docs", "1"], ["bad.jsonl:2", '"text"']),
])
def test_cli_retokenize_errors(tmp_path, args, needles):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in SMALL_TEXTS + SMALL_JSONL))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "no text field"}\n')
    paths = {"MISSING": str(tmp_path / "nope.jsonl"), "DOCS": str(docs), "BAD": str(bad)}
    out = tmp_path / "out"
    r = run_cli("retokenize", *[paths.get(a, a) for a in args], "--out", str(out))
    # errors found in a scanned file follow its progress lines ("scanning ..."): the error is the last line
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.strip().splitlines() if not line.startswith("[prepare_data] ")]
    assert len(errors) == 1 and errors[0] == r.stderr.strip().splitlines()[-1], r.stderr
    assert_one_line_error(types.SimpleNamespace(returncode=2, stderr=errors[0]), *needles)
    assert not out.exists() or not list(out.iterdir()), "nothing may be left behind"


def test_fineweb_variant_names_and_default_layout():
    files, tok = pd.fineweb_files("sp8192", 2)
    assert files == ["datasets/datasets/fineweb10B_sp8192/fineweb_val_000000.bin",
                     "datasets/datasets/fineweb10B_sp8192/fineweb_train_000000.bin",
                     "datasets/datasets/fineweb10B_sp8192/fineweb_train_000001.bin",
                     "datasets/tokenizers/fineweb_8192_bpe.model", "datasets/tokenizers/fineweb_8192_bpe.vocab"]
    assert tok == "datasets/tokenizers/fineweb_8192_bpe.model"
    assert pd.fineweb_files("sp4096", 0)[1] == "datasets/tokenizers/fineweb_4096_bpe.model"
    for bad in ("byte260", "sp", "sp70000", "4096"):
        with pytest.raises(pd.PrepError, match=f"--variant {bad}"):
            pd.fineweb_files(bad, 1)


def test_fineweb_repo_id_option_and_environment(monkeypatch):
    monkeypatch.delenv("MATCHED_FINEWEB_REPO_ID", raising=False)
    assert pd.build_parser().parse_args(["fineweb"]).repo_id == "willdepueoai/parameter-golf"
    monkeypatch.setenv("MATCHED_FINEWEB_REPO_ID", "kevclark/parameter-golf")
    for cmd in (["fineweb"], ["retokenize", "--vocab", "4096"]):
        assert pd.build_parser().parse_args(cmd).repo_id == "kevclark/parameter-golf"
        assert pd.build_parser().parse_args([*cmd, "--repo-id", "me/mine"]).repo_id == "me/mine"


def test_fineweb_sp8192_download(brown_at, tmp_path, monkeypatch, capsys):
    src = brown_at(8192)
    hub = tmp_path / "hub" / "datasets"
    ds = hub / "datasets" / "fineweb10B_sp8192"
    ds.mkdir(parents=True)
    (hub / "tokenizers").mkdir()
    train = read_split(src, "train").astype(np.uint16)
    assert len(pd.write_shards(ds, "train", train, train.size // 3 + 1)) == 3
    (ds / "fineweb_val_000000.bin").write_bytes((src / "fineweb_val_000000.bin").read_bytes())
    (hub / "tokenizers" / "fineweb_8192_bpe.model").write_bytes((src / "tokenizer.model").read_bytes())
    (hub / "tokenizers" / "fineweb_8192_bpe.vocab").write_bytes((src / "tokenizer.vocab").read_bytes())
    manifest = {"datasets": [{"name": "fineweb10B_sp8192", "tokenizer_name": "sp_bpe_8192",
                              "stats": {"files_train": 3, "files_val": 1}}],
                "tokenizers": [{"name": "sp_bpe_8192", "model_path": "tokenizers/fineweb_8192_bpe.model",
                                "vocab_path": "tokenizers/fineweb_8192_bpe.vocab"}]}
    (hub / "manifest.json").write_text(json.dumps(manifest))
    data = tmp_path / "data"
    data.mkdir()  # a hub manifest left by the default repo, without sp8192: must not be trusted
    (data / "manifest.json").write_text(json.dumps({"datasets": [{"name": "fineweb10B_sp1024"}], "tokenizers": []}))
    monkeypatch.setenv("MATCHED_FINEWEB_REPO_ID", "kevclark/parameter-golf")
    calls = fake_hub(monkeypatch, hub.parent, tmp_path / "hfcache", repo_id="kevclark/parameter-golf")
    assert pd.main(["fineweb", "--variant", "sp8192", "--train-shards", "2", "--data-dir", str(data)]) == 0
    dest = data / "datasets" / "fineweb10B_sp8192"
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(dest)
    assert calls == ["datasets/manifest.json", "datasets/datasets/fineweb10B_sp8192/fineweb_val_000000.bin",
                     "datasets/datasets/fineweb10B_sp8192/fineweb_train_000000.bin",
                     "datasets/datasets/fineweb10B_sp8192/fineweb_train_000001.bin",
                     "datasets/tokenizers/fineweb_8192_bpe.model", "datasets/tokenizers/fineweb_8192_bpe.vocab"]
    for name in ("fineweb_val_000000.bin", "fineweb_train_000000.bin", "fineweb_train_000001.bin"):
        assert (dest / name).read_bytes() == (ds / name).read_bytes(), name
    m = assert_valid_dataset(dest, 8192)
    assert m["tokenizer_path"] == "../../tokenizers/fineweb_8192_bpe.model"
    assert m["source"] == "hf:kevclark/parameter-golf/datasets (sp8192)"
    assert (m["val_docs"], m["train_tokens"]) == (50, sum(train_gpt.load_data_shard(dest / n).size for n in
                                                            ("fineweb_train_000000.bin", "fineweb_train_000001.bin")))
    assert_accounting_matches(dest, "val")
    tok = str(data / "tokenizers" / "fineweb_8192_bpe.model")
    hp = train_gpt.load_hparams({"DATA_PATH": str(dest), "VOCAB_SIZE": "8192"})
    assert Path(train_gpt.resolve_tokenizer(hp)).resolve() == Path(tok).resolve()
    (dest / "manifest.json").unlink()  # the public layout alone gives the same tokenizer
    assert Path(train_gpt.resolve_tokenizer(hp)).resolve() == Path(tok).resolve()
    # the variant missing from the hub manifest: one line naming what the repo has
    assert pd.main(["fineweb", "--variant", "sp4096", "--data-dir", str(data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --variant sp4096") and "fineweb10B_sp8192" in err[-1]


def test_curriculum_samples_easy_sequences_first_and_hard_ones_last(tmp_path):
    rng = np.random.default_rng(0)  # 16-token sequences: even ones a frequent token repeated (easy), odd ones random
    seqs = [np.full(16, 5) if i % 2 == 0 else rng.integers(10, 1000, 16) for i in range(400)]
    header = np.zeros(train_gpt.HEADER_INTS, dtype="<i4")
    header[:3] = train_gpt.SHARD_MAGIC, train_gpt.SHARD_VERSION, 400 * 16
    (tmp_path / "fineweb_train_000000.bin").write_bytes(header.tobytes() + np.concatenate(seqs).astype("<u2").tobytes())
    hp = train_gpt.load_hparams({"CURRICULUM_BUCKETS": "2", "SEED": "3"})
    loader = train_gpt.CurriculumLoader(str(tmp_path / "fineweb_train_*.bin"), train_gpt.Run(hp, torch.device("cpu")))
    easy = {}
    for p in (0.0, 0.5, 1.0):
        loader.progress = p
        x, y = loader.next_batch(16 * 100, 16, 1)  # 100 sequences, each with its next-token targets
        assert x.shape == y.shape == (100, 16) and torch.equal(x[:, 1:], y[:, :-1])
        easy[p] = float((x == 5).all(1).float().mean())
    assert easy[0.0] > 0.9 and 0.3 < easy[0.5] < 0.7 and easy[1.0] < 0.1, easy  # weights 1 vs 0.02 at the ends
    loader.n, loader.progress = 8, 0.0  # 8 buckets at the start: linear from 1 (easiest) down to the floor
    assert np.allclose(loader.weights(), [1, 6 / 7, 5 / 7, 4 / 7, 3 / 7, 2 / 7, 1 / 7, 0.02])


class MarkedPilot(torch.nn.Module):
    """A pilot whose loss on a sequence is its first input token: the buckets it yields are known."""

    def forward(self, x, y):
        return x[:, :1].float().expand(-1, x.size(1))


def test_curriculum_pilot_model_scores_the_buckets_when_asked(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)  # 64 sequences of 16 tokens, each starting with a distinct token
    seqs = np.concatenate([[rng.permutation(np.arange(100, 164))[i]] + [7] * 15 for i in range(64)])
    header = np.zeros(train_gpt.HEADER_INTS, dtype="<i4")
    header[:3] = train_gpt.SHARD_MAGIC, train_gpt.SHARD_VERSION, seqs.size
    (tmp_path / "fineweb_train_000000.bin").write_bytes(header.tobytes() + seqs.astype("<u2").tobytes())
    pattern = str(tmp_path / "fineweb_train_*.bin")
    runs = {steps: train_gpt.Run(train_gpt.load_hparams({"CURRICULUM_BUCKETS": "4", "CURRICULUM_PILOT_STEPS": steps,
                                                         "VAL_BATCH_TOKENS": "256"}), torch.device("cpu"))
            for steps in ("0", "3")}
    trained = []
    monkeypatch.setattr(train_gpt, "train_pilot", lambda pat, run, seq_len: trained.append(
        (pat, run.hp.curriculum_pilot_steps, seq_len)) or MarkedPilot())
    loader = train_gpt.CurriculumLoader(pattern, runs["3"])
    loader.next_batch(16 * 8, 16, 1)
    assert trained == [(pattern, 3, 16)]  # trained once, when the first stretch is scored
    firsts = seqs.reshape(64, 16)[:, 0]
    want = np.array_split(np.argsort(firsts[:63], kind="stable"), 4)  # 63 full sequences (each needs its next token)
    assert all(np.array_equal(a, b) for a, b in zip(loader.members, want))
    plain = train_gpt.CurriculumLoader(pattern, runs["0"])  # unigram surprisal: every first token is seen once
    plain.next_batch(16 * 8, 16, 1)
    assert not all(np.array_equal(a, b) for a, b in zip(plain.members, want)) and len(trained) == 1
    monkeypatch.undo()  # the real pilot: a small GPT that its steps taught something
    pilot, untrained = (train_gpt.train_pilot(pattern, runs[k], 16) for k in ("3", "0"))
    x = torch.from_numpy(seqs[:16 * 8].astype(np.int64)).view(8, 16)
    assert sum(p.numel() for p in pilot.parameters()) < 500_000
    again = train_gpt.train_pilot(pattern, runs["3"], 16).state_dict()  # seeded: every rank and a resume agree
    assert all(torch.equal(t, again[k]) for k, t in pilot.state_dict().items())
    with torch.no_grad():
        assert float(pilot(x[:, :-1], x[:, 1:]).mean()) < float(untrained(x[:, :-1], x[:, 1:]).mean()) - 0.5
