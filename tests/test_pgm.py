"""The prompt generation model (pgm.py) against transformers, and the Prompt type.

An untrained PGM (LoRA B = 0) is the frozen LM reading [X^P ; padding embeddings], so each design's
prompt is something transformers computes from the same inputs:
* prefix: each layer's keys and values at the P slots (Llama: keys re-rotated for positions
  0..P-1, i.e. HF's key rotated back by its own position);
* hidden_state: the last hidden state (after the final norm) at the slots;
* weighted_sum: softmax(logits / temperature) @ the word embeddings;
* discrete (inference): argmax tokens of the logits, and their embeddings.
Also: PGMConfig refuses bad fields by name, and Prompt.rows gathers on each field's batch axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from metal_jax import lora, pgm
from metal_jax.models import KV, rope
from metal_jax.models.hf import load_lm

B, N_X, P = 2, 7, 4  # rows, longest X^P, prompt length
T = N_X + P
TOL = 2e-5


@pytest.fixture(scope='module', params=['gpt2', 'llama'])
def pair(request, gpt2_dir, llama_dir):
  d = str(gpt2_dir if request.param == 'gpt2' else llama_dir)
  return request.param, load_lm(d), transformers.AutoModelForCausalLM.from_pretrained(d).eval()


def pgm_batch(seed=0):
  """Left-padded X^P (rows of 7 and 4 tokens), the P slots last (collate_pgm's layout)."""
  rng = np.random.default_rng(seed)
  ids = np.zeros((B, T), np.int32)
  mask = np.zeros((B, T), np.int32)
  for b, n in enumerate([N_X, 4]):
    ids[b, N_X - n:N_X] = rng.integers(1, 100, n)
    mask[b, N_X - n:] = 1
  return ids, mask


def trainable_with_padding(lm, cfg, seed=1):
  return pgm.init_trainable(jax.random.key(seed), lm.config, cfg)  # LoRA B = 0: the frozen LM


def hf_reference(hf, lm, cfg, tr, ids, mask):
  """transformers' forward on [embeddings of X^P ; padding embeddings], positions from the mask."""
  pad = np.asarray(pgm.padding_embeddings(lm.config, cfg, tr), np.float32)  # [P, D]
  with torch.no_grad():
    emb = hf.get_input_embeddings()(torch.tensor(ids, dtype=torch.long))
    emb[:, N_X:] = torch.tensor(pad)
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return hf(inputs_embeds=emb, attention_mask=torch.tensor(mask),
              position_ids=torch.tensor(pos, dtype=torch.long), use_cache=True,
              output_hidden_states=True), pos


def generate(cfg, lm, tr, ids, mask):
  return pgm.generate(cfg, lm.module, lm.params, tr, jnp.asarray(ids), jnp.asarray(mask))


def test_prefix_is_the_lms_keys_and_values_at_the_slots(pair):
  name, lm, hf = pair
  cfg = pgm.PGMConfig(prompt_len=P, design='prefix',
                      lora=lora.LoraConfig(rank=2, targets=('q', 'v')))
  tr = trainable_with_padding(lm, cfg)
  ids, mask = pgm_batch()
  out, pos = hf_reference(hf, lm, cfg, tr, ids, mask)
  prompt = generate(cfg, lm, tr, ids, mask)
  c = lm.config
  assert prompt.kv.k.shape == (c.n_layers, B, P, c.n_kv_heads, c.head_dim)
  for i, layer in enumerate(out.past_key_values.layers):
    k = layer.keys.permute(0, 2, 1, 3).numpy()[:, N_X:]  # [B, P, K, H], at HF's positions
    v = layer.values.permute(0, 2, 1, 3).numpy()[:, N_X:]
    if name == 'llama':  # rotate by (j - position): the key HF's position would have at j
      shift = np.arange(P)[None] - pos[:, N_X:]
      k = np.asarray(rope.apply_rope(jnp.asarray(k), jnp.asarray(shift), c.inv_freq))
    np.testing.assert_allclose(np.asarray(prompt.kv.k[i]), k, atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(prompt.kv.v[i]), v, atol=TOL, rtol=0)


def test_hidden_state_weighted_sum_and_discrete_follow_the_lms_outputs(pair):
  _, lm, hf = pair
  ids, mask = pgm_batch(seed=3)
  base = dict(prompt_len=P, lora=lora.LoraConfig(rank=2, targets=('q', 'v')))
  cfg = pgm.PGMConfig(design='hidden_state', **base)
  tr = trainable_with_padding(lm, cfg)
  out, _ = hf_reference(hf, lm, cfg, tr, ids, mask)
  hidden = out.hidden_states[-1].numpy()[:, N_X:]
  logits = out.logits.numpy()[:, N_X:].astype(np.float64)
  table = hf.get_input_embeddings().weight.detach().numpy().astype(np.float64)
  np.testing.assert_allclose(np.asarray(generate(cfg, lm, tr, ids, mask).embeds), hidden,
                             atol=TOL, rtol=0)
  temp = 0.7
  cfg = pgm.PGMConfig(design='weighted_sum', temperature=temp, **base)
  probs = np.exp(logits / temp - (logits / temp).max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(generate(cfg, lm, tr, ids, mask).embeds), probs @ table,
                             atol=TOL, rtol=0)
  cfg = pgm.PGMConfig(design='discrete', **base)
  prompt = generate(cfg, lm, tr, ids, mask)
  np.testing.assert_array_equal(np.asarray(prompt.tokens), logits.argmax(-1))
  np.testing.assert_allclose(np.asarray(prompt.embeds), table[logits.argmax(-1)], atol=1e-6)


def test_an_iterative_pass_reads_the_previous_prompt_first(pair):
  """Iterative generation: the PGM reads the previous prompt (at positions 0..q-1) before X^P,
  which keeps the positions of a first pass (from 0). An embeddings prompt is transformers'
  forward on [prompt ; X^P ; padding] with those positions; a key/value prompt (the same
  embeddings' keys/values) gives the same prompt."""
  name, lm, hf = pair
  c = lm.config
  cfg = pgm.PGMConfig(prompt_len=P, design='prefix',
                      lora=lora.LoraConfig(rank=2, targets=('q', 'v')))
  tr = trainable_with_padding(lm, cfg)
  ids, mask = pgm_batch(seed=5)
  q = 3
  prev = np.asarray(0.5 * np.random.default_rng(0).normal(size=(B, q, c.d_model)), np.float32)
  pad = np.asarray(pgm.padding_embeddings(c, cfg, tr), np.float32)
  with torch.no_grad():
    emb = hf.get_input_embeddings()(torch.tensor(ids, dtype=torch.long))
    emb[:, N_X:] = torch.tensor(pad)
    emb = torch.cat([torch.tensor(prev), emb], dim=1)
    pos = np.concatenate([np.broadcast_to(np.arange(q), (B, q)),
                          np.maximum(np.cumsum(mask, axis=1) - 1, 0)], axis=1)
    out = hf(inputs_embeds=emb, attention_mask=torch.tensor(np.concatenate(
        [np.ones((B, q), np.int32), mask], axis=1)),
             position_ids=torch.tensor(pos, dtype=torch.long), use_cache=True)
  got = pgm.generate(cfg, lm.module, lm.params, tr, jnp.asarray(ids), jnp.asarray(mask),
                     prev=pgm.Prompt(embeds=jnp.asarray(prev)))
  for i, layer in enumerate(out.past_key_values.layers):
    k = layer.keys.permute(0, 2, 1, 3).numpy()[:, q + N_X:]
    v = layer.values.permute(0, 2, 1, 3).numpy()[:, q + N_X:]
    if name == 'llama':
      k = np.asarray(rope.apply_rope(jnp.asarray(k), jnp.asarray(np.arange(P)[None] -
                                                                  pos[:, q + N_X:]), c.inv_freq))
    np.testing.assert_allclose(np.asarray(got.kv.k[i]), k, atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(got.kv.v[i]), v, atol=TOL, rtol=0)
  # The same previous prompt as keys/values (what the prefix design hands the next pass).
  kv = lm.module.apply(lora.variables(lm.params, tr['lora'], cfg.lora),
                       jnp.zeros((B, q), jnp.int32), jnp.ones((B, q), jnp.int32),
                       input_embeds=jnp.asarray(prev), return_kv=True, return_logits=False).kv
  again = pgm.generate(cfg, lm.module, lm.params, tr, jnp.asarray(ids), jnp.asarray(mask),
                       prev=pgm.Prompt(kv=KV(kv.k, kv.v)))
  np.testing.assert_allclose(np.asarray(again.kv.k), np.asarray(got.kv.k), atol=TOL, rtol=0)
  np.testing.assert_allclose(np.asarray(again.kv.v), np.asarray(got.kv.v), atol=TOL, rtol=0)
  alone = generate(cfg, lm, tr, ids, mask)
  assert float(jnp.abs(alone.kv.v - got.kv.v).max()) > 1e-3  # the previous prompt is read


def test_padding_is_trained_state_and_lora_starts_at_zero(gpt2_dir):
  lm = load_lm(str(gpt2_dir))
  cfg = pgm.PGMConfig(prompt_len=P, lstm_layers=1)
  tr = pgm.init_trainable(jax.random.key(0), lm.config, cfg)
  assert set(tr) == {'lora', 'padding'}
  assert pgm.padding_embeddings(lm.config, cfg, tr).shape == (P, lm.config.d_model)
  bs = [x for path, x in jax.tree_util.tree_leaves_with_path(tr['lora']) if path[-1].key == 'b']
  assert bs and all(float(jnp.abs(x).max()) == 0.0 for x in bs)


@pytest.mark.parametrize('field, value, message', [
    ('design', 'nosuch', r"pgm.design='nosuch'"), ('prompt_len', 0, r'pgm.prompt_len=0')])
def test_config_refuses_bad_fields_naming_them(field, value, message):
  with pytest.raises(ValueError, match=message):
    pgm.PGMConfig(**{field: value})


def test_rows_gathers_on_each_fields_batch_axis():
  kv = KV(jnp.arange(2 * 3 * 1 * 1 * 1.0).reshape(2, 3, 1, 1, 1),
          -jnp.arange(2 * 3 * 1 * 1 * 1.0).reshape(2, 3, 1, 1, 1))
  p = pgm.Prompt(kv=kv).rows(np.array([2, 0, 2, 1]))
  assert p.batch_size == 4 and p.kv.k.shape == (2, 4, 1, 1, 1)
  assert p.kv.k[0, :, 0, 0, 0].tolist() == [2.0, 0.0, 2.0, 1.0]
  e = pgm.Prompt(embeds=jnp.arange(3.0)[:, None, None] * jnp.ones((3, 2, 5)),
                 tokens=jnp.arange(3)[:, None] * jnp.ones((3, 2), jnp.int32))
  g = e.rows(np.array([1, 1]))
  assert g.embeds.shape == (2, 2, 5) and g.tokens.tolist() == [[1, 1], [1, 1]]
  assert g.length == 2
