"""omnilab.plots: one function per figure, each returning a plotly Figure (never showing it).

Plots take analysis outputs (`omnilab.analysis`) and compute nothing themselves; `export(fig, path)`
writes HTML, or PNG/SVG/PDF where a Chromium is available.

    routing     routing_heatmap, token_route, expert_load_bars, specialization_heatmap,
                coactivation_heatmap, paths_sankey, agreement_lines
    positions   positions_3d, seconds_timeline
    attention   attention_heatmap, attention_mass_heatmap, attention_time_lines, tower_attention_heatmap
    speech      codebook_heatmap, spectrogram
    attribution attribution_tokens, attribution_modality, attribution_windows, attribution_patches
    lens        logit_lens_heatmap, talker_lens_heatmap, probe_lines
    patching    patching_heatmap
"""

from ._export import ExportError, browser_path, export
from ._style import MODALITY_COLORS
from .attention import (
    attention_heatmap,
    attention_mass_heatmap,
    attention_time_lines,
    tower_attention_heatmap,
)
from .attribution import attribution_modality, attribution_patches, attribution_tokens, attribution_windows
from .lens import logit_lens_heatmap, probe_lines, talker_lens_heatmap
from .patching import patching_heatmap
from .positions import positions_3d, seconds_timeline
from .routing import (
    agreement_lines,
    coactivation_heatmap,
    expert_load_bars,
    paths_sankey,
    routing_heatmap,
    specialization_heatmap,
    token_route,
)
from .speech import codebook_heatmap, spectrogram

__all__ = [
    "MODALITY_COLORS",
    "ExportError",
    "agreement_lines",
    "browser_path",
    "attention_heatmap",
    "attention_mass_heatmap",
    "attention_time_lines",
    "tower_attention_heatmap",
    "attribution_modality",
    "attribution_patches",
    "attribution_tokens",
    "attribution_windows",
    "coactivation_heatmap",
    "codebook_heatmap",
    "expert_load_bars",
    "export",
    "logit_lens_heatmap",
    "paths_sankey",
    "patching_heatmap",
    "positions_3d",
    "probe_lines",
    "routing_heatmap",
    "seconds_timeline",
    "spectrogram",
    "specialization_heatmap",
    "talker_lens_heatmap",
    "token_route",
]
