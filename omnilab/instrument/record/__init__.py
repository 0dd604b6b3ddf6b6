"""The recording engine: one Recorder per capture kind behind one small interface (see base.py)."""

# ruff: noqa: F401  (re-exports: the public names of this package)

from .activations import ActivationsRecorder, SiteRequest, estimate_bytes, resolve_requests
from .attention import AttentionRecorder, AttentionSettings, attention_settings
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
