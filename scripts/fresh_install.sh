#!/usr/bin/env bash
# The README's main command as a new user meets it: a clean clone of HEAD, a new virtual
# environment, the README's install, then `python -m seqtrain +experiment=char_lm` cut to a few
# updates, and a check of everything the README promises the run leaves behind.
#   bash scripts/fresh_install.sh            (about a minute on 2 CPU cores, packages cached)
# Extra arguments are added to the training command (e.g. trainer.max_steps=40).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
unset PYTHONPATH PYTHONHOME PIP_USER VIRTUAL_ENV
git clone -q "$repo" "$tmp/seqtrain"
cd "$tmp/seqtrain"
python3 -m venv "$tmp/venv"
# shellcheck disable=SC1091
. "$tmp/venv/bin/activate"
pip install -q -e '.[dev]'
run="$tmp/run"
python -m seqtrain +experiment=char_lm trainer.max_steps=12 trainer.val_check_interval=6 \
  trainer.sample_length=20 "hydra.run.dir=$run" "$@" | tee "$tmp/console.txt"
python - "$run" "$tmp/console.txt" <<'EOF'
"""Every output the README's 'What a run leaves behind' names, and the console's last lines."""
import json
import sys
from pathlib import Path

run, console = Path(sys.argv[1]), Path(sys.argv[2]).read_text()
expected = [
    ".hydra/config.yaml",
    ".hydra/overrides.yaml",
    "cli.log",
    "checkpoints/last.ckpt",
    "checkpoints/best.ckpt",
    "summary.json",
]
missing = [p for p in expected if not (run / p).is_file()]
if not list((run / "tensorboard").glob("events.out.tfevents.*")):
    missing.append("tensorboard/events.out.tfevents.*")
summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
for key in ("steps", "tokens", "tokens_per_s", "val_bpc", "backend", "device"):
    if key not in summary:
        missing.append(f"summary.json:{key}")
if summary.get("steps") != 12:
    missing.append(f"summary.json:steps=12 (got {summary.get('steps')})")
for words in ("run directory:", "val/bpc:", "tensorboard --logdir"):
    if words not in console:
        missing.append(f"console: {words!r}")
if missing:
    sys.exit("fresh install: missing " + ", ".join(missing))
print(f"fresh install: ok ({len(expected) + 1} outputs, val/bpc {summary['val_bpc']:.3f})")
EOF
