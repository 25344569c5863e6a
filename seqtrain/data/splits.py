"""Train, val and test: a corpus cut into contiguous splits at line starts, tokenized, paired with
its targets and summed up as a DataSpec (`load_splits`, the one pipeline of train and evaluate)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from seqtrain.data.cache import fingerprint, tokenize
from seqtrain.data.corpus import SPLITS, Corpus, DataSpec, boundary, with_targets
from seqtrain.data.sources import (
    SERIES_KEYS,
    DataConfig,
    check_data_keys,
    load_corpus,
    refuse_unread_keys,
)
from seqtrain.data.streams import Rows
from seqtrain.errors import DataError
from seqtrain.tokenizers import (
    MIN_VOCAB,
    TOKENIZERS,
    Tokenizer,
)

log = logging.getLogger("seqtrain")


def split_corpus(
    corpus: Corpus, fractions: list[float], at_boundaries: bool = False
) -> dict[str, Corpus]:
    """Contiguous train/val/test split: no text of one split appears in another.

    at_boundaries: each cut moves forward to the next line or document start (with no newline
    left, the next whitespace), so no word is cut in two: tokenizers other than bytes need it.
    """
    n = len(corpus.values)
    bounds = np.round(np.cumsum([0.0, *fractions]) / sum(fractions) * n).astype(np.int64)
    if at_boundaries:
        for i in range(1, len(bounds) - 1):
            bounds[i] = boundary(corpus, max(int(bounds[i]), int(bounds[i - 1])))
    return {
        name: corpus.slice(int(a), int(b))
        for name, a, b in zip(SPLITS, bounds[:-1], bounds[1:], strict=True)
    }


def fit_streams(
    splits: dict[str, Corpus], streams: dict[str, int], window: int, world: int = 1
) -> dict[str, int]:
    """The streams each split named in `streams` gives, one window each at least, over `world`
    ranks alike. The training split must give all it is asked for (data.batch_size streams per
    rank: the update's shape). An evaluation split (val, test) gives as many as fit, fewer
    than asked with an INFO line: its figure is over the whole split either way, only with a
    little more context per stream. Too short for one window per rank is one line."""
    fitted = {}
    for name, count in streams.items():
        have, unit = len(splits[name].values), splits[name].unit
        fit = min(count, have // (window + 1) // world * world)
        if name == "train" and fit < count:
            raise DataError(
                f"the train split has {have:,} {unit} but {count} streams x (tbptt.window "
                f"{window} + 1) need {count * (window + 1):,}; use a larger corpus, a smaller "
                "data.batch_size or tbptt.window"
            )
        if fit < world:
            raise DataError(
                f"the {name} split has {have:,} {unit}, too few for one window of tbptt.window "
                f"{window} (+ 1) per rank; use a larger corpus, a larger {name} fraction of "
                "data.split or a smaller tbptt.window"
            )
        if fit < count:
            log.info(
                "the %s split holds %d windows of %d %s: %d streams instead of %d",
                name,
                have // (window + 1),
                window + 1,
                unit,
                fit,
                count,
            )
        fitted[name] = fit
    return fitted


def describe(train: Corpus) -> DataSpec:
    """The DataSpec of a run, from its training split with targets (`with_targets`)."""
    if train.vocab_size is not None:
        return DataSpec("tokens", train.vocab_size, train.vocab_size)
    targets = train.targets.astype(np.float64)  # (N, K)
    variance = float(targets.var(axis=0).mean())  # per column around its own mean, then averaged
    if not variance > 0:
        raise DataError(
            f"the training targets of '{train.name}' have zero variance: nMSE (MSE over the "
            "variance) is undefined; pass a series that varies (data.path, data.target_path, "
            "data.target_columns)"
        )
    return DataSpec("series", train.values.shape[1], targets.shape[1], variance)


@dataclass
class Splits:
    """A run's data: train/val/test tokenized, each paired with its targets, and their spec."""

    parts: dict[str, Corpus]  # train, val, test, each with its targets (`with_targets`)
    spec: DataSpec  # what the model and the task need, the tokenizer included
    prompt: bytes  # the val split's first bytes of text: where the text samples start
    streams: dict[str, int]  # all ranks' streams each split asked for gives (fit_streams)


def load_splits(
    cfg: DataConfig,
    streams: dict[str, int],
    window: int,
    saved: DataSpec | None = None,
    check_identity: Callable[[str], None] | None = None,
    world: int = 1,
) -> Splits:
    """The corpus of `cfg`, split, tokenized and paired with its targets, and the streams each
    split named in `streams` gives over `world` ranks (`fit_streams`).

    The tokenizer (data.tokenizer) is fitted on the training split alone, so no word of val or
    test enters the vocabulary; with `saved`, a checkpoint's spec, it is that run's own tokenizer
    instead and nothing is fitted (resume, evaluate). Each split reports its UTF-8 bytes per
    token, the scale of bits per byte. `check_identity` sees the corpus's fingerprint first.
    """
    name = cfg.tokenizer if saved is None else saved.tokenizer
    if name != cfg.tokenizer:  # a checkpoint of an earlier version has no data.tokenizer key
        raise DataError(
            f"the checkpoint was trained with data.tokenizer={name} (now {cfg.tokenizer}); its "
            "weights read that tokenizer's tokens: use it, or train anew"
        )
    kind = TOKENIZERS.get(name)
    check_data_keys(cfg)
    corpus = load_corpus(cfg)
    if corpus.vocab_size is not None:  # tokens: data.target_path is for series alone
        text = not corpus.tokenized
        refuse_unread_keys(cfg, "text" if text else "token ids", SERIES_KEYS[: 2 if text else 1])
    identity = fingerprint(corpus)  # of the source: what a resume or an evaluation compares
    if check_identity is not None:  # before any work on a corpus that may be refused
        check_identity(identity)
    raw = split_corpus(corpus, cfg.split, at_boundaries=not kind.passthrough)
    is_text = corpus.vocab_size is not None and not corpus.tokenized  # one byte of text each
    if kind.passthrough:  # the corpus's values are the tokens
        tokenizer, parts = kind.from_state({}), raw
    elif not is_text:
        got = "float rows" if corpus.vocab_size is None else "tokens"
        raise DataError(
            f"data.tokenizer={name} reads text, but data.source={cfg.source} gives {got}; use "
            "data.tokenizer=bytes (the default)"
        )
    else:
        state = None if saved is None else saved.tokenizer_state
        tokenizer, parts = tokenize(identity, raw, cfg, name, state)
    tokens = "" if parts is raw else f"; {name} tokens {sizes(parts)}"
    log.info(
        "corpus %s: %s %s, %s documents; train/val/test %s%s",
        corpus.name,
        f"{len(corpus.values):,}",
        corpus.unit,
        f"{len(corpus.doc_starts):,}",
        sizes(raw),
        tokens,
    )
    fitted = fit_streams(parts, streams, window, world)
    paired = {split: with_targets(part, cfg.target_columns) for split, part in parts.items()}
    spec = describe(paired["train"])
    if spec.kind == "tokens":
        ratios = {s: len(raw[s].values) / len(p.values) for s, p in parts.items() if len(p.values)}
        spec = dataclasses.replace(
            spec,
            tokenizer=name,
            tokenizer_state=tokenizer.state(),
            text=is_text,
            bytes_per_token=ratios if is_text else None,
        )
    warnings = (*corpus.warnings, *degenerate(spec, tokenizer, parts["val"], name))
    for warning in warnings:
        log.warning(warning)
    spec = dataclasses.replace(spec, corpus=identity, warnings=warnings)
    return Splits(paired, spec, raw["val"].values[:PROMPT_BYTES].tobytes(), fitted)


MAX_UNK_SHARE = 0.5  # a val split more <unk> than this measures the tokenizer, not the model


COUNT_CHUNK = 1 << 22  # ids counted at once (through a bounded buffer: data.Rows)


def degenerate(spec: DataSpec, tokenizer: Tokenizer, val: Corpus, name: str) -> list[str]:
    """Why the run's figures would say little: a tiny vocabulary (`data.tokenizer=word
    data.min_count=1000000` keeps <unk> and <eos>: 0.21 bits per byte of nothing learnt), or a
    val split mostly of the unknown token."""
    if spec.kind != "tokens":
        return []
    found = []
    if spec.input_size < MIN_VOCAB:
        found.append(
            f"a vocabulary of {spec.input_size} tokens (under {MIN_VOCAB}, data.tokenizer={name}"
            "): its loss and bits per byte measure almost nothing; check data.min_count, "
            "data.vocab_size or the corpus"
        )
    unk = getattr(tokenizer, "unk_id", None)
    if unk is not None and len(val.values):
        rows = Rows(val.values)
        count = sum(
            int(np.count_nonzero(rows.run(a, min(COUNT_CHUNK, len(val.values) - a)) == unk))
            for a in range(0, len(val.values), COUNT_CHUNK)
        )
        if count / len(val.values) > MAX_UNK_SHARE:
            found.append(
                f"{count / len(val.values):.0%} of the val split's tokens are <unk> (over "
                f"{MAX_UNK_SHARE:.0%}, data.tokenizer={name}): its figures measure the "
                "vocabulary, not the model; lower data.min_count or raise data.vocab_size"
            )
    return found


def sizes(parts: dict[str, Corpus]) -> str:
    return "/".join(f"{len(p.values):,}" for p in parts.values())


PROMPT_BYTES = 48  # of val text, for the samples logged at validation
