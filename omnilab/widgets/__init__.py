"""omnilab.widgets: notebook explorers over a Trace (ipywidgets + plotly FigureWidget, which needs anywidget).

    RoutingExplorer(trace)    layer slider, thinker/talker, click a token → its route through all layers
    PositionExplorer(trace)   TM-RoPE (t, h, w) and seconds timeline, misaligned audio flagged
    SpeechExplorer(trace)     play the reply; codebook grid and spectrogram under one time cursor

Each keeps its figures in sync when driven from Python (`explorer.layer.value = 3`, `explorer.select(pos)`,
`explorer.time.value = 1.2`) and displays itself in JupyterLab.
"""

from .positions import PositionExplorer
from .routing import RoutingExplorer
from .speech import SpeechExplorer, wav_bytes

__all__ = ["PositionExplorer", "RoutingExplorer", "SpeechExplorer", "wav_bytes"]
