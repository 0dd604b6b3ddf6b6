"""A sparse autoencoder (TopK, or BatchTopK saved as JumpReLU) in SAELens's file format.

    sae = SparseAutoencoder.load("runs/sae-resid.2")     # cfg.json + sae_weights.safetensors
    features = sae.encode(x)        # [..., d_sae], at most k non-zero per row (topk)
    x_hat = sae.decode(features)    # [..., d_in]

The format is SAELens's (`SAE.save_model` / `SAE.load_from_disk`, sae_lens 6): `sae_weights.safetensors`
holds `W_enc` [d_in, d_sae], `W_dec` [d_sae, d_in], `b_enc` [d_sae], `b_dec` [d_in] (and `threshold`
[d_sae] for "jumprelu"); `cfg.json` holds `d_in`, `d_sae`, `dtype`, `device`, `apply_b_dec_to_input`,
`normalize_activations`, `reshape_activations`, `architecture` ("topk" with `k` and
`rescale_acts_by_decoder_norm`, or "jumprelu") and `metadata` (`hook_name`: the omnilab site,
`model_name`, ...). Why not the `sae-lens` package itself: it pulls transformer-lens, wandb, nltk,
statsmodels and ~30 more packages into the lock for a two-file format; this module is those files.

Encoding follows SAELens: `pre = (x - b_dec) @ W_enc + b_enc` (with apply_b_dec_to_input), then
topk: the k largest of `pre`, ReLU'd, the rest zero; jumprelu: `relu(pre) * (pre > threshold)`.
BatchTopK (Bussmann et al., 2024) trains with the k·batch largest over a whole batch and is saved,
as SAELens saves it, as a JumpReLU whose threshold is the running minimum kept activation.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .._version import __version__
from ..errors import OmnilabError

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
ARCHITECTURES = ("topk", "jumprelu")
_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


class SAEError(OmnilabError, ValueError):
    """A sparse autoencoder's file, configuration or input is not what it must be."""


