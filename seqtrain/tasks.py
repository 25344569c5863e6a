"""What a window is trained for: the task owns the model's input layer and head, the loss of a
segment's outputs, the figures a run reports and which of them picks the best checkpoint.

The engine (tbptt.py) only calls `loss`; the model (model.py) only calls `input_layer` and
`output_layer` (by default the task's `head`); the Lightning module, train.py and the tools name
metrics through `metrics` and `monitor`. A task is chosen by `task.name` (the `task` config group);
a user's own is `task.name=my_module:MyTask` (docs/tasks.md). Built-ins:

    lm          next-token cross-entropy over a vocabulary; loss (nats), bpc = loss / ln 2 (bits
                per token: per byte with data.tokenizer=bytes), bits_per_byte on every tokenizer's
                common scale, and ppl = e^loss for tokenizers other than bytes
                (its head is model.head's, heads.py, optionally tied to the embedding)
    regression  next-step continuous targets; MSE and nMSE = MSE / variance of the train targets
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqtrain import heads
from seqtrain.data import DataSpec
from seqtrain.errors import ConfigError, DataError, require
from seqtrain.model import ModelConfig, RecurrentModel, TokenEmbedding
from seqtrain.registry import Registry, is_import_path
from seqtrain.tokenizers import TOKENIZERS, Tokenizer, rebuild


@dataclass
class TaskConfig:
    name: str = "lm"  # lm | regression | module:Name (a class like those below)

    def check(self) -> None:
        require(
            self.name in TASKS,
            "task.name",
            self.name,
            f"choose from {', '.join(TASKS)}, or name your own as module:Name",
        )


class Task:
    """The protocol every task follows (subclass it, or write the same methods and attributes;
    `check_model` and `output_layer` have defaults here that most tasks keep).

    Built from the run's DataSpec, which the checkpoint keeps, so the same task (and its figures)
    is rebuilt from the file alone.
    """

    kind: ClassVar[str]  # the data it reads: "tokens" or "series" (DataSpec.kind)
    monitor: ClassVar[str]  # the metric (lower is better) that picks best.ckpt and sweeps on
    generates_text: ClassVar[bool] = False  # whether `generate` (and text samples) work

    def __init__(self, spec: DataSpec) -> None:
        self.spec = spec

    def input_layer(self, cfg: ModelConfig) -> nn.Module:
        """(B, T) or (B, T, F) inputs -> (B, T, cfg.embedding_size), fed to the recurrent stack."""
        raise NotImplementedError

    def head(self, features: int) -> nn.Module:
        """(B, T, features) recurrent outputs -> (B, T, ...) outputs `loss` compares to targets."""
        raise NotImplementedError

    def check_model(self, cfg: ModelConfig) -> None:
        """Refuse model options this task cannot take, in one line; the data is known here
        (train.prepare calls it before anything is written). The head options (model.head,
        model.tie_weights) are a task over a vocabulary's: lm takes them."""
        name = type(self).__name__
        if cfg.tie_weights:
            raise ConfigError(
                f"model.tie_weights=true: {name} has no token embedding for its head to share "
                "(task=lm has); set model.tie_weights=false"
            )
        if cfg.head != "linear" or cfg.cutoffs:
            raise ConfigError(
                f"model.head={cfg.head}: {name} builds its own head (model.head and "
                "model.cutoffs choose task=lm's); leave model.head=linear, model.cutoffs=[]"
            )

    def output_layer(self, cfg: ModelConfig, embedding: nn.Module) -> nn.Module:
        """The head the model is built with: by default `head` at the stack's output size."""
        return self.head(cfg.output_size)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Summed over the target elements; the engine divides by their number (targets.numel())."""
        raise NotImplementedError

    def metrics(self, loss: float) -> dict[str, float]:
        """Figures from a mean loss, by name without prefix (train/, val/): {"bpc": ...}."""
        raise NotImplementedError

    def figures(self, loss: float, split: str) -> dict[str, float]:
        """The figures of one split (train, val, test) from its mean loss: `metrics`, unless a
        figure depends on the split (the LM's bits per byte: on the split's bytes per token)."""
        return self.metrics(loss)

    def random_batch(self, batch: int, window: int, generator: torch.Generator) -> tuple:
        """(inputs, targets) of one window's shape and dtype, for the memory probe."""
        raise NotImplementedError

    def generate(self, model: nn.Module, prompt: bytes, length: int, **options: object) -> str:
        """Tasks with generates_text: `length` tokens sampled after `prompt` (text, encoded with
        the run's tokenizer), decoded with it."""
        raise NotImplementedError


TASKS: Registry[type[Task]] = Registry("task.name")
MAX_LOG = 700.0  # e^700 is near the largest float: a perplexity past it is reported as inf
# Sampling's default, for the text logged at validation and for python -m seqtrain.sample: below
# 1 sharpens the distribution, so an early model's samples show its words rather than noise.
SAMPLE_TEMPERATURE = 0.8


