"""RoutingData: the routing of a trace or a store as dense arrays, made once, read by every routing analysis.

`RoutingData.of(source, component=, layer=, phase=)` is the one way in (from a Trace, a dict of tables,
an object with table attributes, a trace store or a RoutingData). It turns the long routing table (one
row per token, layer and rank) into dense arrays per component: `experts[layer, token, rank]` (int16,
-1 where absent) and `weights` alike, with per-token modality, phase, token id and text. Every routing
statistic is then a `np.bincount` over integer codes or an elementwise comparison of those arrays.

Columns of the routing table beyond the schema's (for instance a store's sample id) that the tokens
table shares are taken as part of each token's identity: rows of different traces are never merged,
and "consecutive tokens" means pos and pos + 1 of the same trace.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from ...errors import TraceError
from ...trace import COLUMNS, COMPONENTS, MODALITIES, PHASES
from .._source import as_list, equals, routing_tables

ROUTING_COLUMNS = tuple(COLUMNS["routing"])


@dataclass(frozen=True, eq=False)
class ComponentRouting:
    """One component's routing as dense arrays (see the module docstring).

    experts [L, N, K] int16 (-1 absent); weights [L, N, K] float16; layers [L] the layer numbers;
    pos/sequence [N] each token's pos and trace code; modality/phase [N] int8 codes into
    MODALITIES/PHASES (-1 unknown); token_id [N] int64; text [N] object; entropy/topk_mass [L, N]
    float32 from router_stats (NaN absent) or None; num_experts E; top_k K; complete: no absent cell.
    """

    component: str
    layers: np.ndarray
    experts: np.ndarray
    weights: np.ndarray
    pos: np.ndarray
    sequence: np.ndarray
    modality: np.ndarray
    phase: np.ndarray
    token_id: np.ndarray
    text: np.ndarray
    num_experts: int
    top_k: int
    complete: bool
    entropy: np.ndarray | None = None
    topk_mass: np.ndarray | None = None
    logits: pd.DataFrame | None = None
    cache: dict = field(default_factory=dict, repr=False)

    @property
    def num_tokens(self) -> int:
        return len(self.pos)

    def cached(self, key, compute):
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]

    def consecutive(self) -> np.ndarray:
        """[N-1] bool: token i+1 directly follows token i in the same sequence."""
        return self.cached("consecutive", lambda: (np.diff(self.pos) == 1) & (np.diff(self.sequence) == 0))

    def select_layers(self, wanted: list[int]) -> ComponentRouting:
        index = np.flatnonzero(np.isin(self.layers, wanted))
        if len(index) == len(self.layers):
            return self
        return replace(
            self,
            layers=self.layers[index],
            experts=self.experts[index],
            weights=self.weights[index],
            entropy=None if self.entropy is None else self.entropy[index],
            topk_mass=None if self.topk_mass is None else self.topk_mass[index],
            complete=bool(self.complete or (self.experts[index] >= 0).all()),
            cache={},
        )

    def text_codes(self) -> tuple[np.ndarray, pd.Index]:
        """Each token's text as a code into the distinct texts (for categorical columns)."""
        return self.cached("text_codes", lambda: pd.factorize(pd.Series(self.text, dtype=object)))


@dataclass(frozen=True, eq=False)
class RoutingData:
    """Routing prepared once for many analyses: one ComponentRouting per component with routing (in
    schema order), and the trace's meta."""

    components: tuple[ComponentRouting, ...]
    meta: dict

    @classmethod
    def of(cls, source, *, component=None, layer=None, phase=None) -> RoutingData:
        """The dense routing of `source` (see the module docstring), once, for any number of analyses
        (`routing_suite` prepares once); only `component` and `layer` (one value or a list each; None:
        all). `phase` ("prefill" or "decode") keeps only the tokens of that phase, so any analysis can
        compare how the prompt and the reply are routed. A RoutingData is selected further, never re-read
        (its phase was chosen when it was made). `prepare` is this function."""
        if isinstance(source, RoutingData):
            if phase is not None:
                raise TraceError(
                    "choose the phase when preparing from the trace; this RoutingData is already prepared"
                )
            return source.select(component, layer)
        if phase is not None and phase not in PHASES:
            raise TraceError(f"unknown phase {phase!r}; the phases are {', '.join(PHASES)}")
        tables = routing_tables(source, component=component, layer=layer, phase=phase)
        return _dense(tables, as_list(component), as_list(layer), phase)

    def select(self, component=None, layer=None) -> RoutingData:
        """The same routing, only `component` and `layer` (one value or a list each; None: all)."""
        wanted, layers = as_list(component), as_list(layer)
        if wanted is None and layers is None:
            return self
        chosen = []
        for part in self.components:
            if wanted is not None and part.component not in wanted:
                continue
            chosen.append(part if layers is None else part.select_layers(layers))
        if wanted is not None and not chosen and set(wanted) - {p.component for p in self.components}:
            raise _no_routing(wanted, layers, [p.component for p in self.components])
        return RoutingData(tuple(chosen), self.meta)


