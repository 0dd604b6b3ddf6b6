"""Sparse autoencoders on a site's activations: train from a store, measure, score against the world, steer.

    from omnilab import sae
    model = sae.train_sae("runs/world", "resid.2", "runs/sae-resid.2", sae.SAETrainConfig(width=512, k=16))
    sae.sae_quality(model, "runs/world")                 # FVE, L0, dead and dense features
    sae.spliced_accuracy(lab, model, examples)           # the organism with the reconstruction in place
    analysis.sae_factor_scores(model, "runs/world", sae.world_factors("runs/world"))
    sae.steer_feature(lab, model, feature, examples, target, value=8.0)

Files are SAELens's (cfg.json + sae_weights.safetensors; `SparseAutoencoder.load`). Command line:
`omnilab sae train --store S --site resid.2 --width W --k K --out DIR`.
"""

from .model import SAEError, SparseAutoencoder
from .quality import sae_quality, spliced_accuracy
from .steer import edited_site, steer_feature
from .train import SAETrainConfig, train_sae
from .world import collect_world, draw_world, example_factors, world_factors, world_manifest

__all__ = [
    "SAEError",
    "SAETrainConfig",
    "SparseAutoencoder",
    "collect_world",
    "draw_world",
    "edited_site",
    "example_factors",
    "sae_quality",
    "spliced_accuracy",
    "steer_feature",
    "train_sae",
    "world_factors",
    "world_manifest",
]
