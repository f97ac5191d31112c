r"""
Final Checkpoint
================

Ends every fit with its final state in the checkpoints, also when it is stopped with Ctrl-C.

"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

__all__ = ["FinalCheckpoint"]


class FinalCheckpoint(Callback):
    r"""Save the last step of a fit through the trainer's ``ModelCheckpoint`` callbacks.

    ``ModelCheckpoint`` saves on its own triggers only (every ``every_n_train_steps`` steps, at
    each validation or epoch end), so a run whose ``max_steps`` is not on a trigger ends with
    ``last.ckpt`` pointing at an earlier step, and a run stopped with Ctrl-C keeps whatever was
    saved last. This callback completes them:

    * **at the end of fit**, each ``ModelCheckpoint`` that has not saved the final step does so:
      an unmonitored one as on its own triggers (its top-k file, e.g. ``epoch=0-step=60.ckpt``,
      replaces the previous one with the default ``save_top_k=1``), and ``last.ckpt`` (with
      ``save_last``) is the final state. A monitored one (``monitor="val/loss"``) only writes
      ``last.ckpt``: the final step has no fresh value of the metric to rank it by.
    * **the first Ctrl-C** (SIGINT) stops training at the end of the optimizer step in progress,
      which then counts as the end of fit: the final state is saved as above and
      ``interrupted`` is set (``lit-cosmos`` exits with status 130). Under DDP/FSDP2 the ranks
      agree on the stop with one all-reduce per step. A second Ctrl-C stops at once.
    * **a KeyboardInterrupt** that reaches the trainer anyway (the second Ctrl-C, or one raised
      by code) saves ``last.ckpt`` too when it arrives between training batches (loading data,
      validating) in a single process; inside a batch (forward, backward, optimizer step), or
      when distributed, nothing is saved (the state may be half-updated, and the other processes
      may not take part in the save), and a warning says which step the checkpoints hold.

    Nothing is saved under ``fast_dev_run``, outside of ``fit``, or when the trainer has no
    ``ModelCheckpoint``. ``lit-cosmos`` adds this callback to every run.

    Args:
        handle_sigint: turn the first Ctrl-C into a graceful stop (only in the main thread).

    Example::

        from lightning.pytorch import Trainer
        from lightning.pytorch.callbacks import ModelCheckpoint
        from lit_cosmos.callbacks import FinalCheckpoint

        trainer = Trainer(max_steps=60, callbacks=[ModelCheckpoint(every_n_train_steps=50, save_last=True),
                                                   FinalCheckpoint()])
        # checkpoints/last.ckpt holds step 60
    """

    def __init__(self, handle_sigint: bool = True) -> None:
        self.handle_sigint = handle_sigint
        self.interrupted = False
        self._stop_requested = False
        self._previous_handler: Any = None
        self._in_step = False
        self._epoch: int | None = None  # the epoch of the last finished batch, for the file name

    # -- Ctrl-C
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.interrupted = False
        self._stop_requested = False
        if self.handle_sigint and threading.current_thread() is threading.main_thread():
            current = signal.getsignal(signal.SIGINT)
            if current is signal.default_int_handler:  # never replace a handler someone else installed
                self._previous_handler = current
                signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self._stop_requested = True
        self._restore_handler()  # the next Ctrl-C raises KeyboardInterrupt as usual
        rank_zero_info("\nCtrl-C: stopping after this optimizer step and saving the last checkpoint "
                       "(Ctrl-C again to stop at once)")

    def _restore_handler(self) -> None:
        if self._previous_handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_handler)
        self._previous_handler = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._in_step = True  # from here to the end of the batch the state may be half-updated

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._in_step = False
        self._epoch = trainer.current_epoch
        if not self.handle_sigint:
            return
        stop = self._stop_requested
        if trainer.world_size > 1:
            # Every rank must stop at the same step (the final save is collective under FSDP2).
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            self.interrupted = True
            trainer.should_stop = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_handler()
        self.save_final(trainer)
        if self.interrupted:
            rank_zero_info(f"Stopped by Ctrl-C after step {trainer.global_step}; the last checkpoint holds it")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handler()
        if not isinstance(exception, KeyboardInterrupt):
            return
        self.interrupted = True
        if self._in_step or trainer.world_size > 1:
            saved = max((cb._last_global_step_saved for cb in _checkpoint_callbacks(trainer)), default=0)
            rank_zero_warn(
                f"Interrupted during step {trainer.global_step + 1}: nothing saved, the checkpoints hold step {saved}"
                if self._in_step else
                f"Interrupted at once in a distributed run: nothing saved, the checkpoints hold step {saved}"
            )
            return
        self.save_final(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_handler()

    # -- saving
    def save_final(self, trainer: pl.Trainer) -> list[str]:
        """Save the current state through every ``ModelCheckpoint`` that has not saved it; returns the
        paths written (collective under DDP/FSDP2: call it on every rank)."""
        if trainer.fast_dev_run or trainer.sanity_checking or trainer.state.fn != "fit":
            return []
        written = []
        for cb in _checkpoint_callbacks(trainer):
            if cb._last_global_step_saved == trainer.global_step or cb.dirpath is None:
                continue
            candidates = cb._monitor_candidates(trainer)
            if self._epoch is not None and "epoch" not in trainer.callback_metrics:
                # At the end of fit the epoch counter has moved on; name the file as its own trigger would have.
                candidates["epoch"] = torch.tensor(self._epoch)
            if cb.monitor is None and cb.save_top_k != 0:
                cb._save_topk_checkpoint(trainer, candidates)
                written.append(cb.best_model_path)
            if cb.save_last:
                if cb.save_last == "link" and cb.monitor is None and cb.save_top_k != 0:
                    cb._save_last_checkpoint(trainer, candidates)  # a link to the file just written
                else:
                    # Saving a file through a link would overwrite the older checkpoint it points at.
                    last = cb.format_checkpoint_name(candidates, cb.CHECKPOINT_NAME_LAST)
                    _unlink(trainer, last)
                    if cb.save_last == "link":  # monitored: its link would point at the best, not the final state
                        cb.last_model_path = last
                        cb._save_checkpoint(trainer, last)
                    else:
                        cb._save_last_checkpoint(trainer, candidates)
                written.append(cb.last_model_path)
        return written


def _checkpoint_callbacks(trainer: pl.Trainer) -> list[ModelCheckpoint]:
    return [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]


def _unlink(trainer: pl.Trainer, path: str | None) -> None:
    if path and trainer.is_global_zero and os.path.islink(path):
        os.remove(path)
    trainer.strategy.barrier("FinalCheckpoint")
