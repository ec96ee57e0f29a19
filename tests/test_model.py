"""The transformer: KV-cache parity with full recomputation, causality, relative positions, dropout."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from conftest import SINGLE_STREAM

from midigen.codec import TokenizerConfig
from midigen.codec.tokenizer import TokenSequence
from midigen.inference.generate import SlidingWindowDecoder
from midigen.model import KV, PRESETS, ModelConfig, MusicTransformer
from midigen.model import transformer as transformer_module
from midigen.model.transformer import bucket_distances, relative_buckets, toeplitz
from midigen.training.config import TrainConfig


def tiny(**overrides: object) -> MusicTransformer:
    torch.manual_seed(0)
    return MusicTransformer(ModelConfig.preset("tiny", SINGLE_STREAM, **overrides)).eval()


Features = dict[str, torch.Tensor]


def random_inputs(T: int, B: int = 2, seed: int = 1) -> tuple[torch.Tensor, Features]:
    """Random tokens (B, T) and their `bars` and `beats` features."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, 388, (B, T), generator=g)
    bars = torch.randint(0, 40, (B, T), generator=g)
    beats = torch.randint(0, 64, (B, T), generator=g)
    return tokens, {"bars": bars, "beats": beats}


def cut(features: Features, window: slice) -> Features:
    """The features of the tokens in `window` (of the last dimension)."""
    return {name: value[..., window] for name, value in features.items()}


def concat(past: list[KV] | None, present: list[KV]) -> list[KV]:
    return present if past is None else [p.then(c) for p, c in zip(past, present)]


@pytest.mark.parametrize("use_bar_beat", [True, False])
@pytest.mark.parametrize("first_chunk", [1, 13])
def test_kv_cache_matches_full_forward(use_bar_beat: bool, first_chunk: int) -> None:
    model = tiny() if use_bar_beat else tiny(embeddings={})
    assert set(model.feature_emb) == ({"bars", "beats"} if use_bar_beat else set())
    tokens, features = random_inputs(40)
    with torch.no_grad():
        full = model(tokens, features).logits
        out = model(tokens[:, :first_chunk], cut(features, slice(None, first_chunk)))
        past, pieces = out.present, [out.logits]
        for t in range(first_chunk, 40):
            out = model(tokens[:, t : t + 1], cut(features, slice(t, t + 1)), past=past)
            past = concat(past, out.present)
            pieces.append(out.logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-4, rtol=0)


def test_bar_and_beat_inputs_change_the_output() -> None:
    model = tiny()
    tokens, features = random_inputs(16)
    with torch.no_grad():
        a = model(tokens, features).logits
        b = model(tokens, features | {"beats": (features["beats"] + 1) % 64}).logits
        c = model(tokens, features | {"bars": features["bars"] + 1}).logits
    assert not torch.allclose(a, c)
    assert not torch.allclose(a, b)


def test_future_tokens_do_not_change_past_logits() -> None:
    model = tiny()
    tokens, features = random_inputs(30)
    changed = tokens.clone()
    changed[:, 20:] = 5
    with torch.no_grad():
        a = model(tokens, features).logits
        b = model(changed, features).logits
    torch.testing.assert_close(a[:, :20], b[:, :20])
    assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_sliding_window_equals_full_forward_over_the_last_window() -> None:
    """One layer, so a cached key depends on its own token only: past the context the decoder must
    attend to exactly the last `context` tokens, with the same relative distances."""
    model = tiny(n_layers=1, context=16, knn_layer=0)
    tokens, features = random_inputs(50, B=1)
    song = TokenSequence(tokens[0].numpy(), features["bars"][0].numpy(),  # steps are not fed to the model
                         {name: value[0].numpy() for name, value in features.items()})
    decoder = SlidingWindowDecoder(model)
    decoder(song.slice(slice(0, 1)))
    for t in range(1, 50):
        logits = decoder(song.slice(slice(t, t + 1)))
        start = max(0, t + 1 - 16)
        with torch.no_grad():
            expected = model(tokens[:, start : t + 1], cut(features, slice(start, t + 1))).logits[0, -1]
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def test_relative_buckets_are_exact_then_logarithmic() -> None:
    distance = torch.arange(0, 2000)
    buckets = relative_buckets(distance, num_buckets=32, max_distance=512)
    assert torch.equal(buckets[:16], torch.arange(16))
    assert (buckets[1:] >= buckets[:-1]).all()
    # 16 + floor(16 · log(d / 16) / log(512 / 16)) reaches the last bucket, 31, at d = 16 · 32^(15/16) ≈ 412.3
    assert buckets[412] == 30 and buckets[413:].eq(31).all()
    assert relative_buckets(torch.tensor([-5]), 32, 512).item() == 0