KINDS = ("tokens", "series")  # DataSpec.kind: what a task may read
# A task's own members: Task's defaults of these raise NotImplementedError (its head may come
# from `head` or from an `output_layer` of its own).
PROTOCOL = ("input_layer", "loss", "metrics", "random_batch")


def missing_members(task_type: type) -> list[str]:
    """The members of the protocol a task class does not implement itself."""

    def own(member: str) -> bool:
        impl = getattr(task_type, member, None)
        return callable(impl) and impl is not getattr(Task, member)

    missing = [member for member in PROTOCOL if not own(member)]
    if not (own("head") or own("output_layer")):
        missing.insert(1, "head")
    return missing


def build_task(cfg: TaskConfig, spec: DataSpec) -> Task:
    """The task of `cfg` on data described by `spec`, checked against the protocol (a kind, a
    monitor among the figures it logs); a task that cannot read the data is one line."""
    task_type = TASKS.get(cfg.name)
    key = f"task.name={cfg.name}"
    if not isinstance(task_type, type):
        raise ConfigError(f"{key}: is a {type(task_type).__name__}, not a class like Task")
    name = task_type.__qualname__
    missing = missing_members(task_type)
    if missing:
        raise ConfigError(
            f"{key}: {name} lacks {', '.join(missing)} of the task protocol "
            "(seqtrain.tasks.Task; docs/tasks.md)"
        )
    if getattr(task_type, "kind", None) not in KINDS:
        raise ConfigError(
            f"{key}: {name}.kind={getattr(task_type, 'kind', None)!r}; it must say the data it "
            f"reads: {' or '.join(map(repr, KINDS))}"
        )
    if task_type.kind != spec.kind:
        readers = [n for n in TASKS if TASKS.get(n).kind == spec.kind]
        raise DataError(
            f"task.name={cfg.name} trains on {task_type.kind} data but this corpus is "
            f"{spec.kind}; use task={' or task='.join(readers)}, or another data.source"
        )
    task = task_type(spec)
    if not is_import_path(cfg.name):  # a built-in's figures are its tests' to check
        return task
    figures = task.figures(1.0, "val")
    if getattr(task, "monitor", None) not in figures:
        raise ConfigError(
            f"{key}: {name}.monitor={getattr(task, 'monitor', None)!r} is not among the figures "
            f"its metrics give ({', '.join(figures)}); best.ckpt and sweeps go by it"
        )
    return task


def build_model(cfg: ModelConfig, task: Task) -> RecurrentModel:
    task.check_model(cfg)
    model = RecurrentModel(cfg, task.input_layer, task.output_layer)
    check_loss(task, model)
    return model


@torch.no_grad()
def check_loss(task: Task, model: RecurrentModel) -> None:
    """The task's loss of a (2, 3) probe through the model's head is a scalar, as the engine
    needs (it divides the sum by the target elements and backpropagates it): a per-element loss
    would fail at the first update, after the run had started. In eval mode, so that the probe
    draws no dropout mask from the run's random stream; on the meta device, shapes alone."""
    B, T = 2, 3
    _, targets = task.random_batch(B, T, torch.Generator())  # (B, T) ids or (B, T, K) values
    p = next(model.head.parameters(), None) if isinstance(model.head, nn.Module) else None
    device = p.device if p is not None else targets.device
    training = model.training
    model.eval()
    try:
        h = torch.zeros(B, T, model.cfg.output_size, device=device)  # (B, T, H)
        loss = task.loss(model.predict(h), targets.to(device))
    finally:
        model.train(training)
    if not (isinstance(loss, Tensor) and loss.ndim == 0):
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ConfigError(
            f"{task_key(task)}: {type(task).__qualname__}.loss gives {shape} for a {(B, T)} "
            "probe; it must be a scalar tensor (the sum over the target elements)"
        )


def task_key(task: Task) -> str:
    """task.name=NAME of a task: its registered name, or its import path."""
    cls = type(task)
    name = next((n for n in TASKS if TASKS.get(n) is cls), f"{cls.__module__}:{cls.__qualname__}")
    return f"task.name={name}"


