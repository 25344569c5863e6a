"""python -m seqtrain: train a model (see seqtrain.cli).

The OpenMP wait policy is set here, before anything imports torch: GNU OpenMP reads it once,
when torch loads (seqtrain/threads.py), and cli imports torch through the config. The
`seqtrain` command runs this `main` too (pyproject.toml).
"""

from seqtrain import threads


def main() -> None:
    threads.yield_when_waiting()
    from seqtrain import cli  # torch loads here, with the wait policy in the environment

    cli.main()


if __name__ == "__main__":
    main()
