"""The layers of lit_cosmos (docs/architecture.md): the core and the distributed seam need only
torch, lit_cosmos never imports zoo, and no module of lit_cosmos imports itself round a circle."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lit_cosmos"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path) -> set[str]:
    """Every module a file imports, at module level or inside functions (lazy imports count)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {m for m in _imports(name, path) if m in modules and m != name} for name, path in modules.items()}


def test_lit_cosmos_never_imports_zoo_and_the_core_never_imports_lightning():
    for name, path in _modules().items():
        tops = {m.split(".")[0] for m in _imports(name, path)}
        assert "zoo" not in tops, name
        if name.startswith(("lit_cosmos.core", "lit_cosmos.distributed")) or name == "lit_cosmos":
            assert "lightning" not in tops and "pytorch_lightning" not in tops, name
        if name.startswith("lit_cosmos.distributed"):
            assert not any(m.startswith("lit_cosmos.core") for m in _imports(name, path)), name


def test_no_import_cycles():
    graph = _graph()
    # A package's own submodules are not edges back to it (importing lit_cosmos.core.cosmos runs
    # lit_cosmos/core/__init__.py first by Python's rules, not by the code's choice).
    for name in graph:
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_torch_only_api_works_with_lightning_blocked():
    code = """
import sys
for name in ("lightning", "lightning.pytorch", "pytorch_lightning", "zoo"):
    sys.modules[name] = None  # any import of them raises ImportError
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from lit_cosmos import COSMOS, MuonAdamW, RefreshSchedule, WarmupCosine, cosmos_param_groups
import lit_cosmos.core, lit_cosmos.distributed

torch.manual_seed(0)
model = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 20))
x = torch.randint(0, 20, (4, 6))
for make in (lambda g: COSMOS(g, rank=2), lambda g: MuonAdamW(g)):
    opt = make(cosmos_param_groups(model))
    sched = LambdaLR(opt, WarmupCosine(warmup_steps=2, total_steps=6, min_lr_ratio=0.1))
    refresh = RefreshSchedule("constant", interval=2).attach(opt) if isinstance(opt, COSMOS) else None
    for _ in range(6):
        nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
        opt.step(); sched.step(); opt.zero_grad()
    assert refresh is None or refresh.refreshes == 3, refresh.state_dict()  # steps 2, 4, 6
loaded = {k.split(".")[0] for k, v in sys.modules.items() if v is not None}
assert not loaded & {"lightning", "pytorch_lightning", "zoo"}, loaded
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
