"""Llama-family decoders (Llama 2/3, Mistral, Qwen2) in Flax, loaded from Hugging Face checkpoints.

    module, params = llama.from_pretrained("path/to/Llama-3.2-1B", dtype=jnp.bfloat16)
    logits = module.apply({"params": params}, tokens)          # int32 [B, T] -> float32 [B, T, vocab]

The network (Touvron et al., arXiv 2302.13971 and 2307.09288; the Hugging Face `modeling_llama`
layout, so checkpoints load by name):

    h_0 = E[tokens]
    h   = h + o_proj(Attn(RoPE(q_proj(n1(h))), RoPE(k_proj(n1(h))), v_proj(n1(h))))   per layer
    h   = h + down_proj(silu(gate_proj(n2(h))) * up_proj(n2(h)))                     (SwiGLU)
    logits = lm_head(norm(h))                           (lm_head = E^T with tied embeddings)

* RMSNorm (arXiv 1910.07467): n(x) = w * x / sqrt(mean(x^2) + eps), computed in float32 and cast
  back to the activation dtype before the weight, as the reference does.
* Rotary embeddings (RoFormer, arXiv 2104.09864) in the "rotate half" layout of Hugging Face
  checkpoints: x' = x cos(p f) + rotate_half(x) sin(p f), with frequencies
  f_i = rope_theta^(-2i / head_dim) remapped by `rope_scaling` ('linear': f / factor; 'llama3':
  the Llama 3.1 band-wise remapping of `llama3_frequencies`).
* Grouped-query attention (arXiv 2305.13245): `num_key_value_heads` key/value heads, each shared
  by num_attention_heads / num_key_value_heads query heads; scores scaled by 1/sqrt(head_dim),
  causal (and a sliding window when the config has one, as Mistral's), softmax in float32.
* Qwen2: biases on the q, k, v projections (`attention_bias`); Llama's `attention_bias` also puts
  one on o_proj.

Parameters mirror the checkpoint's names (`layers_3/self_attn/q_proj/kernel` is
`model.layers.3.self_attn.q_proj.weight` transposed), so `config.mesh.rules` regexes read like the
checkpoint. Right padding never changes earlier positions' logits (causal attention), so batches
need no attention mask. `decode` runs one position against a key/value cache of `max_len`
positions, the interface `fdistill.models.transformer.generate` samples with.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
ROPE_TYPES = ("default", "linear", "llama3")
NEG_INF = -1e9


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The fields of a Hugging Face `config.json` that the network needs (hashable: a Flax field)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: tuple = ()  # sorted (key, value) items of the config's rope_scaling dict
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | tuple | None = None

    @classmethod
    def from_hf(cls, hf: dict, where: str = "config.json") -> "LlamaConfig":
        """From the dict of a checkpoint's config.json; an unsupported architecture or option is a
        ValueError naming the field."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_TYPES:
            raise ValueError(f"{where}: model_type={model_type!r} is not supported; allowed: {list(SUPPORTED_TYPES)}")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in hf]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing}")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{where}: hidden_act={act!r} is not supported; allowed: ['silu']")
        heads = int(hf["num_attention_heads"])
        kv = int(hf.get("num_key_value_heads") or heads)
        if heads % kv:
            raise ValueError(f"{where}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
        head_dim = int(hf.get("head_dim") or int(hf["hidden_size"]) // heads)
        # transformers >= 5 writes `rope_parameters` (rope_theta inside); older checkpoints
        # `rope_theta` and `rope_scaling`
        scaling = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        theta = float(scaling.pop("rope_theta", hf.get("rope_theta", 10000.0)))
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"{where}: rope_scaling type {rope_type!r} is not supported; allowed: {list(ROPE_TYPES)}")
        if model_type == "qwen2":
            qkv_bias, o_bias = True, False
            window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
        else:
            qkv_bias = o_bias = bool(hf.get("attention_bias", False))
            window = hf.get("sliding_window") if model_type == "mistral" else None
        eos = hf.get("eos_token_id")
        return cls(
            vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]), num_hidden_layers=int(hf["num_hidden_layers"]),
            num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            rope_theta=theta,
            rope_scaling=() if rope_type == "default" else tuple(sorted(
                (k, v) for k, v in {**scaling, "rope_type": rope_type}.items() if k != "type")),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=bool(hf.get("mlp_bias", False)),
            sliding_window=int(window) if window else None, model_type=model_type,
            bos_token_id=hf.get("bos_token_id"), eos_token_id=tuple(eos) if isinstance(eos, list) else eos)

    def to_hf(self) -> dict:
        """The config.json dict of this configuration (what `save_pretrained` writes)."""
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
        scaling = dict(self.rope_scaling)
        out = {"architectures": [arch[self.model_type]], "model_type": self.model_type,
               "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
               "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
               "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
               "head_dim": self.head_dim, "max_position_embeddings": self.max_position_embeddings,
               "rope_theta": self.rope_theta,
               "rope_scaling": None if scaling.get("rope_type", "default") == "default" else scaling,
               "rms_norm_eps": self.rms_norm_eps, "tie_word_embeddings": self.tie_word_embeddings,
               "hidden_act": "silu", "bos_token_id": self.bos_token_id,
               "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
               "torch_dtype": "float32"}
        if self.model_type == "qwen2":
            out.update(use_sliding_window=self.sliding_window is not None, sliding_window=self.sliding_window)
        else:
            out["attention_bias"] = self.o_bias
            out["mlp_bias"] = self.mlp_bias
            if self.model_type == "mistral":
                out["sliding_window"] = self.sliding_window
        return out


