"""A small decoder-only Transformer language model (pre-LayerNorm GPT) and jitted sampling.

    logits = TransformerLM(vocab_size, max_len, width, depth, num_heads).apply({'params': p}, tokens)

`tokens` [B, T] (T <= max_len) -> next-token logits [B, T, vocab] in float32: position t sees
tokens 0..t only (causal self-attention), so right-padding never changes earlier logits.
`generate` continues fixed-length prompts by greedy decoding or temperature sampling inside one
`lax.fori_loop`, one position per iteration against a key/value cache (a full forward pass per
token costs the sequence length times more).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fdistill.configs import ConfigError

NEG_INF = -1e9


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention; `step` attends one new position to a key/value cache."""

    width: int
    num_heads: int
    dtype: Any = jnp.float32

    def setup(self):
        if self.width % self.num_heads:
            raise ConfigError(f"config.model.width={self.width} is not divisible by "
                             f"config.model.num_heads={self.num_heads}")
        self.qkv = nn.Dense(3 * self.width, dtype=self.dtype)
        self.out = nn.Dense(self.width, dtype=self.dtype)

    def _qkv(self, h):
        b, t, _ = h.shape
        qkv = self.qkv(h).reshape(b, t, 3, self.num_heads, self.width // self.num_heads)
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]

    def _attend(self, q, k, v, allowed):
        hd = q.shape[-1]
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(jnp.float32(hd))
        scores = jnp.where(allowed, scores, NEG_INF)
        attn = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", attn, v)
        return self.out(out.reshape(out.shape[0], out.shape[1], self.width))

    def __call__(self, h: jax.Array) -> jax.Array:
        t = h.shape[1]
        q, k, v = self._qkv(h)
        return self._attend(q, k, v, jnp.tril(jnp.ones((t, t), bool))[None, None])

    def step(self, h: jax.Array, pos: jax.Array, cache: tuple[jax.Array, jax.Array]):
        """h [B, 1, width] at position `pos`; cache (k, v) [B, max_len, heads, head_dim]."""
        q, k, v = self._qkv(h)
        k_cache = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), pos, axis=1)
        v_cache = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), pos, axis=1)
        allowed = (jnp.arange(k_cache.shape[1]) <= pos)[None, None, None, :]
        return self._attend(q, k_cache, v_cache, allowed), (k_cache, v_cache)


class Block(nn.Module):
    width: int
    num_heads: int
    mlp_ratio: int = 4
    dtype: Any = jnp.float32

    def setup(self):
        self.ln1 = nn.LayerNorm(dtype=self.dtype)
        self.attn = CausalSelfAttention(self.width, self.num_heads, self.dtype)
        self.ln2 = nn.LayerNorm(dtype=self.dtype)
        self.fc = nn.Dense(self.mlp_ratio * self.width, dtype=self.dtype)
        self.proj = nn.Dense(self.width, dtype=self.dtype)

    def _mlp(self, h):
        return h + self.proj(nn.gelu(self.fc(self.ln2(h))))

    def __call__(self, h: jax.Array) -> jax.Array:
        return self._mlp(h + self.attn(self.ln1(h)))

    def step(self, h, pos, cache):
        a, cache = self.attn.step(self.ln1(h), pos, cache)
        return self._mlp(h + a), cache


class TransformerLM(nn.Module):
    """Decoder-only LM: token + learned position embeddings, `depth` pre-LN blocks, untied output.

    `__call__(tokens [B, T]) -> logits [B, T, vocab]`; `decode(token [B], pos, cache) ->
    (logits [B, vocab], cache)` runs one position against a key/value cache (`init_cache(B)`).
    """

    vocab_size: int
    max_len: int
    width: int = 64
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: int = 4
    dtype: Any = jnp.float32

    def setup(self):
        init = nn.initializers.normal(0.02)
        self.tok_emb = nn.Embed(self.vocab_size, self.width, embedding_init=init)
        self.pos_emb = self.param("pos_emb", init, (self.max_len, self.width))
        self.blocks = [Block(self.width, self.num_heads, self.mlp_ratio, self.dtype) for _ in range(self.depth)]
        self.ln_f = nn.LayerNorm(dtype=self.dtype)
        self.head = nn.Dense(self.vocab_size, dtype=self.dtype)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        t = tokens.shape[1]
        if t > self.max_len:
            raise ValueError(f"sequence length {t} exceeds the model's context max_len={self.max_len}")
        h = (self.tok_emb(tokens) + self.pos_emb[None, :t]).astype(self.dtype)
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h)).astype(jnp.float32)

    def decode(self, token: jax.Array, pos: jax.Array, cache: list):
        h = self.tok_emb(token[:, None]) + jax.lax.dynamic_slice_in_dim(self.pos_emb, pos, 1, axis=0)[None]
        h = h.astype(self.dtype)
        new_cache = []
        for block, c in zip(self.blocks, cache):
            h, c = block.step(h, pos, c)
            new_cache.append(c)
        return self.head(self.ln_f(h))[:, 0].astype(jnp.float32), new_cache

    def init_cache(self, batch: int) -> list:
        shape = (batch, self.max_len, self.num_heads, self.width // self.num_heads)
        return [(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)) for _ in range(self.depth)]


