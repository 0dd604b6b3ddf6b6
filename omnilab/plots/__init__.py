"""omnilab.plots: one function per figure, each returning a plotly Figure (never showing it).

Plots take analysis outputs (`omnilab.analysis`) and compute nothing themselves; `export(fig, path)`
writes HTML, or PNG/SVG/PDF where a Chromium is available.

    routing     routing_heatmap, token_route, expert_load_bars, expert_load_heatmap,
                specialization_heatmap, coactivation_heatmap
    paths       paths_sankey, agreement_lines
    positions   positions_3d, positions_by_index, seconds_timeline
    attention   attention_heatmap, attention_heads, attention_mass_heatmap, attention_time_lines,
                tower_attention_heatmap
    speech      codebook_heatmap, spectrogram, spectrogram_compare
    attribution attribution_tokens, attribution_modality, attribution_windows, attribution_patches,
                attribution_overlay, attribution_compare
    lens        logit_lens_heatmap, talker_lens_heatmap, probe_lines
    patching    patching_heatmap, patching_layers
    findings    accuracy_vs_shift, nmi_by_layer, ablation_intervals

Each figure carries its null where one exists (uniform 1/E, causal-uniform attention, lift 1, patch
effect 0, a shuffled probe, chance), on diverging scales whose neutral colour is that null.
"""

from ._export import ExportError, browser_path, export
from ._style import MODALITY_COLORS
from .attention import (
    attention_heads,
    attention_heatmap,
    attention_mass_heatmap,
    attention_time_lines,
    tower_attention_heatmap,
)
from .attribution import (
    attribution_compare,
    attribution_modality,
    attribution_overlay,
    attribution_patches,
    attribution_tokens,
    attribution_windows,
)
from .findings import ablation_intervals, accuracy_vs_shift, nmi_by_layer
from .lens import logit_lens_heatmap, probe_lines, talker_lens_heatmap
from .patching import patching_heatmap, patching_layers
from .paths import agreement_lines, paths_sankey
from .positions import positions_3d, positions_by_index, seconds_timeline
from .routing import (
    coactivation_heatmap,
    expert_load_bars,
    expert_load_heatmap,
    routing_heatmap,
    specialization_heatmap,
    token_route,
)
from .speech import codebook_heatmap, spectrogram, spectrogram_compare

__all__ = [
    "MODALITY_COLORS",
    "ExportError",
    "ablation_intervals",
    "accuracy_vs_shift",
    "agreement_lines",
    "attention_heads",
    "attention_heatmap",
    "attention_mass_heatmap",
    "attention_time_lines",
    "attribution_compare",
    "attribution_modality",
    "attribution_overlay",
    "attribution_patches",
    "attribution_tokens",
    "attribution_windows",
    "browser_path",
    "coactivation_heatmap",
    "codebook_heatmap",
    "expert_load_bars",
    "expert_load_heatmap",
    "export",
    "logit_lens_heatmap",
    "nmi_by_layer",
    "patching_heatmap",
    "patching_layers",
    "paths_sankey",
    "positions_3d",
    "positions_by_index",
    "probe_lines",
    "routing_heatmap",
    "seconds_timeline",
    "specialization_heatmap",
    "spectrogram",
    "spectrogram_compare",
    "talker_lens_heatmap",
    "token_route",
    "tower_attention_heatmap",
]
