"""The recording engine: one Recorder per capture kind behind one small interface (see base.py)."""

from .attention import AttentionRecorder
from .base import Columns, Recorder, Recording, Turn, concat_columns
from .codes import CodesRecorder
from .routing import RoutingRecorder, routing_tables
from .timings import STAGES, TimingsRecorder
from .tokens import (
    SpecialTokens,
    TokensRecorder,
    annotate_tokens,
    position_id_per_seconds,
    spans,
    special_tokens,
)
from .tower_attention import TOWERS, TowerAttentionRecorder

__all__ = [
    "STAGES",
    "TOWERS",
    "AttentionRecorder",
    "CodesRecorder",
    "Columns",
    "Recorder",
    "Recording",
    "RoutingRecorder",
    "SpecialTokens",
    "TimingsRecorder",
    "TokensRecorder",
    "TowerAttentionRecorder",
    "Turn",
    "annotate_tokens",
    "concat_columns",
    "position_id_per_seconds",
    "routing_tables",
    "spans",
    "special_tokens",
]
