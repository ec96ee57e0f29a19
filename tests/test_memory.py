"""Long-term memory: XL parity, kNN search, FIFO, no leaks between songs, contiguous batching, memory
when generating, and every memory mode through train → resume → generate."""

from __future__ import annotations

import copy
import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SINGLE_STREAM

from midigen.codec import load_tokenizer
from midigen.codec.config import NUM_PITCHES, Vocab
from midigen.data.batching import RandomChunks, SongLanes, TokenArrays, draw_shifts, resolve_location
from midigen.data.store import TokenStore
from midigen.errors import MidigenError
from midigen.inference.generate import MemoryDecoder, empty_prompt, generate, load_prompt
from midigen.inference.sampling import SamplingConfig
from midigen.model import ModelConfig, MusicTransformer
from midigen.model import memory as memory_module
from midigen.model.memory import KnnMemory, MemoryState, announce_search, knn_store_bytes, knn_store_device
from midigen.model.transformer import Neighbours
from midigen.training.config import TrainConfig
from midigen.inference.model_files import load_model
from midigen.training.recipe import train

TOKENIZER = load_tokenizer(SINGLE_STREAM)


def tiny(memory: str, **overrides: object) -> MusicTransformer:
    torch.manual_seed(0)
    return MusicTransformer(ModelConfig.preset("tiny", SINGLE_STREAM, memory=memory, **overrides)).eval()


Features = dict[str, torch.Tensor]


def segment_inputs(T: int, B: int = 1, seed: int = 0) -> tuple[torch.Tensor, Features]:
    """Random tokens (B, T) and their `bars` and `beats` features."""
    g = torch.Generator().manual_seed(seed)
    tokens, bars = torch.randint(4, 388, (B, T), generator=g), torch.randint(0, 8, (B, T), generator=g)
    return tokens, {"bars": bars, "beats": torch.randint(0, 64, (B, T), generator=g)}


def cut(features: Features, window: slice) -> Features:
    """The features of the tokens in `window` (of the last dimension)."""
    return {name: value[..., window] for name, value in features.items()}


