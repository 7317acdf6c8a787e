#!/usr/bin/env python3
"""Pack train_gpt.py into the short self-extracting script that a submission counts as code.

    python scripts/pack_code.py                          # train_gpt.py -> train_gpt_packed.py
    python scripts/pack_code.py --source train_gpt.py --out records/x/train_gpt.py

The packed file is two comment lines and one statement: the readable source compressed with
whichever of lzma (raw LZMA2, preset 9e), lzma (xz), brotli-11 or zstd-22 gives the smallest file,
held in a latin-1 string literal (one source character per byte; only backslash, quote, CR, LF
and NUL are escaped, so it grows ~2%, where base85 grows 25%), decompressed and executed in the
packed file's own module: `__file__` is the packed file, so train_gpt.py counts the packed
file's bytes as CODE_BYTES and logs `code: N bytes (packed)`. Line 1 carries the sha256 of the
readable source, which package_submission.py checks. Never edit a packed file by hand: pack again.
"""
from __future__ import annotations

import argparse
import hashlib
import lzma
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import UserError, cli, write_atomic  # noqa: E402

MARKER = b"# packed train_gpt.py sha256="
RAW = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
ESCAPES = {0x5C: b"\\\\", 0x22: b'\\"', 0x0A: b"\\n", 0x0D: b"\\r", 0x00: b"\\x00"}


def codecs() -> dict[str, tuple]:
    """name -> (compress, the wrapper's statement, its @ standing for the compressed bytes)."""
    out = {"lzma-raw": (lambda b: lzma.compress(b, lzma.FORMAT_RAW, filters=RAW),
                        "import lzma as L;exec(L.decompress(@,L.FORMAT_RAW,filters=[{'id':L.FILTER_LZMA2}]))"),
           "xz": (lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME), "import lzma;exec(lzma.decompress(@))")}
    for name, module, comp, call in (("brotli", "brotli", lambda m: lambda b: m.compress(b, quality=11),
                                      "import brotli;exec(brotli.decompress(@))"),
                                     ("zstd", "zstandard", lambda m: lambda b: m.ZstdCompressor(level=22).compress(b),
                                      "import zstandard;exec(zstandard.ZstdDecompressor().decompress(@))")):
        try:
            out[name] = (comp(__import__(module)), call)
        except ImportError:
            pass
    return out


def literal(data: bytes) -> bytes:
    """A latin-1 string literal holding data, one character per byte."""
    return b'"' + b"".join(ESCAPES.get(c, bytes((c,))) for c in data) + b'"'


def pack(source: bytes) -> tuple[bytes, str]:
    """(packed file, codec used): the smallest of every available codec."""
    head = MARKER + hashlib.sha256(source).hexdigest().encode() + b"\n# -*- coding: latin-1 -*-\n"
    files = {name: head + call.replace("@", literal(comp(source)).decode("latin-1") + '.encode("latin-1")', 1)
             .encode("latin-1") + b"\n" for name, (comp, call) in codecs().items()}
    name = min(files, key=lambda n: len(files[n]))
    return files[name], name


def packed_hash(packed: bytes) -> str | None:
    """The readable source's sha256 a packed file names, or None if it is not a packed file."""
    m = re.match(re.escape(MARKER) + rb"([0-9a-f]{64})\n", packed)
    return m[1].decode() if m else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", type=Path, default=Path("train_gpt.py"), help="readable script (default train_gpt.py)")
    p.add_argument("--out", type=Path, default=Path("train_gpt_packed.py"),
                   help="packed file (default train_gpt_packed.py)")
    args = p.parse_args(argv)
    if not args.source.is_file():
        raise UserError(f"{args.source}: not found; run from the repo root or pass --source")
    source = args.source.read_bytes()
    if packed_hash(source):
        raise UserError(f"{args.source}: already a packed file; pack the readable train_gpt.py")
    packed, codec = pack(source)
    write_atomic(args.out, packed)
    print(f"{args.source} {len(source):,} bytes -> {args.out} {len(packed):,} bytes ({codec})")
    return 0


if __name__ == "__main__":
    cli(main)
