"""Screenshots of TensorBoard on a finished run, taken by headless Chromium.

    python scripts/tensorboard_screenshot.py                 # trains a tiny run first
    python scripts/tensorboard_screenshot.py --run-dir RUN   # an existing run

Writes docs/tensorboard.png (the time series, as a user first sees them) and
docs/tensorboard_hparams.png (the HParams table). TensorBoard listens on 127.0.0.1 only, for as
long as the screenshots take. Needs a `chromium` binary (Debian: apt-get install chromium).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from seqtrain.cli import tensorboard_url

ROOT = Path(__file__).resolve().parents[1]
# A tiny model, long enough for curves: three validations, a text sample at each.
TINY = ["+debug=tiny", "trainer.max_steps=90", "trainer.val_check_interval=30"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/data/runs", timeout=2) as reply:
                if reply.status == 200 and reply.read() != b"[]":  # the runs are loaded
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"TensorBoard did not serve {url} within {seconds:.0f} s")


def screenshot(chromium: str, url: str, out: Path) -> None:
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1400,1000",
            "--virtual-time-budget=15000",  # let the page fetch and draw its charts
            f"--screenshot={out}",
            url,
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, help="a finished run (default: train a tiny one)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="where the PNGs go")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("no chromium on PATH (Debian: apt-get install chromium)")
    run_dir = args.run_dir
    if run_dir is None:
        run_dir = Path(tempfile.mkdtemp(prefix="seqtrain_tb_")) / "run"
        command = [sys.executable, "-m", "seqtrain", *TINY, f"hydra.run.dir={run_dir}"]
        subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    board = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(run_dir / "tensorboard")]
        + ["--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_serving(url, 60)
        # The page seqtrain's last line points to (loss and bpc pinned, no smoothing), and the
        # HParams table; charts as SVG, which headless Chromium draws (its WebGL often does not).
        page, _, fragment = tensorboard_url("val/bpc", url).partition("#")
        views = {"tensorboard.png": f"{page}&forceSVG=true#{fragment}"}
        views["tensorboard_hparams.png"] = f"{url}/?forceSVG=true#hparams"
        for name, page in views.items():
            screenshot(chromium, page, args.out / name)
            print(args.out / name)
    finally:
        board.terminate()
        board.wait(timeout=30)


if __name__ == "__main__":
    main()
