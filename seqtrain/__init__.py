"""seqtrain: memory-aware training of recurrent sequence models on long sequences."""

__version__ = "0.1.0"