# ----------------------------------------------------------------------------------------------
# Rotary embeddings
# ----------------------------------------------------------------------------------------------
def llama3_frequencies(inv_freq: np.ndarray, factor: float, low_freq_factor: float, high_freq_factor: float,
                       original_max_position_embeddings: int) -> np.ndarray:
    """Llama 3.1's remapping of RoPE frequencies (the `llama3` rope type): with wavelengths
    lambda = 2 pi / f and L the original context, bands lambda < L / high_freq_factor keep f,
    lambda > L / low_freq_factor use f / factor, and in between
    f' = (1 - s) f / factor + s f with s = (L / lambda - low_freq_factor) / (high - low)."""
    L = float(original_max_position_embeddings)
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > L / low_freq_factor, inv_freq / factor, inv_freq)
    smooth = (L / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= L / high_freq_factor) & (wavelen <= L / low_freq_factor)
    return np.where(medium, smoothed, scaled)


def rope_frequencies(cfg: LlamaConfig) -> np.ndarray:
    """f_i = rope_theta^(-2i / head_dim), i < head_dim / 2, remapped by `cfg.rope_scaling` (float64)."""
    inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim)
    scaling = dict(cfg.rope_scaling)
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        return llama3_frequencies(inv_freq, float(scaling["factor"]), float(scaling["low_freq_factor"]),
                                  float(scaling["high_freq_factor"]), int(scaling["original_max_position_embeddings"]))
    return inv_freq


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """x [B, T, heads, head_dim] at `positions` [T]: x cos + rotate_half(x) sin in float32, with
    cos/sin of positions x (f, f) (the two halves of the head share the frequencies)."""
    angles = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq, jnp.float32)[None]  # [T, hd/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[None, :, None, :]
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return (xf * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        xf = x.astype(jnp.float32)
        y = (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)).astype(self.dtype)
        return w.astype(self.dtype) * y


def _dense(features: int, bias: bool, dtype, name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=bias, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=nn.initializers.normal(0.02), name=name)


