"""MidiTok's REMI, TSD and MIDI-Like as tokenizer kinds: real files round-trip as MidiTok's own round trip does (the
losses named), go into a token store and back, pass the grammar, carry the features the grammar derives from the
tokens alone, and every random walk the grammar allows decodes into notes that re-encode, the notes the grammar
reports being those decoded; an untrained model's generations pass the grammar and decode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import symusic
import torch

from midigen.cli.main import main
from midigen.codec import TokenizerConfig, load_tokenizer, read_notes
from midigen.codec.bpe import BpeTokenizer
from midigen.codec.interface import Tokenizer
from midigen.codec.miditok_kinds import MiditokTokenizer
from midigen.data.store import TokenStore
from midigen.errors import MidigenError
from midigen.inference import LoadedModel, SamplingConfig, TokenEvent, empty_prompt, generate_batch, load_prompt

DATA = Path(__file__).parent / "data"
PROMPTS = sorted((DATA / "prompts").glob("*.mid"))
BAND, BEAT = DATA / "multitrack" / "230_bpm_multitrack.mid", DATA / "multitrack" / "beat.mid"
KINDS = ("remi", "tsd", "midilike")
TICKS = 480  # scores are compared at one resolution


MERGED_KINDS = ("remi", "tsd")  # byte-pair merges fold through the grammar (MIDI-Like's state is too wide)


@pytest.fixture(scope="module", params=KINDS)
def tokenizer(request: pytest.FixtureRequest) -> MiditokTokenizer:
    return load_tokenizer(TokenizerConfig(kind=request.param))


@pytest.fixture(scope="module")
def bpe_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bpe")


def merged_tokenizer(kind: str, root: Path) -> BpeTokenizer:
    """`kind` with 300 merges learned on the real test files."""
    from midigen.data.bpe import train_store
    from midigen.data.encode import encode_files

    base, merged = root / f"{kind}-base", root / kind
    if not (merged / "report.json").exists():
        encode_files([DATA / "multitrack", DATA / "prompts"], base, TokenizerConfig(kind=kind), workers=1,
                     progress=False)
        train_store(base, merged, TokenStore(base).tokenizer.vocab.size + 300, progress=False)
    tokenizer = TokenStore(merged).tokenizer
    assert isinstance(tokenizer, BpeTokenizer)
    return tokenizer


@pytest.fixture(scope="module", params=MERGED_KINDS)
def merged(request: pytest.FixtureRequest, bpe_root: Path) -> BpeTokenizer:
    return merged_tokenizer(request.param, bpe_root)


@pytest.fixture(scope="module", params=[*KINDS, *(f"{kind}+bpe" for kind in MERGED_KINDS)])
def any_tokenizer(request: pytest.FixtureRequest, bpe_root: Path) -> Tokenizer:
    """Each kind, and each kind that takes merges with them."""
    kind, _, bpe = request.param.partition("+")
    return merged_tokenizer(kind, bpe_root) if bpe else load_tokenizer(TokenizerConfig(kind=kind))


def notes_of(score: symusic.Score) -> set[tuple[int, int, int, int, int]]:
    """(instrument: program or 128 for drums, onset, pitch, duration, velocity) of every note, `TICKS` per quarter."""
    score = score.resample(TICKS, min_dur=1)
    notes = set()
    for track in score.tracks:
        columns = track.notes.numpy()
        instrument = 128 if track.is_drum else track.program
        notes |= {(instrument, *note) for note in zip(columns["time"].tolist(), columns["pitch"].tolist(),
                                                      columns["duration"].tolist(), columns["velocity"].tolist())}
    return notes


def one_note_on_per_pitch(notes: set[tuple[int, int, int, int, int]]) -> set[tuple[int, int, int, int, int]]:
    """MIDI-Like's loss beyond MidiTok's: a note ends where its instrument plays its pitch again."""
    rows = np.array(sorted(notes), dtype=np.int64).reshape(-1, 5)
    instruments, onsets, pitches, durations = rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3]
    ends = MiditokTokenizer.one_note_on_per_pitch(instruments, pitches, onsets, onsets + durations)
    rows[:, 3] = ends - onsets
    return {tuple(row) for row in rows.tolist()}


def miditok_round_trip(tokenizer: MiditokTokenizer, path: Path) -> set[tuple[int, int, int, int, int]]:
    return notes_of(tokenizer.backend.decode(tokenizer.backend.encode(symusic.Score(str(path)))))


@pytest.mark.parametrize("path", [BAND, BEAT, *PROMPTS[:6]], ids=lambda path: path.stem[:20])
def test_real_files_round_trip_as_miditok_itself_does(tokenizer: MiditokTokenizer, path: Path) -> None:
    ours = notes_of(tokenizer.decode(tokenizer.encode(path)))
    theirs = miditok_round_trip(tokenizer, path)
    if tokenizer.config.kind == "midilike":
        # The same notes start; but where a pitch starts again while it sounds, ours ends there, and MidiTok's own
        # MIDI-Like pairs its note offs first in, first out, which changes those notes' durations: ours are the
        # quantised notes MidiTok's REMI keeps, cut where the pitch starts again.
        assert {(i, onset, pitch, v) for i, onset, pitch, _, v in ours} == {(i, onset, pitch, v)
                                                                            for i, onset, pitch, _, v in theirs}
        theirs = one_note_on_per_pitch(miditok_round_trip(load_tokenizer(TokenizerConfig(kind="remi")), path))
    assert ours == theirs and len(ours) > 0
    # what MidiTok itself loses: timing finer than 8 steps per quarter, velocities beyond 8 levels
    original = notes_of(symusic.Score(str(path)))
    assert len({note[:3] for note in ours}) <= len({note[:3] for note in original})


def test_merges_on_a_miditok_kind_round_trip_exactly_as_the_kind(merged: BpeTokenizer) -> None:
    base_tokens = merged_tokens = 0
    for path in [BAND, BEAT, *PROMPTS]:
        base_sequence, sequence = merged.base.encode(path), merged.encode(path)
        expanded, firsts = merged.expand(sequence.tokens)
        assert np.array_equal(expanded, base_sequence.tokens), path
        assert np.array_equal(sequence.steps, base_sequence.steps[firsts]), path  # where its first base token sits
        assert notes_of(merged.decode(sequence)) == notes_of(merged.base.decode(base_sequence)), path
        base_tokens, merged_tokens = base_tokens + len(base_sequence), merged_tokens + len(sequence)
    assert merged_tokens < 0.7 * base_tokens


@pytest.mark.parametrize("kind", MERGED_KINDS)
def test_merges_are_those_miditok_s_own_train_learns(kind: str, tmp_path: Path) -> None:
    """`tokenizer train` on a MidiTok kind learns what MidiTok's `train` learns from the same songs (each whole,
    `encode_ids_split` "no"): both are Hugging Face's BPE over one character per base token."""
    import json

    import miditok
    from miditok.constants import CHR_ID_START

    from midigen.codec.bpe import TEXT_BASE
    from midigen.codec.miditok_kinds import MIDITOK_CLASSES, miditok_config
    from midigen.data.bpe import learn_merges, merge_pairs, training_words
    from midigen.data.encode import encode_files

    config = TokenizerConfig(kind=kind)
    encode_files([DATA / "prompts", DATA / "multitrack"], tmp_path / "store", config, workers=1, progress=False)
    store = TokenStore(tmp_path / "store")
    base_size = store.tokenizer.vocab.size
    ours, _ = learn_merges(store, base_size + 150)
    theirs_tokenizer = getattr(miditok, MIDITOK_CLASSES[kind])(miditok_config(config))  # not the shared one
    theirs_tokenizer.config.encode_ids_split = "no"
    words = ["".join(chr(ord(c) - TEXT_BASE + CHR_ID_START) for c in word) for word in training_words(store)]
    theirs_tokenizer.train(base_size + 150, iterator=words)
    learned = json.loads(theirs_tokenizer._model.to_str())["model"]["merges"]
    theirs = merge_pairs(learned, [chr(token + CHR_ID_START) for token in range(base_size)])
    assert len(ours) == 150 and ours == theirs


