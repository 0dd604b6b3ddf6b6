"""Routing analyses: what the routers of the thinker's and talker's MoE layers chose, as tidy tables.

Every function is `fn(trace, *, component=None, layer=None, ...) -> DataFrame`: it turns `trace` (a
Trace, a dict of tables, an object with `.routing`/`.tokens` attributes, a trace store, or a RoutingData
such as `prepare(trace)`, to run many analyses on one preparation) into `RoutingData.of(trace)` once
(data.py) and computes on that; a store over STORE_CHUNK_ROWS routing rows a few layers at a time.
`component` and `layer` select (one value or a list); None means all. Label columns (component,
modality, phase, text) are pandas Categoricals. load.py: load, specialization, confidence; paths.py:
co-activation, repetition, layer transitions, token paths, agreement of two runs.

Notation used in the docstrings: a layer routes N tokens, each to a set S of k experts out of E; an
*assignment* is one (token, expert in S) pair, so a layer makes N·k assignments.
"""

from __future__ import annotations

import pandas as pd

from .._source import layer_chunks
from .data import ComponentRouting, RoutingData, prepare
from .load import (
    expert_load,
    load_balance,
    modality_experts,
    modality_nmi,
    modality_specialization,
    router_confidence,
    vocabulary_specialization,
)
from .paths import coactivation, layer_transitions, repetition, routing_agreement, token_paths

ROUTING_ANALYSES = {
    "expert_load": expert_load,
    "load_balance": load_balance,
    "modality_specialization": modality_specialization,
    "modality_nmi": modality_nmi,
    "modality_experts": modality_experts,
    "coactivation": coactivation,
    "repetition": repetition,
    "layer_transitions": layer_transitions,
    "token_paths": token_paths,
    "vocabulary_specialization": vocabulary_specialization,
    "router_confidence": router_confidence,
}

__all__ = [*ROUTING_ANALYSES, "ROUTING_ANALYSES", "routing_agreement", "routing_suite", "prepare"]
__all__ += ["RoutingData", "ComponentRouting"]


def routing_suite(trace, *, component=None, layer=None) -> dict[str, pd.DataFrame]:
    """Every routing analysis of one trace (or store query result), keyed by the function's name.

    The routing is prepared once (see `prepare`) and shared by all analyses; a trace store larger than
    `STORE_CHUNK_ROWS` routing rows is read by each analysis a few layers at a time instead.
    """
    chunked = len(layer_chunks(trace, component=component, layer=layer)) > 1  # too large to prepare at once
    data = trace if chunked else RoutingData.of(trace, component=component, layer=layer)
    return {name: fn(data, component=component, layer=layer) for name, fn in ROUTING_ANALYSES.items()}
