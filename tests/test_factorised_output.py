"""The factorised output (type, then pitch class, then octave): a normalised distribution over every token of
every tokenizer kind, equal to the product its heads define, the same through the KV cache, and a model trained
with it from the command line saves, loads and scores."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import DATA, PROMPTS, SINGLE_STREAM

from midigen.cli.main import main
from midigen.codec import TokenizerConfig, load_tokenizer
from midigen.codec.interface import Tokenizer
from midigen.data.bpe import train_store
from midigen.data.store import TokenStore
from midigen.errors import MidigenError
from midigen.inference import LoadedModel, SamplingConfig, empty_prompt, generate_batch, load_prompt
from midigen.inference.export import export_model
from midigen.inference.model_files import load_model
from midigen.model import ModelConfig, MusicTransformer
from midigen.model.pitch_output import PitchedTokens

BAND = DATA / "multitrack" / "230_bpm_multitrack.mid"


@pytest.fixture(scope="module")
def merged_store(prompt_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The prompts' store with 60 merges learned on its training songs."""
    out = tmp_path_factory.mktemp("factorised") / "bpe"
    train_store(prompt_store, out, TokenStore(prompt_store).tokenizer.vocab.size + 60, progress=False)
    return out


@pytest.fixture(params=["seed", "multitrack", "midilike", "seed+bpe"])
def tokenizer(request: pytest.FixtureRequest, merged_store: Path) -> Tokenizer:
    if request.param == "seed+bpe":
        return TokenStore(merged_store).tokenizer
    config = {"seed": SINGLE_STREAM, "multitrack": TokenizerConfig(),
              "midilike": TokenizerConfig(kind="midilike")}[request.param]
    return load_tokenizer(config)


def scrambled_model(tokenizer: Tokenizer) -> MusicTransformer:
    """A tiny factorised model with weights far from their initial near-uniform outputs."""
    config = ModelConfig.preset("tiny", tokenizer.config, factorised_output=True)
    torch.manual_seed(0)
    model = MusicTransformer.for_tokenizer(config, tokenizer).eval()
    with torch.no_grad():
        for weight in model.parameters():
            weight.add_(torch.randn_like(weight) * 0.3)
    return model


