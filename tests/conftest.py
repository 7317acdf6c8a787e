"""Shared fixtures: the local Brown dataset and one briefly trained tiny model per test session."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import train_gpt  # noqa: E402


@pytest.fixture(scope="session")
def brown_data() -> Path:
    """The Brown dataset in the public shard format (built by .ci/run; built here if missing)."""
    path = Path(os.environ.get("PG_TEST_DATA", ROOT / "data/datasets/brown_sp1024"))
    if not (path / "manifest.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "scripts/prepare_data.py"), "local"], cwd=ROOT, check=True)
    return path


def tiny_env(data: Path, log_dir: Path, **overrides) -> dict[str, str]:
    """Environment for a short PRESET=tiny run on the Brown data."""
    env = dict(PRESET="tiny", DATA_PATH=str(data), LOG_DIR=str(log_dir), RUN_ID="test", ITERATIONS="60",
               TRAIN_LOG_EVERY="20")  # the preset's warmdown is a fraction of ITERATIONS
    env.update({k: str(v) for k, v in overrides.items()})
    return env


@pytest.fixture(scope="session")
def tiny_run(brown_data, tmp_path_factory):
    """A Run after setup() and train() of the tiny preset for 60 steps (its model holds the exported weights)."""
    hp = train_gpt.load_hparams(tiny_env(brown_data, tmp_path_factory.mktemp("tiny_logs")))
    run = train_gpt.setup(hp)
    train_gpt.train(run)
    return run
