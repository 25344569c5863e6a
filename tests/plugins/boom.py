"""A user's callback with a bug: a plain Python exception inside training, after `at_step`
updates (0: never), as a plug-in's own error would raise it."""

from __future__ import annotations

import lightning as L


class Boom(L.Callback):
    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if self.at_step and trainer.global_step >= self.at_step:
            raise ValueError(f"boom at step {trainer.global_step}")
