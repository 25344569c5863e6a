"""Every bad input exits non-zero before any work, with one line, and overwrites nothing.

The cases here are the table in docs/errors.md; a test checks the two stay in step.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

from seqtrain import cli, train
from seqtrain.config import validate

from .conftest import ROOT
from .test_config import composed

TINY = ["+debug=tiny", "trainer.sample_length=0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished tiny run whose checkpoint the checkpoint cases start from."""
    run_dir = tmp_path_factory.mktemp("trained")
    train.fit(train.prepare(validate(composed(*TINY)), run_dir))
    return run_dir / "checkpoints" / "last.ckpt"


def _file(tmp: Path, name: str, content: bytes) -> str:
    path = tmp / name
    path.write_bytes(content)
    return str(path)


def _checkpoint(tmp: Path, trained: Path, edit) -> str:
    ckpt = torch.load(trained, weights_only=True)
    edit(ckpt)
    path = tmp / "edited.ckpt"
    torch.save(ckpt, path)
    return str(path)


def _vocab_100(ckpt: dict) -> None:
    ckpt["hyper_parameters"]["spec"]["input_size"] = 100


# (id, arguments given the tmp dir and a trained checkpoint, the message's tell-tale part)
CASES = [
    (
        "missing corpus",
        lambda t, c: ["data.path=/no/such.txt"],
        "data.path=/no/such.txt: no such file",
    ),
    ("empty corpus", lambda t, c: [f"data.path={_file(t, 'e.txt', b'')}"], "the file is empty"),
    ("directory as corpus", lambda t, c: [f"data.path={t}"], "is a directory; pass a text file"),
    (
        "unreadable corpus",
        lambda t, c: [f"data.path={_file(t, 'locked.txt', b'x' * 9999)}"],
        "cannot read",
    ),
    (
        "corpus too short for the streams",
        lambda t, c: [f"data.path={_file(t, 's.txt', b'x' * 600)}"],
        "the val split has 30 bytes but 4 streams x (tbptt.window 16 + 1) need 68",
    ),
    (
        "config typo",
        lambda t, c: ["model.hiden_size=3"],
        "model.hiden_size is not a key; 'model' takes:",
    ),
    ("unknown group option", lambda t, c: ["data=wiki"], "data=wiki: no such option; choose from"),
    (
        "unknown backend",
        lambda t, c: ["model.backend=cuda"],
        "model.backend=cuda: choose from cudnn, jit",
    ),
    ("unknown cell", lambda t, c: ["model.cell=rnn"], "model.cell=rnn: choose from lstm, gru"),
    ("window zero", lambda t, c: ["tbptt.window=0"], "tbptt.window=0: must be a positive integer"),
    (
        "stride above window",
        lambda t, c: ["tbptt.stride=17"],
        "tbptt.stride=17: must be in 1..tbptt.window",
    ),
    (
        "batch size zero",
        lambda t, c: ["data.batch_size=0"],
        "data.batch_size=0: must be a positive",
    ),
    ("negative learning rate", lambda t, c: ["optim.lr=-1"], "optim.lr=-1.0: must be > 0"),
    (
        "dropout of 1.5",
        lambda t, c: ["model.dropout=1.5"],
        "model.dropout=1.5: must be a probability",
    ),
    ("text for a number", lambda t, c: ["model.hidden_size=big"], "model.hidden_size: Value 'big'"),
    ("bad split", lambda t, c: ["data.split=[0.9,0.1]"], "data.split=[0.9, 0.1]: must be three"),
    (
        "missing checkpoint",
        lambda t, c: ["ckpt_path=/no/such.ckpt"],
        "ckpt=/no/such.ckpt: no such file",
    ),
    (
        "truncated checkpoint",
        lambda t, c: [f"ckpt_path={_file(t, 'cut.ckpt', c.read_bytes()[:5000])}"],
        "not a readable checkpoint",
    ),
    (
        "not a checkpoint",
        lambda t, c: [f"ckpt_path={_file(t, 'notes.ckpt', b'hello')}"],
        "not a readable checkpoint",
    ),
    (
        "another program's checkpoint",
        lambda t, c: [f"ckpt_path={_checkpoint(t, c, lambda k: k.pop('hyper_parameters'))}"],
        "not a seqtrain checkpoint",
    ),
    (
        "checkpoint of another model shape",
        lambda t, c: [f"ckpt_path={c}", "model.hidden_size=32"],
        "was trained with model.hidden_size=16 (now 32)",
    ),
    (
        "checkpoint of another vocabulary",
        lambda t, c: [f"ckpt_path={_checkpoint(t, c, _vocab_100)}"],
        "trained on data of kind tokens, input_size 100",
    ),
    (
        "resume with options that change the model",
        lambda t, c: [f"ckpt_path={c}", "model.num_layers=2"],
        "model.num_layers=1 (now 2)",
    ),
    (
        "Trainer argument seqtrain owns",
        lambda t, c: ["+trainer.gradient_clip_val=1"],
        "trainer.gradient_clip_val: not settable in seqtrain: the module clips by hand",
    ),
    (
        "not a Trainer argument",
        lambda t, c: ["+trainer.clip=1"],
        "trainer.clip is not a lightning.Trainer argument",
    ),
    (
        "misspelt _target_",
        lambda t, c: ["optim.optimizer._target_=torch.optim.AdamWW"],
        "optim.optimizer._target_=torch.optim.AdamWW: no such class or function",
    ),
    (
        "argument the optimizer does not take",
        lambda t, c: ["+optim.optimizer.momentum=0.9"],
        "optim.optimizer.momentum: torch.optim.AdamW takes no such argument",
    ),
    (
        "resume two ways",
        lambda t, c: [f"ckpt_path={c}", "resume=auto"],
        "give either resume=auto or",
    ),
]


