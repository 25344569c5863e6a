"""A corpus file reader written outside seqtrain, as a user would: data.reader=my_readers:csv_text
(a CSV file's text column)."""

from __future__ import annotations

import csv
from pathlib import Path

from seqtrain.data import Corpus, DataConfig, documents


def csv_text(path: Path, cfg: DataConfig, budget: int | None) -> Corpus:
    """Each row's `text` column, one document per row."""
    with path.open(newline="", encoding="utf-8") as f:
        return documents([row["text"].encode() for row in csv.DictReader(f)], path.name)