@TASKS.register("lm")
class LanguageModelling(Task):
    """Next-token prediction: embedding -> stack -> a head over the vocabulary (model.head).

    best.ckpt is picked by val/bpc with the byte tokenizer and by val/bits_per_byte with any
    other: on one split the two rank checkpoints alike, and bits per byte compares across
    tokenizers (a sweep over data.tokenizer minimises one scale).
    """

    kind = "tokens"
    monitor = "bpc"
    generates_text = True

    def __init__(self, spec: DataSpec) -> None:
        super().__init__(spec)
        self.bytes_tokens = TOKENIZERS.get(spec.tokenizer).passthrough  # bpc is bits per byte
        if not self.bytes_tokens:
            self.monitor = "bits_per_byte"

    @cached_property
    def tokenizer(self) -> Tokenizer:
        """The run's tokenizer, rebuilt from the spec (the checkpoint's) when text is made."""
        return rebuild(self.spec.tokenizer, self.spec.tokenizer_state)

    def input_layer(self, cfg: ModelConfig) -> nn.Module:
        return TokenEmbedding(self.spec.input_size, cfg.embedding_size, cfg.embedding_dropout)

    def check_model(self, cfg: ModelConfig) -> None:
        """The cutoffs against the vocabulary, known only now (the rest: ModelConfig.check)."""
        try:
            heads.HEADS.get(cfg.head).check(cfg.cutoffs, cfg.output_size, self.spec.target_size)
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def output_layer(self, cfg: ModelConfig, embedding: nn.Module) -> nn.Module:
        """model.head's head over the vocabulary, sharing the embedding's matrix if tied."""
        head = heads.HEADS.get(cfg.head)(cfg.output_size, self.spec.target_size, cfg.cutoffs)
        if cfg.tie_weights:
            head.tie(embedding.weight)
        return head  # (B, T, H) -> (B, T, V) logits, or a head's outputs (heads.py)

    def loss(self, outputs: Tensor | heads.AdaptiveOutputs, targets: Tensor) -> Tensor:
        return heads.nll(outputs, targets)

    def metrics(self, loss: float) -> dict[str, float]:
        # bits per token from nats per token; with bytes it is bits per byte, as for enwik8
        figures = {"bpc": loss / math.log(2)}
        if not self.bytes_tokens:  # perplexity per word (awd-lstm-lm's figure) or BPE token
            figures["ppl"] = math.exp(loss) if loss < MAX_LOG else math.inf
        return figures

    def figures(self, loss: float, split: str) -> dict[str, float]:
        # Bits over the split's tokens / the UTF-8 bytes they cover, (N bpc) / (N bytes per
        # token): the scale on which every tokenizer compares. Bytes: bytes per token is 1.0.
        figures = self.metrics(loss)
        ratio = (self.spec.bytes_per_token or {}).get(split)
        if ratio is not None:
            figures["bits_per_byte"] = figures["bpc"] / ratio
        return figures

    def random_batch(self, batch: int, window: int, generator: torch.Generator) -> tuple:
        V, device = self.spec.input_size, generator.device
        x = torch.randint(0, V, (batch, window), device=device, generator=generator)  # (B, T)
        y = torch.randint(0, V, (batch, window), device=device, generator=generator)  # (B, T)
        return x, y

    @torch.no_grad()
    def generate(
        self,
        model: nn.Module,
        prompt: bytes,
        length: int,
        temperature: float = SAMPLE_TEMPERATURE,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> str:
        device = next(model.parameters()).device
        # ids of a token array (.bin, .npy); the size also catches one in an earlier checkpoint
        if not self.spec.text or self.spec.input_size > self.tokenizer.vocab_size:
            raise DataError(
                f"the model reads {self.spec.input_size:,} token ids that no tokenizer of the run "
                f"turns into text (data.tokenizer={self.spec.tokenizer}); it cannot write samples"
            )
        start = self.tokenizer.encode(prompt).tolist()
        if not start:
            raise DataError(
                f"prompt={prompt.decode('utf-8', errors='replace')!r} is no tokens for the "
                f"{self.spec.tokenizer} tokenizer; give it some text"
            )
        x = torch.tensor(start, dtype=torch.long, device=device)  # (T0,)
        outputs, state = model(x.view(1, -1))  # (1, T0, V) logits, or a head's outputs
        out = []
        for _ in range(length):
            step = heads.scores(outputs)[0, -1].float() / max(temperature, 1e-6)  # (V,)
            if top_k is not None:
                kth = torch.topk(step, top_k).values[-1]
                step = step.masked_fill(step < kth, float("-inf"))
            token = torch.multinomial(F.softmax(step, -1), 1, generator=generator)  # (1,)
            out.append(int(token))
            outputs, state = model(token.view(1, 1), state)
        return self.tokenizer.decode(start + out)


@TASKS.register("regression")
class Regression(Task):
    """Per-step continuous targets: input projection -> stack -> linear head, MSE loss."""

    kind = "series"
    monitor = "nmse"

    def input_layer(self, cfg: ModelConfig) -> nn.Module:
        if cfg.embedding_dropout > 0:
            raise ConfigError(
                f"model.embedding_dropout={cfg.embedding_dropout}: drops token embeddings; "
                "task=regression has an input projection instead, set it to 0"
            )
        return nn.Linear(self.spec.input_size, cfg.embedding_size)  # (B, T, F) -> (B, T, E)

    def head(self, features: int) -> nn.Module:
        return nn.Linear(features, self.spec.target_size)  # (B, T, H) -> (B, T, K)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return (outputs.float() - targets).square().sum()  # float32 even under bf16 autocast

    def metrics(self, loss: float) -> dict[str, float]:
        # nMSE 1 = no better than predicting each column's training mean
        return {"mse": loss, "nmse": loss / self.spec.target_variance}

    def random_batch(self, batch: int, window: int, generator: torch.Generator) -> tuple:
        F_, K, device = self.spec.input_size, self.spec.target_size, generator.device
        x = torch.randn(batch, window, F_, device=device, generator=generator)  # (B, T, F)
        y = torch.randn(batch, window, K, device=device, generator=generator)  # (B, T, K)
        return x, y
