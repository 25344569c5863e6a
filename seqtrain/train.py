"""run(cfg): data -> model -> module -> Lightning trainer -> fit -> summary.json."""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from seqtrain import cells
from seqtrain.callbacks import TextSamples, Throughput
from seqtrain.config import Config, to_dict
from seqtrain.data import (
    VOCAB_SIZE,
    Corpus,
    Streams,
    load_corpus,
    require_tokens,
    split_corpus,
    window_loader,
)
from seqtrain.module import LanguageModelModule

log = logging.getLogger("seqtrain")


def quiet_lightning() -> None:
    """One log line per event: Hydra's handler prints, Lightning's own banner and tips do not."""
    logging.getLogger("lightning.pytorch").handlers.clear()
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


def flatten(d: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}, with non-scalars as strings (TensorBoard's hparams)."""
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def build_loaders(cfg: Config, splits: dict[str, Corpus]):
    window, stride = cfg.tbptt.window, cfg.tbptt.stride or cfg.tbptt.window
    require_tokens(splits, {"train": cfg.data.batch_size, "val": cfg.data.eval_batch_size}, window)
    train = Streams(splits["train"], cfg.data.batch_size, stride)
    val = Streams(splits["val"], cfg.data.eval_batch_size, cfg.tbptt.window)
    return window_loader(train), window_loader(val)


def run(cfg: Config, run_dir: Path) -> dict:
    """Train one model; return (and write) the run summary."""
    quiet_lightning()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    corpus = load_corpus(cfg.data)
    splits = split_corpus(corpus, cfg.data.split)
    train_loader, val_loader = build_loaders(cfg, splits)
    log.info(
        "corpus %s: %s bytes, %s documents; train/val/test %s",
        corpus.name,
        f"{len(corpus.tokens):,}",
        f"{len(corpus.doc_starts):,}",
        "/".join(f"{len(s.tokens):,}" for s in splits.values()),
    )

    module = LanguageModelModule.from_config(cfg, VOCAB_SIZE)
    params = sum(p.numel() for p in module.model.parameters())
    throughput = Throughput()
    checkpoints = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best",
        monitor="val/bpc",
        mode="min",
        save_last=True,
        auto_insert_metric_name=False,
    )
    logger = TensorBoardLogger(run_dir, name="tensorboard", version="", default_hp_metric=False)
    progress = cfg.trainer.progress_bar
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        precision=cfg.trainer.precision,
        max_steps=cfg.trainer.max_steps,
        val_check_interval=cfg.trainer.val_check_interval,
        check_val_every_n_epoch=None,  # count validation intervals in updates, across epochs
        num_sanity_val_steps=0,
        log_every_n_steps=cfg.trainer.log_every_n_steps,
        logger=logger,
        callbacks=[
            throughput,
            checkpoints,
            TextSamples(splits["val"].tokens[:48].tobytes(), cfg.trainer.sample_length),
        ],
        enable_progress_bar=sys.stderr.isatty() if progress is None else progress,
        enable_model_summary=False,
        default_root_dir=run_dir,
    )
    log.info(
        "model: %s %s, %d x %d, %s parameters; kernel: %s; device: %s",
        cfg.model.backend,
        cfg.model.cell,
        cfg.model.num_layers,
        cfg.model.hidden_size,
        f"{params:,}",
        cells.kernel_name(module.model.rnn, trainer.strategy.root_device),
        trainer.strategy.root_device,
    )
    start = time.perf_counter()
    trainer.fit(module, train_loader, val_loader)
    wall = time.perf_counter() - start
    if module.last_val_step != trainer.global_step:  # the last update was not validated yet
        trainer.validate(module, val_loader, verbose=False)

    summary = {
        "steps": trainer.global_step,
        "tokens": module.tokens_seen,
        "train_seconds": round(throughput.train_seconds, 3),
        "wall_seconds": round(wall, 3),
        "tokens_per_s": round(throughput.tokens_per_s, 1),
        "train_loss": float(trainer.callback_metrics["train/loss"]),
        "val_loss": module.last_val["val/loss"],
        "val_bpc": module.last_val["val/bpc"],
        "backend": cfg.model.backend,
        "cell": cfg.model.cell,
        "parameters": params,
        "device": str(trainer.strategy.root_device),
        "best_checkpoint": checkpoints.best_model_path,
    }
    if trainer.is_global_zero:
        metrics = {"hp/val_bpc": summary["val_bpc"], "hp/tokens_per_s": summary["tokens_per_s"]}
        logger.log_hyperparams(flatten(to_dict(cfg)), metrics)
        logger.finalize("success")
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
