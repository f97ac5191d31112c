r"""Route a model's parameters to COSMOS or AdamW once, at construction, with each matrix's layout.

COSMOS and Muon are optimizers for the hidden matrices of a network: a weight ``W`` of an
``nn.Linear`` maps ``x -> W x`` with ``W`` stored ``(out, in)``. Embeddings, the output head, the
MoE router, norms and biases are not hidden matrices and get AdamW. A hidden matrix stored
otherwise is routed to COSMOS with its ``matrix_layout``, the param-group key that tells COSMOS
which ``(out, in)`` matrices the tensor holds:

==============  ======================  ===============================================
layout          stored as               COSMOS works on
==============  ======================  ===============================================
``linear``      ``(out, in)``           the tensor (``nn.Linear``)
``transposed``  ``(in, out)``           its transpose (transformers' ``Conv1D``, GPT-2)
``stack``       ``(E, out, in)``        E independent matrices (MoE expert stacks)
``flatten``     ``(out, c, k...)``      the ``(shape[0], rest)`` matrix (convolutions)
==============  ======================  ===============================================

and, opt-in, ``split``: the ``(out, in)`` matrix taken as parts along ``out`` (fused Q/K/V),
each with its own basis.

Rules for a trainable parameter ``p`` of module ``m`` (first match wins):

1. a user override, ``overrides={"glob": route}`` (:mod:`fnmatch` on any of ``p``'s names);
   ``route`` is ``"adamw"``, ``"adamw_no_decay"``, ``"cosmos"`` (with the layout that rule 7
   finds) or ``"cosmos_<layout>"`` (that layout, e.g. ``"cosmos_stack"``);
2. ``nn.Embedding`` weights, and weights tied to one -> ``adamw``;
3. parameters of normalisation layers, biases (``bias``, ``*_bias``, ``bias_*``) and every
   0-D / 1-D parameter -> ``adamw_no_decay``;
4. the MoE router -> ``adamw``: a 2-D weight next to an expert container (a module named
   ``experts`` or whose class name contains ``Expert``) with one output per expert;
5. the output head by name -> ``adamw``: a module (or a parameter of its own) named in
   ``head_names``;
6. the output head by vocabulary -> ``adamw``: a 2-D weight outside the repeated blocks whose
   output dimension equals the token embedding's ``num_embeddings``;
7. every other weight -> ``cosmos`` with its layout, from (first match): the module's declared
   ``cosmos_layout``; a convolution (``nn.Conv1d/2d/3d``, any >3-D weight) -> ``conv``
   (``"adamw"`` or ``"cosmos"`` with ``flatten``); transformers' ``Conv1D`` (recognised by its class
   name and ``nx``/``nf``, without importing transformers) -> ``transposed``; another 3-D weight
   -> ``stacks`` (``"cosmos"`` with ``stack``, or ``"adamw"``), except ``(1, n, d)`` tables
   (ViT position embeddings, class tokens) and stacks their module marks ``is_transposed``
   (transformers' GPT-OSS experts, ``(E, in, out)``), which go to ``adamw``; 2-D -> ``linear``.

Every trainable parameter lands in exactly one group (checked); frozen ones in none.
"""

from __future__ import annotations

import fnmatch
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

from torch import Tensor, nn

__all__ = [
    "cosmos_param_groups",
    "routing_summary",
    "ROUTES",
    "LAYOUTS",
    "OVERRIDE_ROUTES",
    "DEFAULT_HEAD_NAMES",
    "LAYOUT_ATTRIBUTE",
]

#: Route name -> (algorithm, extra group options).
ROUTES: dict[str, tuple[str, dict[str, Any]]] = {
    "cosmos": ("cosmos", {}),
    "adamw": ("adamw", {}),
    "adamw_no_decay": ("adamw", {"weight_decay": 0.0}),
}
#: Values of the ``matrix_layout`` group key, in group order.
LAYOUTS = ("linear", "transposed", "stack", "flatten")
#: What an override may ask for: a route, or COSMOS with a given layout.
OVERRIDE_ROUTES = (*ROUTES, *(f"cosmos_{layout}" for layout in LAYOUTS))
DEFAULT_HEAD_NAMES = ("lm_head", "output", "head", "classifier")
#: The module attribute that declares a layout: a layout name for all its weights, or a mapping
#: ``{parameter name: layout}``; a class or an instance attribute.
LAYOUT_ATTRIBUTE = "cosmos_layout"

