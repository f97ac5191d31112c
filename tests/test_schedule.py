"""RefreshSchedule in a plain PyTorch loop (no Lightning), CPU, tiny shapes."""

from __future__ import annotations

import copy
import io
import subprocess
import sys
from typing import Any, Optional

import pytest
import torch
from torch import nn

from lit_cosmos import COSMOS, RefreshSchedule, cosmos_param_groups

RANK = 4
LR = 1e-2


def make_model() -> nn.Module:
    torch.manual_seed(0)  # what L.seed_everything(0) does to torch
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))


def make_opt(model: nn.Module, **kw: Any) -> COSMOS:
    return COSMOS(cosmos_param_groups(model), rank=RANK, lr=LR, lr_ratio=0.2, weight_decay=0.0, **kw)


def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The data of the ``i``-th optimizer step call (0-based): a function of ``i`` only."""
    g = torch.Generator().manual_seed(1000 * i)
    return torch.randn(8, 8, generator=g), torch.randn(8, 4, generator=g)


class Run:
    """A model and its COSMOS, stepped one call at a time, recording what the optimizer really does:
    the calls that requested a refresh and the calls after which a basis ``U`` changed."""

    def __init__(self, model: Optional[nn.Module] = None, nan_at_call: Optional[int] = None, **opt_kw: Any) -> None:
        self.model = model or make_model()
        self.opt = make_opt(self.model, **opt_kw)
        self.nan_at_call = nan_at_call
        self.calls = 0
        self.requests: list[tuple[int, Optional[int]]] = []  # (step() call, power_iters)
        self.U_changed_at: list[int] = []
        self._wrap(self.opt)

    def _wrap(self, opt: COSMOS) -> None:
        original = opt.request_refresh

        def recording_request(power_iters: Optional[int] = None) -> None:
            self.requests.append((self.calls + 1, power_iters))
            original(power_iters)

        opt.request_refresh = recording_request

    def bases(self) -> list[torch.Tensor]:
        return [st["U"].clone() for _, _, st in self.opt.matrix_states()]

    def step(self, n: int = 1) -> "Run":
        for _ in range(n):
            before = self.bases()
            x, y = batch(self.calls)
            loss = nn.functional.mse_loss(self.model(x), y)
            if self.nan_at_call is not None and self.calls + 1 == self.nan_at_call:
                loss = loss * float("nan")
            loss.backward()
            self.opt.step()
            self.opt.zero_grad()
            self.calls += 1
            after = self.bases()
            if len(after) != len(before) or any(not torch.equal(a, b) for a, b in zip(before, after)):
                self.U_changed_at.append(self.calls)
        return self

    @property
    def request_steps(self) -> list[int]:
        return [t for t, _ in self.requests]

    def params(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.model.parameters()]


def assert_bitwise_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# ---------------------------------------------------------------------- (a) constant == update_interval
@pytest.mark.parametrize("k", [1, 3])
def test_constant_refreshes_where_update_interval_does_and_gives_the_same_parameters(k):
    steps = 10
    own = Run(update_interval=k).step(steps)
    sched = Run()
    rs = RefreshSchedule("constant", interval=k).attach(sched.opt)
    sched.step(steps)

    expected = [t for t in range(2, steps + 1) if t % k == 0]
    assert own.U_changed_at == [1] + expected  # COSMOS's own schedule
    assert sched.U_changed_at == own.U_changed_at
    assert sched.request_steps == expected and rs.refreshes == len(expected)
    assert all(g["update_interval"] == 0 for g in sched.opt.param_groups if g["algorithm"] == "cosmos")
    assert_bitwise_equal(sched.params(), own.params())


# ---------------------------------------------------------------------- (b) dense_then_sparse
def test_dense_then_sparse_refreshes_on_the_documented_steps():
    logged: list[tuple[int, dict[str, float]]] = []
    run = Run()
    rs = RefreshSchedule("dense_then_sparse", warmup=2, interval=1, growth=2.0, max_interval=8, power_iters=(3, 2, 1),
                         log_fn=lambda metrics, t: logged.append((t, metrics))).attach(run.opt)
    run.step(30)
    assert run.U_changed_at == [1, 2, 3, 5, 9, 17, 25]  # the optimizer's bases really moved there
    assert run.requests == [(2, 3), (3, 2), (5, 1), (9, 1), (17, 1), (25, 1)]
    assert rs.refreshes == 6 and rs.next_refresh == 33
    assert [t for t, _ in logged] == [1, 2, 3, 5, 9, 17, 25]
    assert logged[0][1] == {"refresh/count": 0.0, "refresh/interval": 1.0}
    t, last = logged[-1]
    assert t == 25 and last["refresh/count"] == 6.0 and last["refresh/interval"] == 8.0
    assert last["refresh/power_iters"] == 1.0 and 0.0 <= last["refresh/drift_mean"] <= last["refresh/drift_max"] <= 1.0
    assert rs.last_metrics == {}  # step 30 is not a point


def test_last_metrics_are_those_of_the_last_step():
    run = Run()
    rs = RefreshSchedule("constant", interval=2).attach(run.opt)
    run.step(1)
    assert rs.last_metrics == {"refresh/count": 0.0, "refresh/interval": 1.0}
    run.step(1)
    assert set(rs.last_metrics) == {"refresh/count", "refresh/interval", "refresh/drift_mean", "refresh/drift_max",
                                    "refresh/power_iters"}
    run.step(1)
    assert rs.last_metrics == {}


# ---------------------------------------------------------------------- (c) same decisions as the callback
def test_plain_schedule_matches_the_lightning_callback():
    L = pytest.importorskip("lightning")
    from lit_cosmos.callbacks import EigenbasisRefresh

    kwargs = dict(interval=2, min_interval=1, max_interval=6, drift_low=0.02, drift_high=0.08, power_iters=(2, 1))
    steps = 24

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model()
            self.requests: list[tuple[int, Optional[int]]] = []

        def training_step(self, batch_: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch(self.trainer.global_step)
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> COSMOS:
            opt = make_opt(self.net)
            original = opt.request_refresh

            def recording_request(power_iters: Optional[int] = None) -> None:
                self.requests.append((self.trainer.global_step + 1, power_iters))
                original(power_iters)

            opt.request_refresh = recording_request
            return opt

        def train_dataloader(self) -> torch.utils.data.DataLoader:
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(steps, 1)), batch_size=1)

    cb_logged: list[tuple[int, dict[str, float]]] = []
    cb = EigenbasisRefresh("adaptive", **kwargs)
    cb.log_fn = lambda metrics, t: cb_logged.append((t, metrics))
    model = Tiny()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, callbacks=[cb],
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(model)

    plain_logged: list[tuple[int, dict[str, float]]] = []
    run = Run()
    rs = RefreshSchedule("adaptive", log_fn=lambda metrics, t: plain_logged.append((t, metrics)), **kwargs)
    rs.attach(run.opt)
    run.step(steps)

    assert run.requests == model.requests and len(run.requests) > 3
    assert plain_logged == cb_logged  # same points, gaps and drifts
    assert len({m["refresh/interval"] for _, m in plain_logged[1:]}) > 1  # the gap did adapt
    assert rs.state_dict() == cb.state_dict()
    assert_bitwise_equal(run.params(), [p.detach() for p in model.net.parameters()])


# ---------------------------------------------------------------------- (d) resume
def _adaptive() -> RefreshSchedule:
    return RefreshSchedule("adaptive", interval=2, min_interval=1, max_interval=8, drift_low=0.02, drift_high=0.08)


def test_adaptive_state_dict_round_trip_mid_run_is_bitwise():
    total, cut = 24, 11
    full = Run()
    _adaptive().attach(full.opt)
    full.step(total)

    first = Run()
    rs = _adaptive().attach(first.opt)
    first.step(cut)
    assert rs.state_dict()["gap"] != 2  # the gap has moved from its start: a fresh schedule would differ
    buf = io.BytesIO()
    torch.save({"model": first.model.state_dict(), "opt": first.opt.state_dict(), "sched": rs.state_dict()}, buf)
    rs.detach()
    buf.seek(0)
    ckpt = torch.load(buf)

    def resumed(load_schedule: bool) -> Run:
        model = make_model()
        model.load_state_dict(ckpt["model"])
        run = Run(model)
        run.opt.load_state_dict(copy.deepcopy(ckpt["opt"]))
        run.calls = cut
        sched = _adaptive().attach(run.opt)
        if load_schedule:
            sched.load_state_dict(ckpt["sched"])
        else:
            sched.reset(cut)
        return run.step(total - cut)

    second = resumed(load_schedule=True)
    assert first.request_steps + second.request_steps == full.request_steps
    assert first.U_changed_at + second.U_changed_at == full.U_changed_at
    assert_bitwise_equal(second.params(), full.params())
    # Without the saved counters the schedule restarts its gap: other refresh steps.
    assert first.request_steps + resumed(load_schedule=False).request_steps != full.request_steps


def test_state_dict_keys_and_schedule_mismatch_warning():
    rs = RefreshSchedule("dense_then_sparse", warmup=4)
    state = {"schedule": "dense_then_sparse", "step": 7, "next_refresh": 9, "gap": 4, "refreshes": 5}
    rs.load_state_dict(state)
    assert rs.state_dict() == state and rs.next_refresh == 9 and rs.refreshes == 5
    with pytest.warns(UserWarning, match="schedule 'dense_then_sparse', this one uses 'constant'"):
        RefreshSchedule("constant").load_state_dict(state)
    constant = RefreshSchedule("constant", interval=3)
    constant.reset(5)
    assert constant.next_refresh == 6 and constant.state_dict()["step"] == 5
    rs.reset(6)
    assert rs.state_dict() == {"schedule": "dense_then_sparse", "step": 6, "next_refresh": 7, "gap": 2,
                               "refreshes": 0}


# ---------------------------------------------------------------------- (e) skipped steps
def test_skipped_nonfinite_steps_do_not_count():
    # Call 6 has a NaN gradient: COSMOS skips it (and keeps the request), so the refresh of
    # optimizer step 6 happens on call 7 and the one of step 9 on call 10.
    run = Run(nan_at_call=6, on_nonfinite="skip")
    rs = RefreshSchedule("constant", interval=3).attach(run.opt)
    run.step(10)
    assert run.request_steps == [3, 6, 7, 10]
    assert run.U_changed_at == [1, 3, 7, 10]
    assert rs.refreshes == 3 and rs.state_dict()["step"] == 9


# ---------------------------------------------------------------------- (f) attach / detach
def test_attach_rejects_other_optimizers():
    model = make_model()
    with pytest.raises(TypeError, match=r"lit_cosmos\.COSMOS optimizer, got torch\.optim\.sgd\.SGD"):
        RefreshSchedule().attach(torch.optim.SGD(model.parameters(), lr=0.1))


def test_detach_hands_the_optimizer_its_own_interval_back():
    run = Run(update_interval=4)
    rs = RefreshSchedule("constant", interval=1).attach(run.opt)
    run.step(3)
    assert run.U_changed_at == [1, 2, 3] and rs.optimizer is run.opt
    assert all(g["update_interval"] == 0 for g in run.opt.param_groups if g["algorithm"] == "cosmos")
    rs.detach()
    run.step(6)  # calls 4..9: COSMOS's own update_interval=4 refreshes on its steps 4 and 8
    assert run.request_steps == [2, 3] and rs.refreshes == 2 and rs.optimizer is None
    assert run.U_changed_at == [1, 2, 3, 4, 8]
    assert all(g["update_interval"] == 4 for g in run.opt.param_groups if g["algorithm"] == "cosmos")


def test_saved_optimizer_state_carries_the_own_interval():
    # While attached the live groups say 0 (manual), the saved ones the optimizer's own value: a
    # checkpoint resumed without the schedule keeps refreshing instead of never again.
    run = Run(update_interval=3)
    RefreshSchedule("adaptive", interval=1).attach(run.opt)
    run.step(4)
    saved = copy.deepcopy(run.opt.state_dict())
    cosmos_groups = [g for g in saved["param_groups"] if g["algorithm"] == "cosmos"]
    assert cosmos_groups and all(g["update_interval"] == 3 for g in cosmos_groups)
    assert all(g["update_interval"] == 0 for g in run.opt.param_groups if g["algorithm"] == "cosmos")

    # resumed without a schedule: COSMOS's own interval (steps 6 and 9 of its count)
    plain = Run(update_interval=1)
    plain.opt.load_state_dict(copy.deepcopy(saved))
    plain.calls = 4
    plain.step(5)
    assert plain.U_changed_at == [6, 9]

    # loaded while attached: stays manual, and the loaded value becomes the own one
    other = Run(update_interval=1)
    rs = RefreshSchedule("constant", interval=2).attach(other.opt)
    other.opt.load_state_dict(copy.deepcopy(saved))
    assert all(g["update_interval"] == 0 for g in other.opt.param_groups if g["algorithm"] == "cosmos")
    assert all(g["update_interval"] == 3 for g in other.opt.state_dict()["param_groups"] if g["algorithm"] == "cosmos")
    rs.detach()
    assert all(g["update_interval"] == 3 for g in other.opt.param_groups if g["algorithm"] == "cosmos")


def test_attaching_to_a_second_optimizer_detaches_from_the_first():
    a, b = Run(update_interval=5), Run()
    rs = RefreshSchedule("constant", interval=1).attach(a.opt)
    a.step(2)
    rs.attach(b.opt)
    a.step(3)
    b.step(3)
    # a is back on its own update_interval=5: no more requests, its own refresh on step 5
    assert a.U_changed_at == [1, 2, 5] and a.request_steps == [2]
    # The counters carry over: b's first call is the schedule's step 3.
    assert b.request_steps == [1, 2, 3] and b.U_changed_at == [1, 2, 3]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(schedule="linear"), "schedule must be one of"),
        (dict(interval=0), "interval must be an int >= 1, got 0"),
        (dict(warmup=-1), "warmup must be an int >= 0"),
        (dict(schedule="adaptive", interval=200), "min_interval <= interval <= max_interval"),
        (dict(growth=1.0), "growth must be a finite number > 1"),
        (dict(drift_low=0.5, drift_high=0.1), "drift_low <= drift_high"),
        (dict(drift_reduce="median"), "drift_reduce must be one of"),
        (dict(power_iters=[]), "power_iters must be"),
        (dict(log_fn="print"), "log_fn must be None or a callable"),
    ],
)
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RefreshSchedule(**kwargs)


def test_reset_rejects_a_negative_step():
    with pytest.raises(ValueError, match="anchor_step must be an int >= 0, got -1"):
        RefreshSchedule().reset(-1)


def test_drift_reduce_device_defaults_to_the_first_parameter():
    run = Run()
    rs = RefreshSchedule()
    assert rs._reduce_device() == torch.device("cpu")
    rs.attach(run.opt)
    assert rs._reduce_device() == next(run.model.parameters()).device
    rs.device = "meta"
    assert rs._reduce_device() == torch.device("meta")


# ---------------------------------------------------------------------- (g) no Lightning
def test_schedule_imports_without_lightning():
    code = (
        "import sys; sys.modules['lightning'] = None; sys.modules['lightning.pytorch'] = None\n"
        "import torch\n"
        "import lit_cosmos.core.refresh\n"
        "from lit_cosmos import COSMOS, RefreshSchedule\n"
        "m = torch.nn.Linear(4, 3); opt = COSMOS(m.parameters(), rank=2)\n"
        "s = RefreshSchedule('constant', interval=2).attach(opt)\n"
        "for _ in range(3):\n"
        "    m(torch.ones(2, 4)).sum().backward(); opt.step(); opt.zero_grad()\n"
        "assert s.refreshes == 1, s.state_dict()\n"
        "assert 'lightning' not in {k.split('.')[0] for k, v in sys.modules.items() if v is not None}\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_the_state_materialisation_step_of_distributed_checkpoints_is_not_counted():
    # Before loading into an empty optimizer, torch.distributed.checkpoint (FSDP2 resumes) takes
    # one step on zero gradients at lr 0 to build the state. Counting it would shift every later
    # refresh by one step against the uninterrupted run.
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    saved = {"schedule": "constant", "step": 5, "next_refresh": 6, "gap": 2, "refreshes": 2}
    run = Run()
    rs = RefreshSchedule("constant", interval=2)
    rs.load_state_dict(dict(saved))
    rs.attach(run.opt)
    _init_optim_state(run.opt)
    assert run.opt.state  # it stepped
    assert rs.state_dict() == saved and run.requests == []

    # A real step at lr 0 (e.g. the first step of a warmup from 0) is counted.
    fresh = Run()
    rs = RefreshSchedule("constant", interval=2).attach(fresh.opt)
    for g in fresh.opt.param_groups:
        g["lr"] = 0.0
    fresh.step(2)
    assert rs.state_dict()["step"] == 2 and fresh.request_steps == [2]
