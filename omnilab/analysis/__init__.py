"""omnilab.analysis: pure functions over a Trace (or a trace store) → tidy DataFrames.

Every analysis is `fn(trace, *, component=None, layer=None, ...) -> DataFrame`, its definition and
source paper in its docstring. `trace` may be an omnilab Trace, a dict of tables, or any object with
`.routing` / `.tokens` / ... attributes. Routing analyses also take a trace store (its folder or
`open_store` connection), of which DuckDB reads only the rows they need, and compute on
`RoutingData.of(trace)` (= `prepare(trace)`), the dense routing arrays, which they also take directly
(`routing_suite(trace)` runs them all on one preparation).

    routing     expert_load, load_balance, modality_specialization, modality_nmi, modality_experts,
                coactivation, repetition, layer_transitions, token_paths, vocabulary_specialization,
                router_confidence, routing_agreement, routing_suite
    positions   position_layout, av_alignment
    attention   attention_map, attention_modality_mass, attention_over_time
    speech      codebook_usage, codebook_grid, spoken_text, mel_spectrogram, waveform_envelope,
                residual_audio, residual_series (these two run the model's code2wav)
    attribution attribute → Attribution; attribution_by_modality, attribution_by_item,
                attribution_by_window, attribution_by_patch
    lens        logit_lens (runs the thinker), talker_lens (runs a spoken reply)
    probes      linear_probe (scikit-learn, over activations)
    patching    patching_sweep (clean vs corrupted, batched over patches; runs the thinker)
    attribution_patching  attribution_patching (AtP: every patch estimated from two forwards and one
                backward; runs the thinker), atp_agreement (AtP against a sweep: Spearman)
    heads       head_scores (per head, the attention mass from queries onto a modality's tokens)
    steering    steering_vector (mean difference of two activation sets)
    sae         sae_factor_scores, cross_modal_features (an SAE's features against known factors)

Attribution, the lenses, patching and residual audio must run the model, so they take an OmniLab,
not a Trace.
"""

from .attention import attention_map, attention_modality_mass, attention_over_time, tower_attention_map
from .attribution import (
    Attribution,
    attribute,
    attribution_by_item,
    attribution_by_modality,
    attribution_by_patch,
    attribution_by_window,
)
from .attribution_patching import agreement as atp_agreement
from .attribution_patching import attribution_patching
from .heads import head_scores
from .lens import logit_lens, talker_lens
from .patching import patching_sweep
from .positions import av_alignment, position_layout
from .probes import linear_probe
from .routing import (
    ROUTING_ANALYSES,
    ComponentRouting,
    RoutingData,
    coactivation,
    expert_load,
    layer_transitions,
    load_balance,
    modality_experts,
    modality_nmi,
    modality_specialization,
    prepare,
    repetition,
    router_confidence,
    routing_agreement,
    routing_suite,
    token_paths,
    vocabulary_specialization,
)
from .sae import cross_modal_features, sae_factor_scores
from .speech import (
    codebook_grid,
    codebook_usage,
    mel_spectrogram,
    residual_audio,
    residual_series,
    spoken_text,
    waveform_envelope,
)
from .steering import steering_vector

__all__ = [
    "atp_agreement",
    "attribution_patching",
    "head_scores",
    "ROUTING_ANALYSES",
    "Attribution",
    "ComponentRouting",
    "RoutingData",
    "attention_map",
    "attention_modality_mass",
    "attention_over_time",
    "tower_attention_map",
    "attribute",
    "linear_probe",
    "logit_lens",
    "patching_sweep",
    "steering_vector",
    "sae_factor_scores",
    "cross_modal_features",
    "talker_lens",
    "attribution_by_item",
    "attribution_by_modality",
    "attribution_by_patch",
    "attribution_by_window",
    "av_alignment",
    "coactivation",
    "codebook_grid",
    "codebook_usage",
    "expert_load",
    "layer_transitions",
    "load_balance",
    "mel_spectrogram",
    "modality_experts",
    "modality_nmi",
    "modality_specialization",
    "position_layout",
    "prepare",
    "repetition",
    "residual_audio",
    "residual_series",
    "router_confidence",
    "routing_agreement",
    "routing_suite",
    "spoken_text",
    "token_paths",
    "vocabulary_specialization",
    "waveform_envelope",
]