def test_xl_segments_equal_one_forward_with_the_banded_mask() -> None:
    """Segment 2 attends to all of segment 1 (the memory) and causally to itself; segment 1 only to itself."""
    model = tiny("xl", n_layers=1, knn_layer=0, context=16)
    T = 16
    tokens, features = segment_inputs(2 * T, B=2)
    memory = MemoryState(model.config, 2, torch.device("cpu"))
    with torch.no_grad():
        first = memory.forward(model, tokens[:, :T], cut(features, slice(None, T)), new_song=torch.ones(2, dtype=torch.bool))
        second = memory.forward(model, tokens[:, T:], cut(features, slice(T, None)), new_song=torch.zeros(2, dtype=torch.bool))
        bars, beats = model.feature_emb["bars"], model.feature_emb["beats"]
        x = model.tok_emb(tokens) + bars(features["bars"] % bars.num_embeddings) + beats(features["beats"])
        buckets, _ = model.attention_layout(2 * T, None, torch.device("cpu"))
        q = torch.arange(2 * T).view(-1, 1)
        k = torch.arange(2 * T).view(1, -1)
        banded = (k <= q) & (k >= (q // T - 1).clamp(min=0) * T)  # own segment, plus the previous one
        x, _ = model.blocks[0](x, buckets, banded.view(1, 1, 2 * T, 2 * T), None, None)
        full = model.output(model.ln_f(x))
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("slots_per_block", [None, 7, 13])
def test_knn_search_equals_brute_force_and_keeps_the_newest(
    backend: str, slots_per_block: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a store searched in several blocks, whose top-k are merged; faiss's heaps start from a floor found in a first
    # block of at least 2k + 1 slots (13), or from nothing (7)
    if slots_per_block is not None:
        monkeypatch.setattr(memory_module, "SCORE_BLOCK_ELEMENTS", 3 * 2 * 7 * slots_per_block)
    torch.manual_seed(0)
    lanes, heads, dim, capacity, k = 3, 2, 8, 50, 5
    memory = KnnMemory(lanes, heads, dim, capacity, k, torch.device("cpu"), backend)
    written: list[list[torch.Tensor]] = [[] for _ in range(lanes)]
    values_written: list[list[torch.Tensor]] = [[] for _ in range(lanes)]
    for segment, length in enumerate((20, 20, 60, 20)):  # lane 0's third segment is longer than the store
        keys = torch.nn.functional.normalize(torch.randn(lanes, heads, length, dim), dim=-1)
        values = torch.randn(lanes, heads, length, dim)
        valid = torch.ones(lanes, length, dtype=torch.bool)
        valid[1, 15:] = False  # padding is never stored
        valid[2] = segment < 2
        memory.write(keys, values, valid)
        for lane in range(lanes):
            written[lane].append(keys[lane][:, valid[lane]])
            values_written[lane].append(values[lane][:, valid[lane]])
    queries = torch.nn.functional.normalize(torch.randn(lanes, heads, 7, dim), dim=-1)
    found = memory.search(queries)
    found_keys, found_values = found.keys[found.rows], found.values[found.rows]  # (B, H, T, K, D)
    for lane in range(lanes):
        newest_keys = torch.cat(written[lane], 1)[:, -capacity:]  # FIFO: exactly the newest entries survive
        newest_values = torch.cat(values_written[lane], 1)[:, -capacity:]
        assert int(memory.sizes()[lane]) == newest_keys.shape[1]
        scores = torch.einsum("htd,hcd->htc", queries[lane], newest_keys)
        best = scores.topk(k, dim=-1)
        expected_values = newest_values[torch.arange(heads).view(-1, 1, 1), best.indices]
        assert found.valid[lane].all()
        got = torch.einsum("htd,htkd->htk", queries[lane], found_keys[lane])
        torch.testing.assert_close(found.scores[lane], got, atol=1e-5, rtol=0)  # the scores are the neighbours'
        order = got.argsort(dim=-1, descending=True)
        torch.testing.assert_close(got.gather(-1, order), best.values, atol=1e-5, rtol=0)
        torch.testing.assert_close(found_values[lane].gather(-2, order.unsqueeze(-1).expand(-1, -1, -1, dim)),
                                   expected_values, atol=1e-6, rtol=0)


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_knn_search_over_lanes_of_different_sizes_scores_each_only_up_to_its_own_end(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Contiguous batching leaves lanes with very different amounts: an empty lane, one with fewer than k entries,
    a short song, a long one. Each lane is scored only over the blocks holding its entries, and finds its exact top k."""
    monkeypatch.setattr(memory_module, "UNEVEN_BLOCK_SLOTS", 16)
    torch.manual_seed(0)
    sizes, heads, dim, k = [0, 3, 37, 200], 2, 8, 5
    memory = KnnMemory(len(sizes), heads, dim, 256, k, torch.device("cpu"), backend)
    keys = torch.nn.functional.normalize(torch.randn(len(sizes), heads, max(sizes), dim), dim=-1)
    values = torch.randn_like(keys)
    valid = torch.arange(max(sizes)) < torch.tensor(sizes).view(-1, 1)  # (B, T)
    memory.write(keys, values, valid)
    queries = torch.nn.functional.normalize(torch.randn(len(sizes), heads, 6, dim), dim=-1)
    blocks = [(first, lanes) for first, lanes, _ in memory._score_blocks(queries)]
    assert blocks == [(first, [lane for lane in (1, 2, 3) if sizes[lane] > first]) for first in range(0, 200, 16)]
    found = memory.search(queries)
    assert not found.valid[0].any() and found.valid[1].sum(-1).eq(3).all() and found.valid[2:].all()
    for lane in (1, 2, 3):
        scores = torch.einsum("htd,hcd->htc", queries[lane], keys[lane, :, : sizes[lane]])
        best = scores.topk(min(k, sizes[lane]), dim=-1)
        got = found.scores[lane][found.valid[lane]].view(heads, 6, -1)
        torch.testing.assert_close(got.sort(-1, descending=True).values, best.values, atol=1e-5, rtol=0)
        got_values = found.values[found.rows[lane]][found.valid[lane]].view(heads, 6, -1, dim)
        expected_values = values[lane][torch.arange(heads).view(-1, 1, 1), best.indices]
        torch.testing.assert_close(got_values.sum(2), expected_values.sum(2), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("imports", "warned"), [
    ("import midigen.model.memory", False),  # the memory module itself loads torch before faiss
    ("import torch, faiss, midigen.model.memory", False),
    ("import faiss, torch, midigen.model.memory", True),
])
def test_faiss_loaded_before_torch_is_warned_about(imports: str, warned: bool) -> None:
    """In a process that loaded faiss first, the search took 8× as long."""
    result = subprocess.run([sys.executable, "-c", imports], capture_output=True, text=True, check=True)
    assert ("faiss was imported before torch" in result.stderr) == warned


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_a_restored_knn_memory_searches_and_evicts_like_the_original(backend: str) -> None:
    torch.manual_seed(0)

    def segment() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        valid = torch.ones(3, 12, dtype=torch.bool)
        valid[2, 4:] = False  # lanes fill at different rates
        return torch.nn.functional.normalize(torch.randn(3, 2, 12, 8), dim=-1), torch.randn(3, 2, 12, 8), valid

    original = KnnMemory(3, 2, 8, 30, 4, torch.device("cpu"), backend)
    for _ in range(3):  # lanes 0 and 1 wrap round their ring buffer
        original.write(*segment())
    restored = KnnMemory(3, 2, 8, 30, 4, torch.device("cpu"), backend)
    saved = io.BytesIO()
    torch.save(original.state_dict(), saved)
    restored.load_state_dict(torch.load(io.BytesIO(saved.getvalue())))
    for _ in range(2):
        queries = torch.nn.functional.normalize(torch.randn(3, 2, 5, 8), dim=-1)
        a, b = original.search(queries), restored.search(queries)
        assert torch.equal(a.valid, b.valid) and torch.equal(a.scores, b.scores)
        assert torch.equal(a.keys[a.rows], b.keys[b.rows]) and torch.equal(a.values[a.rows], b.values[b.rows])
        keys, values, valid = segment()
        original.write(keys, values, valid)
        restored.write(keys, values, valid)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_knn_search_under_bf16_autocast_is_the_float32_search(backend: str) -> None:
    """The trainer runs under bf16 autocast on CUDA (here on CPU): the search's scores stay float32, so it stays exact."""
    torch.manual_seed(0)
    memory = KnnMemory(2, 2, 16, 400, 8, torch.device("cpu"), backend)
    keys = torch.nn.functional.normalize(torch.randn(2, 2, 400, 16), dim=-1)
    memory.write(keys, torch.randn_like(keys), torch.ones(2, 400, dtype=torch.bool))
    queries = torch.nn.functional.normalize(torch.randn(2, 2, 9, 16), dim=-1)
    plain = memory.search(queries)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = memory.search(queries)
    assert autocast.scores.dtype == torch.float32
    assert torch.equal(autocast.rows, plain.rows) and torch.equal(autocast.scores, plain.scores)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
@pytest.mark.parametrize("mode", ["xl", "knn"])
def test_memory_trains_under_bf16_autocast(mode: str, device: str) -> None:
    """Four segments with memory under bf16 autocast compute what they compute in float32, within bf16's precision.

    bf16 keeps 8 significant bits, so each rounding errs by up to 2^-9 relative; through the model's matmuls the
    logits and the gradients end up about 2^-8 (0.3-0.4%) away from float32's. The tolerances, 1% for the logits
    and 2% for all gradients together, leave room for other CPUs' kernels, while an error in the bf16 path (the
    relative-position bias lost, say) moves them by 2% and more. One parameter's gradient may err more (some of the
    kNN layer's do by 4%), hence 15% each; a gradient lost under autocast errs by 100%.
    """
    base = tiny(mode, dropout=0.0, attn_dropout=0.0).to(device).train()  # no dropout: the same model in both runs
    runs = {}
    for autocast in (False, True):
        model = copy.deepcopy(base)
        memory = MemoryState(model.config, 2, torch.device(device))
        logits = []
        for segment in range(4):  # the kNN memory is searched from the third segment on
            tokens, features = segment_inputs(model.config.context + 1, B=2, seed=segment)
            tokens, features = tokens.to(device), {name: value.to(device) for name, value in features.items()}
            with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
                output = memory.forward(model, tokens[:, :-1], cut(features, slice(None, -1)), targets=tokens[:, 1:],
                                        new_song=torch.full((2,), segment == 0, device=device))
            output.loss.backward()
            assert output.logits.dtype == (torch.bfloat16 if autocast else torch.float32)
            logits.append(output.logits.detach().float())
        if mode == "knn":
            assert int(memory.knn.sizes().min()) > 0 and model.blocks[-1].attn.gate.grad.abs().sum() > 0
        runs[autocast] = torch.stack(logits), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    def relative_error(bf16: torch.Tensor, float32: torch.Tensor) -> float:
        return float((bf16 - float32).norm() / float32.norm())

    (logits, grads), (bf16_logits, bf16_grads) = runs[False], runs[True]
    assert bf16_grads.keys() == grads.keys()
    assert relative_error(bf16_logits, logits) < 0.01
    assert relative_error(torch.cat([g.flatten() for g in bf16_grads.values()]), torch.cat([g.flatten() for g in grads.values()])) < 0.02
    for name, grad in grads.items():
        assert relative_error(bf16_grads[name], grad) < 0.15, name


def test_saved_memory_holds_only_what_was_written() -> None:
    model = tiny("knn", context=16)  # a kNN store of 4,096 entries per lane
    memory = MemoryState(model.config, 2, torch.device("cpu"))
    tokens, features = segment_inputs(16, B=2)
    with torch.no_grad():
        memory.forward(model, tokens, features, new_song=torch.ones(2, dtype=torch.bool))
    saved = io.BytesIO()
    torch.save(memory.state_dict(), saved)
    written = sum(t.numel() * t.element_size() for t in memory.knn.state_dict().values())
    window = sum(kv.keys.numel() * 2 * kv.keys.element_size() for kv in memory.xl.past())
    assert saved.tell() < 2 * (written + window) + 20_000  # not the whole store, nor the buffers the window views


def test_knn_clear_forgets_one_lane_only() -> None:
    memory = KnnMemory(2, 1, 4, 10, 3, torch.device("cpu"), "faiss")
    memory.write(torch.nn.functional.normalize(torch.randn(2, 1, 6, 4), dim=-1), torch.randn(2, 1, 6, 4),
                 torch.ones(2, 6, dtype=torch.bool))
    memory.clear(torch.tensor([True, False]))
    valid = memory.search(torch.nn.functional.normalize(torch.randn(2, 1, 2, 4), dim=-1)).valid
    assert not valid[0].any() and valid[1].all()


@pytest.mark.parametrize("mode", ["xl", "knn"])
def test_a_new_song_does_not_see_the_previous_one(mode: str) -> None:
    """Lane 0 plays song A then song B; changing A must not change B's logits."""
    model = tiny(mode)
    T = model.config.context
    song_b = segment_inputs(T, B=2, seed=9)

    def song_b_logits(seed_of_a: int) -> torch.Tensor:
        memory = MemoryState(model.config, 2, torch.device("cpu"))
        with torch.no_grad():
            for segment in range(3):  # song A, three segments long
                memory.forward(model, *segment_inputs(T, B=2, seed=seed_of_a + segment),
                               new_song=torch.tensor([segment == 0, segment == 0]))
            return memory.forward(model, *song_b, new_song=torch.tensor([True, False])).logits

    a, b = song_b_logits(100), song_b_logits(200)
    torch.testing.assert_close(a[0], b[0], atol=0, rtol=0)  # lane 0 switched songs: no leak
    assert not torch.allclose(a[1], b[1])  # lane 1 did not: its memory is in use


def test_memory_decoder_computes_what_training_computes(prompt_files: list[Path]) -> None:
    """Token-by-token generation with memory gives the logits of the segmented training forward."""
    model = tiny("knn", context=16)
    sequence = TOKENIZER.encode(prompt_files[0])
    tokens = torch.as_tensor(sequence.tokens[:80]).view(1, -1)
    features = {name: torch.as_tensor(sequence.features[name][:80]).view(1, -1) for name in ("bars", "beats")}
    memory = MemoryState(model.config, 1, torch.device("cpu"))
    with torch.no_grad():
        expected = torch.cat([
            memory.forward(model, tokens[:, s : s + 16], cut(features, slice(s, s + 16))).logits
            for s in range(0, 80, 16)
        ], 1)[0]
    decoder = MemoryDecoder(model)
    first = decoder(sequence.slice(slice(0, 21)))  # a prompt over a segment long
    got = [first] + [decoder(sequence.slice(slice(t, t + 1))) for t in range(21, 80)]
    torch.testing.assert_close(torch.stack(got), expected[20:], atol=1e-4, rtol=0)
    # of the five finished segments, the newest is in the XL window and the four before it in the kNN memory
    assert int(decoder.memory.knn.sizes()[0]) == 64


def epoch_of(store: TokenStore, mode: str, lanes: int, context: int = 32, seed: int = 3,
             max_transpose: int = 5) -> list[dict[str, torch.Tensor]]:
    """One epoch of song lanes, transposed as in training by default."""
    data = TokenArrays(store, "memmap")
    songs = list(range(len(store)))
    return list(SongLanes(data, songs, context, lanes, seed=seed, mode=mode, max_transpose=max_transpose,
                          shuffle=True, endless=False))


def shift_of(row: np.ndarray, original: np.ndarray, vocab: Vocab) -> int | None:
    """The one interval by which `row` moves the notes of `original` (None: no notes), asserting that every
    other token (durations, gaps, separators, specials, padding) is untouched and every note stays a note."""
    notes = vocab.ids_of("note")
    is_note = (original >= notes.start) & (original < notes.stop)
    assert np.array_equal(row[~is_note], original[~is_note])
    moved = np.unique(row[is_note] - original[is_note])
    assert len(moved) <= 1, f"the notes of one row moved by {moved}"
    assert ((row[is_note] >= notes.start) & (row[is_note] < notes.stop)).all()  # pitch 0..127
    return int(moved[0]) if len(moved) else None


@pytest.mark.parametrize("mode", ["contiguous", "song"])
def test_song_lanes_transpose_each_song_by_one_interval_drawn_from_the_seed(prompt_store: Path, mode: str) -> None:
    store = TokenStore(prompt_store)
    vocab = store.config.vocab

    def shifts(seed: int) -> dict[int, int]:
        found: dict[int, set[int]] = {}
        for batch in epoch_of(store, mode, lanes=3, context=32, seed=seed):
            for lane in range(3):
                song, offset = int(batch["song"][lane]), int(batch["offset"][lane])
                if song < 0:
                    assert not batch["tokens"][lane].any()
                    continue
                original = store.song(song)
                n = min(33, max(0, len(original) - offset))  # a finished song waits in song mode: all padding
                for name in ("bars", "beats"):
                    assert np.array_equal(batch[name][lane, :n].numpy(), getattr(original, name)[offset : offset + n])
                shift = shift_of(batch["tokens"][lane].numpy(), np.pad(original.tokens[offset : offset + n], (0, 33 - n)), vocab)
                if shift is not None:
                    found.setdefault(song, set()).add(shift)
        assert all(len(moved) == 1 for moved in found.values()), found  # one interval per song, in every segment
        return {song: moved.pop() for song, moved in found.items()}

    drawn = shifts(seed=3)
    assert len(drawn) == len(store)  # every song has notes, and all of them were seen
    assert set(drawn.values()) <= set(range(-5, 6)) and len(set(drawn.values())) > 3
    assert shifts(seed=3) == drawn and shifts(seed=4) != drawn


def test_random_chunks_transpose_each_chunk_by_one_interval_drawn_from_the_seed(prompt_store: Path) -> None:
    store = TokenStore(prompt_store)
    songs = list(range(len(store)))

    def batches(seed: int) -> list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
        """Each batch with the chunks as gathered from the store, before transposition."""
        data = TokenArrays(store, "memmap")
        gathered = []
        gather = data.gather
        data.gather = lambda *args: gathered.append(gather(*args)) or {k: v.clone() for k, v in gathered[-1].items()}
        chunks = RandomChunks(data, songs, 32, 4, seed=seed, max_transpose=5)
        return [(next(chunks), gathered[-1]) for _ in range(20)]

    drawn = []
    first = batches(seed=3)
    for batch, original in first:
        for name in ("bars", "beats"):
            assert torch.equal(batch[name], original[name])
        for row, original_row in zip(batch["tokens"].numpy(), original["tokens"].numpy()):
            drawn.append(shift_of(row, original_row, store.config.vocab))
    assert set(drawn) <= set(range(-5, 6)) and len(set(drawn)) > 3
    for seed, same in ((3, True), (4, False)):
        again = [batch["tokens"] for batch, _ in batches(seed)]
        assert all(torch.equal(a, b) for a, b in zip(again, (batch["tokens"] for batch, _ in first))) == same


def test_shifts_keep_notes_on_the_keyboard_and_are_uniform_over_what_is_left() -> None:
    """A row whose notes reach within 5 semitones of pitch 0 or 127 draws only from the shifts that keep them there,
    each as likely; a row with no notes may take any shift."""
    lowest, highest = np.array([60, 2, 0, 40, NUM_PITCHES]), np.array([72, 50, 127, 125, -1])
    allowed = [range(-5, 6), range(-2, 6), range(0, 1), range(-5, 3), range(-5, 6)]
    rng = np.random.default_rng(0)
    drawn = np.stack([draw_shifts(lowest, highest, 5, rng) for _ in range(2000)])  # (draws, rows)
    for shifts, values in zip(drawn.T, allowed):
        counts = np.bincount(shifts - values.start, minlength=len(values))
        assert len(counts) == len(values) and shifts.min() >= values.start
        assert counts.min() > 0.8 * len(shifts) / len(values)


@pytest.mark.parametrize("mode", ["contiguous", "song"])
def test_song_lanes_cover_every_token_once(prompt_store: Path, mode: str) -> None:
    store = TokenStore(prompt_store)
    batches = epoch_of(store, mode, lanes=3)  # transposed
    targets = sorted(int((b["tokens"][:, 1:] != 0).sum()) for b in batches)
    assert sum(targets) == sum(s.length - 1 for s in store.songs)
    seen = np.concatenate([b["tokens"][lane, 1:][b["tokens"][lane, 1:] != 0].numpy() for b in batches for lane in range(3)])
    everything = np.concatenate([store.song(i).tokens[1:] for i in range(len(store))])
    # transposition shifts notes, so compare the multiset of non-note tokens and the count of notes
    vocab = store.config.vocab
    is_note = lambda t: vocab.family_of("note")[t]  # noqa: E731
    assert np.array_equal(np.sort(seen[~is_note(seen)]), np.sort(everything[~is_note(everything)]))
    assert is_note(seen).sum() == is_note(everything).sum()
    for batch in batches:  # each row is the named song from the given offset
        for lane in range(3):
            row, song, offset = batch["tokens"][lane].numpy(), int(batch["song"][lane]), int(batch["offset"][lane])
            expected = store.song(song).tokens[offset : offset + 33] if song >= 0 else np.zeros(0, np.int64)
            assert np.array_equal(is_note(row[: len(expected)]), is_note(expected)) and not row[len(expected) :].any()
            assert np.array_equal(row[: len(expected)][~is_note(expected)], expected[~is_note(expected)])


def test_contiguous_lanes_switch_songs_at_different_times(prompt_store: Path) -> None:
    batches = epoch_of(TokenStore(prompt_store), "contiguous", lanes=3, context=16)
    switches = [{i for i, b in enumerate(batches) if b["new_song"][lane] and i > 0} for lane in range(3)]
    assert all(switches) and len(set.union(*switches)) > max(len(s) for s in switches)
    song_batches = epoch_of(TokenStore(prompt_store), "song", lanes=3, context=16)
    flags = [b["new_song"] for b in song_batches]
    assert all(f.all() or not f.any() for f in flags)  # song mode: all lanes start together


def test_every_data_location_gives_the_same_batches(prompt_store: Path) -> None:
    store = TokenStore(prompt_store)
    songs = list(range(len(store)))
    batches = {}
    for location in ("memmap", "cpu", "auto"):
        data = TokenArrays(store, location)
        assert data.location == {"auto": "cpu"}.get(location, location)  # a few thousand tokens fit in memory
        lanes = SongLanes(data, songs, 16, 3, seed=1)
        batches[location] = [next(lanes) for _ in range(6)]
    for batch in range(6):
        for name, value in batches["memmap"][batch].items():
            assert torch.equal(value, batches["cpu"][batch][name]) and torch.equal(value, batches["auto"][batch][name])
    if not torch.cuda.is_available():
        with pytest.raises(MidigenError, match="--data-location gpu needs training on a CUDA device"):
            TokenArrays(store, "gpu", torch.device("cpu"))


def test_auto_puts_the_token_store_where_it_takes_under_a_quarter_of_the_memory(
    prompt_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`auto`: on the GPU when training there and the arrays take under a quarter of its free memory, else in CPU
    memory when they take under a quarter of it, else memory-mapped from disk; training on the CPU never asks the GPU."""
    store = TokenStore(prompt_store)
    needed = sum(array.nbytes for array in TokenArrays(store, "cpu").arrays.values())  # as loaded
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: pytest.fail("asked the GPU when training on the CPU"))
    assert TokenArrays(store, "auto", cpu).location == "cpu" and TokenArrays(store, "auto").location == "cpu"
    asked = []
    for free, expected in ((4 * needed + 4, "gpu"), (4 * needed, "cpu")):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, free=free: (asked.append(device), (free, 10 * free))[1])
        assert resolve_location("auto", store, cuda) == expected
    assert asked == [cuda, cuda]
    for ram, expected in ((4 * needed + 4, "cpu"), (4 * needed, "memmap")):
        monkeypatch.setattr(os, "sysconf", lambda name, ram=ram: {"SC_PAGE_SIZE": 4, "SC_PHYS_PAGES": ram // 4}[name])
        assert TokenArrays(store, "auto", cpu).location == expected and resolve_location("auto", store, cuda) == expected


def test_knn_memory_says_where_it_searches_once(caplog: pytest.LogCaptureFixture) -> None:
    announce_search.cache_clear()
    with caplog.at_level(logging.INFO, logger="midigen.model.memory"):
        for _ in range(3):  # a new memory at every validation
            KnnMemory(1, 1, 4, 8, 2, torch.device("cpu"))
    assert caplog.text.count("kNN memory: exact search with faiss on cpu") == 1


def test_knn_stores_go_where_the_data_location_says_and_auto_where_they_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    config = ModelConfig.preset("tiny", SINGLE_STREAM, memory="knn")
    store = KnnMemory(4, config.n_heads, config.head_dim, config.knn_capacity, config.knn_top_k, torch.device("cpu"))
    needed = knn_store_bytes(config, 4)
    assert needed == store.keys.nbytes + store.values.nbytes
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert all(knn_store_device(location, config, 4, cpu) == cpu for location in ("auto", "cpu", "memmap"))
    assert knn_store_device("gpu", config, 4, cuda) == cuda
    assert knn_store_device("cpu", config, 4, cuda) == cpu and knn_store_device("memmap", config, 4, cuda) == cpu
    for free, expected in ((8 * needed + 1, cuda), (8 * needed, cpu)):  # training's and validation's in a quarter
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, free=free: (free, 10 * free))
        assert knn_store_device("auto", config, 4, cuda) == expected
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: pytest.fail("asked the GPU for no stores"))
    for memory in ("none", "xl"):  # no kNN stores to place
        assert knn_store_device("auto", ModelConfig.preset("tiny", SINGLE_STREAM, memory=memory), 4, cuda) == cuda


def test_song_lanes_resume_from_their_state(prompt_store: Path) -> None:
    data = TokenArrays(TokenStore(prompt_store), "memmap")
    songs = list(range(len(data.lengths)))
    straight = SongLanes(data, songs, 16, 3, seed=1, max_transpose=5)
    expected = [next(straight) for _ in range(12)]
    first = SongLanes(data, songs, 16, 3, seed=1, max_transpose=5)
    for _ in range(5):
        next(first)
    resumed = SongLanes(data, songs, 16, 3, seed=99, max_transpose=5)
    resumed.load_state_dict(first.state_dict())
    for batch in expected[5:]:
        got = next(resumed)
        for name in batch:
            assert torch.equal(batch[name], got[name])


@pytest.mark.parametrize("mode", ["xl", "knn"])
def test_train_resume_evaluate_and_generate_with_memory(mode: str, prompt_store: Path, tmp_path: Path) -> None:
    run = tmp_path / mode
    model_config = ModelConfig.preset("tiny", SINGLE_STREAM, memory=mode, context=32)
    settings = dict(batch_size=3, eval_interval=4, log_interval=2, warmup_steps=2, device="cpu", eval_tokens=2000)
    train(prompt_store, run, model_config, TrainConfig(max_steps=4, **settings), progress=False)
    result, _ = train(prompt_store, run, None, TrainConfig(max_steps=8, **settings), resume=True, progress=False)
    assert result.step == 8 and np.isfinite(result.val["val_loss"])
    trained = load_model(run)
    assert trained.model_config.memory == mode
    long_prompt = load_prompt(max(sorted((Path(__file__).parent / "data" / "prompts").glob("*.mid")),
                                  key=lambda p: len(TOKENIZER.encode(p))), 100, TOKENIZER)
    assert len(long_prompt.sequence) > 3 * 32
    for prompt in (long_prompt, empty_prompt(TOKENIZER)):
        generation = generate(trained, prompt, SamplingConfig(seed=0), new_tokens=100)
        assert TOKENIZER.grammar.check(generation.sequence.tokens) is None


@pytest.mark.filterwarnings("error")  # a lane with fewer than k entries has no floor: no warning about it either
@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("stored", [3, 20])  # fewer slots in use than k, or more (one lane still has fewer entries)
def test_knn_with_fewer_entries_than_k_marks_the_rest_invalid(backend: str, stored: int) -> None:
    memory = KnnMemory(2, 1, 4, 100, 8, torch.device("cpu"), backend)
    keys = torch.nn.functional.normalize(torch.randn(2, 1, stored, 4), dim=-1)
    valid = torch.zeros(2, stored, dtype=torch.bool)
    valid[0], valid[1, 0] = True, True
    memory.write(keys, torch.randn(2, 1, stored, 4), valid)
    found = memory.search(torch.nn.functional.normalize(torch.randn(2, 1, 5, 4), dim=-1))
    assert found.rows.shape == found.scores.shape == (2, 1, 5, 8)
    assert found.valid[0].sum(-1).eq(min(stored, 8)).all() and found.valid[1].sum(-1).eq(1).all()
    assert found.scores[~found.valid].eq(0).all()  # no entry: a score that keeps gradients finite


class FixedNeighbours:
    """A retriever that hands back given neighbours (B, H, T, K, D), whatever the queries, scored against them."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> None:
        self.keys, self.values, self.valid = keys, values, valid

    def search(self, queries: torch.Tensor) -> Neighbours:
        D = queries.shape[-1]
        rows = torch.arange(self.valid.numel()).view(self.valid.shape)  # neighbour i is row i of the stores
        scores = torch.einsum("bhtd,bhtkd->bhtk", queries, self.keys)
        return Neighbours(scores, rows, self.valid, self.keys.reshape(-1, D), self.values.reshape(-1, D))


def test_retrieved_attention_is_a_gated_softmax_over_the_valid_neighbours() -> None:
    """Keys come back from the store at unit length; queries are normalised and sharpened by the temperature."""
    torch.manual_seed(0)
    attention = tiny("knn").blocks[-1].attn
    with torch.no_grad():
        attention.gate.copy_(torch.tensor([-1.0, 0.5]).view(2, 1, 1))
    B, H, T, K, D = 2, 2, 5, 4, 16
    keys, values = torch.nn.functional.normalize(torch.randn(B, H, T, K, D), dim=-1), torch.randn(B, H, T, K, D)
    valid = torch.rand(B, H, T, K) > 0.3
    valid[0, :, 0] = False  # a query with no memory at all
    valid[1, 1, 2] = torch.tensor([False, True, False, False])
    q, local = torch.randn(B, H, T, D, requires_grad=True), torch.randn(B, H, T, D)
    mixed = attention.mix_memory(q, local, FixedNeighbours(keys, values, valid), dropout=0.0)

    unit_q = torch.nn.functional.normalize(q, dim=-1) * attention.log_temperature.exp()
    scores = (unit_q.unsqueeze(-2) * keys).sum(-1).masked_fill(~valid, float("-inf"))  # (B, H, T, K): cosine × temperature
    memory = (torch.softmax(scores, -1).nan_to_num(0.0).unsqueeze(-1) * values).sum(-2)
    gate = torch.sigmoid(attention.gate) * valid.any(-1, keepdim=True)
    expected = gate * memory + (1 - gate) * local
    torch.testing.assert_close(mixed, expected)
    torch.testing.assert_close(mixed[0, :, 0], local[0, :, 0])
    torch.testing.assert_close(mixed[1, 1, 2], torch.sigmoid(torch.tensor(0.5)) * values[1, 1, 2, 1]
                               + (1 - torch.sigmoid(torch.tensor(0.5))) * local[1, 1, 2])
    weights = torch.randn_like(expected)
    torch.testing.assert_close(torch.autograd.grad((mixed * weights).sum(), q)[0],
                               torch.autograd.grad((expected * weights).sum(), q)[0])


def test_knn_memory_takes_the_tokens_that_leave_the_xl_window() -> None:
    model = tiny("knn", context=16)
    tokens, features = segment_inputs(48, B=2)
    memory = MemoryState(model.config, 2, torch.device("cpu"))
    layer = model.config.knn_layer_index
    with torch.no_grad():
        outputs = [memory.forward(model, tokens[:, s : s + 16], cut(features, slice(s, s + 16)))
                   for s in (0, 16, 32)]
    assert memory.knn is not None and memory.knn.sizes().tolist() == [32, 32]  # the newest segment is in XL only
    left = torch.cat([outputs[0].present[layer].keys, outputs[1].present[layer].keys], dim=2)  # (B, H, 32, D)
    torch.testing.assert_close(memory.knn.keys[:, :, :32], torch.nn.functional.normalize(left, dim=-1))


def test_a_write_that_evicts_the_neighbours_just_retrieved_leaves_the_gradients_alone() -> None:
    """The kNN layer reads its neighbours from the store during the backward pass, after the segment was written."""
    model = tiny("knn", context=16, knn_capacity=16)  # every segment written evicts all the store held
    tokens, features = segment_inputs(65, B=2)
    memory = MemoryState(model.config, 2, torch.device("cpu"))
    with torch.no_grad():
        for s in (0, 16, 32):
            memory.forward(model, tokens[:, s : s + 16], cut(features, slice(s, s + 16)))
    untouched = copy.deepcopy(memory)
    segment = tokens[:, 48:64], cut(features, slice(48, 64))
    memory.forward(model, *segment, targets=tokens[:, 49:65]).loss.backward()
    assert memory.knn is not None and memory.knn.staged  # the segment is written, not yet stored
    written_then = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model(*segment, targets=tokens[:, 49:65], past=untouched.xl.past(), knn=untouched.knn).loss.backward()
    assert written_then.keys() == {name for name, p in model.named_parameters() if p.grad is not None}
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(written_then[name], p.grad, atol=0, rtol=0, msg=name)
    assert memory.knn.sizes().tolist() == [16, 16] and not memory.knn.staged  # reading the store stores it:
    assert memory.knn.written.tolist() == [48, 48]  # three segments have passed through a store of one


def test_a_lane_with_fewer_entries_than_k_trains_with_finite_gradients() -> None:
    """Missing neighbours weigh nothing, and their scores must not turn the temperature's gradient into NaN."""
    model = tiny("knn", context=16, knn_top_k=32).train()
    tokens, features = segment_inputs(97, B=2)
    memory = MemoryState(model.config, 2, torch.device("cpu"))
    with torch.no_grad():
        for s in range(0, 80, 16):  # lane 1 starts a new song at the fourth segment
            new_song = torch.tensor([False, s == 48])
            memory.forward(model, tokens[:, s : s + 16], cut(features, slice(s, s + 16)), new_song=new_song)
    assert memory.knn is not None
    sizes = memory.knn.sizes().tolist()
    assert sizes[0] > 32 > sizes[1] > 0  # lane 1 has fewer entries than the 32 searched for
    loss = memory.forward(model, tokens[:, 80:96], cut(features, slice(80, 96)), targets=tokens[:, 81:97]).loss
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
