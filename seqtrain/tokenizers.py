"""Text <-> tokens: what a language model reads, chosen by data.tokenizer.

    bytes  the 256 byte values (default): any file trains, and bpc is bits per byte
    word   awd-lstm-lm's words: whitespace-split, <eos> at each line end, <unk> for rare words
    bpe    byte-level BPE (the `tokenizers` library), trained on the training split or read
           from data.tokenizer_file

A tokenizer is fitted on the training split only (`data.load_splits`) and is then plain data
(`state()`), kept in every checkpoint's DataSpec: sampling and evaluation rebuild it from the file
alone and never fit again. A user's own is data.tokenizer=my_module:MyTok, a `Tokenizer` subclass
(or a class with the same members).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import marshal
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np

from seqtrain.errors import ConfigError, first_line
from seqtrain.registry import Registry


class Settings(Protocol):
    """The data settings a tokenizer is fitted with (DataConfig's fields of the same names)."""

    vocab_size: int | None
    min_count: int
    tokenizer_file: str | None


MIN_VOCAB = 16  # a vocabulary smaller than this makes a model whose figures say little


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every token id."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


class Tokenizer:
    """The protocol every tokenizer follows. Subclass it: `settings`, `passthrough`, `check` and
    `fingerprint` have defaults; `fit`, `from_state`, `state`, `encode`, `decode` and
    `vocab_size` are the tokenizer's own."""

    # The data.* keys it reads (others must keep their defaults); its fit depends on them alone.
    settings: ClassVar[tuple[str, ...]] = ()
    # True: the corpus's values are its tokens already (bytes), so nothing is encoded or cached
    # and the splits are cut where the fractions fall; False: splits are cut at a line start.
    passthrough: ClassVar[bool] = False
    vocab_size: int  # token ids are 0 .. vocab_size - 1
    # The version of its code, part of every cache key: a fixed `encode` must tokenize anew. A
    # built-in's is a constant raised with any change of its output; a plug-in may set its own,
    # else the hash of its module's source stands for it (`code_version`).
    version: ClassVar[str | None] = None
    # The id of the unknown token, if it has one: a split mostly of it is a degenerate corpus.
    unk_id: ClassVar[int | None] = None

    @classmethod
    def check(cls, cfg: Settings) -> None:
        """Refuse settings it cannot be fitted with: one ConfigError line naming the key."""

    @classmethod
    def fit(cls, texts: Iterable[bytes], cfg: Settings) -> Tokenizer:
        """Fitted on the training split, given as pieces of text cut at line starts."""
        raise NotImplementedError

    @classmethod
    def fingerprint(cls, cfg: Settings) -> dict:
        """What the fit depends on besides the text, as plain data (part of the cache key)."""
        return {key: getattr(cfg, key) for key in cls.settings}

    @classmethod
    def from_state(cls, state: dict) -> Tokenizer:
        """The tokenizer `state()` describes."""
        raise NotImplementedError

    def state(self) -> dict:
        """Everything it needs to be rebuilt, as plain Python data (JSON-able)."""
        raise NotImplementedError

    def encode(self, text: bytes) -> np.ndarray:
        """(N,) token ids of the smallest unsigned dtype that fits (`token_dtype`)."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of the ids, printable (bytes that are not UTF-8 as U+FFFD)."""
        raise NotImplementedError


# data.tokenizer -> a Tokenizer class; a user's own is named as data.tokenizer=my_module:MyTok.
TOKENIZERS: Registry[type[Tokenizer]] = Registry("data.tokenizer")


PROTOCOL = ("fit", "from_state", "state", "encode", "decode")  # a tokenizer's own members


def check_protocol(kind: object, name: str) -> None:
    """A tokenizer plug-in is a class with every member of the protocol (`Tokenizer`'s
    defaults of those raise NotImplementedError); else one line naming data.tokenizer."""
    key = f"data.tokenizer={name}"
    if not isinstance(kind, type):
        raise ConfigError(f"{key}: is a {type(kind).__name__}, not a class like Tokenizer")

    def own(member: str) -> bool:
        impl = getattr(kind, member, None)
        base = getattr(Tokenizer, member)
        return callable(impl) and getattr(impl, "__func__", impl) is not getattr(
            base, "__func__", base
        )

    missing = [member for member in PROTOCOL if not own(member)]
    if missing:
        raise ConfigError(
            f"{key}: {kind.__qualname__} lacks {', '.join(missing)} of the tokenizer protocol "
            "(seqtrain.tokenizers.Tokenizer; docs/corpora.md)"
        )


def code_version(kind: type) -> str:
    """The version of a tokenizer class's code: each class it is built from (the protocol aside)
    by its own `version`, else by a hash of its module's source (`source_hash`)."""
    parts = []
    for cls in kind.__mro__:
        if cls in (Tokenizer, object):
            continue
        own = cls.__dict__.get("version")
        parts.append(f"{cls.__module__}.{cls.__qualname__}={own or source_hash(cls)}")
    return ";".join(parts)


def source_hash(cls: type) -> str:
    """blake2b of the source of the module that defines cls: its class and the helpers it calls
    (a fix anywhere in the file tokenizes anew); of its compiled methods where no source is kept
    (a class typed into a session)."""
    try:
        raw = inspect.getsource(sys.modules[cls.__module__]).encode()
    except (OSError, TypeError, KeyError):
        codes = [getattr(getattr(v, "__func__", v), "__code__", None) for v in vars(cls).values()]
        raw = b"".join(marshal.dumps(code) for code in codes if code is not None)
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


def rebuild(name: str, state: dict | None) -> Tokenizer:
    """The tokenizer a checkpoint's DataSpec names (None state: the byte tokenizer's)."""
    return TOKENIZERS.get(name).from_state(state or {})


@TOKENIZERS.register("bytes")
class ByteTokenizer(Tokenizer):
    """Text <-> byte tokens: any file works, and bpc on any text is bits per byte."""

    passthrough = True
    vocab_size = 256
    version = "1"

    @classmethod
    def fit(cls, texts: Iterable[bytes], cfg: Settings) -> ByteTokenizer:
        return BYTES

    @classmethod
    def from_state(cls, state: dict) -> ByteTokenizer:
        return BYTES

    def state(self) -> dict:
        return {}

    def encode(self, text: bytes) -> np.ndarray:
        return np.frombuffer(text, dtype=np.uint8)  # (N,)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return np.asarray(ids, dtype=np.uint8).tobytes().decode("utf-8", errors="replace")


BYTES = ByteTokenizer()


@TOKENIZERS.register("word")
class WordTokenizer(Tokenizer):
    """awd-lstm-lm's word vocabulary: whitespace-separated words, `<eos>` for each newline, and
    `<unk>` for a word seen fewer than data.min_count times in the training split or outside its
    data.vocab_size most frequent (ties in alphabetical order of the bytes).

    Ids: 0 `<unk>`, 1 `<eos>`, then the words by falling count. A literal `<unk>` in the text
    (Penn Treebank has them) is the unknown word. decode joins words with single spaces, so
    decode(encode(t)) is t with rare words as `<unk>` and runs of spaces as one.
    """

    settings = ("vocab_size", "min_count")
    version = "1"
    SPECIALS = ("<unk>", "<eos>")
    UNK, EOS = 0, 1
    unk_id = UNK

    def __init__(self, words: list[str]) -> None:
        self.words = words  # the vocabulary, by id; bytes that are not UTF-8 as surrogates
        self.pieces = [w.encode("utf-8", errors="surrogateescape") for w in words]
        self.ids = {piece: i for i, piece in enumerate(self.pieces)}
        self.vocab_size = len(words)
        self.dtype = token_dtype(self.vocab_size)

    @classmethod
    def check(cls, cfg: Settings) -> None:
        if cfg.vocab_size is not None and cfg.vocab_size < 3:
            raise ConfigError(
                f"data.vocab_size={cfg.vocab_size}: data.tokenizer=word needs at least 3 "
                "(<unk>, <eos> and one word), or null for every word seen data.min_count times"
            )

    @classmethod
    def fit(cls, texts: Iterable[bytes], cfg: Settings) -> WordTokenizer:
        counts: Counter[bytes] = Counter()
        for text in texts:
            counts.update(text.split())
        for special in cls.SPECIALS:
            counts.pop(special.encode(), None)
        kept = [w for w, c in counts.items() if c >= cfg.min_count]
        kept.sort(key=lambda w: (-counts[w], w))  # most frequent first; ties by the word's bytes
        if cfg.vocab_size is not None:
            kept = kept[: cfg.vocab_size - len(cls.SPECIALS)]
        return cls([*cls.SPECIALS, *(w.decode("utf-8", errors="surrogateescape") for w in kept)])

    @classmethod
    def from_state(cls, state: dict) -> WordTokenizer:
        return cls(list(state["words"]))

    def state(self) -> dict:
        return {"words": self.words}

    def encode(self, text: bytes) -> np.ndarray:
        lookup, unk = self.ids.get, self.UNK
        *lines, last = text.split(b"\n")  # `last` has no newline after it: no <eos>
        ids: list[int] = []
        for line in lines:
            ids.extend([lookup(w, unk) for w in line.split()])
            ids.append(self.EOS)
        ids.extend([lookup(w, unk) for w in last.split()])
        return np.array(ids, dtype=self.dtype)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        lines, line = [], []
        for i in np.asarray(ids, dtype=np.int64).tolist():
            if i == self.EOS:
                lines.append(b" ".join(line))
                line = []
            else:
                line.append(self.pieces[i])
        lines.append(b" ".join(line))
        return b"\n".join(lines).decode("utf-8", errors="replace")


@TOKENIZERS.register("bpe")
class BytePairTokenizer(Tokenizer):
    """Byte-level BPE (GPT-2's pre-tokenizer, no specials): data.vocab_size tokens learnt from
    the training split, or the tokenizer in data.tokenizer_file (a `tokenizers` JSON file).

    The 256 byte symbols are always in the vocabulary, so every text encodes and
    decode(encode(t)) == t for any valid UTF-8 text; bytes that are not UTF-8 are read as U+FFFD.
    Training is deterministic: the same text and vocab_size give the same merges.
    """

    settings = ("vocab_size", "tokenizer_file")
    version = "1"
    ALPHABET = 256  # the byte-level alphabet: the smallest vocabulary

    def __init__(self, tokenizer) -> None:  # a tokenizers.Tokenizer
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.dtype = token_dtype(self.vocab_size)

    @classmethod
    def check(cls, cfg: Settings) -> None:
        if cfg.tokenizer_file is not None:
            size = read_tokenizer_file(cfg.tokenizer_file).vocab_size
            if cfg.vocab_size is not None and cfg.vocab_size != size:
                raise ConfigError(
                    f"data.vocab_size={cfg.vocab_size}: data.tokenizer_file has {size} tokens; "
                    "set data.vocab_size=null (the file's vocabulary is used) or drop the file"
                )
            return
        if cfg.vocab_size is None or cfg.vocab_size < cls.ALPHABET:
            raise ConfigError(
                f"data.vocab_size={cfg.vocab_size}: data.tokenizer=bpe needs a vocabulary of at "
                f"least {cls.ALPHABET} (the byte alphabet), e.g. data.vocab_size=4096, or a "
                "data.tokenizer_file"
            )

    @classmethod
    def fingerprint(cls, cfg: Settings) -> dict:
        # The file by its content: a file rewritten in place is another tokenizer.
        if cfg.tokenizer_file is None:
            return {"vocab_size": cfg.vocab_size}
        return {"tokenizer_file": read_tokenizer_file(cfg.tokenizer_file).state()}

    @classmethod
    def fit(cls, texts: Iterable[bytes], cfg: Settings) -> BytePairTokenizer:
        if cfg.tokenizer_file is not None:
            return read_tokenizer_file(cfg.tokenizer_file)
        from tokenizers import Tokenizer as Tokenizers
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tokenizer = Tokenizers(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=cfg.vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
            show_progress=False,  # data.cache shows the progress of the whole step
        )
        tokenizer.train_from_iterator((t.decode("utf-8", errors="replace") for t in texts), trainer)
        return cls(tokenizer)

    @classmethod
    def from_state(cls, state: dict) -> BytePairTokenizer:
        from tokenizers import Tokenizer as Tokenizers

        return cls(Tokenizers.from_str(state["json"]))

    def state(self) -> dict:
        return {"json": self.tokenizer.to_str()}

    def encode(self, text: bytes) -> np.ndarray:
        encoding = self.tokenizer.encode(
            text.decode("utf-8", errors="replace"), add_special_tokens=False
        )
        return np.array(encoding.ids, dtype=self.dtype)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        ids = np.asarray(ids, dtype=np.int64).tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def read_tokenizer_file(path: str) -> BytePairTokenizer:
    """data.tokenizer_file as a tokenizer; missing, unreadable or not one is one line."""
    from tokenizers import Tokenizer as Tokenizers

    key = f"data.tokenizer_file={path}"
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{key}: no such file; pass a tokenizer.json (tokenizers' format)")
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{key}: cannot read ({err.strerror}); check its permissions") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{key}: not a tokenizer.json (not UTF-8 text)") from None
    try:
        json.loads(text)
        tokenizer = BytePairTokenizer(Tokenizers.from_str(text))
    except Exception as err:
        raise ConfigError(
            f"{key}: not a tokenizer.json ({first_line(err)}); save one with tokenizers' "
            "Tokenizer.save"
        ) from None
    if tokenizer.vocab_size < MIN_VOCAB:
        raise ConfigError(
            f"{key}: holds {tokenizer.vocab_size} tokens, under {MIN_VOCAB}: no vocabulary to "
            "train a model on; is it the right file?"
        )
    return tokenizer
