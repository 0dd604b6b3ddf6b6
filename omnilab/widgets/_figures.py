"""Keeping a FigureWidget in step with a freshly built Figure, and the widget base."""

from __future__ import annotations

import plotly.graph_objects as go


def refresh(widget: go.FigureWidget, figure: go.Figure) -> bool:
    """Make `widget` show `figure`: traces updated in place when they match (type by type), replaced
    otherwise; layout replaced. Returns True when the traces were replaced (click handlers must be
    attached again)."""
    same = len(widget.data) == len(figure.data) and all(
        a.type == b.type for a, b in zip(widget.data, figure.data, strict=True)
    )
    with widget.batch_update():
        if same:
            for target, source in zip(widget.data, figure.data, strict=True):
                properties = source.to_plotly_json()
                properties.pop("type", None)
                properties.pop("uid", None)
                # properties absent from the new trace return to their defaults
                for name in list(target.to_plotly_json()):
                    if name not in properties and name not in ("type", "uid"):
                        properties[name] = None
                target.update(properties, overwrite=True)
        else:
            widget.data = []
            widget.add_traces(list(figure.data))
        layout = figure.layout.to_plotly_json()
        widget.layout = layout
    return not same


class Explorer:
    """Base of the explorers: `.widget` is the ipywidgets box; displaying the explorer displays it."""

    widget = None

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def _ipython_display_(self):  # JupyterLab and classic notebooks
        from IPython.display import display

        display(self.widget)
