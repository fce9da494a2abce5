"""HF checkpoint import/export: file formats, round trip, clear errors, full-size parameter counts."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import metal_jax
from metal_jax.models import GPT2Config, LlamaConfig
from metal_jax.models.hf import CheckpointError, count_params

from conftest import save_hf

IDS = np.random.RandomState(0).randint(0, 100, (2, 9))


def ours(lm, ids=IDS):
  return np.asarray(lm.module.apply({'params': lm.params}, jnp.asarray(ids)).logits)


def theirs(model, ids=IDS):
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.float().numpy()


@pytest.mark.parametrize('kind,overrides', [
    ('gpt2', {}),
    ('llama', {}),
    ('llama', dict(tie_word_embeddings=True, num_key_value_heads=1, attention_bias=True,
                   mlp_bias=True, rope_scaling={'rope_type': 'linear', 'factor': 2.0})),
    ('llama', dict(rope_theta=500000.0, rope_scaling={
        'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
        'original_max_position_embeddings': 16})),
])
@pytest.mark.parametrize('scan', [False, True])
def test_round_trip(tmp_path, kind, overrides, scan):
  """Load, export, reload with transformers: the same logits (and the same tensors)."""
  ref = save_hf(kind, tmp_path / 'hf', **overrides)
  lm = metal_jax.load_lm(str(tmp_path / 'hf'), scan_layers=scan)
  np.testing.assert_allclose(ours(lm), theirs(ref), atol=1e-4)
  metal_jax.save_lm(str(tmp_path / 'out'), lm.config, lm.params)
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'out')).eval()
  np.testing.assert_array_equal(theirs(back), theirs(ref))
  for name, t in ref.state_dict().items():
    np.testing.assert_array_equal(back.state_dict()[name].numpy(), t.numpy(), err_msg=name)


def test_sharded_safetensors(tmp_path):
  ref = save_hf('llama', tmp_path / 'a')
  ref.save_pretrained(tmp_path / 'sharded', max_shard_size='20KB')
  assert os.path.exists(tmp_path / 'sharded' / 'model.safetensors.index.json')
  assert len([f for f in os.listdir(tmp_path / 'sharded') if f.endswith('.safetensors')]) > 2
  lm = metal_jax.load_lm(str(tmp_path / 'sharded'))
  np.testing.assert_allclose(ours(lm), theirs(ref), atol=1e-4)


@pytest.mark.parametrize('kind', ['gpt2', 'llama'])
def test_pytorch_bin(tmp_path, kind):
  ref = save_hf(kind, tmp_path / 'st')
  d = tmp_path / 'bin'
  d.mkdir()
  shutil.copy(tmp_path / 'st' / 'config.json', d / 'config.json')
  torch.save(ref.state_dict(), d / 'pytorch_model.bin')
  lm = metal_jax.load_lm(str(d))
  np.testing.assert_allclose(ours(lm), theirs(ref), atol=1e-4)


def test_bare_gpt2_keys(tmp_path):
  """The original `gpt2` hub files hold GPT2Model keys (no `transformer.` prefix) plus attn buffers."""
  ref = save_hf('gpt2', tmp_path / 'st')
  tensors = {k.removeprefix('transformer.'): v for k, v in
             load_file(str(tmp_path / 'st' / 'model.safetensors')).items()}
  tensors['h.0.attn.bias'] = np.tril(np.ones((1, 1, 64, 64), np.float32))
  save_file(tensors, str(tmp_path / 'st' / 'model.safetensors'))
  np.testing.assert_allclose(ours(metal_jax.load_lm(str(tmp_path / 'st'))), theirs(ref), atol=1e-4)


def test_bfloat16_checkpoint(tmp_path):
  ref = save_hf('llama', tmp_path / 'f32')
  ref.to(torch.bfloat16).save_pretrained(tmp_path / 'bf16')
  lm = metal_jax.load_lm(str(tmp_path / 'bf16'), dtype='bfloat16')
  assert all(x.dtype == jnp.bfloat16 for x in jax_leaves(lm.params))
  got = ours(lm)
  assert np.isfinite(got).all()
  # bf16 weights and compute: about 2-3 significant digits on these O(1) logits.
  np.testing.assert_allclose(got, theirs(ref.float()), atol=0.1)


def jax_leaves(tree):
  import jax
  return jax.tree.leaves(tree)


def test_tokenizer_loaded_when_present(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers
  save_hf('gpt2', tmp_path)
  assert metal_jax.load_lm(str(tmp_path)).tokenizer is None
  vocab = {w: i for i, w in enumerate(['[UNK]', 'hello', 'world'])}
  tok = Tokenizer(models.WordLevel(vocab, unk_token='[UNK]'))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token='[UNK]').save_pretrained(
      tmp_path)
  loaded = metal_jax.load_lm(str(tmp_path)).tokenizer
  assert loaded('hello world')['input_ids'] == [1, 2]


# ----------------------------------------------------------------------------- broken checkpoints


def _rewrite(path, fn):
  tensors = load_file(str(path))
  fn(tensors)
  save_file(tensors, str(path))


def test_missing_tensor_names_file_and_key(tmp_path):
  save_hf('llama', tmp_path)
  _rewrite(tmp_path / 'model.safetensors', lambda t: t.pop('model.layers.1.mlp.up_proj.weight'))
  with pytest.raises(CheckpointError, match=r"model\.safetensors.*model\.layers\.1\.mlp\.up_proj\.weight"):
    metal_jax.load_lm(str(tmp_path))


def test_wrong_shape_names_key(tmp_path):
  save_hf('gpt2', tmp_path)
  key = 'transformer.h.0.attn.c_attn.weight'
  _rewrite(tmp_path / 'model.safetensors', lambda t: t.update({key: t[key][:, :48]}))
  with pytest.raises(CheckpointError, match=r"h\.0\.attn\.c_attn\.weight.*\(32, 48\).*\(32, 96\)"):
    metal_jax.load_lm(str(tmp_path))


def test_extra_tensor_names_key(tmp_path):
  save_hf('llama', tmp_path)
  _rewrite(tmp_path / 'model.safetensors',
           lambda t: t.update({'model.layers.0.self_attn.q_proj.bias': np.zeros(32, np.float32)}))
  with pytest.raises(CheckpointError, match=r'unexpected tensor .model\.layers\.0\.self_attn\.q_proj\.bias'):
    metal_jax.load_lm(str(tmp_path))


def test_unknown_model_type(tmp_path):
  save_hf('gpt2', tmp_path)
  cfg = json.loads((tmp_path / 'config.json').read_text())
  cfg['model_type'] = 'mamba'
  (tmp_path / 'config.json').write_text(json.dumps(cfg))
  with pytest.raises(CheckpointError, match=r"config\.json: unknown model_type 'mamba'"):
    metal_jax.load_lm(str(tmp_path))


def test_missing_files(tmp_path):
  with pytest.raises(CheckpointError, match='config.json'):
    metal_jax.load_lm(str(tmp_path))
  save_hf('gpt2', tmp_path)
  os.remove(tmp_path / 'model.safetensors')
  with pytest.raises(CheckpointError, match='no weights found'):
    metal_jax.load_lm(str(tmp_path))


def test_missing_shard(tmp_path):
  ref = save_hf('llama', tmp_path / 'a')
  ref.save_pretrained(tmp_path / 's', max_shard_size='20KB')
  shard = sorted(f for f in os.listdir(tmp_path / 's') if f.endswith('.safetensors'))[-1]
  os.remove(tmp_path / 's' / shard)
  with pytest.raises(CheckpointError, match=shard):
    metal_jax.load_lm(str(tmp_path / 's'))


# ----------------------------------------------------------------------------- full-size counts


@pytest.mark.parametrize('cfg,expected', [
    (GPT2Config(n_embd=1280, n_layer=36, n_head=20), 774_030_080),  # GPT2-Large
    (GPT2Config(n_embd=1600, n_layer=48, n_head=25), 1_557_611_200),  # GPT2-XL
    (LlamaConfig(), 6_738_415_616),  # Llama-2-7B
    (LlamaConfig(scan_layers=True), 6_738_415_616),
])
def test_full_size_parameter_counts(cfg, expected):
  assert count_params(cfg) == expected
