"""The `omnilab` command: card, chat, demo, bench, collect, query."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .errors import OmnilabError

BENCHES = ("forward", "trace", "analysis", "stream", "store", "memory", "activations", "atp")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args) or 0)
    except OmnilabError as exc:
        print(f"omnilab: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omnilab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("card", help="the architecture card of a model")
    p.add_argument(
        "--model",
        default="qwen3-omni-30b-a3b-instruct",
        help="tiny, small, a real config name (built on the meta device), a hub id or a path",
    )
    p.add_argument("--json", action="store_true", help="print JSON records instead of a table")
    p.set_defaults(run=_card)

    p = sub.add_parser("chat", help="one turn: print the reply, write the speech")
    p.add_argument("--model", default="tiny")
    p.add_argument("--text", default="")
    p.add_argument("--audio", action="append", default=[])
    p.add_argument("--image", action="append", default=[])
    p.add_argument("--video", action="append", default=[])
    p.add_argument("--use-audio-in-video", action="store_true")
    p.add_argument("--system", default=None)
    p.add_argument("--speaker", default="Ethan")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--no-audio", action="store_true", help="text only")
    p.add_argument("--out", default=None, help="write the speech to this WAV file")
    p.add_argument("--timings", action="store_true", help="stream the reply and print the latency breakdown")
    p.set_defaults(run=_chat)

    # The flags of apps/demo/serve.py's parser (a test holds the two the same), passed on to it.
    p = sub.add_parser(
        "demo",
        help="the Gradio app: chat with a model and watch its instruments",
        description="The omnilab demo: chat with a Qwen3-Omni model and watch its instruments.",
    )
    p.add_argument(
        "--model",
        default="organism",
        help="the model to serve: organism (the trained toy; default), tiny or small (random weights), "
        "a hub id or a local checkpoint directory",
    )
    p.add_argument(
        "--port", type=int, default=7860, help="the port on 127.0.0.1 (the app binds no other address)"
    )
    p.add_argument("--max-upload-mb", type=int, default=200, help="refuse uploads larger than this many MiB")
    p.set_defaults(run=_demo)

    p = sub.add_parser("bench", help="benchmarks, as ratios measured in one run")
    p.add_argument("name", choices=BENCHES)
    p.add_argument("--model", default=None, help="model to measure (each bench has its default)")
    p.add_argument("--device", default=None, help="forward, trace, stream: e.g. cuda (default: the CPU)")
    p.add_argument("--json", action="store_true", help="print one JSON object of the figures")
    p.add_argument(
        "--repeat", type=int, default=1, help="run the bench N times: each figure as min/median/max"
    )
    p.set_defaults(run=_bench)

    p = sub.add_parser("collect", help="run the instruments over a manifest into a trace store")
    p.add_argument("manifest")
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="tiny")
    p.add_argument(
        "--capture",
        default="routing,positions,codes",
        help="captures and site patterns, comma-separated (e.g. 'positions,resid.*': activations per shard)",
    )
    p.add_argument(
        "--generate", type=int, default=0, help="new tokens to generate per sample (0: prefill only)"
    )
    p.add_argument("--engine", choices=("local", "ray"), default="local")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--ray-address", default=None)
    p.add_argument(
        "--batch-size", type=int, default=None, help="samples per forward (default: from a memory estimate)"
    )
    p.set_defaults(run=_collect)

    p = sub.add_parser("query", help="SQL over a trace store (DuckDB, read-only)")
    p.add_argument("store")
    p.add_argument("sql")
    p.add_argument(
        "--out",
        default=None,
        help="write the whole result to a .csv, .parquet or .jsonl file instead of printing it",
    )
    p.set_defaults(run=_query)
    from .organism.cli import register as register_organism

    register_organism(sub)
    from .sae.cli import register as register_sae

    register_sae(sub)
    return parser


def _card(args) -> int:
    from . import card
    from .models.card import format_card

    if args.model in ("tiny", "small") or args.model.startswith("qwen3-omni-30b-a3b"):  # built on meta
        frame = card(args.model)
    else:
        from . import load

        frame = load(args.model).card()
    if args.json:
        print(frame.to_json(orient="records", indent=2))
    else:
        print(format_card(frame))
    return 0


def _conversation(args) -> list[dict]:
    content = [{"type": "audio", "audio": p} for p in args.audio]
    content += [{"type": "image", "image": p} for p in args.image]
    content += [{"type": "video", "video": p} for p in args.video]
    if args.text:
        content.append({"type": "text", "text": args.text})
    messages = [{"role": "system", "content": args.system}] if args.system else []
    return messages + [{"role": "user", "content": content}]


def _chat(args) -> int:
    from . import load
    from .options import GenerationOptions

    lab = load(args.model)
    conversation = _conversation(args)
    options = GenerationOptions(
        speaker=args.speaker,
        max_new_tokens=args.max_new_tokens,
        return_audio=not args.no_audio,
        use_audio_in_video=args.use_audio_in_video,
    )
    if args.timings:
        from .streaming import format_timings

        done = None
        for event in lab.stream(conversation, options):
            if event.kind == "text":
                print(event.text, end="", flush=True)
            elif event.kind == "done":
                done = event
        print()
        reply = done.reply
        print(format_timings(done.timings))
    else:
        reply = lab.generate(conversation, options)
        print(reply.text)
    if reply.random_weights:
        print(
            f"(note: {lab.model_id} is a random-weight model; its words and speech are noise)",
            file=sys.stderr,
        )
    if args.out and reply.audio is not None:
        import soundfile as sf

        sf.write(args.out, reply.audio, reply.sample_rate)
        print(f"speech: {reply.seconds:.2f} s -> {args.out}", file=sys.stderr)
    return 0


def _demo(args) -> int:
    # The app (apps/demo/) sits beside the package in a checkout and is not installed. The library
    # never imports it (invariant 1): this process becomes `python -m apps.demo` (exec, so the same
    # process id answers signals and no child outlives it), with the checkout on its path.
    root = Path(__file__).resolve().parent.parent
    if not (root / "apps" / "demo" / "__main__.py").is_file():
        raise OmnilabError(
            f"the Gradio app is not in {root / 'apps' / 'demo'}; run omnilab demo from a source checkout"
        )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    sys.stdout.flush()
    sys.stderr.flush()
    command = [sys.executable, "-m", "apps.demo", "--model", args.model, "--port", str(args.port),
               "--max-upload-mb", str(args.max_upload_mb)]  # fmt: skip
    os.execve(sys.executable, command, env)
    return 0  # not reached: execve replaces this process


def _bench(args) -> int:
    import importlib

    from .bench import format_figures, repeated

    module = importlib.import_module(f".bench.{args.name}", __package__)
    options = {"model": args.model} if args.model else {}
    if args.device:
        if args.name not in ("forward", "trace", "stream", "activations"):
            raise OmnilabError(
                f"bench {args.name} runs on the CPU only; --device is for forward, trace, stream and activations"
            )
        options["device"] = args.device
    if args.repeat < 1:
        raise OmnilabError(f"--repeat must be at least 1; got {args.repeat}")
    figures = repeated([module.run(**options) for _ in range(args.repeat)])
    print(json.dumps(figures, default=str) if args.json else format_figures(args.name, figures))
    return 0


def _collect(args) -> int:
    from .store.collect import collect

    summary = collect(
        args.manifest,
        args.out,
        model=args.model,
        capture=tuple(args.capture.split(",")),
        generate=args.generate,
        engine=args.engine,
        workers=args.workers,
        ray_address=args.ray_address,
        batch_size=args.batch_size,
    )
    print(json.dumps(summary, default=str, indent=2))
    return 0


QUERY_FORMATS = (".csv", ".parquet", ".jsonl")


def _query(args) -> int:
    from .store import query

    out = Path(args.out) if args.out else None
    if out is not None:
        if out.suffix not in QUERY_FORMATS:
            raise OmnilabError(f"--out '{out}': write a {', '.join(QUERY_FORMATS)} file (by its suffix)")
        if out.resolve().is_relative_to(Path(args.store).resolve()):
            raise OmnilabError(
                f"--out '{out}' is inside the store '{args.store}'; write the result elsewhere"
            )
        if not out.parent.is_dir():
            raise OmnilabError(f"--out '{out}': the folder '{out.parent}' does not exist")
    frame = query(args.store, args.sql)
    if out is None:
        print(frame.to_string(index=False, max_rows=200))
        return 0
    tmp = out.with_name(out.name + ".tmp")  # a file that is there is replaced whole, or not at all
    try:
        if out.suffix == ".csv":
            frame.to_csv(tmp, index=False)
        elif out.suffix == ".parquet":
            frame.to_parquet(tmp, index=False)
        else:
            frame.to_json(tmp, orient="records", lines=True)
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OmnilabError(f"--out '{out}' could not be written: {exc}") from None
    print(f"wrote {len(frame)} rows to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