@pytest.mark.parametrize(("name", "args", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_touches_nothing(
    name, args, message, trained, tmp_path, monkeypatch, capsys
) -> None:
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("an: earlier run\n")
    if name == "unreadable corpus":  # root reads any file, so fake the permission error
        real = Path.read_bytes
        monkeypatch.setattr(
            Path,
            "read_bytes",
            lambda p: (
                (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
                if p.name == "locked.txt"
                else real(p)
            ),
        )
    argv = ["seqtrain", *TINY, *args(tmp_path, trained), f"hydra.run.dir={run_dir}"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("seqtrain: error: ") and "\n" not in err, err
    assert message in err
    assert (run_dir / ".hydra" / "config.yaml").read_text() == "an: earlier run\n"
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "tensorboard").exists()


def test_a_run_directory_with_checkpoints_is_not_overwritten(
    trained, tmp_path, monkeypatch, capsys
):
    run_dir = tmp_path / "run"
    shutil.copytree(trained.parent, run_dir / "checkpoints")
    before = (run_dir / "checkpoints" / "last.ckpt").read_bytes()
    monkeypatch.setattr(sys, "argv", ["seqtrain", *TINY, f"hydra.run.dir={run_dir}"])
    with pytest.raises(SystemExit):
        cli.main()
    assert "already holds checkpoints; pass resume=auto" in capsys.readouterr().err
    assert (run_dir / "checkpoints" / "last.ckpt").read_bytes() == before


def test_docs_table_lists_every_case() -> None:
    table = (ROOT / "docs" / "errors.md").read_text()
    for name, _, message in CASES:
        assert f"| {name} |" in table, name
        assert message in table, message


def test_full_traceback_only_when_asked(tmp_path, monkeypatch) -> None:
    from seqtrain.config import ConfigError

    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    argv = ["seqtrain", *TINY, "tbptt.window=0", f"hydra.run.dir={tmp_path}"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(ConfigError, match="tbptt.window=0"):
        cli.main()
