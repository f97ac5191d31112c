"""``FSDP2Strategy``: Lightning's ``ModelParallelStrategy`` for data-parallel FSDP2, sized by the world.

Lightning's ``ModelParallelStrategy(data_parallel_size="auto", tensor_parallel_size="auto")``
means "data parallel across nodes, tensor parallel within a node": on one machine the default is
pure tensor parallelism, which a module that only calls ``fully_shard`` (FSDP2) does not do, so
every FSDP2 config had to name ``data_parallel_size`` and change it with the device count.
Here the data-parallel size defaults to the world size (``devices x num_nodes``) divided by the
tensor-parallel size, which defaults to 1: ``--trainer.devices 4`` (and ``--trainer.num_nodes 2``)
alone is enough. A size that does not fit the world is refused when the Trainer is built, in the
launching process, with the numbers and the keys to change.

Any LightningModule that shards itself in ``configure_model`` with the mesh's
``"data_parallel"`` dimension can use it (``zoo.lit_model.CausalLM`` does)::

    import lightning as L
    from lit_cosmos.lightning import FSDP2Strategy

    L.Trainer(devices=4, strategy=FSDP2Strategy())           # or strategy="fsdp2"

Importing this module registers it in Lightning's strategy registry as ``"fsdp2"``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal

from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry

__all__ = ["FSDP2Strategy"]


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` whose data-parallel size is the world size unless given.

    Args:
        data_parallel_size: processes per data-parallel group; ``"auto"`` (default): the world
            size divided by ``tensor_parallel_size``.
        tensor_parallel_size: processes per tensor-parallel group; default 1 (pure FSDP2).
            ``"auto"`` keeps Lightning's meaning (the devices of one node).
        save_distributed_checkpoint, process_group_backend, timeout: as ``ModelParallelStrategy``.

    Raises:
        ValueError: when the Trainer is built, if ``data_parallel_size x tensor_parallel_size``
            is not the world size, or the world size is not a multiple of ``tensor_parallel_size``.
    """

    def __init__(
        self,
        data_parallel_size: Literal["auto"] | int = "auto",
        tensor_parallel_size: Literal["auto"] | int = 1,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        for name, value in (("data_parallel_size", data_parallel_size), ("tensor_parallel_size", tensor_parallel_size)):
            if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} must be 'auto' or an int >= 1")
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=tensor_parallel_size,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self._requested = (data_parallel_size, tensor_parallel_size)

    def _resolve_sizes(self) -> tuple[int, int]:
        """(data_parallel_size, tensor_parallel_size) for this world; raises if they do not fit it."""
        nodes, per_node = self.num_nodes, self.num_processes
        world = nodes * per_node
        dp, tp = self._requested
        if tp == "auto":
            tp = per_node
        world_txt = f"{world} (trainer.devices={per_node} x trainer.num_nodes={nodes})"
        if dp == "auto":
            if world % tp:
                raise ValueError(
                    f"FSDP2Strategy: tensor_parallel_size={tp} does not divide the world size {world_txt}; change "
                    "trainer.strategy.init_args.tensor_parallel_size or the device count"
                )
            dp = world // tp
        if dp * tp != world:
            raise ValueError(
                f"FSDP2Strategy: data_parallel_size={dp} x tensor_parallel_size={tp} must equal the world size, but "
                f"the world size is {world_txt}; leave trainer.strategy.init_args.data_parallel_size at 'auto' to "
                "follow the devices"
            )
        return dp, tp

    def _configure_launcher(self) -> None:
        # Called when the Trainer is built, before any process is launched: the sizes are checked once,
        # in the launching process, instead of in every rank after the launch.
        if self.parallel_devices is not None:
            self._resolve_sizes()
        super()._configure_launcher()

    def setup_environment(self) -> None:
        self._data_parallel_size, self._tensor_parallel_size = self._resolve_sizes()
        super().setup_environment()

    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            "fsdp2", cls, description="FSDP2 (fully_shard in configure_model), data parallel over every process"
        )


if "fsdp2" not in StrategyRegistry:
    FSDP2Strategy.register_strategies(StrategyRegistry)
