"""The Llama-family decoder (`fdistill.models.llama`) against Hugging Face transformers.

The fixtures in tests/fixtures/hf/models/ were written by tests/fixtures/make_hf_model_fixtures.py
with transformers and PyTorch (random tiny Llama, Mistral and Qwen2 checkpoints and their logits on
fixed token ids); these tests need neither.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdistill import sharding
from fdistill.models import llama, param_count
from fdistill.models.transformer import generate

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf", "models")
MODELS = ("llama_gqa", "llama_linear_rope", "llama_tied_llama3rope", "mistral", "qwen2")


def tiny_config(**kw) -> llama.LlamaConfig:
    fields = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    return llama.LlamaConfig(**{**fields, **kw})


@pytest.mark.parametrize("name", MODELS)
def test_logits_match_transformers(name):
    """GQA, MQA, tied and untied embeddings, linear and llama3 RoPE scaling, Qwen2's biases."""
    path = os.path.join(FIXTURES, name)
    ref = np.load(os.path.join(path, "logits.npz"))
    module, params = llama.from_pretrained(path, max_len=32)
    logits = module.apply({"params": params}, jnp.asarray(ref["input_ids"]))
    assert logits.shape == ref["logits"].shape and logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits), ref["logits"], atol=1e-4, rtol=0)
    with open(os.path.join(FIXTURES, "params.json")) as f:
        assert param_count(params) == json.load(f)[name]


def test_rope_frequencies_match_transformers():
    with open(os.path.join(FIXTURES, "rope_inv_freq.json")) as f:
        recorded = json.load(f)
    for name, r in recorded.items():
        hf = dict(model_type="llama", vocab_size=8, hidden_size=2 * r["head_dim"], intermediate_size=4,
                  num_hidden_layers=1, num_attention_heads=2, head_dim=r["head_dim"], rope_parameters=r["rope_parameters"])
        np.testing.assert_allclose(llama.rope_frequencies(llama.LlamaConfig.from_hf(hf)), r["inv_freq"], rtol=1e-6,
                                   err_msg=name)


def test_legacy_rope_fields_read_like_rope_parameters():
    """Checkpoints written before transformers 5 carry `rope_theta` and `rope_scaling`."""
    base = dict(model_type="llama", vocab_size=8, hidden_size=16, intermediate_size=4, num_hidden_layers=1,
                num_attention_heads=2)
    new = llama.LlamaConfig.from_hf({**base, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}})
    old = llama.LlamaConfig.from_hf({**base, "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert new == old and new.rope_theta == 5e5


def test_greedy_kv_cache_sampling_matches_transformers_generate():
    ref = np.load(os.path.join(FIXTURES, "llama_gqa", "greedy.npz"))
    module, params = llama.from_pretrained(os.path.join(FIXTURES, "llama_gqa"), max_len=ref["tokens"].shape[1])
    tokens, _ = jax.jit(lambda p, x: generate(module, p, x, jax.random.PRNGKey(0), ref["tokens"].shape[1],
                                              greedy=True))(params, jnp.asarray(ref["prompt"]))
    np.testing.assert_array_equal(np.asarray(tokens), ref["tokens"])


@pytest.mark.parametrize("window", [None, 5])
def test_kv_cache_decoding_equals_full_recomputation(window):
    module = llama.build(tiny_config(sliding_window=window, model_type="mistral"), max_len=16)
    params = llama.init_params(module, jax.random.PRNGKey(0))
    params = jax.tree.map(lambda x: x * 10, params)  # far from uniform attention
    tokens = jax.random.randint(jax.random.PRNGKey(1), (3, 16), 0, 64)
    full = module.apply({"params": params}, tokens)

    def step(cache, t):
        logits, cache = module.apply({"params": params}, tokens[:, t], t, cache, method="decode")
        return cache, logits

    _, stepped = jax.lax.scan(step, module.init_cache(3), jnp.arange(16))
    np.testing.assert_allclose(np.asarray(jnp.swapaxes(stepped, 0, 1)), np.asarray(full), rtol=1e-4, atol=1e-4)


def test_sliding_window_masks_distant_keys():
    """With window w, position t attends to t - w + 1 .. t only: changing token 0 leaves positions >= w."""
    module = llama.build(tiny_config(sliding_window=3, model_type="mistral", num_hidden_layers=1), max_len=8)
    params = llama.init_params(module, jax.random.PRNGKey(0))
    a = jnp.arange(8)[None] % 64
    b = a.at[0, 0].set(50)
    la, lb = module.apply({"params": params}, a), module.apply({"params": params}, b)
    assert float(jnp.max(jnp.abs(la[0, :3] - lb[0, :3]))) > 1e-4
    np.testing.assert_allclose(np.asarray(la[0, 3:]), np.asarray(lb[0, 3:]), atol=1e-6)


def test_bfloat16_loading(tmp_path):
    path = os.path.join(FIXTURES, "qwen2")
    ref = np.load(os.path.join(path, "logits.npz"))
    module, params = llama.from_pretrained(path, dtype=jnp.bfloat16, max_len=32)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    logits = module.apply({"params": params}, jnp.asarray(ref["input_ids"]))
    err = np.abs(np.asarray(logits) - ref["logits"])
    assert logits.dtype == jnp.float32 and np.mean(err) < 0.05 * np.std(ref["logits"])
    # a bfloat16 checkpoint (as most published ones are) reads back bit for bit
    llama.save_pretrained(str(tmp_path), module.cfg, params, dtype=jnp.bfloat16)
    _, again = llama.from_pretrained(str(tmp_path), dtype=jnp.bfloat16, max_len=32)
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


def test_save_pretrained_round_trip_and_sharded_index(tmp_path):
    from safetensors.numpy import load_file, save_file

    cfg = tiny_config(model_type="qwen2", qkv_bias=True, tie_word_embeddings=True)
    module = llama.build(cfg, max_len=8)
    params = llama.init_params(module, jax.random.PRNGKey(3))
    one = tmp_path / "one"
    llama.save_pretrained(str(one), cfg, params)
    module2, params2 = llama.from_pretrained(str(one), max_len=8)
    assert module2.cfg == cfg
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), params, params2)
    # the same tensors split over two files with an index, as large checkpoints are saved
    split = tmp_path / "split"
    split.mkdir()
    tensors = load_file(str(one / "model.safetensors"))
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        file = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, str(split / file))
        weight_map.update({k: file for k in part})
    (split / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (split / "config.json").write_text((one / "config.json").read_text())
    _, params3 = llama.from_pretrained(str(split), max_len=8)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), params, params3)