# Embeddings whose rows are positions or segments, not tokens (GPT-2 calls its positions wpe).
_POSITIONAL = re.compile(r"pos|wpe|token_type|segment")
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)
Split = Union[int, tuple[int, ...]]


@dataclass
class _Decision:
    route: str  # a key of ROUTES
    layout: Optional[str] = None  # COSMOS routes only
    split: Optional[Split] = None
    note: Optional[str] = None  # why, when the group name does not say it


def _is_norm(module: nn.Module) -> bool:
    norm_types = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase)
    if hasattr(nn, "RMSNorm"):
        norm_types = norm_types + (nn.RMSNorm,)
    return isinstance(module, norm_types) or "norm" in type(module).__name__.lower()


def _is_bias(p_name: str) -> bool:
    # nn.MultiheadAttention's bias_k / bias_v are (1, 1, d); GPT-OSS's gate_up_proj_bias is (E, 2I).
    return p_name == "bias" or p_name.endswith("_bias") or p_name.startswith("bias_")


def _is_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd)


def _is_hf_conv1d(module: nn.Module, p_name: str, p: Tensor) -> bool:
    # transformers.pytorch_utils.Conv1D computes x @ W + b with W stored (nx, nf) = (in, out).
    # Matched by name through the MRO, so FSDP2's FSDPConv1D subclass is recognised too.
    if p_name != "weight" or p.ndim != 2 or not any(c.__name__ == "Conv1D" for c in type(module).__mro__):
        return False
    return tuple(p.shape) == (getattr(module, "nx", None), getattr(module, "nf", None))


def _layout_fits(layout: str, ndim: int) -> bool:
    return ndim == 2 if layout in ("linear", "transposed") else ndim == 3 if layout == "stack" else ndim > 2


def _layout_needs(layout: str) -> str:
    return {"linear": "2-D", "transposed": "2-D", "stack": "3-D (E, out, in)", "flatten": "more than 2-D"}[layout]


def _out_rows(layout: str, shape: Sequence[int]) -> int:
    """Rows of the ``(out, in)`` matrix (of each expert, for stacks): the dimension ``split`` cuts."""
    return shape[1] if layout in ("transposed", "stack") else shape[0]


def _declared_layout(module: nn.Module, mod_name: str, p_name: str, p: Tensor) -> Optional[str]:
    declared = getattr(module, LAYOUT_ATTRIBUTE, None)
    if declared is None:
        return None
    value = declared.get(p_name) if isinstance(declared, Mapping) else declared
    if value is None:
        return None
    where = f"{type(module).__name__} {mod_name or '(root)'!r} declares {LAYOUT_ATTRIBUTE}={declared!r}"
    if value not in LAYOUTS:
        raise ValueError(f"{where}: a layout must be one of {LAYOUTS}, got {value!r}")
    if not _layout_fits(value, p.ndim):
        raise ValueError(f"{where}, but its parameter {p_name!r} has shape {tuple(p.shape)}: "
                         f"{value!r} needs {_layout_needs(value)}")
    return value


def _check_head_names(head_names: Any) -> None:
    # A bare string is a sequence of one-letter names: "lm_head" would mark every module whose
    # name is "l", "m", "_", "h"... as a head.
    if isinstance(head_names, (str, bytes)) or not all(isinstance(n, str) for n in head_names):
        raise ValueError(f"head_names must be a sequence of attribute names such as ('lm_head',), got {head_names!r}")


def _check_split_value(pattern: str, value: Any) -> Split:
    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if is_int(value) and value >= 2:
        return value
    if isinstance(value, (tuple, list)) and len(value) >= 2 and all(is_int(v) and v >= 1 for v in value):
        return tuple(value)
    raise ValueError(f"split {pattern!r} -> {value!r}: must be a number of equal parts >= 2, or a tuple of "
                     "two or more positive row counts (e.g. (64, 16, 16) for Q, K, V)")