@pytest.mark.parametrize("queries, past", [(16, 0), (16, 16), (1, 40), (5, 3)])
def test_bias_by_diagonals_equals_a_lookup_per_query_and_key(queries: int, past: int) -> None:
    """The model's bias, looked up per diagonal and skewed, is the bias of each (query, key) distance,
    with the same gradient."""
    model = MusicTransformer(ModelConfig.preset("tiny", SINGLE_STREAM))
    table = model.blocks[0].attn.rel_bias
    kv = KV(torch.zeros(1, 2, past, 16), torch.zeros(1, 2, past, 16), torch.ones(1, past, dtype=torch.bool))
    buckets, allowed = model.attention_layout(queries, kv if past else None, torch.device("cpu"))
    distance = torch.arange(past, past + queries).unsqueeze(1) - torch.arange(past + queries)  # (T, S)
    expected = table(relative_buckets(distance, model.config.rel_pos_buckets, model.config.rel_pos_max_distance))
    expected = expected.permute(2, 0, 1)  # (H, T, S)
    skewed = toeplitz(table(buckets).t(), queries, past + queries)
    torch.testing.assert_close(skewed, expected, rtol=0, atol=0)
    assert torch.equal(allowed.view(queries, -1), distance >= 0)
    weights = torch.randn_like(expected)
    torch.testing.assert_close(torch.autograd.grad((skewed * weights).sum(), table.weight)[0],
                               torch.autograd.grad((expected * weights).sum(), table.weight)[0])


def test_relative_bias_starts_local_with_a_different_reach_per_head() -> None:
    """ALiBi-style start: every head penalises distance from the first step, the first head most."""
    model = tiny()
    buckets, max_distance = model.config.rel_pos_buckets, model.config.rel_pos_max_distance
    distances = bucket_distances(buckets, max_distance)
    assert torch.equal(relative_buckets(distances.long(), buckets, max_distance), torch.arange(buckets))
    for block in model.blocks:
        bias = block.attn.rel_bias.weight  # (buckets, H)
        assert bias[0].eq(0).all() and (bias[1:] < bias[:-1]).all()
        assert (bias[-1, :-1] < bias[-1, 1:]).all()


def test_memory_keys_are_further_away_than_the_segment() -> None:
    model = tiny()
    past = KV(torch.zeros(1, 2, 5, 16), torch.zeros(1, 2, 5, 16), torch.tensor([[False, False, True, True, True]]))
    diagonals, allowed = model.attention_layout(3, past, torch.device("cpu"))
    buckets = toeplitz(diagonals, 3, 8)  # (queries, keys)
    # query 0 sits at absolute index 5: distance 5 to key 0, 0 to itself
    assert diagonals.shape == (10,) and buckets[0, 0] == 5 and buckets[0, 5] == 0 and buckets[2, 0] == 7
    assert not allowed[0, 0, 0, :2].any()  # empty memory is masked out
    assert allowed[0, 0, 0, 2:6].all() and not allowed[0, 0, 0, 6:].any()  # causal inside the segment


