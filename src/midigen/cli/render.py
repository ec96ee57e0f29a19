"""`midigen render IN.mid [--png OUT.png] [--wav OUT.wav]`: a piano roll picture and audio of a MIDI file."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "render",
        help="draw a piano roll PNG and render a WAV of a MIDI file",
        description=(
            "Draw a MIDI file as a piano roll PNG (bars, note names, velocity or track as colour; the prompt "
            "of a file written by `midigen generate` shaded, its continuation marked) and render it to a WAV "
            "with FluidSynth and a General MIDI SoundFont, the same samples every time. With neither --png "
            "nor --wav, writes both beside the input (IN.png, IN.wav)."
        ),
    )
    parser.add_argument("input", metavar="IN", help="MIDI file")
    parser.add_argument("--png", metavar="OUT.png", help="write the piano roll here")
    parser.add_argument("--wav", metavar="OUT.wav", help="write the audio here")
    parser.add_argument(
        "--soundfont", metavar="SF2",
        help="General MIDI SoundFont (default: $MIDIGEN_SOUNDFONT, else the first found in the usual places)",
    )  # fmt: skip
    parser.add_argument("--title", help="title of the piano roll (default: the file name)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from midigen.evaluation.render import render_piano_roll, render_wav

    png, wav = args.png, args.wav
    if png is None and wav is None:
        png, wav = Path(args.input).with_suffix(".png"), Path(args.input).with_suffix(".wav")
    if wav is not None:  # first, so that a missing synthesizer or SoundFont stops the command before it writes
        print(render_wav(args.input, wav, args.soundfont))
    if png is not None:
        print(render_piano_roll(args.input, png, title=args.title))
    return 0
