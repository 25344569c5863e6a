"""`python -m seqtrain` and the `seqtrain` command (pyproject.toml points both here).

A Tab's completion is answered from its cache before anything heavy is imported (completion.py).
Otherwise the OpenMP wait policy is set before torch loads: GNU OpenMP reads it once, when torch
loads (threads.py), and cli imports torch through the config.
"""

import sys

from seqtrain import completion, threads


def main() -> None:
    if completion.answer(sys.argv[1:]):
        return
    threads.yield_when_waiting()
    from seqtrain import cli  # torch loads here, with the wait policy in the environment

    cli.main()


if __name__ == "__main__":
    main()
