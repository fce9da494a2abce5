"""The built-in base LM's pretraining (metal_jax/pretrain.py): induction warm-up windows, the
frozen word embeddings of phase 2, and the flags' checks."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metal_jax.data import synthetic as S
from metal_jax.data.tasks import load_tokenized, meta_train_file
from metal_jax.models import GPT2Config, GPT2LM
from metal_jax.pretrain import PretrainConfig, lm_batch, make_step


@pytest.fixture(scope='module')
def tasks(tmp_path_factory):
  d = str(tmp_path_factory.mktemp('suite'))
  setting = S.write_suite(d, n_train_tasks=4, n_test_tasks=2, n_train_examples=40,
                          n_test_examples=8)
  tok = S.build_tokenizer()
  return [load_tokenized(meta_train_file(d, t), tok, os.path.join(d, 'cache'))
          for t in setting['train']]


def test_batches_copy_then_task_text(tasks):
  cfg = PretrainConfig(steps=4, copy_steps=2, batch_size=6, seq_len=64)
  vocab = len(S.VOCAB)
  for step in (0, 1):
    b = lm_batch(tasks, cfg, step, vocab)
    assert b.shape == (6, 65) and b.min() >= 3 and b.max() < vocab
    for row in b:  # a span of distinct words, repeated with its period
      period = next(p for p in range(16, 34) if np.array_equal(row[p:], row[:-p]))
      assert len(set(row[:period].tolist())) == period
  b = lm_batch(tasks, cfg, 2, vocab)  # phase 2: MetaICL text of a meta-train task, not periodic
  nl = S.build_tokenizer().convert_tokens_to_ids('\n')
  assert all((row == nl).sum() >= 6 for row in b)  # three newlines between examples
  assert not any(np.array_equal(row[p:], row[:-p]) for row in b for p in range(16, 34))
  # Deterministic.
  assert np.array_equal(lm_batch(tasks, cfg, 0, vocab), lm_batch(tasks, cfg, 0, vocab))
  assert not np.array_equal(lm_batch(tasks, cfg, 0, vocab), lm_batch(tasks, cfg, 1, vocab))


def test_embed_on_zero_leaves_the_word_embeddings_exactly():
  cfg = GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=1, n_head=2)
  module = GPT2LM(cfg)
  params = module.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']
  params = jax.tree.map(lambda x: x.value if hasattr(x, 'value') else x, params,
                        is_leaf=lambda x: hasattr(x, 'value'))
  tx = optax.adamw(1e-2, weight_decay=0.01)
  step = make_step(module, tx, cfg.embed_param)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, (2, 9)), jnp.int32)
  opt = tx.init(params)
  p1, opt, _ = step(params, opt, tokens, jnp.float32(1))  # warm-up: everything trains
  p2, _, _ = step(p1, opt, tokens, jnp.float32(0))  # phase 2: the embeddings stay
  assert not np.array_equal(p1['wte'], params['wte'])
  np.testing.assert_array_equal(p2['wte'], p1['wte'])
  changed = [k for k in p1 if k != 'wte' and not all(
      np.array_equal(a, b) for a, b in zip(jax.tree.leaves(p1[k]), jax.tree.leaves(p2[k])))]
  assert changed  # the rest of the LM still trains


@pytest.mark.parametrize('kw, flag', [
    (dict(steps=10, copy_steps=11), 'pretrain.copy_steps=11'),
    (dict(steps=10, copy_steps=-1), 'pretrain.copy_steps=-1'),
    (dict(steps=10, copy_steps=5, seq_len=16), 'pretrain.seq_len=16'),
    (dict(steps=10, decay_steps=5), 'pretrain.decay_steps=5')])
def test_bad_flags(kw, flag):
  with pytest.raises(ValueError, match=flag):
    PretrainConfig(**kw)
