"""`midigen generate RUN -o OUT.mid`: continue a MIDI prompt, or write from nothing."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate music with a trained model",
        description=(
            "Continue the first bars of a MIDI prompt (or start from nothing) with a trained model. The output "
            "holds the prompt, then the continuation, with a MIDI marker where the continuation starts."
        ),
    )
    parser.add_argument("run_dir", metavar="RUN", help="run folder or checkpoint file")
    parser.add_argument("-o", "--output", required=True, help="MIDI file to write")
    parser.add_argument("--prompt", metavar="IN.mid", help="MIDI file whose opening bars to continue")
    parser.add_argument("--prompt-bars", type=int, default=4, help="bars of the prompt to use (default 4)")
    length = parser.add_mutually_exclusive_group(required=True)
    length.add_argument("--bars", type=int, help="bars to generate")
    length.add_argument("--tokens", type=int, help="tokens to generate")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0: off)")
    parser.add_argument("--seed", type=int, help="random seed, for repeatable output")
    parser.add_argument("--png", nargs="?", const="", metavar="OUT.png",
                        help="also draw a piano roll (default path: the output's, with .png)")
    parser.add_argument("--wav", nargs="?", const="", metavar="OUT.wav",
                        help="also render audio with FluidSynth (default path: the output's, with .wav)")
    parser.add_argument("--soundfont", metavar="SF2", help="General MIDI SoundFont for --wav")
    parser.add_argument("--device", default="auto")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from midigen.codec.tokenizer import SeedTokenizer
    from midigen.inference.generate import empty_prompt, generate, load_prompt, write_generation
    from midigen.inference.sampling import SamplingConfig
    from midigen.inference.model_files import load_model

    from pathlib import Path

    from midigen.evaluation.render import find_fluidsynth, find_soundfont, render_piano_roll, render_wav

    output = Path(args.output)
    png = None if args.png is None else Path(args.png or output.with_suffix(".png"))
    wav = None if args.wav is None else Path(args.wav or output.with_suffix(".wav"))
    if wav is not None:
        find_fluidsynth(), find_soundfont(args.soundfont)  # a missing synthesizer or SoundFont stops us first
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    trained = load_model(args.run_dir, args.device)
    tokenizer = SeedTokenizer(trained.tokenizer)
    prompt = load_prompt(args.prompt, args.prompt_bars, tokenizer) if args.prompt else empty_prompt(tokenizer)
    generation = generate(trained, prompt, sampling, bars=args.bars, new_tokens=args.tokens)
    score = write_generation(generation, tokenizer, args.output)
    print(f"{args.output}: {score.note_num()} notes, {len(generation.sequence) - generation.prompt_length} new tokens")
    if png is not None:
        print(render_piano_roll(output, png))
    if wav is not None:
        print(render_wav(output, wav, args.soundfont))
    return 0
