"""The organism's commands: `omnilab train organism` and `omnilab eval organism`."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def register(sub) -> None:
    """Add the `train` and `eval` subcommands to the `omnilab` parser's subparsers `sub`."""
    from .train import TrainConfig

    defaults = TrainConfig()
    p = sub.add_parser("train", help="train the organism on its synthetic world (resumable)")
    p.add_argument("name", choices=("organism",))
    p.add_argument("--out", default="organism-run", help="folder of checkpoints, cached data and the result")
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--examples", type=int, default=defaults.examples, help="training examples drawn")
    p.add_argument(
        "--aux-weight", type=float, default=defaults.aux_weight, help="weight of the router balancing loss"
    )
    p.add_argument(
        "--install", action="store_true", help="copy the weights into the package (load('organism'))"
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=_train)

    p = sub.add_parser("eval", help="held-out accuracy of the organism, per task")
    p.add_argument("name", choices=("organism",))
    p.add_argument("--n", type=int, default=100, help="held-out examples per task")
    p.add_argument("--seed", type=int, default=None, help="seed of the held-out draw (default: the card's)")
    p.add_argument("--weights", default=None, help="an organism.safetensors other than the shipped one")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=_eval)


def _train(args) -> int:
    from . import pipeline
    from .train import TrainConfig

    config = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, examples=args.examples, aux_weight=args.aux_weight
    )
    report = pipeline.make(args.out, config, install=args.install, progress=not args.no_progress)
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=2))
    return 0


def _eval(args) -> int:
    from ..lab import OmniLab
    from . import pipeline

    if args.weights:
        lab = OmniLab(pipeline._loaded_from(Path(args.weights)))
    else:
        from .. import load

        lab = load("organism")
    seed = pipeline.HELD_OUT_SEED if args.seed is None else args.seed
    table = pipeline.evaluate(lab, n=args.n, seed=seed, progress=not args.no_progress)
    if args.json:
        print(table.to_json(orient="records", indent=2))
    else:
        print(table.to_string(index=False))
    sys.stdout.flush()
    return 0
