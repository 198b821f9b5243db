"""Which parameters Muon should update, and why.

Muon is for hidden weight matrices. Embeddings, the output head (also when tied to the
embedding), gains, biases and tensors that are not really matrices go to AdamW inside the same
optimizer. This module decides, per parameter, and says why, so a user can read the decision once.

Names decide first (``nn.Embedding``, ``*embed*``, ``lm_head``, ``classifier``, ...); where they
do not, the module tree does: the output head is the last layer outside the repeated blocks
(ResNet's ``fc``), the input stem the first layer before them (ResNet's ``conv1``).

Example:
    >>> import torch.nn as nn
    >>> from lightning_muon import muon_param_groups, routing_table
    >>> model = nn.Sequential(nn.Embedding(100, 16), nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16),
    ...                       nn.LayerNorm(16), nn.Linear(16, 100))
    >>> [(g["name"], len(g["params"])) for g in muon_param_groups(model)]
    [('muon', 2), ('adamw', 2), ('adamw_no_decay', 5)]
    >>> print(routing_table(model))
    parameter  shape   group           reason
    -------------------------------------...
    0.weight   100x16  adamw           embedding (Embedding)
    1.weight   64x16   muon            hidden matrix
    1.bias     64      adamw_no_decay  1-D (gain or bias)
    3.weight   16x64   muon            hidden matrix
    3.bias     16      adamw_no_decay  1-D (gain or bias)
    4.weight   16      adamw_no_decay  1-D (gain or bias)
    4.bias     16      adamw_no_decay  1-D (gain or bias)
    5.weight   100x16  adamw           output head (last layer outside the repeated blocks)
    5.bias     100     adamw_no_decay  1-D (gain or bias)
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch import Tensor, nn

from ..validation import check_bool, check_choice, check_patterns, check_positive_int
from .layers import (
    DEFAULT_ROUTER_NAMES,
    conv_groups,
    fused_gate_up,
    is_depthwise_conv,
    is_moe_router,
    is_transposed_linear,
)
from .matrix_view import MatrixView, matrix_view_for
from .patterns import matching_pattern, why_not_muon
from .tree import Structure, analyse, find_aux_heads, head_by_name

__all__ = [
    "Route",
    "RoutingRules",
    "DEFAULT_EMBEDDING_NAMES",
    "DEFAULT_HEAD_NAMES",
    "why_not_muon",
    "matching_pattern",
    "route_parameters",
    "route_named_parameters",
    "muon_param_groups",
    "routing_table",
    "DEFAULT_QKV_NAMES",
    "SPLIT_QKV",
    "STEMS",
    "GROUPED_CONVS",
    "ROUTERS",
]


#: Name components (of a parameter or its module) that mark an input embedding or a learned lookup
#: table (Swin's and MaxViT's ``relative_position_bias_table``). fnmatch patterns.
DEFAULT_EMBEDDING_NAMES: tuple[str, ...] = (
    "*embed*",
    "wte",
    "wpe",
    "conv_proj",
    "class_token",
    "cls_token",
    "*pos_emb*",
    "*token_emb*",
    "*bias_table*",
)


#: Name components that mark the output head or classifier. fnmatch patterns.
DEFAULT_HEAD_NAMES: tuple[str, ...] = ("lm_head", "head", "heads", "classifier", "fc_out", "out_head")


#: Names (of a parameter's module, or the parameter) that mark a fused ``[q; k; v]`` projection whose
#: rows are ordered ``(q/k/v, head, head_dim)`` (nanoGPT's ``c_attn``, timm's ``qkv``). fnmatch patterns.
#: A module that orders them otherwise declares it (``muon_qkv_layout``, see :func:`route_parameters`).
DEFAULT_QKV_NAMES: tuple[str, ...] = ("qkv", "c_attn", "in_proj", "in_proj_weight", "Wqkv", "qkv_proj")


#: Values of ``split_qkv``: False (keep fused projections whole), True (three blocks), "per_head".
SPLIT_QKV = (False, True, "per_head")

#: Values of ``stem``: the input stem (first layer before the repeated blocks) to AdamW or Muon.
STEMS = ("adamw", "muon")

#: Values of ``grouped_conv`` (convs with ``groups > 1`` and more than one input channel per group):
#: AdamW (the default), Muon on each group's block, or Muon on the whole ``(out, rest)`` kernel.
GROUPED_CONVS = ("adamw", "per_group", "whole")

#: Values of ``router``: a mixture-of-experts router's weight to AdamW or Muon.
ROUTERS = ("adamw", "muon")

MUON, ADAMW, ADAMW_NO_DECAY = "muon", "adamw", "adamw_no_decay"


@dataclass(frozen=True)
class Route:
    """The routing decision for one parameter."""

    name: str
    param: Tensor = field(repr=False, compare=False)
    group: str  # "muon", "adamw" or "adamw_no_decay"
    reason: str
    matrix: str | None = None  # Muon's matrix view (lightning_muon.routing.matrix_view), None for AdamW

    @property
    def use_muon(self) -> bool:
        return self.group == MUON


@dataclass(frozen=True)
class RoutingRules:
    """The options of routing, in one validated, immutable object (:func:`route_parameters`,
    :func:`muon_param_groups` and :func:`lightning_muon.configure_muon` take it, or its fields as keywords).

    Args:
        embedding_names, head_names: fnmatch patterns that mark input embeddings and output heads.
        adamw_names, muon_names: overrides: patterns always routed to AdamW / to Muon.
        structure: also read the module tree (repeated blocks, input stem, output head).
        matrix_rules: ``{pattern: matrix view}``: how Muon sees the matching matrices.
        split_qkv: ``False``, ``True`` (fused q/k/v as three blocks) or ``"per_head"``.
        num_heads: heads of the fused q/k/v projections (default: the modules' own attribute).
        stem: ``"adamw"`` (default) or ``"muon"``: where the input stem goes (the first matrix layer
            before the repeated blocks, or a first convolution; see :func:`route_parameters`).
        grouped_conv: ``"adamw"`` (default, measured: ``benchmarks/routing_choices.py``),
            ``"per_group"`` (Muon on each group's ``(out/G, rest)`` block) or ``"whole"`` (Muon on
            one ``(out, rest)`` matrix), for convs with ``groups > 1`` and more than one input
            channel per group. Depthwise convs always go to AdamW.
        router: ``"adamw"`` (default) or ``"muon"``: a mixture-of-experts router (a weight named like
            ``router_names`` next to a bank of experts).
        router_names: fnmatch patterns of router module names (last component).
        split_gate_up: orthogonalise a fused gate/up projection ``[W_gate; W_up]`` (``gate_up_proj``)
            as two matrices, like the separate ``gate_proj`` and ``up_proj`` of an unfused model.

    Raises:
        ValueError: at construction, a pattern list that is not a list of strings, a malformed
            matrix view, ``split_qkv`` not one of :data:`SPLIT_QKV`, or ``num_heads < 1``.

    Example:
        >>> rules = RoutingRules(adamw_names=["decoder.proj"], split_qkv="per_head")
        >>> rules.adamw_names, rules.split_qkv
        (('decoder.proj',), 'per_head')
        >>> RoutingRules(split_qkv="yes")
        Traceback (most recent call last):
        ...
        ValueError: lightning_muon routing: split_qkv must be one of (False, True, 'per_head'), got 'yes'
    """

    embedding_names: tuple[str, ...] = DEFAULT_EMBEDDING_NAMES
    head_names: tuple[str, ...] = DEFAULT_HEAD_NAMES
    adamw_names: tuple[str, ...] = ()
    muon_names: tuple[str, ...] = ()
    structure: bool = True
    matrix_rules: Mapping[str, str] = field(default_factory=dict)
    split_qkv: bool | str = False
    num_heads: int | None = None
    stem: str = "adamw"
    grouped_conv: str = "adamw"
    router: str = "adamw"
    router_names: tuple[str, ...] = DEFAULT_ROUTER_NAMES
    split_gate_up: bool = True

    def __post_init__(self) -> None:
        where = "lightning_muon routing"
        for name in ("embedding_names", "head_names", "adamw_names", "muon_names", "router_names"):
            object.__setattr__(self, name, check_patterns(getattr(self, name), name, where))
        check_bool(self.structure, "structure", where)
        check_bool(self.split_gate_up, "split_gate_up", where)
        check_choice(self.stem, "stem", where, STEMS)
        check_choice(self.grouped_conv, "grouped_conv", where, GROUPED_CONVS)
        check_choice(self.router, "router", where, ROUTERS)
        rules = dict(self.matrix_rules or {})
        for pattern, spec in rules.items():
            if not isinstance(pattern, str):
                raise ValueError(f"{where}: matrix_rules keys must be fnmatch patterns (strings), got {pattern!r}")
            MatrixView.parse(spec)  # a malformed view fails here, naming it
        object.__setattr__(self, "matrix_rules", MappingProxyType(rules))
        check_choice(self.split_qkv, "split_qkv", where, SPLIT_QKV)
        if self.num_heads is not None:
            check_positive_int(self.num_heads, "num_heads", where)

    @classmethod
    def of(cls, rules: RoutingRules | None = None, **options: Any) -> RoutingRules:
        """``rules`` (default: the defaults) with the fields in ``options`` replaced."""
        base = rules if rules is not None else cls()
        unknown = sorted(set(options) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(
                f"lightning_muon routing: unknown routing option(s) {unknown}; the options are "
                f"{[f.name for f in dataclasses.fields(cls)]}"
            )
        return dataclasses.replace(base, **options) if options else base

    def __reduce__(self):  # picklable despite the read-only mapping (a LightningModule's hparams may hold one)
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields["matrix_rules"] = dict(self.matrix_rules)
        return (_rebuild_rules, (fields,))


def _rebuild_rules(fields: dict) -> RoutingRules:
    return RoutingRules(**fields)


def _route_one(
    names: Sequence[str],
    param: Tensor,
    module: nn.Module | None,
    rules: RoutingRules,
    *,
    head_verdict: tuple[str, str] | None = None,
    role: str | None = None,
    modules_known: bool = False,
    layer_verdict: tuple[str, str] | None = None,
) -> Route:
    name = names[0]
    aliases = f" (tied: {', '.join(names[1:])})" if len(names) > 1 else ""
    not_matrix = why_not_muon(param)
    for n in names:
        if pattern := matching_pattern(n, rules.adamw_names):
            group = ADAMW_NO_DECAY if param.ndim < 2 else ADAMW
            return Route(name, param, group, f"adamw_names pattern {pattern!r}{aliases}")
    for n in names:
        if pattern := matching_pattern(n, rules.muon_names):
            if not_matrix:
                raise ValueError(
                    f"lightning_muon routing: parameter {n!r} of shape {tuple(param.shape)} matched "
                    f"muon_names pattern {pattern!r} but cannot be a Muon matrix: {not_matrix}. "
                    "Remove it from muon_names."
                )
            return Route(name, param, MUON, f"muon_names pattern {pattern!r}{aliases}")
    if not_matrix:
        return Route(name, param, ADAMW_NO_DECAY if param.ndim < 2 else ADAMW, not_matrix + aliases)
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return Route(name, param, ADAMW, f"embedding ({type(module).__name__}){aliases}")
    for n in names:
        if pattern := matching_pattern(n, rules.embedding_names):
            return Route(name, param, ADAMW, f"embedding (name matches {pattern!r}){aliases}")
    if layer_verdict is not None and layer_verdict[0] == ADAMW:
        return Route(name, param, ADAMW, layer_verdict[1] + aliases)
    if head_verdict is None:
        head_verdict = next((("head", p) for n in names if (p := matching_pattern(n, rules.head_names))), None)
    if head_verdict is not None:
        kind, pattern = head_verdict
        if kind == "head":
            return Route(name, param, ADAMW, f"output head (name matches {pattern!r}){aliases}")
        return Route(
            name,
            param,
            MUON,
            f"hidden matrix inside the head {pattern!r} (an nn.Sequential whose last layer is the output){aliases}",
        )
    if role is not None:
        return Route(name, param, ADAMW, role + aliases)
    if layer_verdict is not None:
        return Route(name, param, MUON, layer_verdict[1] + aliases, "matrix")
    if (
        param.ndim > 2 and not modules_known
    ):  # without module information: flattened (route_parameters decides conv vs stack)
        view = matrix_view_for(tuple(param.shape), None)
        return Route(name, param, MUON, f"hidden {param.ndim}-D tensor: {view.describe(param.shape)}", str(view))
    return Route(name, param, MUON, "hidden matrix", "matrix")


def _heads_near(name: str, modules: Mapping[str, nn.Module]) -> int | None:
    """``num_heads`` / ``n_head`` of the nearest module enclosing parameter ``name`` that has one."""
    parts = name.split(".")[:-1]
    for i in range(len(parts), -1, -1):
        mod = modules.get(".".join(parts[:i]))
        for attr in ("num_heads", "n_head", "num_attention_heads"):
            value = getattr(mod, attr, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _layer_verdict(
    module_name: str | None,
    module: nn.Module | None,
    attr: str | None,
    param: Tensor,
    modules: Mapping[str, nn.Module],
    rules: RoutingRules,
) -> tuple[str, str] | None:
    """``(group, reason)`` when the kind of layer decides (depthwise and grouped convs, MoE routers)."""
    if attr == "weight" and is_depthwise_conv(module):
        return ADAMW, (
            f"depthwise conv (groups={module.groups}, one input channel per group): separate "
            f"{'x'.join(map(str, module.kernel_size))} filters, not a map between feature spaces"
        )
    if attr == "weight" and conv_groups(module) > 1 and rules.grouped_conv == "adamw":
        return ADAMW, f"grouped conv (groups={module.groups}; grouped_conv='adamw')"
    if module_name is not None and param.ndim == 2 and is_moe_router(module_name, modules, rules.router_names):
        what = f"MoE router ({param.shape[0]} expert logits; router={rules.router!r})"
        return (ADAMW, what) if rules.router == "adamw" else (MUON, what)
    return None


def _choose_view(
    names: Sequence[str],
    param: Tensor,
    owner: tuple[nn.Module | None, str | None],
    modules: Mapping[str, nn.Module],
    rules: RoutingRules,
    declared: Mapping[str, tuple[str, str]],
    named_params: Mapping[str, Tensor] | None = None,
) -> tuple[MatrixView, str | None]:
    """The matrix view of a Muon parameter and what chose it (None: the default for its kind)."""
    shape = tuple(param.shape)
    module, attr = owner
    transposed = attr == "weight" and is_transposed_linear(module)
    seen = (shape[1], shape[0]) if transposed else shape  # the (out, in) map of a weight stored (in, out)
    split_qkv = rules.split_qkv
    for n in names:
        if pattern := matching_pattern(n, list(rules.matrix_rules)):
            view = MatrixView.parse(rules.matrix_rules[pattern])
            if reason := view.why_not(shape):
                raise ValueError(
                    f"lightning_muon routing: matrix_rules pattern {pattern!r} gives parameter {n!r} of shape "
                    f"{shape} the view {str(view)!r}, but {reason}"
                )
            return view, f"matrix_rules {pattern!r}"
    if split_qkv and param.ndim == 2:
        spec, why = None, None
        for n in names:
            if n in declared:
                spec, why = declared[n]
                break
        heads = rules.num_heads
        if spec is None and isinstance(module, nn.MultiheadAttention) and attr == "in_proj_weight":
            heads, why = heads or module.num_heads, "split_qkv, nn.MultiheadAttention"
        elif spec is None and any(matching_pattern(n, DEFAULT_QKV_NAMES) for n in names) and seen[0] == 3 * seen[1]:
            heads, why = heads or _heads_near(names[0], modules), "split_qkv"
        if why is not None:
            view = MatrixView.parse(spec or (f"split=3,heads={heads}" if heads else "split=3"))
            if transposed:
                view, why = dataclasses.replace(view, transposed=True), why + ", Hugging Face Conv1D"
            if split_qkv == "per_head":
                if not view.heads:
                    raise ValueError(
                        f"lightning_muon routing: split_qkv='per_head' for {names[0]!r} needs its number of heads; "
                        "pass num_heads=H (or give the module a num_heads attribute)"
                    )
                view = dataclasses.replace(view, per_head=True)
            if reason := view.why_not(shape):
                raise ValueError(f"lightning_muon routing: split_qkv for {names[0]!r} of shape {shape}: {reason}")
            return view, why
    if transposed:
        return MatrixView("matrix", transposed=True), "Hugging Face Conv1D"
    if isinstance(module, nn.modules.conv._ConvNd) and attr == "weight":
        rule = "conv_transpose" if isinstance(module, nn.modules.conv._ConvTransposeNd) else "conv"
        groups = conv_groups(module)
        if groups > 1 and rules.grouped_conv == "per_group":
            return MatrixView(rule, parts=groups), f"groups={groups}, grouped_conv='per_group'"
        return MatrixView(rule), (f"groups={groups}, grouped_conv='whole'" if groups > 1 else None)
    if rules.split_gate_up and named_params is not None and fused_gate_up(names[0], param, named_params):
        view = MatrixView("stack", parts=2) if param.ndim > 2 else MatrixView("split", parts=2)
        if view.why_not(shape) is None:
            return view, "split_gate_up: [W_gate; W_up]"
    if param.ndim > 2:
        stack = MatrixView("stack")
        return (stack, None) if stack.why_not(shape) is None else (MatrixView("flatten"), None)
    return MatrixView("matrix"), None


def _with_view(route: Route, view: MatrixView, why: str | None) -> Route:
    """``route`` with its matrix view recorded and said in the reason (2-D "matrix" routes stay as they are)."""
    if view.rule == "matrix" and why is None:
        return dataclasses.replace(route, matrix="matrix")
    reason = route.reason
    if reason.startswith("hidden matrix") and view.rule in ("conv", "conv_transpose"):
        reason = "hidden conv kernel" + reason[len("hidden matrix") :]
    head, _, aliases = reason.partition(" (tied: ")
    text = f"{head}: {view.describe(route.param.shape)}" + (f" ({why})" if why else "")
    return dataclasses.replace(route, matrix=str(view), reason=text + (f" (tied: {aliases}" if aliases else ""))


def _warn_suspicious(routes: list[Route], head_found: bool, has_modules: bool, rules: RoutingRules) -> None:
    if has_modules and not head_found and any(r.use_muon for r in routes):
        last = next((r.name for r in reversed(routes) if r.use_muon), "")
        warnings.warn(
            "lightning_muon routing: no output head or classifier was recognised, neither by name "
            f"(head_names {rules.head_names}) nor by structure (the last matrix layer outside the repeated "
            "blocks), so if the model has one it is trained by Muon. Name it: "
            f"muon_param_groups(model, adamw_names=[{last.rsplit('.', 1)[0] or last!r}]) (the last Muon "
            "matrix here; any parameter or module name works), and check with routing_table(model).",
            stacklevel=3,
        )
    for r in routes:
        if r.use_muon and r.param.ndim == 2 and not r.reason.startswith("muon_names"):  # 2-D: conv kernels never warn
            rows, cols = r.param.shape
            if max(rows, cols) >= 16 * min(rows, cols) and max(rows, cols) >= 1024:
                warnings.warn(
                    f"lightning_muon: {r.name} ({rows} x {cols}) is routed to Muon ({r.reason}) but its shape "
                    "looks like an embedding or output head (one side >= 16x the other). If it is "
                    f"one, pass adamw_names=[{r.name!r}] (to muon_param_groups or configure_muon); if it is "
                    f"a hidden matrix, muon_names=[{r.name!r}] keeps it on Muon without this warning.",
                    stacklevel=3,
                )


def route_parameters(
    module: nn.Module, rules: RoutingRules | None = None, *, warn: bool = True, **options: Any
) -> list[Route]:
    """Route every trainable parameter of ``module`` (frozen ones are left out).

    ``rules`` (a :class:`RoutingRules`) holds the options; ``options`` are its fields given as
    keywords (``adamw_names=[...]``, ``split_qkv=True``, ...), replacing those of ``rules``. All of
    them are validated before anything is routed. ``warn``: warn when no output head is found or a
    Muon matrix looks like an embedding.

    Rules, first match wins:

    1. ``adamw_names`` / ``muon_names`` overrides (fnmatch patterns on the dotted name, any of
       its components, or a module prefix such as ``"decoder.proj"``);
    2. tensors that are not matrices (see :func:`why_not_muon`) to AdamW, without weight decay
       when 1-D;
    3. ``nn.Embedding`` weights and names matching ``embedding_names`` to AdamW; then depthwise conv
       kernels (one input channel per group) to AdamW, grouped ones too unless ``grouped_conv``
       is ``"per_group"`` or ``"whole"``, and mixture-of-experts routers (a weight of a module named like
       ``router_names`` whose parent holds ``experts``) to AdamW or Muon as ``router`` says
       (:mod:`lightning_muon.routing.layers`);
    4. names matching ``head_names`` to AdamW (a head tied to the embedding is one tensor, matched
       through either name); when the match is an ``nn.Sequential`` of several layers (VGG's
       ``classifier``), only its last layer is the output head, the earlier ones are hidden;
    5. with ``structure=True``, what the module tree says where names do not settle it. A
       *repeated block* holds two or more matrix layers and recurs in the model (same class; plain
       containers: identical structure): ResNet's ``BasicBlock``, a transformer layer. Then

       * **output head**: when no name matched, the last matrix layer outside the repeated blocks
         (ResNet's and RegNet's ``fc``);
       * **auxiliary heads**: the last layer of another top-level branch, of the head's kind and
         output size (GoogLeNet's ``aux1.fc2``, Inception's ``AuxLogits.fc``);
       * **input stem**: the first matrix layer when repeated blocks follow it (ResNet's
         ``conv1``) or when it is a convolution (VGG's ``features.0``), to AdamW as Keller
         Jordan keeps the first layer off Muon (``stem="muon"``: to Muon). A flat MLP's first
         ``Linear`` stays on Muon.

       A model with a single matrix layer has no head, stem or hidden layer to tell apart;

    6. everything else, conv kernels included, to Muon ("hidden matrix").

    Each Muon parameter also gets a matrix view (``Route.matrix``, see
    :mod:`lightning_muon.routing.matrix_view`; the reason says it unless it is a plain 2-D matrix), first
    match wins:

    1. ``matrix_rules``: ``{pattern: view}``, e.g. ``{"experts.*": "stack", "stem.weight": "conv",
       "blocks.*.attn.qkv": "split=3,heads=8,per_head"}`` (patterns as for ``adamw_names``);
    2. with ``split_qkv=True`` (three ``(d, d)`` blocks) or ``"per_head"`` (``3 H`` blocks
       ``(head_dim, d)``): ``nn.MultiheadAttention.in_proj_weight``, a layout a module declares in
       a ``muon_qkv_layout`` attribute (``{"c_attn.weight": "split=3,heads=4,order=heads"}``,
       names relative to that module), and 2-D ``(3d, d)`` weights named like
       :data:`DEFAULT_QKV_NAMES` (rows ``(q/k/v, head, head_dim)``). Heads: ``num_heads``, else the
       nearest enclosing module's ``num_heads``/``n_head``;
    3. the ``weight`` of a Hugging Face ``Conv1D`` (stored ``(in, out)``): ``"matrix,transposed"``
       (with ``split_qkv``, its ``c_attn`` is split along the stored columns);
    4. the ``weight`` of an ``nn.Conv*``: ``"conv"`` ``(out, rest)``; of an ``nn.ConvTranspose*``:
       ``"conv_transpose"`` ``(in, rest)``, scaled as the ``(rest, in)`` map it applies; with
       ``groups > 1`` one matrix per group (``"conv,groups=G"``, ``grouped_conv="per_group"``) or the
       whole kernel (``grouped_conv="whole"``);
    5. a fused gate/up projection (``gate_up_proj`` next to its ``down_proj``) with
       ``split_gate_up=True``: ``"stack,split=2"`` (``"split=2"`` for 2-D);
    6. any other tensor with more than 2 dims: ``"stack"``, each trailing 2-D slice on its own
       (``"flatten"`` when the slices are vector-like);
    7. a 2-D weight: ``"matrix"``.

    Example:
        >>> import torch.nn as nn
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.conv1 = nn.Conv2d(3, 8, 3)
        ...         block = lambda: nn.Sequential(nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3))  # noqa: E731
        ...         self.blocks = nn.Sequential(block(), block())
        ...         self.fc = nn.Linear(8, 10)
        >>> for r in route_parameters(Net()):
        ...     if r.name.endswith("weight"):
        ...         print(f"{r.name:18} {r.group:6} {r.reason}")
        conv1.weight       adamw  input stem (first layer, before the repeated blocks)
        blocks.0.0.weight  muon   hidden conv kernel: conv (out, rest) 8 x 72
        blocks.0.1.weight  muon   hidden conv kernel: conv (out, rest) 8 x 72
        blocks.1.0.weight  muon   hidden conv kernel: conv (out, rest) 8 x 72
        blocks.1.1.weight  muon   hidden conv kernel: conv (out, rest) 8 x 72
        fc.weight          adamw  output head (last layer outside the repeated blocks)
    """
    rules = RoutingRules.of(rules, **options)
    owner: dict[int, nn.Module] = {}
    owner_name: dict[int, str] = {}
    attr: dict[int, str] = {}
    for mname, mod in module.named_modules():
        for a, p in mod.named_parameters(recurse=False):
            owner.setdefault(id(p), mod)
            owner_name.setdefault(id(p), mname)
            attr.setdefault(id(p), a)
    aliases: dict[int, list[str]] = {}
    params: dict[int, Tensor] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
        params[id(p)] = p
    trainable = [key for key in aliases if params[key].requires_grad]
    for pattern in rules.matrix_rules:
        if not any(matching_pattern(n, [pattern]) for key in trainable for n in aliases[key]):
            names = [aliases[key][0] for key in trainable]
            raise ValueError(
                f"lightning_muon routing: matrix_rules pattern {pattern!r} matches no trainable parameter; "
                f"patterns match a dotted name, a component or a module prefix, e.g. {names[:3]}"
            )
    tree = analyse(module) if rules.structure else None
    verdicts, roles, head_found = _head_and_roles(tree, trainable, aliases, rules)
    modules = tree.modules if tree else dict(module.named_modules())
    routes: list[Route] = []
    for key in trainable:
        layer = tree.owner_layer.get(key) if tree else None
        routes.append(
            _route_one(
                aliases[key],
                params[key],
                owner.get(key),
                rules,
                head_verdict=verdicts.get(key),
                role=roles.get(layer) if layer is not None else None,
                modules_known=True,
                layer_verdict=_layer_verdict(
                    owner_name.get(key), owner.get(key), attr.get(key), params[key], modules, rules
                ),
            )
        )
    declared: dict[str, tuple[str, str]] = {}
    for mname, mod in modules.items():
        layout = getattr(mod, "muon_qkv_layout", None)
        if isinstance(layout, Mapping):
            for rel, spec in layout.items():
                declared[f"{mname}.{rel}" if mname else rel] = (spec, f"split_qkv, layout from {type(mod).__name__}")
    named = {n: params[key] for key in trainable for n in aliases[key]}
    for i, (key, r) in enumerate(zip(trainable, routes)):
        if r.use_muon:
            owned = (owner.get(key), attr.get(key))
            view, why = _choose_view(aliases[key], r.param, owned, modules, rules, declared, named)
            routes[i] = _with_view(r, view, why)
    head_found = head_found or any(matching_pattern(n, rules.adamw_names) for key in aliases for n in aliases[key])
    if warn:
        _warn_suspicious(routes, head_found, has_modules=True, rules=rules)
    return routes


def _head_and_roles(
    tree: Structure | None, trainable: list[int], aliases: dict[int, list[str]], rules: RoutingRules
) -> tuple[dict[int, tuple[str, str]], dict[str, str], bool]:
    """Head verdicts by name (per parameter), structural roles (per layer: stem, head, aux heads),
    and whether an output head was found. The structural head is only sought where no name matched."""
    verdicts: dict[int, tuple[str, str]] = {}
    named_head_layer = None
    for key in trainable:
        layer = tree.owner_layer.get(key) if tree else None
        for n in aliases[key]:
            if tree is not None:
                verdict = head_by_name(n, layer, tree, rules.head_names)
            else:
                verdict = ("head", pat) if (pat := matching_pattern(n, rules.head_names)) else None
            if verdict:
                verdicts[key] = verdict
                if verdict[0] == "head" and named_head_layer is None and layer is not None:
                    named_head_layer = layer
                break
    head_found = any(v[0] == "head" for v in verdicts.values())
    roles: dict[str, str] = {}
    if tree is not None:
        if tree.stem and rules.stem == "adamw":
            roles[tree.stem[0]] = tree.stem[1]
        head_layer = named_head_layer
        if not head_found and tree.head:
            head_layer = tree.head[0]
            roles[head_layer] = tree.head[1]
            head_found = True
        if head_layer is not None:
            roles.update(find_aux_heads(tree, head_layer))
    return verdicts, roles, head_found


def route_named_parameters(
    named_params: Iterable[tuple[str, Tensor]], rules: RoutingRules | None = None, **options: Any
) -> list[Route]:
    """Route ``(name, tensor)`` pairs by name and shape alone (no module types are known); of the
    rules, the name patterns apply."""
    rules = RoutingRules.of(rules, **options)
    return [_route_one([name], p, None, rules) for name, p in named_params]


def groups_from_routes(routes: Iterable[Route]) -> list[dict]:
    """Param-group dicts (named params, ``name`` and ``use_muon`` set) for non-empty groups; the Muon
    group's ``matrix_views`` holds ``{name: view}`` for the views that are not the default
    (``"matrix"`` for 2-D, ``"flatten"`` above: what :class:`lightning_muon.Muon` assumes without them)."""
    by_group: dict[str, list[tuple[str, Tensor]]] = {MUON: [], ADAMW: [], ADAMW_NO_DECAY: []}
    views = {}
    for r in routes:
        by_group[r.group].append((r.name, r.param))
        if r.use_muon and r.matrix is not None and r.matrix != str(matrix_view_for(tuple(r.param.shape), None)):
            views[r.name] = r.matrix
    groups = []
    for name, params in by_group.items():
        if not params:
            continue
        group: dict = {"name": name, "params": params, "use_muon": name == MUON}
        if name == MUON:
            group["matrix_views"] = views
        if name == ADAMW_NO_DECAY:
            group["weight_decay"] = 0.0
        groups.append(group)
    return groups


def muon_param_groups(
    module: nn.Module, rules: RoutingRules | None = None, *, verbose: bool = False, **options: Any
) -> list[dict]:
    """Param groups for :class:`lightning_muon.Muon`: ``muon``, ``adamw``, ``adamw_no_decay``.

    Each group has a ``name`` (LearningRateMonitor logs groups apart by it), ``use_muon`` and
    named params. Gains and biases go to ``adamw_no_decay`` (weight decay 0). ``rules`` (a
    :class:`RoutingRules`) or its fields as keywords choose the routing, and with ``matrix_rules``,
    ``split_qkv`` and ``num_heads`` how Muon sees each matrix (conv kernel, stack, split blocks;
    stored in the Muon group's ``matrix_views``). See :func:`route_parameters` for the rules and
    :func:`routing_table` to print them; ``verbose`` prints it.

    Example:
        >>> from lightning_muon import Muon
        >>> model = nn.ModuleDict({"encoder": nn.Linear(8, 8), "decoder": nn.ModuleDict({"proj": nn.Linear(8, 8)}),
        ...                        "out": nn.Linear(8, 3)})
        >>> groups = muon_param_groups(model, adamw_names=["decoder.proj"], verbose=True)
        parameter            shape  group           reason
        ---------------------...
        encoder.weight       8x8    muon            hidden matrix
        encoder.bias         8      adamw_no_decay  1-D (gain or bias)
        decoder.proj.weight  8x8    adamw           adamw_names pattern 'decoder.proj'
        decoder.proj.bias    8      adamw_no_decay  adamw_names pattern 'decoder.proj'
        out.weight           3x8    adamw           output head (last layer outside the repeated blocks)
        out.bias             3      adamw_no_decay  1-D (gain or bias)
        >>> optimizer = Muon(groups, lr=0.02)
    """
    routes = route_parameters(module, rules, **options)
    if verbose:
        print(routing_table(routes))
    return groups_from_routes(routes)


def routing_table(routes: Iterable[Route] | nn.Module) -> str:
    """A plain-text table: parameter, shape, group and the reason, one row per parameter."""
    if isinstance(routes, nn.Module):
        routes = route_parameters(routes, warn=False)
    rows = [("parameter", "shape", "group", "reason")]
    rows += [(r.name, "x".join(map(str, r.param.shape)) or "scalar", r.group, r.reason) for r in routes]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3] for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
