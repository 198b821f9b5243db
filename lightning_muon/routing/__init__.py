"""Which parameters Muon updates, and how it sees each one as matrices.

* :mod:`.rules`: the routing decision per parameter (:func:`route_parameters`,
  :func:`muon_param_groups`, :func:`routing_table`) and why;
* :mod:`.tree`: what the module tree says (repeated blocks, input stem, output head);
* :mod:`.patterns`: :func:`why_not_muon` and the name patterns every rule reads;
* :mod:`.layers`: third-party layer conventions (Hugging Face's ``Conv1D`` stored ``(in, out)``,
  grouped and depthwise convs, MoE routers, fused gate/up experts), recognised without importing them;
* :mod:`.matrix_view`: :class:`MatrixView`, the matrices a parameter is seen as (one matrix, a
  flattened conv kernel, a stack, split q/k/v blocks), used by the optimizer, the monitors and QK-clip.
"""

from .layers import (
    DEFAULT_GATE_UP_NAMES,
    DEFAULT_ROUTER_NAMES,
    conv_groups,
    fused_gate_up,
    is_depthwise_conv,
    is_moe_router,
    is_transposed_linear,
)
from .matrix_view import MATRIX_RULES, MatrixView, matrix_shape, matrix_view, matrix_view_for
from .patterns import matching_pattern, why_not_muon
from .rules import (
    ADAMW,
    ADAMW_NO_DECAY,
    DEFAULT_EMBEDDING_NAMES,
    DEFAULT_HEAD_NAMES,
    DEFAULT_QKV_NAMES,
    GROUPED_CONVS,
    MUON,
    ROUTERS,
    SPLIT_QKV,
    STEMS,
    Route,
    RoutingRules,
    groups_from_routes,
    muon_param_groups,
    route_named_parameters,
    route_parameters,
    routing_table,
)

__all__ = [
    "ADAMW",
    "ADAMW_NO_DECAY",
    "DEFAULT_EMBEDDING_NAMES",
    "DEFAULT_GATE_UP_NAMES",
    "DEFAULT_ROUTER_NAMES",
    "GROUPED_CONVS",
    "ROUTERS",
    "STEMS",
    "conv_groups",
    "fused_gate_up",
    "is_depthwise_conv",
    "is_moe_router",
    "is_transposed_linear",
    "DEFAULT_HEAD_NAMES",
    "DEFAULT_QKV_NAMES",
    "MATRIX_RULES",
    "MUON",
    "MatrixView",
    "Route",
    "RoutingRules",
    "SPLIT_QKV",
    "groups_from_routes",
    "matching_pattern",
    "matrix_shape",
    "matrix_view",
    "matrix_view_for",
    "muon_param_groups",
    "route_named_parameters",
    "route_parameters",
    "routing_table",
    "why_not_muon",
]
