"""python -m seqtrain: train a model (see seqtrain.cli)."""

from seqtrain.cli import main

if __name__ == "__main__":
    main()
