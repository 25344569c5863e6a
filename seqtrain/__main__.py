"""`python -m seqtrain` and the `seqtrain` command (pyproject.toml points both here).

A Tab's completion is answered from its cache before anything heavy is imported (completion.py);
otherwise the command line runs (cli imports torch through the config).

Ctrl-C or SIGTERM while torch, Lightning and Hydra load (seconds) is one line and the status of
the signal, as it is later before training starts (cli.hydra_main, which installs its own
SIGTERM handler): nothing has started, so there is nothing to release.
"""

import os
import signal
import sys

from seqtrain import completion

STARTING = "before training started; nothing was saved; run the same command again to start"


def stop_while_starting(signum: int, frame) -> None:
    """SIGTERM while starting: nothing is held yet, so the one line and out at once (an exception
    raised inside the imports or Hydra's setup could be caught there and become another error)."""
    print(f"seqtrain: error: interrupted (SIGTERM) {STARTING}", file=sys.stderr, flush=True)
    os._exit(128 + signum)


def main() -> None:
    if completion.answer(sys.argv[1:]):
        return
    previous = signal.signal(signal.SIGTERM, stop_while_starting)
    try:
        from seqtrain import cli  # torch loads here

        cli.main()
    except KeyboardInterrupt:  # only while starting: later ones are handled inside
        print(f"seqtrain: error: interrupted (SIGINT) {STARTING}", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    main()
