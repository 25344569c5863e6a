"""LightningModule: manual optimisation around the TBPTT engine.

Lightning 2.x has no truncated BPTT and forbids Trainer-level gradient clipping under manual
optimisation, so one `training_step` here is one engine update: forward + backward over the
window, clip, optimizer step, LR schedule step.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from torch import Tensor

from seqtrain.config import Config, OptimConfig, from_dict, to_dict
from seqtrain.data import Window
from seqtrain.memory import plan_chunk
from seqtrain.model import RecurrentLM
from seqtrain.tbptt import Engine, bits


def lr_factor(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Linear warmup to 1, then cosine decay to min_lr_ratio at max_steps."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    progress = min(1.0, (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps))
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * cosine


class LanguageModelModule(L.LightningModule):
    def __init__(self, config: dict, vocab_size: int) -> None:
        super().__init__()
        # The whole config and the vocabulary go into every checkpoint: sampling and evaluation
        # rebuild the model from the file alone. Logged to TensorBoard once, at the end.
        self.save_hyperparameters(logger=False)
        self.cfg: Config = from_dict(config)
        self.model = RecurrentLM(self.cfg.model, vocab_size)
        t = self.cfg.tbptt
        chunk = plan_chunk(self.cfg.memory, t.window)
        self.engine = Engine(self.model, t.window, t.stride, t.carry, chunk)
        self.automatic_optimization = False
        self.tokens_seen = 0
        self.val_sums = (0.0, 0)  # (summed nats, tokens) over the running validation pass
        self.last_val_step = -1
        self.last_val: dict[str, float] = {}

    @classmethod
    def from_config(cls, cfg: Config, vocab_size: int) -> LanguageModelModule:
        return cls(to_dict(cfg), vocab_size)

    def configure_optimizers(self):
        o = self.cfg.optim
        decay = [
            p for n, p in self.model.named_parameters() if p.ndim >= 2 and "embedding" not in n
        ]
        rest = [
            p
            for n, p in self.model.named_parameters()
            if not (p.ndim >= 2 and "embedding" not in n)
        ]
        groups = [
            {"params": decay, "weight_decay": o.weight_decay},
            {"params": rest, "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas))
        max_steps = self.cfg.trainer.max_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, o, max_steps)
        )
        return [optimizer], [schedule]

    def training_step(self, batch: Window, batch_idx: int) -> dict:
        optimizer, schedule = self.optimizers(), self.lr_schedulers()
        result = self.engine.train_update(batch, self.manual_backward)
        clip = self.cfg.optim.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), clip if clip is not None else math.inf
        )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        self.tokens_seen += result.tokens
        self.log("train/loss", result.loss, prog_bar=True)
        self.log("train/bpc", bits(result.loss))
        self.log("optim/lr", schedule.get_last_lr()[0])
        self.log("optim/grad_norm", grad_norm)
        return {"tokens": result.tokens}

    def on_validation_epoch_start(self) -> None:
        self.val_sums = (0.0, 0)

    def validation_step(self, batch: Window, batch_idx: int) -> None:
        nats, tokens = self.engine.eval_window(batch)
        self.val_sums = (self.val_sums[0] + nats, self.val_sums[1] + tokens)

    def on_validation_epoch_end(self) -> None:
        nats, tokens = self.val_sums
        if tokens == 0:
            return
        loss = nats / tokens
        self.last_val = {"val/loss": loss, "val/bpc": bits(loss)}
        self.last_val_step = self.global_step
        self.log_dict(self.last_val, prog_bar=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["seqtrain"] = {"engine": self.engine.state_dict(), "tokens": self.tokens_seen}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        loop = checkpoint.get("seqtrain")
        if loop is not None:
            self.engine.load_state_dict(loop["engine"])
            self.tokens_seen = loop["tokens"]

    def sample(self, prompt: bytes, length: int, seed: int = 0) -> str:
        """Text generated from the current weights; train mode is restored afterwards."""
        was_training = self.model.training
        self.model.eval()
        generator = torch.Generator(device=self.device).manual_seed(seed)
        x = torch.tensor(list(prompt), dtype=torch.long, device=self.device)
        out: Tensor = self.model.generate(x, length, temperature=0.8, generator=generator)
        self.model.train(was_training)
        return (prompt + bytes(out.tolist())).decode("utf-8", errors="replace")
