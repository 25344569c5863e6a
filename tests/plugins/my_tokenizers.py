"""A user's own tokenizer, outside seqtrain: python -m seqtrain data.tokenizer=my_tokenizers:Chars
(with this directory on PYTHONPATH). docs/corpora.md walks through it."""

from __future__ import annotations

import numpy as np

from seqtrain.tokenizers import Tokenizer, token_dtype


class Chars(Tokenizer):
    """One token per Unicode character of the training split; id 0 for any other character."""

    def __init__(self, chars: str) -> None:
        self.chars = chars
        self.ids = {c: i + 1 for i, c in enumerate(chars)}
        self.vocab_size = len(chars) + 1

    @classmethod
    def fit(cls, texts, cfg) -> Chars:
        seen = set().union(*(t.decode("utf-8", errors="replace") for t in texts))
        return cls("".join(sorted(seen)))

    @classmethod
    def from_state(cls, state: dict) -> Chars:
        return cls(state["chars"])

    def state(self) -> dict:
        return {"chars": self.chars}

    def encode(self, text: bytes) -> np.ndarray:
        ids = [self.ids.get(c, 0) for c in text.decode("utf-8", errors="replace")]
        return np.array(ids, dtype=token_dtype(self.vocab_size))

    def decode(self, ids) -> str:
        return "".join(self.chars[i - 1] if i else "\ufffd" for i in np.asarray(ids).tolist())