def _block_prefixes(module: nn.Module) -> list[str]:
    """Names of the repeated blocks: non-leaf children of a ModuleList / ModuleDict, and of a
    Sequential where a sibling has the same class (a Sequential also chains unlike layers)."""
    prefixes = []
    for name, mod in module.named_modules():
        if not isinstance(mod, _CONTAINERS):
            continue
        children = list(mod.named_children())
        classes = Counter(type(child) for _, child in children)
        for key, child in children:
            if next(child.children(), None) is None:  # a leaf layer, e.g. one head of several
                continue
            if isinstance(mod, nn.Sequential) and classes[type(child)] < 2:
                continue
            prefixes.append(f"{name}.{key}" if name else key)
    return prefixes


def _under(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def _token_embedding(module: nn.Module, tied_ids: set[int]) -> Optional[tuple[str, nn.Embedding, str]]:
    """``(name, embedding, why)`` of the token embedding, or None when the model has no nn.Embedding."""
    embeddings = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Embedding)]
    if not embeddings:
        return None
    for n, m in embeddings:
        if id(m.weight) in tied_ids:
            return n, m, "tied to the head"
    for m in module.modules():
        if callable(getattr(type(m), "get_input_embeddings", None)):  # transformers' PreTrainedModel
            try:
                emb = m.get_input_embeddings()
            except (NotImplementedError, AttributeError):
                continue
            found = [(en, em) for en, em in embeddings if em is emb]
            if found:
                return found[0][0], emb, "get_input_embeddings()"
    tokens = [(n, m) for n, m in embeddings if not _POSITIONAL.search(n.rsplit(".", 1)[-1])] or embeddings
    n, m = max(tokens, key=lambda nm: nm[1].num_embeddings)
    return n, m, "the largest non-positional nn.Embedding"


def _expert_containers(module: nn.Module) -> dict[str, int]:
    """``{module name: number of experts}`` of the MoE expert containers."""
    found = {}
    for name, mod in module.named_modules():
        if not name or not (name.rsplit(".", 1)[-1] == "experts" or "expert" in type(mod).__name__.lower()):
            continue
        if isinstance(mod, (nn.ModuleList, nn.ModuleDict)) and len(mod) > 1:
            found[name] = len(mod)
            continue
        stacks = [p.shape[0] for p in mod.parameters(recurse=False) if p.ndim == 3 and p.shape[0] > 1]
        if stacks:
            found[name] = int(stacks[0])
    return found