class Attention(nn.Module):
    cfg: LlamaConfig
    dtype: Any = jnp.float32

    def setup(self):
        c = self.cfg
        self.q_proj = _dense(c.num_attention_heads * c.head_dim, c.qkv_bias, self.dtype, "q_proj")
        self.k_proj = _dense(c.num_key_value_heads * c.head_dim, c.qkv_bias, self.dtype, "k_proj")
        self.v_proj = _dense(c.num_key_value_heads * c.head_dim, c.qkv_bias, self.dtype, "v_proj")
        self.o_proj = _dense(c.hidden_size, c.o_bias, self.dtype, "o_proj")
        self.inv_freq = rope_frequencies(c)

    def _qkv(self, h, positions):
        c, (b, t, _) = self.cfg, h.shape
        q = self.q_proj(h).reshape(b, t, c.num_attention_heads, c.head_dim)
        k = self.k_proj(h).reshape(b, t, c.num_key_value_heads, c.head_dim)
        v = self.v_proj(h).reshape(b, t, c.num_key_value_heads, c.head_dim)
        return apply_rope(q, positions, self.inv_freq), apply_rope(k, positions, self.inv_freq), v

    def _allowed(self, q_pos, k_pos):
        allowed = k_pos[None, :] <= q_pos[:, None]
        if self.cfg.sliding_window:
            allowed &= q_pos[:, None] - k_pos[None, :] < self.cfg.sliding_window
        return allowed

    def _attend(self, q, k, v, allowed):
        """q [B, Tq, H, D], k/v [B, Tk, KV, D]: each group of H / KV query heads reads one kv head."""
        c = self.cfg
        b, tq = q.shape[:2]
        groups = c.num_attention_heads // c.num_key_value_heads
        q = q.reshape(b, tq, c.num_key_value_heads, groups, c.head_dim)
        scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k).astype(jnp.float32) / math.sqrt(c.head_dim)
        scores = jnp.where(allowed[None, None, None], scores, NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v)
        return self.o_proj(out.reshape(b, tq, c.num_attention_heads * c.head_dim))

    def __call__(self, h):
        positions = jnp.arange(h.shape[1])
        q, k, v = self._qkv(h, positions)
        return self._attend(q, k, v, self._allowed(positions, positions))

    def step(self, h, pos, cache):
        """h [B, 1, hidden] at position `pos`; cache (k, v) [B, max_len, kv_heads, head_dim]."""
        q, k, v = self._qkv(h, jnp.reshape(pos, (1,)))
        k_cache = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), pos, axis=1)
        v_cache = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), pos, axis=1)
        allowed = self._allowed(jnp.reshape(pos, (1,)), jnp.arange(k_cache.shape[1]))
        return self._attend(q, k_cache, v_cache, allowed), (k_cache, v_cache)


class MLP(nn.Module):
    cfg: LlamaConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h):
        c = self.cfg
        gate = _dense(c.intermediate_size, c.mlp_bias, self.dtype, "gate_proj")(h)
        up = _dense(c.intermediate_size, c.mlp_bias, self.dtype, "up_proj")(h)
        return _dense(c.hidden_size, c.mlp_bias, self.dtype, "down_proj")(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    cfg: LlamaConfig
    dtype: Any = jnp.float32

    def setup(self):
        self.input_layernorm = RMSNorm(self.cfg.rms_norm_eps, self.dtype)
        self.self_attn = Attention(self.cfg, self.dtype)
        self.post_attention_layernorm = RMSNorm(self.cfg.rms_norm_eps, self.dtype)
        self.mlp = MLP(self.cfg, self.dtype)

    def __call__(self, h):
        h = h + self.self_attn(self.input_layernorm(h))
        return h + self.mlp(self.post_attention_layernorm(h))

    def step(self, h, pos, cache):
        a, cache = self.self_attn.step(self.input_layernorm(h), pos, cache)
        h = h + a
        return h + self.mlp(self.post_attention_layernorm(h)), cache


class LlamaLM(nn.Module):
    """`__call__(tokens [B, T]) -> logits [B, T, vocab]` (float32), T <= max_len; `decode(token [B],
    pos, cache) -> (logits [B, vocab], cache)` against `init_cache(B)` (max_len positions).
    `remat` recomputes each layer's activations in the backward pass (memory for compute)."""

    cfg: LlamaConfig
    max_len: int
    dtype: Any = jnp.float32
    remat: bool = False

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    def setup(self):
        c = self.cfg
        self.embed_tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=jnp.float32,
                                     embedding_init=nn.initializers.normal(0.02), name="embed_tokens")
        layer = nn.remat(DecoderLayer) if self.remat else DecoderLayer
        self.layers = [layer(c, self.dtype, name=f"layers_{i}") for i in range(c.num_hidden_layers)]
        self.norm = RMSNorm(c.rms_norm_eps, self.dtype, name="norm")
        if not c.tie_word_embeddings:
            self.lm_head = _dense(c.vocab_size, False, self.dtype, "lm_head")

    def _logits(self, h):
        h = self.norm(h)
        if self.cfg.tie_word_embeddings:
            return self.embed_tokens.attend(h).astype(jnp.float32)
        return self.lm_head(h).astype(jnp.float32)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        if tokens.shape[1] > self.max_len:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds the model's context max_len={self.max_len}")
        h = self.embed_tokens(tokens)
        for layer in self.layers:
            h = layer(h)
        return self._logits(h)

    def decode(self, token: jax.Array, pos: jax.Array, cache: list):
        h = self.embed_tokens(token[:, None])
        new_cache = []
        for layer, c in zip(self.layers, cache):
            h, c = layer.step(h, pos, c)
            new_cache.append(c)
        return self._logits(h)[:, 0], new_cache

    def init_cache(self, batch: int) -> list:
        c = self.cfg
        shape = (batch, self.max_len, c.num_key_value_heads, c.head_dim)
        return [(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)) for _ in range(c.num_hidden_layers)]


