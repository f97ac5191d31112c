"""``CausalLM``: a ``zoo.model.GPT`` trained as a causal language model with COSMOS.

The LightningModule that ``lit-cosmos fit`` (``zoo/cli.py``) trains. The optimizer comes from
:class:`lit_cosmos.CosmosMixin`: the parameters are routed once (matrices to COSMOS, embeddings,
head, norms and biases to AdamW) and handed to the injected ``optimizer`` callable, under a
per-step warmup-cosine schedule unless an ``lr_scheduler`` is injected. Any optimizer that accepts
the routed param groups can be swapped in from a config: ``lit_cosmos.COSMOS`` (default),
``lit_cosmos.MuonAdamW``, ``torch.optim.AdamW``.

The network is built in ``configure_model``, not in ``__init__``: under FSDP2
(``ModelParallelStrategy``) it is sharded block by block with ``fully_shard``, and on GPUs it is
created on the meta device and only initialised after sharding, so no rank ever holds the whole
model (on CPU meshes it is initialised whole and then sharded, because DTensor cannot draw
sharded random numbers there). Every other strategy gets an ordinary module.

Example::

    import lightning as L
    from zoo.data import TextDataModule
    from zoo.lit_model import CausalLM

    model = CausalLM("debug")
    L.Trainer(max_steps=20).fit(model, TextDataModule(block_size=64, batch_size=8))

and from a config (``model.init_args.optimizer`` swaps the optimizer)::

    model:
      class_path: zoo.lit_model.CausalLM
      init_args:
        model: llama-60m
        optimizer: {class_path: lit_cosmos.COSMOS, init_args: {lr: 0.002, rank: 64}}
"""

from __future__ import annotations

import pickle
from typing import Any, ClassVar, Optional

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch.optim import Optimizer
from torchmetrics import MeanMetric

from lit_cosmos import COSMOS
from lit_cosmos.lightning.mixin import FSDP1_ERROR, CosmosConfig, CosmosMixin, check_strategy
from zoo.config import Config
from zoo.model import GPT

try:  # public since torch 2.6
    from torch.distributed.fsdp import fully_shard
except ImportError:  # pragma: no cover - older torch
    from torch.distributed._composable.fsdp import fully_shard

__all__ = ["CausalLM", "cosmos_optimizer", "FSDP1_ERROR"]

def cosmos_optimizer(params: Any) -> Optimizer:
    """The default optimizer of :class:`CausalLM`: :class:`lit_cosmos.COSMOS` with its defaults
    (lr 2e-3, lr_ratio 0.2, rank 64, betas (0.95, 0.95), weight decay 0.1).

    A module-level function on purpose: as a default of an ``OptimizerCallable`` argument it
    shows up in configs by name, whereas a lambda would become a ``class_path`` whose
    ``init_args`` leak into whatever optimizer a config substitutes.
    """
    return COSMOS(params)


