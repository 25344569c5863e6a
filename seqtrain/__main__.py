"""`python -m seqtrain` and the `seqtrain` command: a Tab's completion from its cache, else the
command line (seqtrain.cli), whose imports (torch, Lightning, Hydra) take seconds."""

import sys

from seqtrain import completion


def main() -> None:
    if completion.answer(sys.argv[1:]):
        return
    from seqtrain import cli  # past the completion fast path only

    cli.main()


if __name__ == "__main__":
    main()