# ----------------------------------------------------------------------------------------------
# Hugging Face checkpoints
# ----------------------------------------------------------------------------------------------
def hf_name(path: tuple[str, ...]) -> tuple[str, bool]:
    """(checkpoint tensor name, transposed?) of a parameter path: ('layers_0', 'mlp', 'up_proj',
    'kernel') -> ('model.layers.0.mlp.up_proj.weight', True); torch's Linear stores [out, in]."""
    head, *rest = path
    leaf = rest[-1] if rest else None
    if head == "lm_head":
        return "lm_head.weight", True
    if head == "embed_tokens":
        return "model.embed_tokens.weight", False
    if head == "norm":
        return "model.norm.weight", False
    layer = head.split("_", 1)[1]
    name = ".".join(["model", "layers", layer, *rest[:-1]])
    if leaf == "kernel":
        return name + ".weight", True
    return f"{name}.{leaf}", False  # RMSNorm 'weight', Dense 'bias'


def _leaf_path(key_path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in key_path)


def read_config(path: str) -> LlamaConfig:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path!r} is not a Hugging Face checkpoint directory: no config.json")
    try:
        with open(cfg_path) as f:
            hf = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    return LlamaConfig.from_hf(hf, cfg_path)


def _tensor_files(path: str) -> dict[str, str]:
    """{tensor name: safetensors file} from model.safetensors.index.json, or every *.safetensors."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map", {})
        return {k: os.path.join(path, v) for k, v in weight_map.items()}
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{path!r} holds no *.safetensors weights (PyTorch .bin checkpoints are not read: "
                                f"convert them with transformers' save_pretrained(safe_serialization=True))")
    out = {}
    for file in files:
        with open_safetensors(file) as f:
            out.update({k: file for k in f.keys()})
    return out


def open_safetensors(file: str):
    """`safetensors.safe_open(file)` (NumPy); an unreadable file is a ValueError naming it."""
    from safetensors import safe_open

    try:
        return safe_open(file, framework="numpy")
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: the file is not usable
        raise ValueError(f"{file} is not a readable safetensors file ({e}); download or convert it again") from None


def build(cfg: LlamaConfig, max_len: int | None = None, dtype=jnp.float32, remat: bool = False) -> LlamaLM:
    """The module for `cfg`, its context `max_len` (default: max_position_embeddings)."""
    return LlamaLM(cfg, int(max_len or cfg.max_position_embeddings), dtype=dtype, remat=remat)


def abstract_params(module: LlamaLM) -> Any:
    """The parameter tree's ShapeDtypeStructs (float32), without allocating it."""
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(lambda t: module.init(jax.random.PRNGKey(0), t), tokens)["params"]


@dataclasses.dataclass(frozen=True)
class StoredCheckpoint:
    """A checkpoint's parameters read only when placed (a frozen network in `Objective.frozen()`,
    like `checkpoint.StoredTree`): `abstract()` without reading, `restore(shardings)` tensor by
    tensor onto them (`load_params`), `numpy()` to host."""

    path: str
    module: Any
    dtype: Any = jnp.float32

    def abstract(self) -> Any:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, self.dtype), abstract_params(self.module))

    def restore(self, shardings: Any) -> Any:
        return load_params(self.path, self.module, self.dtype, shardings)

    def numpy(self) -> Any:
        return load_params(self.path, self.module, self.dtype)


