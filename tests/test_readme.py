"""docs/CONFIGURATION.md documents every environment variable once, with its true default."""
import dataclasses
import re

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