def cosmos_param_groups(
    module: nn.Module,
    overrides: Optional[Mapping[str, str]] = None,
    head_names: Sequence[str] = DEFAULT_HEAD_NAMES,
    conv: str = "adamw",
    stacks: str = "cosmos",
    split: Optional[Mapping[str, Union[int, Sequence[int]]]] = None,
    **group_options: Any,
) -> list[dict[str, Any]]:
    """Param groups for :class:`lit_cosmos.COSMOS` from a module, routed by the rules above.

    Args:
        module: the model.
        overrides: ``{glob: route}`` with a route of :data:`OVERRIDE_ROUTES`; each pattern must
            match at least one trainable parameter; the last matching pattern wins.
        head_names: attribute names that mark the output head.
        conv: route of convolution weights, ``"adamw"`` (default) or ``"cosmos"`` (``flatten``).
        stacks: route of 3-D expert stacks, ``"cosmos"`` (default, ``stack``) or ``"adamw"``.
        split: opt-in, ``{glob: parts}``: the matched COSMOS weights are taken as parts along
            the output dimension of their ``(out, in)`` matrix (of each expert, for stacks), each
            with its own basis. ``parts`` is a number of equal parts (``3`` for a fused Q/K/V of
            equal sizes) or a tuple of row counts (``(q, k, v)`` with grouped-query attention).
            Weights named ``query_key_value`` (GPT-NeoX, Bloom, Falcon, whose Q/K/V rows are
            interleaved per head) only take parts that lie within one head's block of rows.
        **group_options: hyperparameters added to every group (e.g. ``rank=32``); a route's own
            options (``weight_decay=0`` of ``adamw_no_decay``) win.

    Returns:
        One group per route and layout (and split), in the order ``cosmos`` (``linear``),
        ``cosmos_transposed``, ``cosmos_stack``, ``cosmos_flatten``, split variants such as
        ``cosmos_transposed_split3``, then ``adamw`` and ``adamw_no_decay``; empty groups are left
        out. Each has ``name``, ``algorithm`` and ``params`` as ``(name, parameter)`` pairs (so the
        optimizer records names); COSMOS groups also ``matrix_layout`` and ``split``; groups with
        notable decisions ``routing_notes``, ``[name, why]`` pairs that :func:`routing_summary`
        prints.

    Raises:
        ValueError: an unknown route, a pattern matching nothing, a COSMOS route or layout that
            does not fit the parameter's shape, a split that does not divide the rows or applies
            to a non-COSMOS parameter, a bad ``cosmos_layout`` declaration, a parameter routed
            twice / not at all, or ``head_names`` given as one string.

    Warns:
        UserWarning: when the vocabulary rule takes more than one weight as the output head.
    """
    overrides = dict(overrides or {})
    for pattern, route in overrides.items():
        if route not in OVERRIDE_ROUTES:
            raise ValueError(f"override {pattern!r} -> {route!r}: route must be one of {OVERRIDE_ROUTES}")
    if conv not in ("adamw", "cosmos"):
        raise ValueError(f"conv must be 'adamw' or 'cosmos', got {conv!r}")
    if stacks not in ("adamw", "cosmos"):
        raise ValueError(f"stacks must be 'adamw' or 'cosmos', got {stacks!r}")
    splits = {pattern: _check_split_value(pattern, v) for pattern, v in dict(split or {}).items()}
    for key in ("matrix_layout", "split"):
        if key in group_options:
            raise ValueError(f"{key} is set by the routing, not as a group option: use overrides=, split= or a "
                             f"module's {LAYOUT_ATTRIBUTE}")
    _check_head_names(head_names)

    # Every name of every trainable parameter: a tied weight has several, routed once under the first.
    names_of: dict[int, list[str]] = {}
    owner: dict[int, tuple[str, nn.Module, str]] = {}  # id -> (module name, module, local name), first seen
    params: dict[str, Tensor] = {}
    for mod_name, mod in module.named_modules(remove_duplicate=False):
        for p_name, p in mod.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            names_of.setdefault(id(p), [])
            if name not in names_of[id(p)]:
                names_of[id(p)].append(name)
            if id(p) not in owner:
                owner[id(p)] = (mod_name, mod, p_name)
                params[name] = p
    embedding_ids = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    modules = dict(module.named_modules(remove_duplicate=False))
    tied: dict[int, list[str]] = {}  # embedding weight -> the names it has outside embeddings
    for mod_name, mod in modules.items():
        for p_name, p in mod.named_parameters(recurse=False):
            if id(p) in embedding_ids and not isinstance(mod, nn.Embedding) and p.requires_grad:
                tied.setdefault(id(p), []).append(f"{mod_name}.{p_name}" if mod_name else p_name)

    token = _token_embedding(module, set(tied))
    blocks = _block_prefixes(module)
    experts = _expert_containers(module)

    def in_block(mod_name: str) -> bool:
        return any(_under(mod_name, b) for b in blocks)

    def router_of(mod_name: str, out_dim: int) -> Optional[str]:
        for container, n_experts in experts.items():
            parent = container.rsplit(".", 1)[0] if "." in container else ""
            if _under(mod_name, parent) and not _under(mod_name, container) and out_dim == n_experts:
                return f"MoE router: one output per expert of {_generic(container)} (E={n_experts})"
        return None

    def structural_layout(mod_name: str, mod: nn.Module, p_name: str, p: Tensor) -> tuple[Optional[str], str]:
        """(layout, kind) from the module; kind names the rule for the notes and the defaults."""
        declared = _declared_layout(mod, mod_name, p_name, p)
        if declared is not None:
            return declared, f"declared {LAYOUT_ATTRIBUTE}={declared!r} on {type(mod).__name__}"
        if _is_conv(mod) or p.ndim > 3:
            return "flatten", "convolution"
        if p.ndim == 2:
            if _is_hf_conv1d(mod, p_name, p):
                return "transposed", "transposed: Conv1D stores (in, out)"
            return "linear", "linear"
        if getattr(mod, "is_transposed", False) is True:
            return None, "expert stack stored (E, in, out) (is_transposed): no COSMOS layout for it"
        if p.shape[0] == 1:
            return "stack", "a (1, n, d) table, not a stack of matrices"
        return "stack", f"expert stack: E={p.shape[0]} matrices in nn.Linear layout"

    def default(name: str, p: Tensor) -> _Decision:
        """The decision of rules 2-7 for one parameter (overrides are applied on top)."""
        mod_name, mod, p_name = owner[id(p)]
        leaf = mod_name.rsplit(".", 1)[-1]
        if isinstance(mod, nn.Embedding) or id(p) in embedding_ids:
            heads = tied.get(id(p), [])
            return _Decision("adamw", note=f"output head {', '.join(heads)}, tied to this embedding" if heads else None)
        if _is_norm(mod) or _is_bias(p_name) or p.ndim < 2:
            return _Decision("adamw_no_decay")
        layout, kind = structural_layout(mod_name, mod, p_name, p)
        known = isinstance(mod, nn.Linear) or layout in ("transposed", "stack") or kind.startswith("declared")
        out_dim = _out_rows(layout, p.shape) if layout in ("linear", "transposed", "stack") else p.shape[0]
        router = router_of(mod_name, out_dim) if p.ndim == 2 else None
        if router is not None:
            return _Decision("adamw", note=router)
        if leaf in head_names or p_name in head_names:
            return _Decision("adamw", note=f"output head by name {leaf if leaf in head_names else p_name!r}")
        if token is not None and p.ndim == 2 and not in_block(mod_name):
            vocab = token[1].num_embeddings
            # Without a known layout (a raw nn.Parameter used as x @ W) either side may be the output.
            if (out_dim == vocab) if known else (vocab in tuple(p.shape)):
                return _Decision("adamw", note=f"output head by vocabulary: maps to the {vocab} rows of "
                                               f"{token[0]} ({token[2]})")
        if layout is None or kind.startswith("a (1, n, d) table"):
            return _Decision("adamw", note=kind)
        if kind == "convolution":
            note = f"convolution ({type(mod).__name__}), conv={conv!r}"
            return _Decision("cosmos", "flatten", note=note) if conv == "cosmos" else _Decision("adamw", note=note)
        if kind.startswith("expert stack"):
            note = f"{kind}, stacks={stacks!r}"
            return _Decision("cosmos", "stack", note=note) if stacks == "cosmos" else _Decision("adamw", note=note)
        return _Decision("cosmos", layout, note=None if kind == "linear" else kind)

    decisions: dict[str, _Decision] = {}
    used_patterns: set[str] = set()
    vocab_heads: list[str] = []  # default heads by the vocabulary rule that no override changed
    heads: list[str] = []
    for name, p in params.items():
        d = default(name, p)
        matched = [pat for pat in overrides if any(fnmatch.fnmatchcase(n, pat) for n in names_of[id(p)])]
        if not matched:
            if d.note and d.note.startswith("output head") and "tied" not in d.note:
                heads.append(name)
                if "vocabulary" in d.note:
                    vocab_heads.append(name)
            decisions[name] = d
            continue
        used_patterns.update(matched)
        pattern, route = matched[-1], overrides[matched[-1]]
        note = f"override {pattern!r} -> {route!r}; by default {d.note or _group_name(d)}"
        if not route.startswith("cosmos"):
            decisions[name] = _Decision(route, note=note)
            continue
        mod_name, mod, p_name = owner[id(p)]
        if p.ndim < 2:
            raise ValueError(f"parameter {name!r} of shape {tuple(p.shape)} cannot be routed to {route}: "
                             "it is not a matrix")
        forced = route[len("cosmos_"):] if route != "cosmos" else None
        if forced is not None and not _layout_fits(forced, p.ndim):
            raise ValueError(f"override {pattern!r} -> {route!r}: parameter {name!r} has shape {tuple(p.shape)}, "
                             f"but {forced!r} needs {_layout_needs(forced)}")
        layout, kind = structural_layout(mod_name, mod, p_name, p)
        if forced is None and layout is None:
            raise ValueError(f"override {pattern!r} -> 'cosmos': parameter {name!r} of shape {tuple(p.shape)} is an "
                             f"{kind}; choose 'cosmos_stack' (each (in, out) slice taken as a matrix) or 'adamw'")
        decisions[name] = _Decision("cosmos", forced or layout, note=f"{note}; layout {forced or layout}")

    unused = [pat for pat in overrides if pat not in used_patterns]
    if unused:
        raise ValueError(
            f"override patterns matched no trainable parameter: {unused}; names look like {list(params)[:5]}"
        )
    _apply_splits(splits, params, names_of, owner, modules, decisions)

    if vocab_heads and len(heads) > 1:
        warnings.warn(
            "more than one weight was taken as the output head and routed to adamw: "
            + "; ".join(f"{n} ({decisions[n].note})" for n in heads)
            + ". If one of them is a hidden layer, route it with overrides={name: 'cosmos'}",
            UserWarning,
            stacklevel=2,
        )

    groups = _assemble(decisions, params, group_options)
    _check_partition(module, groups)
    return groups


