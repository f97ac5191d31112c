"""Route a model's parameters to COSMOS or AdamW once, at construction.

Rules (first match wins):

1. a user override, ``overrides={"glob pattern": "cosmos" | "adamw" | "adamw_no_decay"}``,
   matched with :mod:`fnmatch` against the parameter's qualified name;
2. ``nn.Embedding`` weights (token and position embeddings) -> ``adamw``;
3. the output head -> ``adamw``: a module whose attribute name is in ``head_names`` or whose
   weight is the same tensor as an embedding's (tied);
4. parameters of normalisation layers, biases, and every 0-D / 1-D parameter -> ``adamw_no_decay``;
5. weights with more than 2 dimensions (convolutions) -> ``adamw``, or ``cosmos`` on the
   flattened ``(out, rest)`` matrix with ``conv="cosmos"``;
6. every other 2-D weight (the linear layers inside the network) -> ``cosmos``.

Every trainable parameter lands in exactly one group; frozen ones in none.
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from typing import Any, Mapping, Optional, Sequence

from torch import Tensor, nn

__all__ = ["cosmos_param_groups", "routing_summary", "ROUTES", "DEFAULT_HEAD_NAMES"]

#: Route name -> (algorithm, extra group options).
ROUTES: dict[str, tuple[str, dict[str, Any]]] = {
    "cosmos": ("cosmos", {}),
    "adamw": ("adamw", {}),
    "adamw_no_decay": ("adamw", {"weight_decay": 0.0}),
}
DEFAULT_HEAD_NAMES = ("lm_head", "output", "head", "classifier")


def _is_norm(module: nn.Module) -> bool:
    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase)
    if hasattr(nn, "RMSNorm"):
        norm_types = norm_types + (nn.RMSNorm,)
    return isinstance(module, norm_types) or "norm" in type(module).__name__.lower()


def _check_head_names(head_names: Any) -> None:
    # A bare string is a sequence of one-letter names: "lm_head" would mark every module whose
    # name is "l", "m", "_", "h"... as a head.
    if isinstance(head_names, (str, bytes)) or not all(isinstance(n, str) for n in head_names):
        raise ValueError(f"head_names must be a sequence of attribute names such as ('lm_head',), got {head_names!r}")


def cosmos_param_groups(
    module: nn.Module,
    overrides: Optional[Mapping[str, str]] = None,
    head_names: Sequence[str] = DEFAULT_HEAD_NAMES,
    conv: str = "adamw",
    **group_options: Any,
) -> list[dict[str, Any]]:
    """Param groups for :class:`lit_cosmos.COSMOS` from a module, routed by the rules above.

    Args:
        module: the model.
        overrides: ``{glob: route}``; each pattern must match at least one trainable parameter.
        head_names: attribute names that mark the output head.
        conv: route of >2-D weights, ``"adamw"`` (default) or ``"cosmos"``.
        **group_options: hyperparameters added to every group (e.g. ``rank=32``); a route's own
            options (``weight_decay=0`` of ``adamw_no_decay``) win.

    Returns:
        Up to three groups named ``cosmos``, ``adamw`` and ``adamw_no_decay``, each with
        ``params`` given as ``(name, parameter)`` pairs (so the optimizer records names) and
        ``algorithm``. Empty groups are left out.

    Raises:
        ValueError: an unknown route, a pattern matching nothing, a COSMOS route for a 0-D/1-D
            parameter, a parameter routed twice / not at all, or ``head_names`` given as one string.
    """
    overrides = dict(overrides or {})
    for pattern, route in overrides.items():
        if route not in ROUTES:
            raise ValueError(f"override {pattern!r} -> {route!r}: route must be one of {tuple(ROUTES)}")
    if conv not in ("adamw", "cosmos"):
        raise ValueError(f"conv must be 'adamw' or 'cosmos', got {conv!r}")
    _check_head_names(head_names)

    embedding_weights = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    routes: dict[str, str] = {}
    params: dict[str, Tensor] = {}
    seen: dict[int, str] = {}
    used_patterns: set[str] = set()
    for mod_name, mod in module.named_modules():
        leaf = mod_name.rsplit(".", 1)[-1]
        for p_name, p in mod.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            if id(p) in seen:  # tied weight: routed once, under its first name
                continue
            seen[id(p)] = name
            params[name] = p
            matched = [pat for pat in overrides if fnmatch.fnmatchcase(name, pat)]
            if matched:
                used_patterns.update(matched)
                route = overrides[matched[-1]]
            elif isinstance(mod, nn.Embedding) or id(p) in embedding_weights:
                route = "adamw"
            elif leaf in head_names and p.ndim >= 2:
                route = "adamw"
            elif _is_norm(mod) or p_name == "bias" or p.ndim < 2:
                route = "adamw_no_decay"
            elif p.ndim > 2:
                route = conv
            else:
                route = "cosmos"
            if route == "cosmos" and p.ndim < 2:
                raise ValueError(f"parameter {name!r} of shape {tuple(p.shape)} cannot be routed to cosmos: it is not a matrix")
            routes[name] = route

    unused = [pat for pat in overrides if pat not in used_patterns]
    if unused:
        raise ValueError(f"override patterns matched no trainable parameter: {unused}; names look like {list(params)[:5]}")

    groups = []
    for route, (algorithm, options) in ROUTES.items():
        chosen = [(n, params[n]) for n, rt in routes.items() if rt == route]
        if chosen:
            groups.append({**group_options, **options, "name": route, "algorithm": algorithm, "params": chosen})
    _check_partition(module, groups)
    return groups


def _check_partition(module: nn.Module, groups: list[dict[str, Any]]) -> None:
    trainable = {id(p): n for n, p in module.named_parameters() if p.requires_grad}
    counts = Counter(id(_tensor(item)) for g in groups for item in g["params"])
    twice = [trainable.get(i, "?") for i, c in counts.items() if c > 1]
    missing = [n for i, n in trainable.items() if i not in counts]
    if twice or missing:
        raise ValueError(f"parameter routing is not a partition: routed twice {twice}, not routed {missing}")


def _tensor(item: Any) -> Tensor:
    return item[1] if isinstance(item, tuple) else item


def routing_summary(groups: Sequence[Mapping[str, Any]]) -> str:
    """A short table of the routing: per group its algorithm, tensor count, elements and shapes."""
    lines = [f"{'group':<16} {'algorithm':<9} {'tensors':>7} {'elements':>12}  shapes"]
    for i, g in enumerate(groups):
        tensors = [_tensor(x) for x in g["params"]]
        shapes = Counter(tuple(t.shape) for t in tensors)
        shape_txt = ", ".join(f"{'x'.join(map(str, s)) or 'scalar'}" + (f" ({c})" if c > 1 else "") for s, c in shapes.most_common())
        numel = sum(t.numel() for t in tensors)
        lines.append(f"{str(g.get('name', i)):<16} {str(g.get('algorithm', '?')):<9} {len(tensors):>7} {numel:>12,}  {shape_txt}")
    return "\n".join(lines)
