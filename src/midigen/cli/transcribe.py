"""`midigen transcribe AUDIO -o PROMPT.mid`: the notes of an audio clip (a hummed or played tune) as MIDI."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "transcribe",
        help="turn an audio clip (WAV, FLAC, MP3, OGG) into a MIDI prompt",
        description=(
            "Write the notes heard in an audio clip (a hummed, sung or played tune; at most a minute) to a MIDI "
            "file at 120 quarter notes per minute, to use as a prompt. Uses Spotify's basic-pitch with its ONNX "
            "model (the `audio` extra; see the README)."
        ),
    )
    parser.add_argument("audio", metavar="AUDIO", help="WAV, FLAC, MP3 or OGG file")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.mid", help="MIDI file to write")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from midigen.errors import MidigenError
    from midigen.studio.transcription import transcribe

    if not Path(args.audio).is_file():
        raise MidigenError(f"{args.audio}: no such file")
    notes = transcribe(args.audio, args.output)
    print(f"{args.output}: {notes} notes from {args.audio}")
    return 0