def _apply_splits(splits: dict[str, Split], params: dict[str, Tensor], names_of: dict[int, list[str]],
                  owner: dict[int, tuple[str, nn.Module, str]], modules: dict[str, nn.Module],
                  decisions: dict[str, _Decision]) -> None:
    used: set[str] = set()
    for name, p in params.items():
        matched = [pat for pat in splits if any(fnmatch.fnmatchcase(n, pat) for n in names_of[id(p)])]
        if not matched or p.ndim < 2:  # "*qkv*" also matches the fused bias, which has no parts to take
            continue
        used.update(matched)
        pattern, parts = matched[-1], splits[matched[-1]]
        d = decisions[name]
        where = f"split {pattern!r} -> {parts!r}: parameter {name!r} of shape {tuple(p.shape)}"
        if d.route != "cosmos":
            raise ValueError(f"{where} is routed to {d.route}; only COSMOS matrices can be split")
        rows = _out_rows(d.layout, p.shape)
        sizes = (rows // parts,) * parts if isinstance(parts, int) else parts
        if isinstance(parts, int) and rows % parts:
            raise ValueError(f"{where}: its {d.layout} matrix has {rows} output rows, not divisible into {parts} parts")
        if sum(sizes) != rows:
            raise ValueError(f"{where}: the row counts sum to {sum(sizes)}, but its {d.layout} matrix has {rows} "
                             "output rows")
        mod_name, _, _ = owner[id(p)]
        if mod_name.rsplit(".", 1)[-1] == "query_key_value":
            parent = modules.get(mod_name.rsplit(".", 1)[0] if "." in mod_name else "")
            sizes_found = [getattr(parent, a, None) for a in ("head_size", "head_dim")]
            head = next((h for h in sizes_found if isinstance(h, int) and not isinstance(h, bool) and h > 0), None)
            if head is None:
                raise ValueError(f"{where}: query_key_value interleaves Q, K and V per head (GPT-NeoX, Bloom, Falcon), "
                                 "and its attention module has no head_size/head_dim to check the parts against")
            start = 0
            for size in sizes:
                if start // head != (start + size - 1) // head:
                    raise ValueError(
                        f"{where}: query_key_value interleaves Q, K and V per head (GPT-NeoX, Bloom, Falcon), so "
                        f"contiguous parts mix them; rows {start}..{start + size - 1} cross a head block of {head} "
                        f"rows. Split per head instead: split={{{pattern!r}: {rows // head}}}")
                start += size
        d.split = parts
        text = f"split into {parts} equal parts" if isinstance(parts, int) else f"split into rows {parts}"
        d.note = f"{d.note}; {text}" if d.note else text
    unused = [pat for pat in splits if pat not in used]
    if unused:
        raise ValueError(f"split patterns matched no trainable matrix: {unused}; names look like {list(params)[:5]}")


def _group_name(d: _Decision) -> str:
    if d.route != "cosmos":
        return d.route
    name = "cosmos" if d.layout == "linear" else f"cosmos_{d.layout}"
    if d.split is not None:
        name += f"_split{d.split}" if isinstance(d.split, int) else "_split_" + "_".join(map(str, d.split))
    return name


def _assemble(decisions: dict[str, _Decision], params: dict[str, Tensor], group_options: dict[str, Any]) -> list[dict]:
    keys: list[tuple[str, Optional[str], Optional[Split]]] = []
    for d in decisions.values():
        if (d.route, d.layout, d.split) not in keys:
            keys.append((d.route, d.layout, d.split))

    def order(key: tuple) -> tuple:
        route, layout, split = key
        if route != "cosmos":
            return (1, list(ROUTES).index(route), 0)
        return (0, LAYOUTS.index(layout), 0 if split is None else 1 + keys.index(key))

    groups = []
    for key in sorted(keys, key=order):
        chosen = [(n, d) for n, d in decisions.items() if (d.route, d.layout, d.split) == key]
        algorithm, options = ROUTES[key[0]]
        group: dict[str, Any] = {**group_options, **options, "name": _group_name(chosen[0][1]), "algorithm": algorithm}
        if algorithm == "cosmos":
            group["matrix_layout"], group["split"] = key[1], key[2]
        group["params"] = [(n, params[n]) for n, _ in chosen]
        notes = [[n, d.note] for n, d in chosen if d.note]
        if notes:
            group["routing_notes"] = notes
        groups.append(group)
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


def _generic(name: str) -> str:
    """A name with its block indices replaced by ``*``: one line of notes for all layers."""
    return ".".join("*" if part.isdigit() else part for part in name.split("."))


def routing_summary(groups: Sequence[Mapping[str, Any]]) -> str:
    """A table of the routing, then why: the output head and the notable decisions.

    Per group: algorithm, layout, split, tensor count, elements and shapes. Then the line
    ``head:`` (which weight was taken as the output head, and by which rule: by name, by
    vocabulary, tied to the embedding, or an override) and the groups' ``routing_notes``, one
    line per rule, with block indices written ``*`` so that a 48-layer model needs no more lines
    than a 2-layer one.
    """
    rows, notes, heads = [], {}, []
    for i, g in enumerate(groups):
        tensors = [_tensor(x) for x in g["params"]]
        shapes = Counter(tuple(t.shape) for t in tensors)
        shape_txt = ", ".join(
            f"{'x'.join(map(str, s)) or 'scalar'}" + (f" ({c})" if c > 1 else "") for s, c in shapes.most_common()
        )
        layout = g.get("matrix_layout") or ("auto" if g.get("algorithm") == "cosmos" else "-")
        split = g.get("split")
        split_txt = "-" if split is None else str(split) if isinstance(split, int) else "/".join(map(str, split))
        numel = sum(t.numel() for t in tensors)
        name = str(g.get("name", i))
        rows.append((name, str(g.get("algorithm", "?")), layout, split_txt, len(tensors), numel, shape_txt))
        for name, note in g.get("routing_notes", ()):
            if "output head" in note:
                heads.append(f"{name} ({note})")
            else:
                key = (_generic(name), note)
                notes[key] = notes.get(key, 0) + 1
    width = max([len("group")] + [len(r[0]) for r in rows])
    lines = [f"{'group':<{width}} {'algorithm':<9} {'layout':<10} {'split':<8} {'tensors':>7} {'elements':>12}  shapes"]
    for name, algorithm, layout, split_txt, count, numel, shape_txt in rows:
        lines.append(f"{name:<{width}} {algorithm:<9} {layout:<10} {split_txt:<8} {count:>7} {numel:>12,}  {shape_txt}")
    lines.append("head: " + ("; ".join(heads) if heads else "none recognised (no weight named in head_names, tied "
                                                                 "to an embedding, or mapping to the vocabulary)"))
    if notes:
        lines.append("notes:")
        labels = {key: key[0] + (f" ({c})" if c > 1 else "") for key, c in notes.items()}
        pad = max(len(label) for label in labels.values())
        lines.extend(f"  {labels[key]:<{pad}}  {key[1]}" for key in notes)
    return "\n".join(lines)