def load_params(path: str, module: LlamaLM, dtype=jnp.float32, shardings: Any = None) -> Any:
    """The checkpoint's parameters as the module's tree in `dtype`, read tensor by tensor.

    Without `shardings` the leaves are host NumPy arrays; with a pytree of shardings (or one
    sharding for all), each tensor goes straight onto its sharding, every device receiving only its
    own shard (`jax.make_array_from_callback`), so no device holds a full copy of a sharded leaf.
    Missing, unexpected or wrongly shaped tensors are a ValueError listing them."""
    import ml_dtypes  # noqa: F401  (NumPy bfloat16, used by safetensors for BF16 tensors)

    files = _tensor_files(path)
    abstract = abstract_params(module)
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    names = [hf_name(_leaf_path(p)) for p, _ in flat]
    expected = {n for n, _ in names}
    missing = sorted(expected - set(files))
    unexpected = sorted(k for k in set(files) - expected if not k.endswith("rotary_emb.inv_freq"))
    if missing or unexpected:
        raise ValueError(f"{path}: the checkpoint does not match its config.json: missing {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    if shardings is not None and isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, abstract)
    sharding_leaves = jax.tree.leaves(shardings) if shardings is not None else [None] * len(flat)
    handles: dict[str, Any] = {}
    leaves = []
    try:
        for (_, spec), (name, transposed), sharding in zip(flat, names, sharding_leaves):
            file = files[name]
            if file not in handles:
                handles[file] = open_safetensors(file).__enter__()
            try:
                x = handles[file].get_tensor(name)
            except Exception as e:  # noqa: BLE001 - a header that points past the end of the file
                raise ValueError(f"{file}: tensor {name} is unreadable ({e}); download or convert it again") from None
            x = x.T if transposed else x
            if tuple(x.shape) != tuple(spec.shape):
                raise ValueError(f"{file}: tensor {name} has shape {tuple(x.shape)}{' (transposed)' if transposed else ''}, "
                                 f"expected {tuple(spec.shape)} from config.json")
            x = np.ascontiguousarray(x.astype(dtype))
            if sharding is not None:
                x = jax.make_array_from_callback(x.shape, sharding, lambda index, x=x: x[index])
            leaves.append(x)
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def from_pretrained(path: str, dtype=jnp.float32, max_len: int | None = None, shardings: Any = None,
                    remat: bool = False) -> tuple[LlamaLM, Any]:
    """(module, params) of a Hugging Face checkpoint directory (config.json + *.safetensors): the
    parameters stored and computed in `dtype` (float32 or bfloat16), placed on `shardings` when
    given (see `load_params`), else jax arrays on the default device."""
    module = build(read_config(path), max_len, dtype, remat)
    params = load_params(path, module, dtype, shardings)
    if shardings is None:
        params = jax.tree.map(jnp.asarray, params)
    return module, params


def save_pretrained(path: str, cfg: LlamaConfig, params: Any, dtype=np.float32) -> None:
    """Writes config.json and model.safetensors (tensors in `dtype`) that `from_pretrained` and
    transformers' `AutoModelForCausalLM.from_pretrained` read; the files appear complete or not at
    all (each written to a temporary name, then renamed)."""
    import ml_dtypes  # noqa: F401
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    tensors = {}
    for key_path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        name, transposed = hf_name(_leaf_path(key_path))
        x = np.asarray(jax.device_get(x)).astype(dtype)
        tensors[name] = np.ascontiguousarray(x.T if transposed else x)
    tmp = os.path.join(path, "model.safetensors.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(path, "model.safetensors"))
    tmp = os.path.join(path, "config.json.tmp")
    with open(tmp, "w") as f:
        json.dump({**cfg.to_hf(), "torch_dtype": np.dtype(dtype).name}, f, indent=2)
    os.replace(tmp, os.path.join(path, "config.json"))


def init_params(module: LlamaLM, key) -> Any:
    """Fresh random parameters (normal(0.02) kernels, unit norms), initialised under jit."""
    return jax.jit(lambda k: module.init(k, jnp.zeros((1, 1), jnp.int32))["params"])(key)