@pytest.mark.parametrize("lanes_per_call", [1, 2])
@pytest.mark.parametrize("empty_memory", [False, True])
def test_attention_a_few_lanes_at_a_time_equals_all_lanes_at_once(
    lanes_per_call: int, empty_memory: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CPU, attention whose bias needs gradients runs a few lanes at a time: the same outputs and gradients."""
    model = tiny()
    B, T, P, H, D = 3, 8, 8, model.config.n_heads, model.config.head_dim
    tokens, features = random_inputs(T + 1, B=B)
    g = torch.Generator().manual_seed(2)
    valid = torch.ones(B, P, dtype=torch.bool)
    if empty_memory:
        valid[1, :3] = False  # a lane whose memory is partly empty: one mask per lane
    past = [KV(torch.randn(B, H, P, D, generator=g), torch.randn(B, H, P, D, generator=g), valid)
            for _ in range(model.config.n_layers)]
    results = []
    for scores_per_call in (B * H * T * (P + T), lanes_per_call * H * T * (P + T)):
        monkeypatch.setattr(transformer_module, "CPU_MATH_SCORES", scores_per_call)
        model.zero_grad()
        output = model(tokens[:, :-1], cut(features, slice(None, -1)), targets=tokens[:, 1:], past=past)
        output.loss.backward()
        results.append((output.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (logits, grads), (split_logits, split_grads) = results
    torch.testing.assert_close(split_logits, logits, atol=1e-5, rtol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(split_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def attention_inputs(past: int, mask_lanes: int) -> tuple[torch.Tensor, KV | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, past, k, v and a causal mask with a random bias (float64); with per-lane masks one lane's memory is partly empty.

    The past requires gradients, as the XL memory's keys would if they were not detached: whether they get one is up
    to the attention."""
    g = torch.Generator().manual_seed(3)
    B, H, T, D = 3, 2, 6, 4
    q, k, v = (torch.randn(B, H, T, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    memory = KV(torch.randn(B, H, past, D, generator=g, dtype=torch.float64, requires_grad=True),
                torch.randn(B, H, past, D, generator=g, dtype=torch.float64, requires_grad=True),
                torch.ones(B, past, dtype=torch.bool))
    allowed = (torch.arange(past, past + T).unsqueeze(1) - torch.arange(past + T) >= 0).repeat(mask_lanes, 1, 1, 1)
    if mask_lanes > 1 and past:
        allowed[1, ..., :2] = False
    bias = torch.randn(mask_lanes, H, T, past + T, generator=g, dtype=torch.float64)
    mask = bias.masked_fill(~allowed, float("-inf")).requires_grad_()
    return q, memory if past else None, k, v, mask


@pytest.mark.parametrize("past", [0, 5])
@pytest.mark.parametrize("mask_lanes", [1, 3])
@pytest.mark.parametrize("lanes_per_group", [1, 3])
def test_cpu_attention_equals_sdpa_and_leaves_the_past_without_gradient(
    past: int, mask_lanes: int, lanes_per_group: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    q, memory, k, v, mask = attention_inputs(past, mask_lanes)
    monkeypatch.setattr(transformer_module, "CPU_MATH_SCORES", lanes_per_group * mask[0].numel())
    grad = torch.randn_like(q)
    results = []
    for attend in ("sdpa", "cpu"):
        if attend == "sdpa":
            keys, values = (k, v) if memory is None else (torch.cat([memory.keys, k], 2), torch.cat([memory.values, v], 2))
            out = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        else:
            out = transformer_module.CpuAttention.apply(q, memory, k, v, mask, 0.0)
        inputs = (q, k, v, mask) + ((memory.keys, memory.values) if memory is not None else ())
        results.append((out, *torch.autograd.grad(out, inputs, grad, allow_unused=True)))
    (expected_out, *expected_grads), (out, *grads) = results
    torch.testing.assert_close(out, expected_out)
    for expected, actual in zip(expected_grads[:4], grads[:4]):  # q, k, v, mask
        torch.testing.assert_close(actual, expected)
    if memory is not None:
        assert all(g is not None and g.abs().sum() > 0 for g in expected_grads[4:])  # SDPA would train the past
        assert grads[4:] == [None, None]  # CpuAttention leaves it alone


def test_a_layer_training_on_cpu_gives_the_past_no_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    """A layer training on the CPU attends over the past through CpuAttention: the output and the gradients of its
    input and weights that SDPA over the past and present keys gives, and none for the past, which SDPA's would
    train (the XL memory is detached: a gradient for it would be work thrown away)."""
    model = tiny(dropout=0.0, attn_dropout=0.0).double().train()
    attention, (B, T, P, H, D) = model.blocks[0].attn, (2, 6, 5, 2, 16)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(B, T, H * D, generator=g, dtype=torch.float64, requires_grad=True)
    past = KV(torch.randn(B, H, P, D, generator=g, dtype=torch.float64, requires_grad=True),
              torch.randn(B, H, P, D, generator=g, dtype=torch.float64, requires_grad=True),
              torch.tensor([[True] * P, [False, False] + [True] * (P - 2)]))
    buckets, allowed = model.attention_layout(T, past, torch.device("cpu"))
    grad = torch.randn(B, T, H * D, generator=g, dtype=torch.float64)
    inputs = (x, *attention.parameters(), past.keys, past.values)

    def attend() -> tuple[torch.Tensor, ...]:
        out = attention(x, buckets, allowed, past, None)[0]
        return out, *torch.autograd.grad(out, inputs, grad, allow_unused=True)

    out, *grads = attend()

    def sdpa(q: torch.Tensor, past: KV | None, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, dropout: float
             ) -> torch.Tensor:
        keys, values = (k, v) if past is None else (torch.cat([past.keys, k], 2), torch.cat([past.values, v], 2))
        return torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask, dropout_p=dropout)

    monkeypatch.setattr(transformer_module.CpuAttention, "apply", sdpa)
    expected_out, *expected_grads = attend()
    torch.testing.assert_close(out, expected_out)
    for actual, expected in zip(grads[:-2], expected_grads[:-2]):
        torch.testing.assert_close(actual, expected)
    assert all(g.abs().sum() > 0 for g in expected_grads[-2:]) and grads[-2:] == [None, None]


@pytest.mark.parametrize("past", [0, 5])
def test_cpu_attention_gradients_with_dropout_match_finite_differences(past: int) -> None:
    q, memory, k, v, mask = attention_inputs(past, mask_lanes=1)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(0)  # the same dropout at every call
        return transformer_module.CpuAttention.apply(q, memory, k, v, mask, 0.3)

    assert torch.autograd.gradcheck(attend, (q, k, v, mask))
    assert (attend(q, k, v, mask) != transformer_module.CpuAttention.apply(q, memory, k, v, mask, 0.0)).any()


@pytest.mark.parametrize("field", ["dropout", "attn_dropout"])
def test_dropout_applies_in_training_only(field: str) -> None:
    model = tiny(**({"dropout": 0.0, "attn_dropout": 0.0} | {field: 0.5}))
    tokens, features = random_inputs(20)
    model.train()
    a, b = model(tokens, features).logits, model(tokens, features).logits
    assert not torch.allclose(a, b)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, features).logits, model(tokens, features).logits)


def test_padding_targets_are_not_scored() -> None:
    model = tiny()
    tokens, features = random_inputs(20, B=1)
    targets = tokens.roll(-1, 1)
    padded = targets.clone()
    padded[:, 10:] = 0
    with torch.no_grad():
        logits = model(tokens, features).logits
        loss = model(tokens, features, targets=padded).loss
    expected = torch.nn.functional.cross_entropy(logits[0, :10], targets[0, :10])
    torch.testing.assert_close(loss, expected)


def test_output_head_is_tied_to_token_embedding() -> None:
    """Tied: one tensor, so an update to the embedding is an update to the head; untied: two, V·C more parameters."""
    tied, untied = tiny(), tiny(tie_embeddings=False)
    V, C = tied.config.vocab_size, tied.config.d_model
    assert tied.head.weight.data_ptr() == tied.tok_emb.weight.data_ptr()
    with torch.no_grad():
        tied.tok_emb.weight[7] += 1.0
    assert torch.equal(tied.head.weight[7], tied.tok_emb.weight[7])
    assert untied.head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()
    assert untied.num_parameters() - tied.num_parameters() == V * C
    before = untied.head.weight.clone()
    with torch.no_grad():
        untied.tok_emb.weight[7] += 1.0
    assert torch.equal(untied.head.weight, before)


@pytest.mark.parametrize("config", [ModelConfig.preset("small"), TrainConfig(max_steps=3), TokenizerConfig(max_duration=64)])
def test_configs_save_and_load_back_equal(config, tmp_path) -> None:  # noqa: ANN001
    path = tmp_path / "config.json"
    config.save(path)
    assert type(config).load(path) == config
    assert dataclasses.asdict(type(config).load(path)) == dataclasses.asdict(config)


def test_presets_have_the_documented_sizes() -> None:
    """Every preset is the size the README's table of presets says, so the two cannot drift apart."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("## Model presets") :]
    rows = re.findall(r"^\| (\w+) +\| +(\d+) +\| +(\d+) +\| +(\d+) +\| +(\d+) +\| +([\d,]+) +\|$", section, re.MULTILINE)
    assert {row[0] for row in rows} == set(PRESETS)
    for name, layers, width, heads, context, parameters in rows:
        config = ModelConfig.preset(name, TokenizerConfig())  # the default tokenizer, as the README says
        assert (config.n_layers, config.d_model, config.n_heads, config.context) == tuple(map(int, (layers, width, heads, context)))
        assert MusicTransformer(config).num_parameters() == int(parameters.replace(",", "")), name
        with_knn = MusicTransformer(ModelConfig.preset(name, TokenizerConfig(), memory="knn")).num_parameters()
        assert with_knn == int(parameters.replace(",", "")) + 2 * config.n_heads, name
