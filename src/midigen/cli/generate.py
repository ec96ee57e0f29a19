"""`midigen generate RUN -o OUT.mid`: continue MIDI prompts, or write from nothing, one or many samples at once."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate music with a trained model",
        description=(
            "Continue the first bars of a MIDI prompt (or start from nothing) with a trained model. The output "
            "holds the prompt, then the continuation, with a MIDI marker where the continuation starts. "
            "With --num-samples N, or --prompt given several times, every continuation is sampled in one batch "
            "and written to OUT-1.mid, OUT-2.mid, ... (prompt by prompt, N samples each); sample i uses seed "
            "SEED+i-1, so `--seed SEED+i-1` alone writes the same music again."
        ),
    )
    parser.add_argument("run_dir", metavar="RUN", help="run folder or checkpoint file")
    parser.add_argument("-o", "--output", required=True, metavar="OUT.mid",
                        help="MIDI file to write (numbered OUT-1.mid, ... when there are several)")
    parser.add_argument("--prompt", metavar="IN.mid", action="append",
                        help="MIDI file whose opening bars to continue; repeat it for several prompts")
    parser.add_argument("--prompt-bars", type=int, default=4, help="bars of the prompt to use (default 4)")
    parser.add_argument("--num-samples", type=int, default=1, metavar="N",
                        help="continuations of each prompt, sampled together (default 1)")
    length = parser.add_mutually_exclusive_group(required=True)
    length.add_argument("--bars", type=int, help="bars to generate")
    length.add_argument("--tokens", type=int, help="tokens to generate")
    length.add_argument("--seconds", type=float, help="seconds of music to generate, at the prompt's tempo")
    parser.add_argument("--until-end", action="store_true",
                        help="let the model end the song (<eos>) before the length above is reached")
    parser.add_argument("--instruments", metavar="LIST",
                        help="what the continuation may play: General MIDI programs and `drums`, comma-separated "
                             "(e.g. 0,33,drums or piano,bass,drums); needs a model trained with instruments")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="sampling temperature; 0 (or below 1e-6) is greedy (default 1.0)")
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


def numbered(path: Path, number: int, count: int) -> Path:
    """`path` itself for a single output, else OUT-1.mid, OUT-2.mid, ..."""
    return path if count == 1 else path.with_name(f"{path.stem}-{number}{path.suffix}")


def companion(option: str | None, output: Path, suffix: str, number: int, count: int) -> Path | None:
    """Where --png or --wav writes for output `number` of `count`: its path, numbered, or the output's with `suffix`."""
    if option is None:
        return None
    return numbered(Path(option), number, count) if option else output.with_suffix(suffix)


def run(args: argparse.Namespace) -> int:
    import sys

    from midigen.codec.instruments import parse_instruments
    from midigen.codec.registry import load_tokenizer
    from midigen.errors import MidigenError
    from midigen.evaluation.render import find_fluidsynth, find_soundfont, render_piano_roll, render_wav
    from midigen.inference.generate import empty_prompt, generate_batch, load_prompt, write_generation
    from midigen.inference.model_files import load_model
    from midigen.inference.sampling import SamplingConfig

    output = Path(args.output)
    if args.wav is not None:
        find_fluidsynth(), find_soundfont(args.soundfont)  # a missing synthesizer or SoundFont stops us first
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    instruments = parse_instruments(args.instruments) if args.instruments else None
    trained = load_model(args.run_dir, args.device)
    tokenizer = load_tokenizer(trained.tokenizer)
    prompts = [load_prompt(path, args.prompt_bars, tokenizer) for path in args.prompt] if args.prompt else [empty_prompt(tokenizer)]
    generations = generate_batch(trained, prompts, sampling, bars=args.bars, new_tokens=args.tokens,
                                 seconds=args.seconds, until_end=args.until_end, num_samples=args.num_samples,
                                 instruments=instruments)
    failed = 0
    for number, generation in enumerate(generations, 1):
        path = numbered(output, number, len(generations))
        try:
            score = write_generation(generation, tokenizer, path)
        except MidigenError as error:  # one empty continuation must not cost the others
            print(f"{path}: {error}", file=sys.stderr)
            failed += 1
            continue
        new = len(generation.sequence) - generation.prompt_length
        print(f"{path}: {score.note_num()} notes, {new} new tokens, seed {generation.seed}")
        png, wav = (companion(option, path, suffix, number, len(generations))
                    for option, suffix in ((args.png, ".png"), (args.wav, ".wav")))
        if png is not None:
            print(render_piano_roll(path, png))
        if wav is not None:
            print(render_wav(path, wav, args.soundfont))
    return 2 if failed else 0