def test_loading_onto_fsdp_shardings_never_builds_a_full_copy_on_a_device():
    path = os.path.join(FIXTURES, "llama_gqa")
    mesh = sharding.make_mesh(8, fsdp=4)
    rules = sharding.ShardingRules(fsdp=4, min_size=64)
    module = llama.build(llama.read_config(path), max_len=32)
    shardings = rules.shardings(llama.abstract_params(module), mesh)
    params = llama.load_params(path, module, jnp.float32, shardings)
    embed = params["embed_tokens"]["embedding"]  # [96, 32]: split over fsdp on its 96 rows
    assert embed.sharding.shard_shape(embed.shape) == (24, 32)
    assert {s.data.shape for s in embed.addressable_shards} == {(24, 32)}
    _, host = llama.from_pretrained(path, max_len=32)
    ref = np.load(os.path.join(path, "logits.npz"))
    logits = jax.jit(module.apply)({"params": params}, jnp.asarray(ref["input_ids"]))
    np.testing.assert_allclose(np.asarray(logits), ref["logits"], atol=1e-4)


def test_bad_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        llama.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 8}))
    with pytest.raises(ValueError, match="model_type='gpt2' is not supported"):
        llama.from_pretrained(str(tmp_path))
    cfg = tiny_config()
    module = llama.build(cfg, max_len=8)
    params = llama.init_params(module, jax.random.PRNGKey(0))
    llama.save_pretrained(str(tmp_path), cfg, params)
    (tmp_path / "model.safetensors").rename(tmp_path / "weights.bin")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        llama.from_pretrained(str(tmp_path))
    (tmp_path / "weights.bin").rename(tmp_path / "model.safetensors")
    hf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="missing \\['model.layers.2"):
        llama.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**hf, "intermediate_size": 40}))
    with pytest.raises(ValueError, match="has shape"):
        llama.from_pretrained(str(tmp_path))
    weights = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(weights[: len(weights) // 2])  # an interrupted download
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        llama.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**hf, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
    with pytest.raises(ValueError, match="rope_scaling type 'yarn' is not supported"):
        llama.from_pretrained(str(tmp_path))
