"""RoutingExplorer: tokens × experts per layer, and any token's route through all layers."""

from __future__ import annotations

import html

import ipywidgets as widgets
import plotly.graph_objects as go

from .. import analysis, plots
from ._figures import Explorer, refresh

HEATMAP_HEIGHT = 520  # pixels; the width follows the notebook column
ROUTE_HEIGHT = 360


class RoutingExplorer(Explorer):
    """Explore a trace's routing in a notebook.

    Controls: `component` (thinker / talker), `layer` (a slider over the recorded layers). `figure` is
    the routing heatmap of that layer (click a token to select it); `route` shows the selected token's
    experts through every layer; `info` describes it. Driving it from Python keeps everything in sync:

        explorer = RoutingExplorer(trace)
        explorer.layer.value = 3        # the heatmap shows layer 3
        explorer.select(42)             # the route figure shows pos 42's path
    """

    def __init__(
        self, trace, *, component: str | None = None, layer: int | None = None, pos: int | None = None
    ):
        self.data = analysis.prepare(trace)
        if not self.data.components:
            raise ValueError("the trace has no routing to explore; trace with routing captured")
        self._layers = {p.component: [int(x) for x in p.layers] for p in self.data.components}
        self._experts = {p.component: p.num_experts for p in self.data.components}
        self._paths: dict = {}
        names = list(self._layers)
        component = component if component in self._layers else names[0]
        self.component = widgets.ToggleButtons(options=names, value=component, description="component")
        layers = self._layers[component]
        self.layer = widgets.SelectionSlider(
            options=layers,
            value=layer if layer in layers else layers[0],
            description="layer",
            continuous_update=False,
        )
        self.selected: int | None = None
        paths = self.paths(component)
        self.figure = go.FigureWidget(self._heatmap())
        first = int(paths["pos"].iloc[0])
        self.route = go.FigureWidget(self._route(first))
        self.info = widgets.HTML()
        self._attach()
        self.component.observe(self._on_component, names="value")
        self.layer.observe(self._on_layer, names="value")
        self.widget = widgets.VBox(
            [widgets.HBox([self.component, self.layer]), self.figure, self.info, self.route]
        )
        self.select(first if pos is None else pos)

    def paths(self, component: str):
        """token_paths of `component` with every rank (computed once per component)."""
        if component not in self._paths:
            self._paths[component] = analysis.token_paths(self.data, component=component, ranks=None)
        return self._paths[component]

    # -- driven from Python or the page ---------------------------------------------------------------
    def select(self, pos: int) -> None:
        """Show the route of the token at `pos` (of the current component) and mark it on the heatmap."""
        paths = self.paths(self.component.value)
        if pos not in set(paths["pos"].to_numpy().tolist()):
            raise ValueError(
                f"pos {pos} has no routing in the {self.component.value}; pos runs "
                f"{int(paths['pos'].min())}..{int(paths['pos'].max())}"
            )
        self.selected = int(pos)
        refresh(self.route, self._route(self.selected))
        self._mark()
        rows = paths[paths["pos"] == self.selected]
        first = rows.iloc[0]
        top = rows[rows["rank"] == 0].sort_values("layer")
        route = " → ".join(f"{int(e)}" for e in top["expert"])
        self.info.value = (
            f"<b>pos {self.selected}</b> · {html.escape(str(first['modality']))} · "
            f"<code>{html.escape(repr(str(first['text'])))}</code><br>first choices by layer: {route}"
        )

    def _on_layer(self, change) -> None:
        if refresh(self.figure, self._heatmap()):
            self._attach()
        self._mark()

    def _on_component(self, change) -> None:
        layers = self._layers[change["new"]]
        with self.layer.hold_trait_notifications():
            self.layer.options = layers
            self.layer.value = layers[0]
        if refresh(self.figure, self._heatmap()):
            self._attach()
        self.select(int(self.paths(change["new"])["pos"].iloc[0]))

    def _heatmap(self) -> go.Figure:
        component = self.component.value
        figure = plots.routing_heatmap(
            self.paths(component), layer=self.layer.value, num_experts=self._experts[component]
        )
        return figure.update_layout(height=HEATMAP_HEIGHT)

    def _route(self, pos: int) -> go.Figure:
        figure = plots.token_route(self.paths(self.component.value), pos=pos)
        return figure.update_layout(height=ROUTE_HEIGHT)

    def _on_click(self, trace, points, state) -> None:
        if points.ys:
            self.select(int(points.ys[0]))

    def _attach(self) -> None:
        for trace in self.figure.data:
            trace.on_click(self._on_click)

    def _mark(self) -> None:
        """A line across the heatmap at the selected token."""
        if self.selected is None:
            return
        y = float(self.selected)
        line = {
            "type": "rect",
            "xref": "x2 domain",
            "x0": 0,
            "x1": 1,
            "y0": y - 0.5,
            "y1": y + 0.5,
            "line": {"color": "#D62728", "width": 1.5},
            "name": "selected",
        }
        shapes = [s for s in self.figure.layout.shapes if s.name != "selected"]
        self.figure.layout.shapes = [*shapes, line]
