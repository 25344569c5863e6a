"""`python -m seqtrain` and the `seqtrain` command (pyproject.toml points both here).

A Tab's completion is answered from its cache before anything heavy is imported (completion.py);
otherwise the command line runs (cli imports torch through the config).
"""

import sys

from seqtrain import completion


def main() -> None:
    if completion.answer(sys.argv[1:]):
        return
    from seqtrain import cli  # torch loads here

    cli.main()


if __name__ == "__main__":
    main()
