"""PositionExplorer: TM-RoPE positions in (t, h, w) and in time, with the audio-video alignment flags."""

from __future__ import annotations

import html

import ipywidgets as widgets
import pandas as pd
import plotly.graph_objects as go

from .. import analysis, plots
from ..analysis._source import table
from ._figures import Explorer, refresh

VIEWS = ("timeline", "3-D")


class PositionExplorer(Explorer):
    """Explore where TM-RoPE put every token.

    Controls: `component`, `view` ("timeline": tokens on a seconds axis by modality, misaligned audio
    flagged; "3-D": the (t, h, w) cloud). Click a token, or call `select(pos)`, to highlight it and read
    its positions in `info`.
    """

    def __init__(self, trace, *, component: str = "thinker", view: str = "timeline"):
        self.trace = trace
        tokens = table(trace, "tokens")
        names = [c for c in ("thinker", "talker") if (tokens["component"].astype(str) == c).any()] or [
            "thinker"
        ]
        self.component = widgets.ToggleButtons(
            options=names, value=component if component in names else names[0], description="component"
        )
        if view not in VIEWS:
            raise ValueError(f"view={view!r}; the views are {', '.join(VIEWS)}")
        self.view = widgets.ToggleButtons(options=list(VIEWS), value=view, description="view")
        self.selected: int | None = None
        self._tables: dict = {}
        self.figure = go.FigureWidget(self._figure())
        self.info = widgets.HTML()
        self._attach()
        self.component.observe(self._redraw, names="value")
        self.view.observe(self._redraw, names="value")
        self.widget = widgets.VBox([widgets.HBox([self.component, self.view]), self.figure, self.info])

    def tables(self, component: str) -> tuple[pd.DataFrame, pd.DataFrame]:
        """position_layout and av_alignment of `component` (computed once)."""
        if component not in self._tables:
            self._tables[component] = (
                analysis.position_layout(self.trace, component=component),
                analysis.av_alignment(self.trace, component=component),
            )
        return self._tables[component]

    def _figure(self) -> go.Figure:
        layout, alignment = self.tables(self.component.value)
        if self.view.value == "3-D":
            return plots.positions_3d(layout, highlight=self.selected)
        return plots.seconds_timeline(layout, alignment=alignment, highlight=self.selected)

    def select(self, pos: int) -> None:
        """Highlight the token at `pos` and show its positions."""
        layout, alignment = self.tables(self.component.value)
        rows = layout[layout["pos"] == pos]
        if len(rows) == 0:
            raise ValueError(f"no {self.component.value} token at pos {pos}")
        self.selected = int(pos)
        self._redraw()
        row = rows.iloc[0]
        flag = ""
        match = alignment[alignment["pos"] == pos] if len(alignment) else alignment
        if len(match):
            a = match.iloc[0]
            flag = (
                f"<br>audio at {a['media_seconds']:.3f} s placed at {a['position_seconds']:.3f} s "
                f"({'aligned' if a['aligned'] else '<b style=color:#D62728>misaligned</b>'})"
            )
        self.info.value = (
            f"<b>pos {self.selected}</b> · {html.escape(str(row['modality']))} · "
            f"<code>{html.escape(repr(str(row['text'])))}</code><br>t {row['t']} · h {row['h']} · w {row['w']} · "
            f"{row['position_seconds']:.3f} s{flag}"
        )

    def _redraw(self, change=None) -> None:
        if refresh(self.figure, self._figure()):
            self._attach()

    def _on_click(self, trace, points, state) -> None:
        if points.point_inds and trace.customdata is not None:
            self.select(int(trace.customdata[points.point_inds[0]][1]))

    def _attach(self) -> None:
        for trace in self.figure.data:
            trace.on_click(self._on_click)
