"""`omnilab sae train`: an SAE on one site of a store (resumable), then its quality numbers."""

from __future__ import annotations

import json


def register(sub) -> None:
    """Add the `sae` command (and its `train` subcommand) to the `omnilab` parser's subparsers `sub`."""
    from .train import SAETrainConfig

    defaults = SAETrainConfig()
    p = sub.add_parser("sae", help="sparse autoencoders on a store's activations")
    verbs = p.add_subparsers(dest="verb", required=True)
    t = verbs.add_parser("train", help="train a TopK / BatchTopK SAE on one site (resumes from --out)")
    t.add_argument(
        "--store", required=True, help="a store collected with that site (omnilab collect --capture)"
    )
    t.add_argument("--site", required=True, help="the site key, e.g. resid.2")
    t.add_argument("--width", type=int, default=defaults.width, help="features (d_sae)")
    t.add_argument("--k", type=int, default=defaults.k, help="active features per row")
    t.add_argument("--architecture", choices=("topk", "batchtopk"), default=defaults.architecture)
    t.add_argument("--epochs", type=int, default=defaults.epochs)
    t.add_argument("--batch-size", type=int, default=defaults.batch_size)
    t.add_argument("--lr", type=float, default=defaults.lr)
    t.add_argument("--where", default=defaults.where, help="SQL over the activation rows (default: thinker)")
    t.add_argument("--seed", type=int, default=defaults.seed)
    t.add_argument("--out", default=None, help="result folder (default: sae-SITE beside the store)")
    t.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(run=_train)


def _train(args) -> int:
    from pathlib import Path

    from .quality import sae_quality
    from .train import SAETrainConfig, train_sae

    config = SAETrainConfig(
        width=args.width, k=args.k, architecture=args.architecture, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, where=args.where, seed=args.seed,
    )  # fmt: skip
    out = Path(args.out) if args.out else Path(args.store).resolve().parent / f"sae-{args.site}"
    sae = train_sae(args.store, args.site, out, config, device=args.device, progress=not args.no_progress)
    quality = sae_quality(sae, args.store, where=args.where)
    quality.pop("frequency")
    print(json.dumps({"out": str(out), **quality}, indent=2))
    return 0
