"""lit_cosmos.lightning.FSDP2Strategy: a ModelParallelStrategy whose data-parallel size is the world size.

Built in the launching process only (no process is started here); the 2-process runs through the
real CLI are in test_cli.py and test_distributed_lightning.py.
"""

import lightning as L
import pytest

from lit_cosmos.lightning import FSDP2Strategy


def _trainer(**kwargs):
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, **kwargs)


@pytest.mark.parametrize(
    "devices, num_nodes, strategy_kwargs, sizes",
    [
        (2, 1, {}, (2, 1)),
        (4, 1, {}, (4, 1)),
        (2, 2, {}, (4, 1)),  # every process of every node
        (4, 1, {"tensor_parallel_size": 2}, (2, 2)),
        (2, 1, {"data_parallel_size": 2}, (2, 1)),  # the explicit size that fits is kept
        (4, 2, {"tensor_parallel_size": "auto"}, (2, 4)),  # Lightning's meaning of "auto": a node's devices
    ],
)
def test_sizes_follow_the_devices(devices, num_nodes, strategy_kwargs, sizes):
    trainer = _trainer(devices=devices, num_nodes=num_nodes, strategy=FSDP2Strategy(**strategy_kwargs))
    assert trainer.strategy._resolve_sizes() == sizes


def test_registered_as_fsdp2():
    trainer = _trainer(devices=2, strategy="fsdp2")
    assert type(trainer.strategy) is FSDP2Strategy and trainer.strategy._resolve_sizes() == (2, 1)


@pytest.mark.parametrize(
    "devices, strategy_kwargs, message",
    [
        (2, {"data_parallel_size": 8},
         (r"data_parallel_size=8 x tensor_parallel_size=1 must equal the world size, but the world size is 2 "
          r"\(trainer.devices=2 x trainer.num_nodes=1\); leave trainer.strategy.init_args.data_parallel_size "
          r"at 'auto'")),
        (3, {"tensor_parallel_size": 2},
         r"tensor_parallel_size=2 does not divide the world size 3 \(trainer.devices=3 x trainer.num_nodes=1\)"),
    ],
)
def test_sizes_that_do_not_fit_are_refused_when_the_trainer_is_built(devices, strategy_kwargs, message):
    with pytest.raises(ValueError, match=message):
        _trainer(devices=devices, strategy=FSDP2Strategy(**strategy_kwargs))


@pytest.mark.parametrize("kwargs", [{"data_parallel_size": 0}, {"tensor_parallel_size": "two"},
                                    {"data_parallel_size": True}])
def test_bad_sizes_are_refused_at_construction(kwargs):
    name, value = next(iter(kwargs.items()))
    with pytest.raises(ValueError, match=rf"{name}={value!r} must be 'auto' or an int >= 1"):
        FSDP2Strategy(**kwargs)