class CausalLM(CosmosMixin, L.LightningModule):
    """Next-token prediction with a ``zoo`` transformer, optimized by COSMOS (or an injected optimizer).

    A batch is a LongTensor ``(B, T + 1)`` (``zoo.data.TextDataModule``): inputs ``batch[:, :-1]``,
    targets ``batch[:, 1:]``. The loss is the mean token cross entropy, computed from float32
    logits also under ``bf16-mixed``.

    Logs: ``train/loss`` (every step, progress bar), ``train/tokens`` (tokens trained on so far,
    summed over processes and kept across resumes), ``val/loss`` and ``val/ppl`` (token-weighted
    mean over the whole validation set, ``exp`` of it; synced across processes by torchmetrics).

    Args:
        model: a ``zoo.config.Config`` registry name (``Config.available()``), e.g. ``llama-60m``.
        model_overrides: ``Config`` fields replacing the registry entry's, e.g.
            ``{"n_layer": 4, "dropout": 0.1}``.
        vocab_size: vocabulary size; wins over the registry and ``model_overrides``. The CLI links
            it to ``data.vocab_size``, so the embedding always matches the tokenizer.
        activation_checkpointing: recompute each block in the backward pass (saves activation memory).
        compile: ``torch.compile`` each transformer block (in place: parameter names are unchanged).
        optimizer: ``params -> Optimizer``, called with the routed param groups in
            ``configure_optimizers``. Default :func:`cosmos_optimizer`.
        lr_scheduler: ``optimizer -> LR scheduler`` (stepped every optimizer step). ``None``: linear
            warmup then cosine decay to ``min_lr_ratio`` of the peak at the last step.
        warmup_steps: warmup length of the default schedule; wins over ``warmup_fraction``. A warmup
            not shorter than the run (a smoke run with ``--trainer.max_steps 5``) is shrunk to half of
            it, with a warning.
        warmup_fraction: warmup as a fraction of the run's optimizer steps (default schedule).
        min_lr_ratio: the default schedule's final rate as a fraction of the peak.

    Raises:
        ValueError: an unknown model name or ``Config`` field, an invalid ``Config`` value or
            schedule setting (at construction); training sequences longer than the model's
            ``block_size`` (in ``setup``).
        RuntimeError: under FSDP1 (``FSDPStrategy``); see :data:`FSDP1_ERROR`.
    """

    #: Where this module's arguments live in a ``lit-cosmos`` (LightningCLI) config: error messages
    #: and warnings name ``model.init_args.warmup_steps``, not the internal ``CosmosConfig`` field.
    config_key: ClassVar[str] = "model.init_args"

    def __init__(
        self,
        model: str = "llama-tiny",
        model_overrides: Optional[dict[str, Any]] = None,
        vocab_size: Optional[int] = None,
        activation_checkpointing: bool = False,
        compile: bool = False,
        optimizer: OptimizerCallable = cosmos_optimizer,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        warmup_steps: Optional[int] = None,
        warmup_fraction: float = 0.01,
        min_lr_ratio: float = 0.1,
    ) -> None:
        super().__init__()
        overrides = dict(model_overrides or {})
        if vocab_size is not None:
            overrides["vocab_size"] = vocab_size
        # Built (and so validated) now, so that a bad name or field fails at parse time, not after data prep.
        try:
            self.config = Config.from_name(model, **overrides)
        except ValueError as err:
            if model not in Config.available():
                raise ValueError(f"{self.config_key}.model={model!r}: {err}") from None
            key = "vocab_size" if vocab_size is not None and "vocab_size" in str(err) else "model_overrides"
            value = vocab_size if key == "vocab_size" else model_overrides
            raise ValueError(f"{self.config_key}.{key}={value!r}: {err}") from None
        self.activation_checkpointing = activation_checkpointing
        self.compile_blocks = compile
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        # An instance attribute shadowing CosmosMixin's class-level default: the schedule is per run.
        self.cosmos_config = CosmosConfig(
            warmup_steps=warmup_steps, warmup_fraction=warmup_fraction, min_lr_ratio=min_lr_ratio,
            names={
                **{name: f"{self.config_key}.{name}" for name in ("warmup_steps", "warmup_fraction", "min_lr_ratio")},
                "total_steps": "trainer.max_steps",
            },
        )
        # Under LightningCLI the parsed config (plain data) is saved instead of the arguments. Outside
        # it, an optimizer or scheduler callable that does not pickle (a lambda) would break every
        # checkpoint, so such callables are left out of the hyperparameters.
        callables = {"optimizer": optimizer, "lr_scheduler": lr_scheduler}
        self.save_hyperparameters(ignore=[name for name, value in callables.items() if not _picklable(value)])
        self.model: Optional[GPT] = None
        self.val_loss = MeanMetric()
        self.tokens_seen = 0  # global count, saved in checkpoints
        self._checkpoint_step: int | None = None  # optimizer steps of the loaded checkpoint

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        """Build the network once; under FSDP2 shard every block, then the root."""
        if self.model is not None:
            return
        mesh = self.device_mesh
        if mesh is None:
            self.model = self._build()
            return
        dp_mesh = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
        if dp_mesh.device_type == "cpu":
            # DTensor's sharded random init is not fully supported on CPU meshes (torch warns so).
            # Initialise the whole model and keep each rank's rows: with the same seed on every rank
            # (LightningCLI's seed_everything) this equals the single-process model exactly.
            model = self._build()
        else:
            # Accelerators: allocate nothing until sharded, then initialise only the local rows with
            # GPT's own init (Lightning's fallback would call each layer's reset_parameters instead).
            with torch.device("meta"):
                model = self._build()
        for block in model.blocks:
            fully_shard(block, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)
        if any(p.is_meta for p in model.parameters()):
            model.to_empty(device=self._materialize_device(dp_mesh))
            with torch.no_grad():
                model.init_weights()
        self.model = model

    def _build(self) -> GPT:
        model = GPT(self.config, activation_checkpointing=self.activation_checkpointing)
        if self.compile_blocks:
            for block in model.blocks:
                block.compile()
        return model

    def _materialize_device(self, mesh: Any) -> torch.device:
        trainer = self._trainer
        if trainer is not None:
            return trainer.strategy.root_device
        if mesh.device_type == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device(mesh.device_type)

    def setup(self, stage: str) -> None:
        check_strategy(self.trainer.strategy)  # before any data is touched
        self.check_datamodule(self.trainer.datamodule)

    def check_datamodule(self, datamodule: Any) -> None:
        """Raise a ``ValueError`` when the data's sequences are longer than the model's context.

        Called in ``setup`` and, by ``lit-cosmos``, before any data is prepared.
        """
        block_size = getattr(datamodule, "block_size", None)
        if isinstance(block_size, int) and block_size > self.config.block_size:
            raise ValueError(
                f"data.init_args.block_size={block_size} is longer than the model's block_size="
                f"{self.config.block_size} ({self.config.name}); lower data.init_args.block_size or set "
                f"{self.config_key}.model_overrides: {{block_size: {block_size}}}"
            )

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if self.model is None:
            raise RuntimeError("the network is built in configure_model(): call it first (a Trainer does)")
        return self.model(idx)

    # ------------------------------------------------------------------ steps
    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        logits = self(batch[:, :-1])
        # float32 logits for the softmax: bf16's 8-bit mantissa makes log-sum-exp over a large vocabulary lossy.
        return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        # Every process trains on a batch of the same shape, so the global count is local x world size.
        self.tokens_seen += batch[:, 1:].numel() * self.trainer.world_size
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/tokens", float(self.tokens_seen))
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        loss = self._loss(batch)
        self.val_loss.update(loss, weight=batch[:, 1:].numel())

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()  # synced across processes
        self.val_loss.reset()
        # Already equal on every rank; sync_dist only tells Lightning so (and costs one scalar all-reduce).
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log("val/ppl", loss.exp(), sync_dist=True)

    def _place_on_checkpoint_step(self) -> None:
        # `lit-cosmos validate/test --ckpt_path` logs into the run's folder: put its points where the
        # fit's own validation of that step is (Lightning's axis, step - 1), not at 0. Outside of fit,
        # Lightning's logging step is this counter of the (unused) fit loop.
        loop = self.trainer.fit_loop.epoch_loop
        if self.trainer.state.fn != "fit" and self._checkpoint_step and hasattr(loop, "_batches_that_stepped"):
            loop._batches_that_stepped = self._checkpoint_step - 1

    def on_validation_start(self) -> None:
        self._place_on_checkpoint_step()

    def on_test_start(self) -> None:
        self._place_on_checkpoint_step()

    def test_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("test/loss", loss, sync_dist=True)
        self.log("test/ppl", loss.exp(), sync_dist=True)

    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        """Greedy next-token ids ``(B, T)`` for each position of ``batch`` (``(B, T)`` token ids;
        a data-module batch of ``block_size + 1`` tokens is cut to the model's context)."""
        return self(batch[:, : self.config.block_size]).argmax(dim=-1)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tokens_seen"] = self.tokens_seen

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.tokens_seen = int(checkpoint.get("tokens_seen", 0))
        self._checkpoint_step = checkpoint.get("global_step")

    def num_parameters(self) -> int:
        """Parameters of the network (tied weights once), from the config: valid before configure_model."""
        return self.config.num_parameters()


def _picklable(value: Any) -> bool:
    if value is None:
        return True
    try:
        pickle.dumps(value)
    except Exception:
        return False
    return True

