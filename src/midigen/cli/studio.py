"""`midigen studio RUN_OR_MODEL...`: the local web page to prompt, watch, hear and jam with models."""

from __future__ import annotations

import argparse

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "studio",
        help="serve the studio: a web page to prompt, watch, hear and jam with models",
        description=(
            "Serve the studio on this machine: a web page (and an HTTP API, described in the README) to choose a "
            "model, give it a prompt (a MIDI file, the on-screen or a MIDI keyboard, an audio clip or nothing), "
            "watch the continuation appear note by note, hear it, download it, and jam with the model. Open the "
            "address it prints in a browser; Ctrl-C stops it."
        ),
    )
    parser.add_argument("models", nargs="+", metavar="RUN_OR_MODEL",
                        help="run or model folder, or a folder of them (each is offered under its folder's name)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument("--takes", metavar="DIR",
                        help="keep the takes (MIDI, and WAV and PNG once asked for) in DIR (default: a temporary "
                             "folder removed when the studio stops)")
    parser.add_argument("--queue", type=int, default=4,
                        help="generations that may wait behind the running one; more are refused (default 4)")
    parser.add_argument("--no-audio", action="store_true",
                        help="no audio prompts (no transcriber process, nothing warmed up)")
    parser.add_argument("--device", default="auto")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from midigen.studio.app import create_app
    from midigen.studio.service import Studio

    studio = Studio(args.models, args.takes, args.queue, args.device, audio=not args.no_audio)
    try:
        hosts = LOOPBACK_HOSTS if args.host in LOOPBACK_HOSTS else ("*",)
        app = create_app(studio, allowed_hosts=hosts)
        shown_host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"midigen studio: http://{shown_host}:{args.port}/ ({', '.join(studio.shelf.folders())}); Ctrl-C stops it",
              flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=3)
    finally:
        studio.close()
    return 0
