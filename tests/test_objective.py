"""objective.score, the one scoring function, and the Prompt type's explicit batch axis.

* a batch of B different prompts scored in one call gives, row by row, what scoring each row
  alone under its own prompt gives (prefix keys/values and input embeddings; GPT-2 and Llama);
* one batch-1 prompt is broadcast to the rows: equal to the same prompt tiled by hand;
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metal_jax import objective, pgm
from metal_jax.models import KV
from metal_jax.models.hf import load_lm

TOL = 1e-5
B, T, Y, P = 3, 10, 3, 4


def lm_half(seed=0, vocab=100):
  """B right-padded rows of different lengths, each with a y of 1..Y tokens at its end."""
  rng = np.random.default_rng(seed)
  ids = np.zeros((B, T), np.int32)
  mask = np.zeros((B, T), np.int32)
  pos = np.zeros((B, Y), np.int32)
  tgt = np.zeros((B, Y), np.int32)
  tmask = np.zeros((B, Y), np.int32)
  for b, (n, ny) in enumerate([(10, 3), (6, 1), (8, 2)]):
    ids[b, :n] = rng.integers(1, vocab, n)
    mask[b, :n] = 1
    pos[b, :ny] = n - ny - 1 + np.arange(ny)
    tgt[b, :ny] = ids[b, n - ny:n]
    tmask[b, :ny] = 1
  return {k: jnp.asarray(v) for k, v in dict(lm_ids=ids, lm_mask=mask, target_pos=pos,
                                             target_ids=tgt, target_mask=tmask).items()}


def prompts(kind, cfg, n, seed=0):
  r = jax.random.split(jax.random.key(seed), 2)
  if kind == 'prefix':
    shape = (cfg.n_layers, n, P, cfg.n_kv_heads, cfg.head_dim)
    return pgm.Prompt(kv=KV(jax.random.normal(r[0], shape), jax.random.normal(r[1], shape)))
  return pgm.Prompt(embeds=0.5 * jax.random.normal(r[0], (n, P, cfg.d_model)))


@pytest.fixture(scope='module', params=['gpt2', 'llama'])
def lm(request, gpt2_dir, llama_dir):
  return load_lm(str(gpt2_dir if request.param == 'gpt2' else llama_dir))


score = jax.jit(objective.score, static_argnums=0)


@pytest.mark.parametrize('kind', ['prefix', 'embeds'])
def test_batch_of_different_prompts_equals_each_row_alone(lm, kind):
  half = lm_half()
  table = prompts(kind, lm.config, B)
  assert table.batch_size == B
  total, count = score(lm.module, lm.params, table, half)
  assert total.shape == count.shape == (B,)
  alone = []
  for b in range(B):
    row = jax.tree.map(lambda x: x[b:b + 1], half)
    t, c = score(lm.module, lm.params, table.rows(np.array([b])), row)
    alone.append((float(t[0]), float(c[0])))
  worst = max(abs(float(total[b]) - alone[b][0]) / abs(alone[b][0]) for b in range(B))
  print(f'\n{lm.config.model_type}/{kind}: mixed batch vs each row alone, max rel diff {worst:.2e}')
  assert worst <= TOL
  assert [float(c) for c in count] == [c for _, c in alone] == [3.0, 1.0, 2.0]
  # Not vacuous: the rows' prompts differ, and so do the scores of one row under each prompt.
  row0 = jax.tree.map(lambda x: x[:1], half)
  under = [float(score(lm.module, lm.params, table.rows(np.array([b])), row0)[0][0])
           for b in range(B)]
  assert max(under) - min(under) > 1e-3


def test_one_prompt_broadcasts_to_the_rows(lm):
  half = lm_half(1)
  one = prompts('prefix', lm.config, 1, seed=3)
  tiled = pgm.Prompt(kv=KV(*(jnp.repeat(x, B, axis=1) for x in (one.kv.k, one.kv.v))))
  a = score(lm.module, lm.params, one, half)
  b = score(lm.module, lm.params, tiled, half)
  np.testing.assert_allclose(np.asarray(a[0]), np.asarray(b[0]), rtol=TOL)
  with pytest.raises(ValueError, match='batch 2 cannot serve 3 rows'):
    objective.score(lm.module, lm.params, prompts('prefix', lm.config, 2), half)


def test_iterative_episodes_average_every_passes_loss(lm):
  """With two PGM passes (pgm_ids_1: iterative generation), the loss is the mean over the passes
  of the LM's NLL under each pass's prompt, the second pass reading the first's prompt."""
  from metal_jax import lora
  cfg = pgm.PGMConfig(prompt_len=P, lstm_layers=1, lora=lora.LoraConfig(rank=2, alpha=4.0))
  trainable = pgm.init_trainable(jax.random.key(0), lm.config, cfg)
  trainable['lora'] = jax.tree.map(lambda x: 0.05 * jnp.ones_like(x), trainable['lora'])
  rng = np.random.default_rng(1)
  chunks = []
  for _ in range(2):
    ids = np.zeros((B, 9), np.int32)
    mask = np.zeros((B, 9), np.int32)
    ids[:, 9 - P - 3:9 - P] = rng.integers(1, 100, (B, 3))
    mask[:, 9 - P - 3:] = 1
    chunks.append((jnp.asarray(ids), jnp.asarray(mask)))
  half = lm_half(seed=2)
  batch = {**half, 'pgm_ids': chunks[0][0], 'pgm_mask': chunks[0][1],
           'pgm_ids_1': chunks[1][0], 'pgm_mask_1': chunks[1][1]}
  first = pgm.generate(cfg, lm.module, lm.params, trainable, *chunks[0])
  second = pgm.generate(cfg, lm.module, lm.params, trainable, *chunks[1], prev=first)
  sums = [objective.score(lm.module, lm.params, p, half) for p in (first, second)]
  want = sum(float(t.sum()) for t, _ in sums) / sum(float(c.sum()) for _, c in sums)
  got = float(objective.loss(cfg, lm.module, lm.params, trainable, batch, train=False))
  assert got == pytest.approx(want, rel=1e-6)
  one = float(objective.loss(cfg, lm.module, lm.params, trainable,
                             {**half, 'pgm_ids': chunks[0][0], 'pgm_mask': chunks[0][1]},
                             train=False))
  assert one == pytest.approx(float(sums[0][0].sum() / sums[0][1].sum()), rel=1e-6)
  assert abs(got - one) > 1e-4