prepare = RoutingData.of  # the name notebooks know: `expert_load(prepare(trace, phase="decode"))`


def _dense(tables: dict, wanted: list | None, wanted_layers: list | None, phase) -> RoutingData:
    """RoutingData from the long tables (routing, tokens, router_stats, router_logits, meta)."""
    routing, tokens, stats, logits = (
        tables[n] for n in ("routing", "tokens", "router_stats", "router_logits")
    )
    info = tables["meta"]
    if phase is not None:
        routing = routing[equals(routing["phase"], phase)]
        stats = stats[equals(stats["phase"], phase)] if "phase" in stats else stats
        if len(logits) and "phase" not in logits:  # logits have no phase column: keep the routed positions
            keys = routing[["component", "pos"]].drop_duplicates()
            logits = logits.merge(keys, on=["component", "pos"], how="inner")
    if len(routing) == 0:
        return RoutingData((), info)
    extra = [c for c in routing.columns if c not in ROUTING_COLUMNS and c in tokens.columns]
    layer_rows = routing["layer"].to_numpy()
    pos_rows = routing["pos"].to_numpy()
    rank_rows = routing["rank"].to_numpy()
    if layer_rows.min() < 0 or pos_rows.min() < 0 or rank_rows.min() < 0:
        raise TraceError("the routing table has negative layer, pos or rank values; it is damaged")
    cells = _cells(layer_rows, pos_rows, rank_rows)
    parts = []
    for name, cell_index in _split(routing["component"], cells.start, wanted):
        part = _component(name, routing, cells, cell_index, tokens, stats, logits, info, extra, wanted_layers)
        if part is not None:
            parts.append(part)
    if wanted is not None and not parts:
        raise _no_routing(wanted, wanted_layers, pd.unique(routing["component"].astype(str)))
    return RoutingData(tuple(parts), info)


def _no_routing(wanted: list, layers: list | None, present) -> TraceError:
    return TraceError(
        f"the trace has no routing of component {wanted} (at layers {layers or 'any'}); components with "
        f"routing: {', '.join(present) or 'none'} (the components are {', '.join(COMPONENTS)})"
    )


@dataclass(frozen=True)
class _Cells:
    """The routing table's rows grouped into cells: runs of ranks 0, 1, ... of one (layer, pos).

    The tracer writes each token-layer's top-k as k consecutive rows, so a cell is usually a block of k
    rows; `blocked` is False when the rows are in another order, and then every row is its own cell.
    """

    start: np.ndarray  # [C] first row of each cell
    length: np.ndarray  # [C] rows in each cell
    layer: np.ndarray  # [C]
    pos: np.ndarray  # [C]
    rank: np.ndarray | None  # [C] rank of each single-row cell (None when blocked)
    blocked: bool


def _cells(layer: np.ndarray, pos: np.ndarray, rank: np.ndarray) -> _Cells:
    n = len(rank)
    opens = np.empty(n, dtype=bool)
    opens[0] = True
    np.equal(rank[1:], 0, out=opens[1:])
    # within a cell the rank goes up by one and layer and pos stay the same: a few passes over small ints
    blocked = bool(
        (opens[1:] | (rank[1:] == rank[:-1] + 1)).all()
        and (opens[1:] | (layer[1:] == layer[:-1])).all()
        and (opens[1:] | (pos[1:] == pos[:-1])).all()
        and rank[0] == 0
    )
    if not blocked:
        start = np.arange(n)
        return _Cells(start, np.ones(n, dtype=np.int64), layer, pos, rank, blocked=False)
    start = np.flatnonzero(opens)
    length = np.diff(start, append=n)
    return _Cells(start, length, layer[start], pos[start], None, blocked=True)


def _split(values: pd.Series, start: np.ndarray, wanted: list | None):
    """(component, indices of its cells) for each component, in schema order.

    Read at the first row of each cell (a cell belongs to one component). A trace is mostly one
    component: one equality test against the first value settles that; only the rest is factorized.
    """
    every_row = len(start) == len(values)
    if isinstance(values.dtype, pd.CategoricalDtype):
        codes = values.cat.codes.to_numpy()
        codes = codes if every_row else codes[start]
        groups = {str(n): np.flatnonzero(codes == i) for i, n in enumerate(values.cat.categories)}
        groups = {n: g for n, g in groups.items() if len(g)}
    else:
        if values.dtype == object:
            array = values.to_numpy()
            array = array if every_row else array[start]
            first = array[0]
            mask = array == first
        else:  # Arrow-backed strings compare fastest through pandas
            sub = values if every_row else values.iloc[start]
            first = sub.iloc[0]
            mask = (sub == first).to_numpy(dtype=bool)
        if mask.all():
            groups = {str(first): None}
        else:
            groups = {str(first): np.flatnonzero(mask)}
            rest = np.flatnonzero(~mask)
            codes, names = pd.factorize(values.iloc[start[rest]])
            for i, n in enumerate(names):
                groups[str(n)] = rest[codes == i]
    order = sorted(groups, key=lambda n: (COMPONENTS.index(n) if n in COMPONENTS else len(COMPONENTS), n))
    for name in order:
        if wanted is None or name in wanted:
            yield name, groups[name]