def test_midilike_takes_no_merges(tmp_path: Path) -> None:
    from midigen.data.bpe import learn_merges
    from midigen.data.encode import encode_files

    encode_files(PROMPTS[:2], tmp_path / "store", TokenizerConfig(kind="midilike"), workers=1, progress=False)
    with pytest.raises(MidigenError, match="midilike"):
        learn_merges(TokenStore(tmp_path / "store"), 1000)
    with pytest.raises(MidigenError, match="midilike"):
        TokenizerConfig(kind="midilike", merges=((4, 5),))


def test_the_tempo_map_given_is_the_one_written_and_bars_follow_the_time_signatures(
        tokenizer: MiditokTokenizer) -> None:
    sequence = tokenizer.encode(BAND)
    score = tokenizer.decode(sequence, [(0, 230.0), (64, 115.0)])
    ticks_per_step = score.ticks_per_quarter // tokenizer.config.steps_per_quarter
    assert [(tempo.time // ticks_per_step, round(tempo.qpm)) for tempo in score.tempos] == [(0, 230), (64, 115)]
    bars = sequence.features["bars"]
    assert bars[-1] == sequence.grid.locate(sequence.steps[-1:])[0][0] > 0 and (np.diff(bars) >= 0).all()


def test_a_store_reads_back_the_sequences_encoded(tokenizer: MiditokTokenizer, tmp_path: Path) -> None:
    store_path, files = tmp_path / "store", [BAND, *PROMPTS[:3]]
    assert main(["encode", *map(str, files), "-o", str(store_path), "--tokenizer", tokenizer.config.kind,
                 "--workers", "1", "--quiet"]) == 0
    store = TokenStore(store_path)
    assert store.config == tokenizer.config and len(store) == len(files)
    for index in range(len(store)):
        song = store.song(index)
        again = tokenizer.encode(store.songs[index].path)
        assert set(song.features) == set(again.features) == set(tokenizer.feature_sizes)
        for name, array in again.arrays().items():
            assert np.array_equal(song.arrays()[name], array), name


def test_every_encoded_file_passes_the_grammar_with_the_features_it_derives(any_tokenizer: Tokenizer) -> None:
    tokenizer = any_tokenizer
    grammar = tokenizer.grammar
    lanes = grammar.on(torch.device("cpu"))
    for path in [BEAT, *PROMPTS]:
        sequence = tokenizer.encode(path)
        assert grammar.check(sequence.tokens) is None, path
        derived = tokenizer.with_positions(sequence.tokens, sequence.grid)  # from the tokens alone
        assert np.array_equal(derived.steps, sequence.steps), path
        for name, values in sequence.features.items():
            assert np.array_equal(derived.features[name], values), (path, name)
    # the torch lanes step as the numpy tables do
    tokens = tokenizer.encode(PROMPTS[0]).tokens
    state = torch.as_tensor(grammar.states([tokens[:1]]))
    for length in range(2, len(tokens) + 1):
        assert bool(lanes.allowed(state, True)[0, tokens[length - 1]])
        state = lanes.feed(state, torch.tensor(tokens[length - 1 : length])).state
    assert np.array_equal(state.numpy(), grammar.states([tokens]))


def test_200_random_walks_decode_into_the_notes_the_grammar_reports(any_tokenizer: Tokenizer) -> None:
    tokenizer = any_tokenizer
    grammar, generator = tokenizer.grammar, torch.Generator().manual_seed(26)
    lanes = grammar.on(torch.device("cpu"))
    walks, length = 200, 64
    state = torch.as_tensor(grammar.states([np.array([1])] * walks))
    tokens = torch.zeros((walks, length), dtype=torch.long)
    steps = torch.zeros(walks, dtype=torch.long)
    reported: list[set[tuple[int, int, int, int]]] = [set() for _ in range(walks)]
    ended = torch.zeros(walks, dtype=torch.bool)
    for index in range(length):
        allowed = lanes.allowed(state, allow_end=index >= length // 2)
        allowed[ended, 0] = True  # an ended walk pads
        assert allowed.any(1).all()  # no lane is ever stuck
        noise = torch.rand(allowed.shape, generator=generator)
        sampled = torch.where(allowed, noise, -1.0).argmax(1)  # uniform over the allowed tokens
        fed = lanes.feed(state, sampled)
        notes = fed.notes.numpy()  # (B, N, NOTE_FIELDS)
        for walk, slot in zip(*np.nonzero(notes[:, :, 1] >= 0)):
            offset, pitch, duration, instrument = notes[walk, slot].tolist()
            reported[walk].add((int(steps[walk]) + offset, pitch, duration, instrument))
        tokens[:, index], state, steps = sampled, fed.state, steps + fed.advance
        ended |= sampled == 2
    ticks_per_step = TICKS // tokenizer.config.steps_per_quarter
    for walk in range(walks):
        sequence = np.concatenate(([1], tokens[walk].numpy()))
        sequence = sequence[: np.flatnonzero(sequence == 2)[0] + 1] if ended[walk] else sequence
        assert tokenizer.grammar.check(sequence) is None
        score = tokenizer.decode(sequence)
        decoded = {(onset // ticks_per_step, pitch, duration // ticks_per_step, instrument)
                   for instrument, onset, pitch, duration, _ in notes_of(score)}
        if ended[walk] or tokenizer.config.kind != "midilike":
            assert decoded == reported[walk], walk
        else:  # notes still on when the walk stops are written by MidiTok at the longest duration
            assert decoded >= reported[walk], walk
        if score.note_num():  # the notes re-encode, into a sequence the grammar accepts
            again = tokenizer.encode(read_notes(score))
            assert tokenizer.sounding()[again.tokens].any() and tokenizer.grammar.check(again.tokens) is None


def test_an_untrained_model_generates_what_the_grammar_allows_and_it_decodes(any_tokenizer: Tokenizer,
                                                                             tmp_path: Path) -> None:
    from midigen.model import ModelConfig, MusicTransformer

    tokenizer = any_tokenizer
    torch.manual_seed(0)
    config = ModelConfig.preset("tiny", tokenizer.config, derived_features=True)
    model = MusicTransformer.for_tokenizer(config, tokenizer).eval()
    loaded = LoadedModel(model, tokenizer.config, config, tmp_path, 0)
    prompts = [empty_prompt(tokenizer), load_prompt(BAND, 2, tokenizer)]
    events: list[TokenEvent] = []
    generations = generate_batch(loaded, prompts, SamplingConfig(temperature=1.5, seed=3), new_tokens=48,
                                 num_samples=2, instruments=(0, 33, 128), on_token=events.append)
    streamed = [set() for _ in generations]
    for event in events:
        streamed[event.lane] |= {(note.step, note.pitch, note.length, note.instrument) for note in event.notes}
    for generation, notes in zip(generations, streamed):
        sequence = generation.sequence
        assert tokenizer.grammar.check(sequence.tokens) is None
        derived = tokenizer.with_positions(sequence.tokens, generation.grid)  # the features generation gave
        assert np.array_equal(derived.steps, sequence.steps)
        for name, values in sequence.features.items():
            assert np.array_equal(derived.features[name], values), name
        score = tokenizer.decode(sequence, generation.tempos, generation.grid)
        ticks_per_step = score.ticks_per_quarter // tokenizer.config.steps_per_quarter
        decoded = {(onset // ticks_per_step, pitch, duration // ticks_per_step, instrument)
                   for instrument, onset, pitch, duration, _ in notes_of(score)}
        assert notes <= decoded and {note[3] for note in notes} <= {0, 33, 128}
    assert any(streamed) or tokenizer.config.kind == "midilike"  # untrained, it seldom ends a note in 48 tokens


def test_a_tokenizer_config_file_sets_miditok_parameters_and_bad_ones_are_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = tmp_path / "remi.json"
    params.write_text('{"pitch_range": [48, 84]}')
    output = tmp_path / "out.mid"
    assert main(["roundtrip", str(PROMPTS[0]), "-o", str(output), "--tokenizer", "remi",
                 "--tokenizer-config", str(params)]) == 0
    pitches = {note[2] for note in notes_of(symusic.Score(str(output)))}
    assert pitches and min(pitches) >= 48 and max(pitches) <= 84
    params.write_text('{"time_signature_range": {"8": [6]}}')
    assert main(["roundtrip", str(PROMPTS[0]), "-o", str(output), "--tokenizer", "tsd",
                 "--tokenizer-config", str(params)]) == 2
    assert "only denominator 4" in capsys.readouterr().err
    with pytest.raises(MidigenError, match="multiple of steps_per_quarter"):
        TokenizerConfig(kind="midilike", max_duration=100)
    with pytest.raises(MidigenError, match="not supported"):
        TokenizerConfig(kind="remi", miditok={"use_chords": True})
    with pytest.raises(MidigenError, match="for the MidiTok kinds"):
        TokenizerConfig(miditok={"pitch_range": [21, 108]})
    saved = TokenizerConfig(kind="tsd").to_dict()
    del saved["miditok"]  # a config saved before the MidiTok kinds
    assert TokenizerConfig.from_saved(saved) == TokenizerConfig(kind="tsd")
