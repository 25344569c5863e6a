"""Tab completion that answers in a blink: the words come from a cache, not from importing torch.

Hydra's own completion (`-sc install=bash`) registers only for `python FILE.py` and composes the
config on every Tab, which here means importing torch and Lightning: seconds per Tab, and nothing
at all for `seqtrain ...` or `python -m seqtrain ...`. seqtrain prints its own bash function for
both commands instead. The first Tab asks the full command line (`cli.main`), which lists every
key and option and writes them here (`write`); later ones read them back (`answer`, called by
seqtrain/__main__.py before anything heavy is imported) while the package and conf/ are
unchanged. A line that names another config folder (--config-dir,
hydra.searchpath) always goes to Hydra.

Standard library only: this runs before anything heavy is imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
QUERY = ("-sc", "--shell-completion")
OWN_FOLDERS = ("--config-dir", "-cd", "--config-path", "-cp", "hydra.searchpath")

INSTALL = r"""_seqtrain_complete()
{
    local cmd
    if [[ "${COMP_WORDS[0]}" == seqtrain ]]; then
        cmd=(seqtrain)
    elif [[ "${COMP_WORDS[1]}" == -m && "${COMP_WORDS[2]}" == seqtrain ]]; then
        cmd=("${COMP_WORDS[0]}" -m seqtrain)
    else
        return  # python for something else: bash's own file completion (-o default)
    fi
    local choices
    choices=$(COMP_POINT=$COMP_POINT COMP_LINE=$COMP_LINE "${cmd[@]}" -sc query=bash 2>/dev/null)
    COMPREPLY=($(compgen -o nospace -W "$choices" -- "${COMP_WORDS[COMP_CWORD]}"))
}
COMP_WORDBREAKS=${COMP_WORDBREAKS//=}
complete -o nospace -o default -F _seqtrain_complete seqtrain python python3
"""


def conf_dir() -> Path:
    """conf/ ships inside the wheel (seqtrain/conf) and sits beside the package in a checkout."""
    for candidate in (PACKAGE / "conf", PACKAGE.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"seqtrain's conf/ directory is missing next to {PACKAGE}")


def cache_file() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser()
    return root / "seqtrain" / "completion.json"


def version() -> str:
    """What the words depend on: the package's sources and conf/, by path, size and mtime."""
    files = sorted([*PACKAGE.rglob("*.py"), *conf_dir().rglob("*.yaml")])
    h = hashlib.blake2b(digest_size=16)
    for f in files:
        stat = f.stat()
        h.update(f"{f}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()


def query(argv: list[str]) -> bool:
    """Whether argv is a completion query that a cache may answer."""
    if len(argv) != 2 or argv[0] not in QUERY or argv[1] != "query=bash":
        return False
    return not any(flag in os.environ.get("COMP_LINE", "") for flag in OWN_FOLDERS)


def cached() -> list[str] | None:
    """The cached words, or None when there are none or they are stale."""
    try:
        saved = json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("version") != version():
        return None
    return saved.get("words")


def write(words: list[str]) -> None:
    """Keep the words for the next Tab (atomically; a failure only costs speed)."""
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False) as f:
            json.dump({"version": version(), "words": words}, f)
        os.replace(f.name, path)
    except OSError:
        pass


def answer(argv: list[str]) -> bool:
    """Print the words for a completion query from the cache; False when it cannot."""
    if argv[:2] in (["-sc", "install=bash"], ["--shell-completion", "install=bash"]):
        print(INSTALL, end="")
        return True
    words = cached() if query(argv) else None
    if words is None:
        return False
    print("\n".join(words))
    return True