def _index_of(values: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Position of each of `values` in `present` (both non-empty, small non-negative ints), -1 if absent."""
    lookup = np.full(int(max(values.max(), present.max())) + 1, -1, dtype=np.int64)
    lookup[present] = np.arange(len(present))
    return lookup[values]


def _component(
    name, routing, cells: _Cells, index, tokens, stats, logits, info, extra, wanted_layers
) -> ComponentRouting | None:
    """Dense arrays of one component; `index` selects its cells (None: all)."""

    if wanted_layers is not None:
        keep = np.isin(cells.layer if index is None else cells.layer[index], wanted_layers)
        if not keep.any():
            return None
        if not keep.all():
            index = np.flatnonzero(keep) if index is None else index[keep]

    def pick(values):
        return values if index is None else values[index]

    cell_layer, cell_pos, cell_start = pick(cells.layer), pick(cells.pos), pick(cells.start)
    cell_length = pick(cells.length)
    cell_rank = None if cells.rank is None else pick(cells.rank)
    present_layers = np.flatnonzero(np.bincount(cell_layer.astype(np.intp, copy=False)))
    layer_index = _index_of(cell_layer, present_layers)

    # Token identity: pos, or (trace keys, pos) when the routing carries extra key columns.
    sequence_values = None
    if extra:
        keys = routing[extra].iloc[cell_start]
        sequence_code, sequence_values = pd.factorize(
            keys[extra[0]] if len(extra) == 1 else pd.MultiIndex.from_frame(keys)
        )
        span = int(cell_pos.max()) + 1
        unique_keys, token_index = np.unique(
            sequence_code.astype(np.int64) * span + cell_pos, return_inverse=True
        )
        token_pos = (unique_keys % span).astype(np.int32)
        token_sequence = (unique_keys // span).astype(np.int32)
    else:
        present_pos = np.flatnonzero(np.bincount(cell_pos.astype(np.intp, copy=False)))
        token_index = _index_of(cell_pos, present_pos)
        token_pos = present_pos.astype(np.int32)
        token_sequence = np.zeros(len(present_pos), dtype=np.int32)
    num_layers, num_tokens = len(present_layers), len(token_pos)
    dense_cell = layer_index * num_tokens + token_index

    expert = routing["expert"].to_numpy()
    weight = routing["weight"].to_numpy()
    if cells.blocked:
        top_k = int(cell_length.max())
        regular = bool((cell_length == top_k).all())
        contiguous = regular and (len(cell_start) < 2 or bool((np.diff(cell_start) == top_k).all()))
        if contiguous:
            rows = slice(int(cell_start[0]), int(cell_start[0]) + top_k * len(cell_start))
            cell_experts = expert[rows].reshape(-1, top_k)  # views, no copy
            cell_weights = weight[rows].reshape(-1, top_k)
        else:
            offsets = np.arange(top_k)
            row = cell_start[:, None] + offsets
            inside = offsets < cell_length[:, None]
            row = np.where(inside, row, 0)
            cell_experts = np.where(inside, expert[row], -1)
            cell_weights = np.where(inside, weight[row], 0)
        at = dense_cell
    else:
        top_k = int(cell_rank.max()) + 1
        cell_experts, cell_weights, at = expert[cell_start], weight[cell_start], (dense_cell, cell_rank)
    shape = (num_layers, num_tokens, top_k)
    if cells.blocked and len(dense_cell) == num_layers * num_tokens and (np.diff(dense_cell) == 1).all():
        experts = cell_experts.astype(np.int16, copy=False).reshape(shape)  # already in order
        weights = cell_weights.astype(np.float16, copy=False).reshape(shape)
    else:
        experts = np.full((num_layers * num_tokens, top_k), -1, dtype=np.int16)
        weights = np.zeros((num_layers * num_tokens, top_k), dtype=np.float16)
        experts[at], weights[at] = cell_experts, cell_weights
        experts, weights = experts.reshape(shape), weights.reshape(shape)
    complete = bool((experts >= 0).all())
    part_logits = logits[equals(logits["component"], name)] if len(logits) else None
    num_experts = max(
        int(experts.max()) + 1,
        int(_per_component(info, "num_experts", name) or 0),
        int(part_logits["expert"].max()) + 1 if part_logits is not None and len(part_logits) else 0,
    )

    # Per-token columns from the tokens table (the last row of a pos wins, as in Trace.routing_with_tokens).
    modality = np.full(num_tokens, -1, dtype=np.int8)
    phase = np.full(num_tokens, -1, dtype=np.int8)
    token_id = np.full(num_tokens, -1, dtype=np.int64)
    text = np.full(num_tokens, "", dtype=object)
    toks = tokens[equals(tokens["component"], name)] if len(tokens) else tokens
    if len(toks):
        toks = toks.drop_duplicates([*extra, "pos"], keep="last")
        found_at = _token_rows(toks, extra, sequence_values, token_pos, token_sequence)
        found = found_at >= 0
        modality[found_at[found]] = _category_codes(toks["modality"], MODALITIES)[found]
        phase[found_at[found]] = _category_codes(toks["phase"], PHASES)[found]
        token_id[found_at[found]] = toks["token_id"].to_numpy()[found]
        text[found_at[found]] = toks["text"].to_numpy(dtype=object)[found]
    missing = phase < 0
    if missing.any():
        # Tokens absent from the tokens table: their phase is on their routing rows.
        chosen = np.flatnonzero(np.isin(token_index, np.flatnonzero(missing)))
        phase[token_index[chosen]] = _category_codes(routing["phase"].iloc[cell_start[chosen]], PHASES)

    entropy = topk_mass = None
    part_stats = stats[equals(stats["component"], name)] if len(stats) else stats
    if len(part_stats):
        entropy, topk_mass = _dense_stats(
            part_stats, extra, sequence_values, present_layers, token_pos, token_sequence
        )

    return ComponentRouting(
        component=name,
        layers=present_layers.astype(np.int64),
        experts=experts,
        weights=weights,
        pos=token_pos,
        sequence=token_sequence,
        modality=modality,
        phase=phase,
        token_id=token_id,
        text=text,
        num_experts=num_experts,
        top_k=top_k,
        complete=complete,
        entropy=entropy,
        topk_mass=topk_mass,
        logits=part_logits if part_logits is not None and len(part_logits) else None,
    )


def _token_rows(frame, extra, sequence_values, token_pos, token_sequence) -> np.ndarray:
    """For each row of `frame` (tokens or router_stats), the index of its token in the dense arrays, or -1."""
    pos = frame["pos"].to_numpy().astype(np.int64)
    if extra:
        keys = frame[extra[0]] if len(extra) == 1 else pd.MultiIndex.from_frame(frame[extra])
        sequence = pd.Index(sequence_values).get_indexer(keys).astype(np.int64)
        span = int(max(token_pos.max(), pos.max())) + 1
        wanted = token_sequence.astype(np.int64) * span + token_pos
        key = np.where(sequence >= 0, sequence * span + pos, -1)
        found = np.searchsorted(wanted, key)
        found = np.minimum(found, len(wanted) - 1)
        return np.where((key >= 0) & (wanted[found] == key), found, -1)
    return _index_of(pos, token_pos)


def _dense_stats(stats, extra, sequence_values, layers, token_pos, token_sequence):
    li = _index_of(stats["layer"].to_numpy(), layers)
    ti = _token_rows(stats, extra, sequence_values, token_pos, token_sequence)
    shape = (len(layers), len(token_pos))
    entropy_values = stats["entropy"].to_numpy().astype(np.float32, copy=False)
    mass_values = stats["topk_mass"].to_numpy().astype(np.float32, copy=False)
    cell = li * shape[1] + ti
    if len(cell) == shape[0] * shape[1] and cell[0] == 0 and (np.diff(cell) == 1).all():
        return entropy_values.reshape(shape), mass_values.reshape(shape)  # already dense: views
    ok = (li >= 0) & (ti >= 0)
    entropy = np.full(shape, np.nan, dtype=np.float32)
    topk_mass = np.full(shape, np.nan, dtype=np.float32)
    entropy[li[ok], ti[ok]] = entropy_values[ok]
    topk_mass[li[ok], ti[ok]] = mass_values[ok]
    return entropy, topk_mass


def _per_component(info: dict, key: str, component: str):
    """A per-component value of the trace metadata: meta["components"][component][key] (as the tracer
    writes it), else meta[key] as a {component: value} dict or one value for all; None when absent."""
    components = info.get("components")
    if isinstance(components, Mapping) and isinstance(components.get(component), Mapping):
        if components[component].get(key) is not None:
            return components[component][key]
    value = info.get(key)
    if isinstance(value, Mapping):
        return value.get(component)
    return value


def _category_codes(values: pd.Series, categories) -> np.ndarray:
    """Integer codes of `values` in `categories` (-1 for anything else)."""
    return pd.Categorical(values, categories=list(categories)).codes.astype(np.int8)
