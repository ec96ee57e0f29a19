"""The music transformer: a decoder-only, pre-norm transformer with relative-position attention.

Inputs are the token embedding plus one embedding per token feature the config declares (bar, position in the
bar, instrument... passed per position; pitch class, octave... derived from the token ids through the tokenizer's
lookups, which the model keeps as buffers, so no caller passes them); there is no absolute position embedding, so
a window can slide or be extended by memory without re-encoding anything. Every layer adds a learned
T5-style relative-position bias (log buckets over causal distance, per head) to its attention scores,
initialised as ALiBi's per-head linear penalties so that attention starts local, with a different
reach per head. The output is one logit per token, or with `factorised_output` a pitched note's type, pitch class
and octave in steps (`midigen.model.pitch_output`).

Memory hooks: each layer may attend to `past` keys/values prepended to its own (the XL memory when
training, the KV cache when generating; both are the same mechanism), and returns the keys/values
of the current tokens so the caller can keep them. One layer may also read a kNN memory
(Memorizing Transformers): it retrieves the top-k past keys for each query and mixes that
attention with the local one through a learned per-head gate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from midigen.errors import MidigenError
from midigen.model.config import ModelConfig
from midigen.model.pitch_output import FactorisedPitchOutput, PitchedTokens

if TYPE_CHECKING:
    from midigen.codec.interface import Tokenizer

CPU_MATH_SCORES = 2**21  # attention scores per group of lanes when training on CPU: they stay in cache
GATHERED_QUERIES = 1024  # queries whose neighbours' values are gathered at once: a few MB


@dataclass
class KV:
    """Keys and values of some past tokens of one layer, and which of them exist for each lane."""

    keys: Tensor  # (B, H, P, D)
    values: Tensor  # (B, H, P, D)
    valid: Tensor  # (B, P) bool; False where a lane has no such token (start of a song, padding)

    @property
    def length(self) -> int:
        return self.keys.shape[2]

    def then(self, later: KV) -> KV:
        """These tokens followed by `later` ones."""
        return KV(torch.cat([self.keys, later.keys], 2), torch.cat([self.values, later.values], 2),
                  torch.cat([self.valid, later.valid], 1))

    def last(self, count: int) -> KV:
        """The newest `count` tokens."""
        return KV(self.keys[:, :, -count:], self.values[:, :, -count:], self.valid[:, -count:])

    def first(self, count: int) -> KV:
        """The oldest `count` tokens."""
        return KV(self.keys[:, :, :count], self.values[:, :, :count], self.valid[:, :count])


@dataclass
class Neighbours:
    """What a kNN search found for each query: rows of the stores, which the search leaves where they are.

    `scores` and `valid` are on the queries' device; `rows`, `keys` and `values` on the stores' (the CPU's, or the
    model's GPU).
    """

    scores: Tensor  # (B, H, T, K) inner product of each (unit) query with each retrieved (unit) key; 0 if not valid
    rows: Tensor  # (B, H, T, K) long: rows of `keys` and `values`; any row where `valid` is False
    valid: Tensor  # (B, H, T, K) bool
    keys: Tensor  # (R, D) the store of unit keys
    values: Tensor  # (R, D) the store of values


class Retriever(Protocol):
    """A kNN memory: for each query, the top-k stored keys/values of the same lane and head."""

    def search(self, queries: Tensor) -> Neighbours:
        """queries (B, H, T, D), unit length → their neighbours."""
        ...


class RetrievedSimilarity(torch.autograd.Function):
    """The similarity of each query with its neighbours, differentiable in the query.

    The search has computed the inner products already; the backward pass sums the neighbours' keys weighted by
    their gradients straight from the store (`embedding_bag`), so the (B, H, T, K, D) keys are never gathered:
    gathering them took longer than the whole rest of the memory attention.
    """

    @staticmethod
    def forward(ctx: Any, queries: Tensor, found: Neighbours) -> Tensor:  # queries (B, H, T, D) → (B, H, T, K)
        ctx.save_for_backward(found.rows, found.keys)
        ctx.query_dtype = queries.dtype
        return found.scores.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        rows, keys = ctx.saved_tensors
        B, H, T, K = rows.shape
        grad_queries = F.embedding_bag(rows.view(-1, K), keys, mode="sum",
                                       per_sample_weights=grad.reshape(-1, K).to(keys.device, keys.dtype))  # (B·H·T, D)
        return grad_queries.view(B, H, T, -1).to(grad.device, ctx.query_dtype), None


class RetrievedValues(torch.autograd.Function):
    """The weighted sum of each query's neighbours' values, read from the store in place (`embedding_bag`).

    Its backward pass dots each neighbour's value with the gradient: `embedding_bag`'s own makes a BLAS call per
    neighbour, slower than gathering the values of a block of queries and multiplying them at once.
    """

    @staticmethod
    def forward(ctx: Any, weights: Tensor, found: Neighbours) -> Tensor:  # weights (B, H, T, K) → (B, H, T, D)
        B, H, T, K = weights.shape
        ctx.save_for_backward(found.rows, found.values)
        summed = F.embedding_bag(found.rows.view(-1, K), found.values, mode="sum",
                                 per_sample_weights=weights.reshape(-1, K).to(found.values.device, found.values.dtype))
        return summed.view(B, H, T, -1).to(weights.device)  # (B, H, T, D)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        rows, values = ctx.saved_tensors
        B, H, T, K = rows.shape
        device = grad.device
        rows, grad = rows.view(-1, K), grad.reshape(-1, values.shape[1], 1).to(values.device, values.dtype)  # (N, K), (N, D, 1)
        grad_weights = torch.empty(rows.shape, dtype=values.dtype, device=values.device)
        for first in range(0, rows.shape[0], GATHERED_QUERIES):
            block = slice(first, first + GATHERED_QUERIES)
            neighbours = values.index_select(0, rows[block].flatten()).view(-1, K, values.shape[1])  # (n, K, D)
            grad_weights[block] = torch.bmm(neighbours, grad[block]).squeeze(-1)
        return grad_weights.view(B, H, T, K).to(device), None


class CpuAttention(torch.autograd.Function):
    """softmax(q·kᵀ/√D + mask) v over the past keys then the present ones, for training on CPU.

    The mask carries the relative-position bias, whose gradient sends SDPA on CPU to its math path: that one builds
    every lane's scores at once and computes gradients for all keys and values, the detached past's too (a sixth of
    the products with XL memory). This works a few lanes at a time, so their (H, T, S) scores stay in cache, and
    leaves the past (detached) alone.
    """

    @staticmethod
    def forward(ctx: Any, q: Tensor, past: KV | None, k: Tensor, v: Tensor, mask: Tensor,
                dropout: float) -> Tensor:  # q, k, v (B, H, T, D), mask (B or 1, H, T, S) → (B, H, T, D)
        if past is not None:
            k, v = torch.cat([past.keys, k], 2), torch.cat([past.values, v], 2)  # (B, H, S, D)
        B, H, T, D = q.shape
        S = k.shape[2]
        out = q.new_empty(B, H, T, D)
        # one tensor of weights per group of lanes: all lanes' at once would exceed the size that glibc
        # serves from its heap (32 MiB) and be mapped and page-faulted afresh at every step
        groups = lane_groups(B, H * T * S)
        probs: list[Tensor] = []
        kept: list[Tensor] = []  # where dropout keeps a weight
        for lanes in groups:
            scores = torch.matmul(q[lanes], k[lanes].mT).mul_(D**-0.5).add_(mask if mask.shape[0] == 1 else mask[lanes])
            weights = torch.softmax(scores, -1, out=scores)  # (n, H, T, S)
            probs.append(weights)
            if dropout:
                kept.append(torch.rand_like(weights) >= dropout)
                weights = weights * kept[-1] / (1 - dropout)
            torch.matmul(weights, v[lanes], out=out[lanes])
        ctx.save_for_backward(q, k, v, out, *probs, *kept)
        ctx.dropout, ctx.groups, ctx.mask_lanes = dropout, groups, mask.shape[0]
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, out, *saved = ctx.saved_tensors
        groups = ctx.groups
        probs, kept = saved[: len(groups)], saved[len(groups) :]
        B, H, T, D = q.shape
        P = k.shape[2] - T
        softmax_term = (grad * out).sum(-1, keepdim=True)  # (B, H, T, 1): Σ_s weight·grad of weight, dropout or not
        grad_q, grad_k, grad_v = (q.new_empty(B, H, T, D) for _ in range(3))
        grad_mask = (torch.zeros if ctx.mask_lanes == 1 else torch.empty)(ctx.mask_lanes, H, T, P + T, dtype=q.dtype)
        for i, lanes in enumerate(groups):
            weights, g = probs[i], grad[lanes]  # (n, H, T, S), (n, H, T, D)
            grad_scores = torch.matmul(g, v[lanes].mT)  # (n, H, T, S), of the weights so far
            attended = weights
            if kept:
                grad_scores.mul_(kept[i]).div_(1 - ctx.dropout)
                attended = weights * kept[i] / (1 - ctx.dropout)
            grad_scores.sub_(softmax_term[lanes]).mul_(weights)
            torch.matmul(grad_scores, k[lanes], out=grad_q[lanes]).mul_(D**-0.5)
            torch.matmul(grad_scores[..., P:].mT, q[lanes], out=grad_k[lanes]).mul_(D**-0.5)
            torch.matmul(attended[..., P:].mT, g, out=grad_v[lanes])
            if ctx.mask_lanes == 1:
                grad_mask[0] += grad_scores.sum(0)
            else:
                grad_mask[lanes] = grad_scores
        return grad_q, None, grad_k, grad_v, grad_mask, None


def lane_groups(lanes: int, scores_per_lane: int) -> list[slice]:
    """Consecutive groups of lanes whose attention scores fit in `CPU_MATH_SCORES` (one lane at least)."""
    size = max(1, CPU_MATH_SCORES // scores_per_lane)
    return [slice(first, min(first + size, lanes)) for first in range(0, lanes, size)]


def relative_buckets(distance: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """T5 buckets for causal distances (>= 0): exact below num_buckets/2, logarithmic above."""
    distance = distance.clamp(min=0)
    exact = num_buckets // 2
    log_ratio = torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact)
    large = exact + (log_ratio * (num_buckets - exact)).long()
    return torch.where(distance < exact, distance, large.clamp(max=num_buckets - 1))


def bucket_distances(num_buckets: int, max_distance: int) -> Tensor:
    """The smallest distance that falls in each bucket of `relative_buckets` (num_buckets,)."""
    exact = num_buckets // 2
    index = torch.arange(num_buckets, dtype=torch.float64)
    logarithmic = exact * (max_distance / exact) ** ((index - exact) / (num_buckets - exact))
    return torch.where(index < exact, index, logarithmic.ceil()).float()


def toeplitz(diagonals: Tensor, rows: int, cols: int) -> Tensor:
    """(..., rows + cols − 1) → (..., rows, cols), out[..., t, s] = diagonals[..., rows − 1 − t + s].

    Views and one padded copy (the skewing of Music Transformer, Huang et al. 2018): its backward sums
    each diagonal's gradients, where an embedding lookup of every (t, s) would scatter rows·cols of them.
    """
    length = diagonals.shape[-1]
    lead = diagonals.shape[:-1]
    repeated = F.pad(diagonals.unsqueeze(-2).expand(*lead, rows, length), (0, 1))  # (..., rows, length + 1)
    skewed = repeated.flatten(-2)[..., : rows * length].view(*lead, rows, length)  # row t shifted right by t
    return skewed[..., rows - 1 : rows - 1 + cols]


def alibi_slopes(n_heads: int) -> Tensor:
    """ALiBi's geometric head slopes 2^(-8h/H), h = 1..H (Press et al. 2022)."""
    return 2.0 ** (-8.0 * torch.arange(1, n_heads + 1) / n_heads)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, with_knn: bool = False) -> None:
        super().__init__()
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.rel_bias = nn.Embedding(config.rel_pos_buckets, config.n_heads)  # initialised by the model
        self.attn_dropout = config.attn_dropout
        if with_knn:
            # retrieval is by cosine similarity (inner product of unit vectors), and so is attention to what it finds,
            # sharpened by a learned temperature; attention within the window is as in every other layer
            self.log_temperature = nn.Parameter(torch.full((config.n_heads, 1, 1), math.log(10.0)))
            # sigmoid(gate) weighs memory against local attention per head (Memorizing Transformers)
            self.gate = nn.Parameter(torch.zeros(config.n_heads, 1, 1))

    def forward(
        self, x: Tensor, buckets: Tensor, allowed: Tensor, past: KV | None, knn: Retriever | None
    ) -> tuple[Tensor, KV]:
        """`buckets` (T + S − 1,): the relative-position bucket of each diagonal of the (T, S) scores."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, H, T, D) each
        present = KV(k, v, torch.ones(B, T, dtype=torch.bool, device=x.device))
        S = T + (past.length if past is not None else 0)
        bias = toeplitz(self.rel_bias(buckets).t(), T, S).unsqueeze(0)  # (1, H, T, S)
        mask = bias.masked_fill(~allowed, float("-inf")).to(q.dtype)  # (B or 1, H, T, S); bf16 under autocast
        dropout = self.attn_dropout if self.training else 0.0
        if mask.requires_grad and q.device.type == "cpu":
            y = CpuAttention.apply(q, past, k, v, mask, dropout)  # (B, H, T, D)
        else:
            if past is not None:
                k, v = torch.cat([past.keys, k], dim=2), torch.cat([past.values, v], dim=2)  # (B, H, S, D)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)  # (B, H, T, D)
        if knn is not None:
            y = self.mix_memory(q, y, knn, dropout)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.proj(y), present

    def mix_memory(self, q: Tensor, local: Tensor, knn: Retriever, dropout: float) -> Tensor:
        """Attend over the retrieved neighbours, then gate: g·memory + (1 − g)·local."""
        unit_q = F.normalize(q, dim=-1)
        found = knn.search(unit_q.detach())
        scores = RetrievedSimilarity.apply(unit_q, found) * self.log_temperature.exp()  # (B, H, T, K)
        scores = scores.masked_fill(~found.valid, float("-inf"))
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a query with no memory yet gets zeros
        weights = F.dropout(weights, dropout, self.training)
        memory = RetrievedValues.apply(weights, found)  # (B, H, T, D)
        has_memory = found.valid.any(dim=-1, keepdim=True)  # (B, H, T, 1)
        gate = torch.sigmoid(self.gate) * has_memory
        return gate * memory.to(local.dtype) + (1 - gate) * local


class Block(nn.Module):
    def __init__(self, config: ModelConfig, with_knn: bool = False) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model)
        self.attn = Attention(config, with_knn)
        self.ln2 = nn.LayerNorm(config.d_model)
        hidden = config.mlp_ratio * config.d_model
        self.mlp = nn.Sequential(nn.Linear(config.d_model, hidden), nn.GELU(), nn.Linear(hidden, config.d_model))
        self.drop = nn.Dropout(config.dropout)

    def forward(
        self, x: Tensor, buckets: Tensor, allowed: Tensor, past: KV | None, knn: Retriever | None
    ) -> tuple[Tensor, KV]:
        attended, present = self.attn(self.ln1(x), buckets, allowed, past, knn)
        x = x + self.drop(attended)
        x = x + self.drop(self.mlp(self.ln2(x)))
        return x, present


@dataclass
class ModelOutput:
    logits: Tensor  # (B, T, V)
    loss: Tensor | None  # mean cross-entropy over non-padding targets
    present: list[KV]  # per layer, keys/values of this segment's tokens


class MusicTransformer(nn.Module):
    """`derived`: `config.derived_weights(tokenizer)`, per derived feature the (V, values) weights of each value's
    embedding in each token's; `pitched`: with `config.factorised_output`, the tokenizer's pitched note tokens. Both
    are kept as buffers that are not saved with the weights (the tokenizer rebuilds them: `for_tokenizer`)."""

    def __init__(self, config: ModelConfig, derived: Mapping[str, np.ndarray] | None = None,
                 pitched: PitchedTokens | None = None) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        # one table per declared feature, summed with the token embedding (x-transformers' `embed_num_tokens`)
        self.feature_emb = nn.ModuleDict({name: nn.Embedding(size, config.d_model)
                                          for name, size in (config.embeddings | config.derived_embeddings).items()})
        self.lookups = nn.Module()
        for name, size in config.derived_embeddings.items():
            weights = (derived or {}).get(name)
            if weights is None:
                raise MidigenError(f"the model derives {name!r} from token ids, but its tokenizer gives no such lookup")
            if weights.ndim != 2 or weights.shape[0] != config.vocab_size or weights.shape[1] > size:
                raise MidigenError(f"the tokenizer's {name!r} lookup ({weights.shape[0]} tokens, {weights.shape[-1]} "
                                   f"values) does not fit the model ({config.vocab_size} tokens, {size} values)")
            padded = np.pad(weights.astype(np.float32), ((0, 0), (0, size - weights.shape[1])))  # (V, size)
            self.lookups.register_buffer(name, torch.as_tensor(padded), persistent=False)
        self.drop = nn.Dropout(config.dropout)
        knn_layer = config.knn_layer_index
        self.blocks = nn.ModuleList([Block(config, with_knn=i == knn_layer) for i in range(config.n_layers)])
        self.ln_f = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        self.pitch_output = None
        if config.factorised_output:
            if pitched is None:
                raise MidigenError("the model predicts pitched notes factorised, but was given no pitched tokens")
            if pitched.pitches.shape != (config.vocab_size,):
                raise MidigenError(f"the pitched tokens given are of a {pitched.pitches.size}-token vocabulary, the "
                                   f"model's has {config.vocab_size}")
            self.pitch_output = FactorisedPitchOutput(config.d_model, pitched)
        self.apply(self._init_weights)
        if self.pitch_output is not None:
            self.pitch_output.start_even()
        # A bias started at zero hardly moves under AdamW (a few units in thousands of steps), so
        # attention over a long context (XL memory) stayed diluted and learned worse than a short one.
        distance_penalty = -bucket_distances(config.rel_pos_buckets, config.rel_pos_max_distance).view(-1, 1)
        for block in self.blocks:
            for layer in (block.attn.proj, block.mlp[2]):  # GPT-2: scale the residual projections by depth
                nn.init.normal_(layer.weight, std=0.02 / math.sqrt(2 * config.n_layers))
            with torch.no_grad():
                block.attn.rel_bias.weight.copy_(distance_penalty * alibi_slopes(config.n_heads))  # (buckets, H)

    @classmethod
    def for_tokenizer(cls, config: ModelConfig, tokenizer: Tokenizer) -> MusicTransformer:
        """The model of `config` with the tables it derives from `tokenizer` (which must be the config's)."""
        pitched = PitchedTokens.of(tokenizer) if config.factorised_output else None
        return cls(config, config.derived_weights(tokenizer), pitched)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def no_weight_decay(self) -> list[str]:
        """Per-head settings, not weights: decay would pull the relative-position biases back to no locality,
        the kNN layer's temperature towards 1 (flat cosine attention) and its gate towards an even mix."""
        exempt = {"rel_bias", "log_temperature", "gate"}
        return [name for name, _ in self.named_parameters() if exempt & set(name.split("."))]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        tokens: Tensor,  # (B, T)
        features: Mapping[str, Tensor],  # name → (B, T), every feature of `config.embeddings` (not the derived)
        targets: Tensor | None = None,  # (B, T); padding (id 0) is not scored
        past: list[KV] | None = None,
        knn: Retriever | None = None,
    ) -> ModelOutput:
        B, T = tokens.shape
        x = self.tok_emb(tokens)
        for name, table in self.feature_emb.items():
            if name in self.config.derived_embeddings:
                x = x + self.lookups.get_buffer(name)[tokens] @ table.weight  # (B, T, values) @ (values, C)
            else:
                x = x + table(features[name] % table.num_embeddings)
        x = self.drop(x)  # (B, T, C)
        buckets, allowed = self.attention_layout(T, past[0] if past else None, tokens.device)
        present = []
        knn_layer = self.config.knn_layer_index
        for i, block in enumerate(self.blocks):
            x, kv = block(x, buckets, allowed, past[i] if past else None, knn if i == knn_layer else None)
            present.append(kv)
        logits = self.output(self.ln_f(x))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=0)
        return ModelOutput(logits, loss, present)

    def output(self, x: Tensor) -> Tensor:
        """Final hidden states (B, T, C) → the next token's logits (B, T, V); with the factorised output, its
        normalised log-probabilities."""
        logits = self.head(x)
        return logits if self.pitch_output is None else self.pitch_output(x, logits)

    def attention_layout(self, T: int, past: KV | None, device: torch.device) -> tuple[Tensor, Tensor]:
        """Relative-position buckets of the diagonals of the (T, P+T) scores (2T + P − 1,), see `toeplitz`,
        and the allowed-attention mask (B or 1, 1, T, P+T).

        Query i sits at absolute index P+i; key j at j (memory or cache) and P+j (this segment), so
        the distance to a memory key is P + i − j: memory keys are further away than every key of
        the segment, and the bias sees that. Diagonal d holds the distance P + T − 1 − d.
        """
        P = past.length if past is not None else 0
        diagonal_distance = torch.arange(P + T - 1, -T, -1, device=device)  # (2T + P − 1,)
        buckets = relative_buckets(diagonal_distance, self.config.rel_pos_buckets, self.config.rel_pos_max_distance)
        distance = torch.arange(P, P + T, device=device).unsqueeze(1) - torch.arange(P + T, device=device)  # (T, P+T)
        allowed = (distance >= 0).view(1, 1, T, P + T)
        if past is not None and not bool(past.valid.all()):
            # empty memory is masked, never attended as zeros; when none is empty the mask stays
            # (1, 1, T, S), which spares building one mask per lane
            lane_valid = torch.cat([past.valid, torch.ones(past.valid.shape[0], T, dtype=torch.bool, device=device)], 1)
            allowed = allowed & lane_valid.view(-1, 1, 1, P + T)
        return buckets, allowed