def inputs(tokenizer: Tokenizer, length: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The first tokens of a real file (the band file where the tokenizer keeps instruments) as one lane."""
    sequence = tokenizer.encode(BAND if tokenizer.config.instruments else PROMPTS[0])
    tokens = torch.as_tensor(sequence.tokens[:length].astype(np.int64)).view(1, -1)  # (1, T)
    return tokens, {name: torch.as_tensor(values[:length].astype(np.int64)).view(1, -1)
                    for name, values in sequence.features.items()}


def expected_log_probs(model: MusicTransformer, hidden: torch.Tensor, tokenizer: Tokenizer) -> torch.Tensor:
    """log p of every token at one position (hidden (C,)), written out token by token: a pitched token's type's
    share of the softmax shared with the other tokens, times its pitch class among those its type holds, times its
    octave among those its type holds in that pitch class."""
    pitches = tokenizer.token_pitches()
    type_names = [name for name, mask in tokenizer.token_types().items() if (mask & (pitches >= 0)).any()]
    type_of = {token: type_names.index(name) for name, mask in tokenizer.token_types().items()
               for token in np.flatnonzero(mask & (pitches >= 0))}
    head = model.pitch_output
    token_logits = model.head(hidden)  # (V,)
    pitch_class_logits = head.pitch_classes(hidden).view(len(type_names), 12)
    octave_logits = head.octaves(hidden).view(len(type_names), 12, -1)
    unpitched = [token for token in range(len(pitches)) if pitches[token] < 0]
    flat = torch.cat([token_logits[unpitched], head.types(hidden)]).log_softmax(0)
    expected = torch.empty(len(pitches))
    expected[unpitched] = flat[: len(unpitched)]
    for token, kind in type_of.items():
        same_type = [pitches[other] for other, other_kind in type_of.items() if other_kind == kind]
        octave, pitch_class = divmod(int(pitches[token]), 12)
        classes = sorted({p % 12 for p in same_type})
        octaves = sorted({p // 12 for p in same_type if p % 12 == pitch_class})
        expected[token] = (flat[len(unpitched) + kind]
                           + pitch_class_logits[kind, pitch_class]
                           - torch.logsumexp(pitch_class_logits[kind, classes], 0)
                           + octave_logits[kind, pitch_class, octave]
                           - torch.logsumexp(octave_logits[kind, pitch_class, octaves], 0))
    return expected


def test_the_output_is_the_product_of_its_heads_over_every_token(tokenizer: Tokenizer) -> None:
    model = scrambled_model(tokenizer)
    tokens, features = inputs(tokenizer, 40)
    with torch.no_grad():
        log_probs = model(tokens, features).logits[0]  # (T, V)
        torch.testing.assert_close(log_probs.logsumexp(-1), torch.zeros(tokens.shape[1]), atol=1e-5, rtol=0)
        hidden = hidden_states(model, tokens, features)[0]  # (T, C)
        for position in (0, 17, 39):
            torch.testing.assert_close(log_probs[position], expected_log_probs(model, hidden[position], tokenizer),
                                       atol=1e-4, rtol=0)
    pitched = PitchedTokens.of(tokenizer)
    assert np.isfinite(log_probs[:, pitched.pitches >= 0].numpy()).all()  # every pitched token can be sampled
    model.train()
    loss = model(tokens[:, :-1], {k: v[:, :-1] for k, v in features.items()}, targets=tokens[:, 1:]).loss
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.pitch_output.octaves.weight.grad.abs().sum() > 0


def test_a_fresh_model_starts_with_every_token_about_as_likely(tokenizer: Tokenizer) -> None:
    config = ModelConfig.preset("tiny", tokenizer.config, factorised_output=True)
    torch.manual_seed(0)
    model = MusicTransformer.for_tokenizer(config, tokenizer).eval()
    tokens, features = inputs(tokenizer, 16)
    with torch.no_grad():
        probs = model(tokens, features).logits.exp()[0]  # (T, V)
    # each type's notes take about their share of the vocabulary, as with one output per token (a type's logit
    # started at 0 would give them a hundredth of it)
    pitched = PitchedTokens.of(tokenizer)
    for kind in range(pitched.num_types):
        members = torch.as_tensor(pitched.types == kind)
        share = members.float().mean()
        assert ((probs[:, members].sum(-1) / share).log().abs() < 0.3).all()


def test_pitched_tokens_of_each_kind() -> None:
    seed = PitchedTokens.of(load_tokenizer(SINGLE_STREAM))
    assert seed.num_types == 1 and sorted(seed.pitches[seed.pitches >= 0]) == list(range(128))
    midilike = PitchedTokens.of(load_tokenizer(TokenizerConfig(kind="midilike")))
    assert midilike.num_types == 2  # note-ons and note-offs, each over the pitches
    multitrack = load_tokenizer(TokenizerConfig())
    drums = multitrack.token_types()["hit"]
    assert (PitchedTokens.of(multitrack).pitches[drums] == -1).all()  # drum hits stay one output each


def test_merged_tokens_keep_their_own_output(merged_store: Path) -> None:
    tokenizer = TokenStore(merged_store).tokenizer
    base_size = tokenizer.base.vocab.size
    pitched = PitchedTokens.of(tokenizer)
    assert (pitched.pitches[base_size:] == -1).all()
    np.testing.assert_array_equal(pitched.pitches[:base_size], PitchedTokens.of(tokenizer.base).pitches)


def test_a_type_that_repeats_a_pitch_or_no_pitched_token_is_refused() -> None:
    repeated = SimpleNamespace(token_pitches=lambda: np.array([-1, 60, 60, 61]),
                               token_types=lambda: {"note": np.array([False, True, True, True])})
    with pytest.raises(MidigenError, match="'note' tokens repeat a pitch"):
        PitchedTokens.of(repeated)
    unpitched = SimpleNamespace(token_pitches=lambda: np.full(4, -1), token_types=lambda: {"x": np.ones(4, bool)})
    with pytest.raises(MidigenError, match="has none"):
        PitchedTokens.of(unpitched)
    config = ModelConfig.preset("tiny", SINGLE_STREAM, factorised_output=True)
    with pytest.raises(MidigenError, match="no pitched tokens"):
        MusicTransformer(config)


def hidden_states(model: MusicTransformer, tokens: torch.Tensor, features: dict[str, torch.Tensor]) -> torch.Tensor:
    """The final hidden states (B, T, C) the output reads, captured from the final layer norm."""
    captured = []
    handle = model.ln_f.register_forward_hook(lambda _module, _args, out: captured.append(out))
    model(tokens, features)
    handle.remove()
    return captured[0]


def test_the_kv_cache_gives_the_full_computation_and_generations_decode() -> None:
    tokenizer = load_tokenizer(TokenizerConfig())
    model = scrambled_model(tokenizer)
    tokens, features = inputs(tokenizer, 48)
    with torch.no_grad():
        full = model(tokens, features).logits
        prefix = model(tokens[:, :30], {k: v[:, :30] for k, v in features.items()})
        rest = model(tokens[:, 30:], {k: v[:, 30:] for k, v in features.items()}, past=prefix.present)
    torch.testing.assert_close(torch.cat([prefix.logits, rest.logits], 1), full, atol=1e-5, rtol=0)
    loaded = LoadedModel(model, tokenizer.config, model.config, Path("."), 0)
    prompts = [empty_prompt(tokenizer), load_prompt(BAND, 2, tokenizer)]
    for generation in generate_batch(loaded, prompts, SamplingConfig(seed=2), new_tokens=40, num_samples=2):
        assert tokenizer.grammar.check(generation.sequence.tokens) is None
        assert tokenizer.decode(generation.sequence, generation.tempos, generation.grid).note_num() > 0


def test_a_factorised_run_trains_saves_loads_and_scores_from_the_command_line(prompt_store: Path,
                                                                              tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(["train", str(prompt_store), "-o", str(run), "--preset", "tiny", "--max-steps", "3",
                 "--batch-size", "2", "--factorised-output", "--pitch-features", "--device", "cpu", "--quiet"]) == 0
    loaded = load_model(run, "cpu")
    assert loaded.model_config.factorised_output and loaded.model.pitch_output is not None
    exported = load_model(export_model(run, tmp_path / "model"), "cpu")
    tokens, features = inputs(load_tokenizer(SINGLE_STREAM), 32)
    with torch.no_grad():
        torch.testing.assert_close(exported.model(tokens, features).logits, loaded.model(tokens, features).logits,
                                   atol=0, rtol=0)
    out = tmp_path / "eval.json"
    assert main(["eval", str(run), "--data", str(prompt_store), "--device", "cpu", "--json", str(out)]) == 0
    scores = json.loads(out.read_text())
    assert np.isfinite(scores["nll_per_note"]) and 0 < scores["nll"] < np.log(loaded.model_config.vocab_size) + 1
    assert ModelConfig.from_saved(loaded.model_config.to_dict()) == loaded.model_config
    saved_before = loaded.model_config.to_dict()
    del saved_before["factorised_output"]
    assert not ModelConfig.from_saved(saved_before).factorised_output  # a model saved before has one output a token
