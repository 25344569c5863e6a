"""The docs name only config keys that exist (scripts/check_docs.py's key check, in this process;
`python scripts/check_docs.py` runs the docs' commands too)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "check_docs.py"


@pytest.fixture(scope="module")
def check_docs():
    spec = importlib.util.spec_from_file_location("check_docs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_docs"] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


def test_every_key_the_docs_name_is_in_the_composed_config(check_docs) -> None:
    assert check_docs.check_keys() == []


def test_a_key_the_config_lacks_is_reported_with_its_file_and_line(
    check_docs, tmp_path: Path
) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(
        "# t\n\nSet `data.foo` and `model.hidden_size`, or run\n\n```\n"
        "python -m seqtrain +experiment=char_lm optim.lrr=0.1   # a typo\n```\n"
    )
    assert check_docs.check_keys([doc]) == [
        f"{doc}:3: data.foo is not a config key",
        f"{doc}:6: optim.lrr is not a config key",
    ]


def test_commands_are_found_in_blocks_and_spans_with_continuations_and_chains(check_docs) -> None:
    found = {c.text for c in check_docs.commands(check_docs.ROOT / "README.md")}
    assert "python -m seqtrain +experiment=char_lm memory=chunk" in found  # comment stripped
    assert "pytest" in found and "pip install -e '.[dev]'" in found  # `&&` split
    assert "python -m seqtrain --cfg job" in found  # an inline span