class SparseAutoencoder(nn.Module):
    """TopK / JumpReLU sparse autoencoder over one site's activations (see the module)."""

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        k: int | None = 32,
        architecture: str = "topk",
        apply_b_dec_to_input: bool = True,
        metadata: dict | None = None,
        seed: int = 0,
    ):
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise SAEError(f"architecture {architecture!r} is not one omnilab writes; use {ARCHITECTURES}")
        if architecture == "topk" and (k is None or not 0 < int(k) <= d_sae):
            raise SAEError(f"a topk SAE needs 0 < k <= d_sae ({d_sae}); got k={k!r}")
        self.d_in, self.d_sae, self.k = int(d_in), int(d_sae), None if k is None else int(k)
        self.architecture = architecture
        self.apply_b_dec_to_input = bool(apply_b_dec_to_input)
        self.metadata = dict(metadata or {})
        generator = torch.Generator().manual_seed(seed)
        # decoder rows: random unit directions; encoder: its transpose (Gao et al. 2024's init)
        w_dec = torch.randn(self.d_sae, self.d_in, generator=generator)
        w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        self.W_enc = nn.Parameter(w_dec.T.clone().contiguous())
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(self.d_in))
        self.register_buffer("threshold", torch.zeros(self.d_sae))

    # -- the maps ---------------------------------------------------------------------------------
    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_sae]: the encoder's output before the sparsity function."""
        x = x.to(self.W_enc.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """The sparsity function of this SAE's architecture applied to pre-activations."""
        if self.architecture == "jumprelu":
            return pre.relu() * (pre > self.threshold)
        values, index = pre.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, index, values.relu())

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations [..., d_sae] of activations `x` [..., d_in]."""
        return self.activate(self.pre_activations(x))

    def decode(self, features: torch.Tensor) -> torch.Tensor:
        """The reconstruction [..., d_in] of feature activations [..., d_sae]."""
        return features @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction of `x` (encode, then decode)."""
        return self.decode(self.encode(x))

    @property
    def site(self) -> str | None:
        """The omnilab site the SAE reads (SAELens's metadata.hook_name)."""
        return self.metadata.get("hook_name")

    # -- SAELens's format -------------------------------------------------------------------------
    def cfg(self) -> dict:
        """cfg.json's content: SAELens's `SAEConfig.to_dict()` fields for this architecture."""
        cfg = {
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": next(k for k, v in _DTYPES.items() if v == self.W_enc.dtype),
            "device": str(self.W_enc.device),
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": "none",
            "reshape_activations": "none",
            "metadata": {"sae_lens_version": None, "sae_lens_training_version": None, **self.metadata},
            "architecture": self.architecture,
        }
        if self.architecture == "topk":
            cfg.update(k=self.k, rescale_acts_by_decoder_norm=False)
        return cfg

    def state_for_saving(self) -> dict[str, torch.Tensor]:
        """The tensors of sae_weights.safetensors, under SAELens's names."""
        names = ["W_enc", "W_dec", "b_enc", "b_dec"] + (
            ["threshold"] if self.architecture == "jumprelu" else []
        )
        return {name: getattr(self, name).detach().cpu().contiguous() for name in names}

    def save(self, folder: str | Path) -> Path:
        """Write `folder/cfg.json` and `folder/sae_weights.safetensors` (SAELens's layout); returns folder."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (WEIGHTS_FILE + ".tmp")
        save_file(self.state_for_saving(), str(tmp), metadata={"omnilab_version": __version__})
        tmp.replace(folder / WEIGHTS_FILE)
        (folder / CFG_FILE).write_text(json.dumps(self.cfg(), indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path, *, device: str | None = None) -> SparseAutoencoder:
        """An SAE from a folder in SAELens's layout (ours or SAELens's own topk / jumprelu files)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        cfg_path, weights_path = folder / CFG_FILE, folder / WEIGHTS_FILE
        if not cfg_path.is_file() or not weights_path.is_file():
            raise SAEError(
                f"'{folder}' is not an SAE folder: it needs {CFG_FILE} and {WEIGHTS_FILE} "
                "(written by SparseAutoencoder.save, `omnilab sae train` or SAELens's save_model)"
            )
        cfg = json.loads(cfg_path.read_text())
        architecture = cfg.get("architecture")
        if architecture not in ARCHITECTURES:
            raise SAEError(
                f"'{folder}' holds a {architecture!r} SAE; omnilab reads {', '.join(ARCHITECTURES)} "
                "(a batchtopk SAE is saved as jumprelu)"
            )
        if (
            cfg.get("normalize_activations", "none") != "none"
            or cfg.get("reshape_activations", "none") != "none"
        ):
            raise SAEError(
                f"'{folder}' normalizes or reshapes its input ({cfg.get('normalize_activations')}, "
                f"{cfg.get('reshape_activations')}); omnilab reads SAEs on raw activations only"
            )
        metadata = dict(cfg.get("metadata") or {})
        if "hook_name" in cfg and "hook_name" not in metadata:  # SAELens 5's top-level field
            metadata["hook_name"] = cfg["hook_name"]
        metadata = {
            k: v for k, v in metadata.items() if k not in ("sae_lens_version", "sae_lens_training_version")
        }
        sae = cls(
            cfg["d_in"],
            cfg["d_sae"],
            k=cfg.get("k"),
            architecture=architecture,
            apply_b_dec_to_input=cfg.get("apply_b_dec_to_input", True),
            metadata=metadata,
        )
        tensors = load_file(str(weights_path))
        if cfg.get("rescale_acts_by_decoder_norm"):  # fold the decoder norms in (exact for topk's order)
            norms = tensors["W_dec"].norm(dim=1).clamp(min=1e-8)
            tensors["W_dec"] = tensors["W_dec"] / norms[:, None]
            tensors["W_enc"] = tensors["W_enc"] * norms[None, :]
            tensors["b_enc"] = tensors["b_enc"] * norms
        with torch.no_grad():
            for name, tensor in tensors.items():
                if not hasattr(sae, name):
                    continue
                target = getattr(sae, name)
                if tuple(tensor.shape) != tuple(target.shape):
                    raise SAEError(
                        f"'{weights_path}': {name} has shape {tuple(tensor.shape)}; cfg.json's d_in "
                        f"{sae.d_in} and d_sae {sae.d_sae} need {tuple(target.shape)}"
                    )
                target.copy_(tensor.float())
        dtype = _DTYPES.get(cfg.get("dtype", "float32"), torch.float32)
        return sae.to(device=device or "cpu", dtype=dtype).eval()

    def __repr__(self) -> str:
        sparsity = f"k={self.k}" if self.architecture == "topk" else "jumprelu"
        return f"SparseAutoencoder({self.site!r}, d_in={self.d_in}, d_sae={self.d_sae}, {sparsity})"
