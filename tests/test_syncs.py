"""Host synchronisations inside COSMOS.step(), counted with a CPU proxy.

On an accelerator every read of a tensor's value on the host (``.item()``, ``bool()``,
``float()``, ``.tolist()``...) waits for the device queue to drain. ``step()`` makes exactly one
such read, the finiteness decision, and none with ``on_nonfinite="off"``; the step counters are
mirrored on the host. On a CPU the same reads go through the same Python methods, so patching
them counts what an accelerator would wait for (eigh on the first step and linalg error checks
inside kernels are outside this count: they sync in C++).
"""

import pytest
import torch
from torch import nn

from lit_cosmos import COSMOS, cosmos_param_groups

READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist")


class _Counter:
    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in READS:
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original, _name=name, **kwargs):
                self.calls.append(_name)
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(30, 12), nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 12, bias=False),
                         nn.LayerNorm(12), nn.Linear(12, 30))


@pytest.mark.parametrize("on_nonfinite, reads", [("raise", 1), ("skip", 1), ("off", 0)])
@pytest.mark.parametrize("options", [{}, {"update_interval": 2, "state_dtype": "bfloat16"}, {"batch": True}])
def test_a_step_reads_the_device_once_for_the_finiteness_check(monkeypatch, on_nonfinite, reads, options):
    model = _model()
    opt = COSMOS(cosmos_param_groups(model), rank=4, on_nonfinite=on_nonfinite, **options)
    x = torch.randint(0, 30, (4, 5))

    model(x).square().mean().backward()
    opt.step()  # the first step builds the state (and its eigh)
    opt.zero_grad()
    counter = _Counter(monkeypatch)
    for _ in range(3):  # plain and refresh steps
        model(x).square().mean().backward()
        counter.calls.clear()
        opt.step()
        assert len(counter.calls) == reads, counter.calls
        opt.zero_grad()


@pytest.mark.slow
def test_compile_runs_the_whole_bucket_update_and_matches_eager():
    # float64 parameters: the compiled kernels fuse and reorder elementwise operations, which
    # changes roundoff only (float64: ~1e-15 per operation, far below the bound).
    def run(compile):
        torch.manual_seed(0)
        w = nn.Parameter(torch.randn(12, 8, dtype=torch.float64))
        opt = COSMOS([w], rank=3, ns_dtype="float32", update_interval=2, compile=compile)
        g = torch.Generator().manual_seed(1)
        for _ in range(4):  # first, refresh and plain steps
            w.grad = torch.randn(12, 8, generator=g, dtype=torch.float64)
            opt.step()
        return w.detach()

    eager, compiled = run(False), run(True)
    assert (compiled - eager).abs().max().item() < 1e-10


def test_the_step_mirror_sees_a_step_counter_written_in_place():
    # torch.distributed.checkpoint loads into the optimizer's own tensors in place: the host-side
    # mirror of the step counters must notice (by the tensors' version counters), or the bias
    # corrections and refresh steps of a resumed run would use the stale counts.
    import copy

    model = _model()
    opt = COSMOS(cosmos_param_groups(model), rank=4, update_interval=3)
    x = torch.randint(0, 30, (4, 5))
    for _ in range(2):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    saved = copy.deepcopy(opt.state_dict())
    for st in saved["state"].values():
        st["step"] = torch.tensor(7.0)
    twin_model = copy.deepcopy(model)
    twin = COSMOS(cosmos_param_groups(twin_model), rank=4, update_interval=3)
    twin.load_state_dict(saved)
    for st in opt.state.values():
        st["step"].copy_(torch.tensor(7.0))  # in place, as a distributed-checkpoint load writes
    for m, o in ((model, opt), (twin_model, twin)):
        m(x).square().mean().backward()
        o.step()  # step 8: no refresh; t = 8 in the bias corrections
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin_model.parameters()))
    assert all(st["step"].item() == 8.0 for st in opt.state.values())