def generate(model, params, prompts: jax.Array, key: jax.Array, total_len: int,
             temperature: float = 1.0, logit_bias: jax.Array | None = None, eos_id: int | None = None,
             pad_id: int = 0, greedy: bool = False, prefix_len: jax.Array | int | None = None
             ) -> tuple[jax.Array, jax.Array]:
    """Continues `prompts` [B, P] to `total_len` tokens; jit-compatible (call it inside `jax.jit`).
    `model` is any LM with `max_len`, `vocab_size`, `init_cache(B)` and `decode(token, pos, cache)`
    (`TransformerLM`, `fdistill.models.llama.LlamaLM`).

    One `lax.fori_loop` over positions with a key/value cache: position t's token is fed, and for
    t + 1 >= P the next token is drawn from softmax((logits + bias[t]) / temperature) (its argmax
    when `greedy`), where `logit_bias` [total_len, vocab] (0 / -1e9 entries) says which tokens are
    allowed at each position. After `eos_id`, every later token is `pad_id`.

    With `prefix_len` (a scalar or [B], may be traced: one compiled function for every length),
    `prompts` is [B, total_len] and its first `prefix_len` tokens are the given prefix (the rest is
    overwritten); the continuation of a prefix holding `eos_id` is drawn all the same (readers stop
    at the first EOS).

    Returns (tokens [B, total_len], logp [B]): logp is the summed log-probability of the generated
    tokens up to and including the first EOS under the biased distribution at temperature 1 (the
    policy's own distribution whatever `temperature` is used to draw).
    """
    b = prompts.shape[0]
    if total_len > model.max_len:
        raise ValueError(f"total_len={total_len} exceeds the model's context max_len={model.max_len}")
    bias = jnp.zeros((total_len, model.vocab_size), jnp.float32) if logit_bias is None else logit_bias
    if prefix_len is None:
        p = prompts.shape[1]
        tokens = jnp.concatenate([prompts.astype(jnp.int32), jnp.full((b, total_len - p), pad_id, jnp.int32)], axis=1)
    else:
        if prompts.shape[1] != total_len:
            raise ValueError(f"with prefix_len, prompts must hold total_len={total_len} tokens, got {prompts.shape}")
        p = jnp.asarray(prefix_len, jnp.int32)
        tokens = prompts.astype(jnp.int32)
    cache = model.init_cache(b)
    carry = (tokens, jnp.zeros((b,), jnp.float32), jnp.zeros((b,), bool), cache)

    def body(pos, carry):
        tokens, logp, done, cache = carry
        token = jax.lax.dynamic_index_in_dim(tokens, pos, axis=1, keepdims=False)
        logits, cache = model.apply({"params": params}, token, pos, cache, method="decode")
        logits = logits + jax.lax.dynamic_index_in_dim(bias, pos, axis=0, keepdims=False)
        if greedy:
            nxt = jnp.argmax(logits, axis=-1)
        else:
            nxt = jax.random.categorical(jax.random.fold_in(key, pos), logits / jnp.maximum(temperature, 1e-6))
        nxt = nxt.astype(jnp.int32)
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), nxt[:, None], axis=-1)[:, 0]
        generating = pos + 1 >= p
        logp = logp + jnp.where(generating & ~done, lp, 0.0)
        nxt = jnp.where(done, pad_id, nxt)
        if eos_id is not None:
            done = done | (generating & (nxt == eos_id))
        current = jax.lax.dynamic_index_in_dim(tokens, pos + 1, axis=1, keepdims=False)
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, jnp.where(generating, nxt, current), pos + 1, axis=1)
        return tokens, logp, done, cache

    tokens, logp, _, _ = jax.lax.fori_loop(0, total_len - 1, body, carry)
    return tokens, logp

