"""scripts/hostile.py, issue #24's hostile table: at least 150 uniquely named cases, each named
example of the issue and each principle among them, and its --smoke cases pass through the real
command line (the whole table runs outside the suite: docs/reliability.md#the-hostile-table)."""

from __future__ import annotations

import importlib.util
import sys

from .conftest import ROOT

spec = importlib.util.spec_from_file_location("hostile", ROOT / "scripts" / "hostile.py")
hostile = importlib.util.module_from_spec(spec)
sys.modules["hostile"] = hostile  # dataclasses resolve the module's names through it
spec.loader.exec_module(hostile)

# Issue #24's named examples, by the case names that reproduce them.
NAMED_EXAMPLES = (
    "zeroed token cache (train)",
    "zeroed token cache (evaluate)",
    "fixed tokenizer plug-in tokenizes anew",
    "plug-in ids above 255",
    "unreadable subfolder",
    "reader plug-in returning floats",
    "data.doc_starts_path with a text corpus",
    "data.target_path with a text corpus",
    "min_count=1000000",
    "3-token tokenizer.json",
    "+trainer.limit_val_batches=0",
    "resume after a stop at the last step",
    "resume max_steps below the checkpoint",
    "sweep job crashing with a plain exception",
    "full disk",
    "read-only tensorboard/",
    "read-only cli.log",
    "Ctrl-C during tokenization",
    "SIGTERM during tokenization",
    "leftover LOCAL_RANK",
    "peer killed under DDP",
    "resume command of a folder with a space",
    "run folder with ~",
    "symlink loop as corpus",
    "folder without search permission",
    "ckpt= naming a folder",
    "hidden_size=100000",
    "experiment without +",
    "fresh run over a finished run",  # a refused run writes nothing into that run's folder
)
# The six principles, by a case of each.
PRINCIPLES = (
    "edited fitted tokenizer",  # 1. what is read is verified
    "FIFO in a corpus folder",  # 2. nothing dropped without a word
    "tokenizer plug-in without encode",  # 3. plug-ins checked when built
    "uint8 .bin read as uint16",  # 4. degenerate results warn
    "SIGTERM at startup",  # 5. a failure releases what it holds
    "resume of a finished run",  # 6. summaries never hold invented figures
)


def test_the_table_has_150_uniquely_named_cases_with_known_outcomes() -> None:
    table = hostile.cases()
    names = [case.name for case in table]
    assert len(table) >= 150
    assert len(set(names)) == len(names)
    assert {case.expect for case in table} <= set(hostile.EXPECTS)
    assert all(case.words for case in table if case.expect in ("refused", "warned"))


def test_the_table_covers_each_named_example_and_principle() -> None:
    names = [case.name for case in hostile.cases()]
    missing = [p for p in NAMED_EXAMPLES + PRINCIPLES if not any(n.startswith(p) for n in names)]
    assert not missing


def test_smoke_cases_pass(capsys) -> None:
    assert hostile.main(["--smoke", "-j", "2"]) == 0
    out = capsys.readouterr().out
    assert "verdicts: ok " in out and "silently wrong" not in out


def verdict(tmp_path, expect: str, rc: int, stderr: str, before=None, **kw) -> str:
    """classify's verdict of a made-up outcome of a case."""
    case = hostile.Case("made up", expect, words="data.path", **kw)
    result = hostile.Result(case, tmp_path, rc=rc, stderr=stderr, run=tmp_path / "run")
    guarded = {} if before is None else {tmp_path / "run": before}
    return hostile.classify(case, result, guarded)[0]


def test_each_wrong_outcome_gets_its_verdict(tmp_path) -> None:
    line = "seqtrain: error: data.path=/x: no such file\n"
    assert verdict(tmp_path, "refused", 2, line) == "ok"
    assert verdict(tmp_path, "refused", 0, "") == "silently wrong"
    assert verdict(tmp_path, "refused", 1, "Traceback (most recent call last):\n") == "traceback"
    assert verdict(tmp_path, "refused", 2, line + line) == "wrong message"
    assert verdict(tmp_path, "refused", 2, "seqtrain: error: model.x\n") == "wrong message"
    assert verdict(tmp_path, "warned", 0, "") == "silently wrong"
    assert verdict(tmp_path, "warned", 0, "[WARNING] - data.path=x: odd\n") == "ok"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "cli.log").write_text("the other run's log\n")
    before = hostile.snapshot(tmp_path / "run")
    assert verdict(tmp_path, "refused", 2, line, before) == "ok"
    (tmp_path / "run" / "cli.log").write_text("the other run's log\nseqtrain: error: ...\n")
    assert verdict(tmp_path, "refused", 2, line, before) == "data loss"
