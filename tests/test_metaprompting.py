"""MetaPrompting (metal_jax.baselines.metaprompting) on a tiny random GPT-2 and the synthetic suite.

* meta-training counts its LM passes by the stated formula and improves what it optimises: the
  after-adaptation query loss on held-out examples of the meta-train tasks;
* the outer gradient is first-order MAML's, written out with jax.grad, also across tasks whose
  batches are padded to a common length;
* per-task tuning starts exactly at the meta-learned init, at SoftPrompt's budget;
* the cached init round-trips exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metal_jax import objective
from metal_jax.baselines import common, metaprompting, soft_prompt
from metal_jax.data import synthetic
from metal_jax.data.episodes import EpisodeSpec
from metal_jax.data.tasks import load_tokenized, meta_train_file
from metal_jax.models.hf import load_lm
from metal_jax.pgm import Prompt

P = 4
SPEC = EpisodeSpec(prompt_len=P, max_len=128)
# Learning rates far above the defaults so that 6 outer steps on a random tiny LM show a gain.
TINY = metaprompting.Hparams(prompt_len=P, meta_steps=6, meta_batch_tasks=2, inner_steps=2,
                             inner_lr=0.3, outer_lr=0.03, support_size=8, query_size=8)


@pytest.fixture(scope='module')
def suite(tmp_path_factory):
  """Two meta-train tasks of 64 examples, and a test task's 16 few-shot examples (seed 100)."""
  d = str(tmp_path_factory.mktemp('suite'))
  tokenizer = synthetic.build_tokenizer()
  setting = synthetic.write_suite(d, n_train_tasks=2, n_test_tasks=1, n_train_examples=64,
                                  n_test_examples=8)
  cache = os.path.join(d, 'cache')
  tasks = [load_tokenized(meta_train_file(d, t), tokenizer, cache) for t in setting['train']]
  shots = load_tokenized(synthetic.few_shot_path(d, setting['test'][0], 100, 'train'), tokenizer,
                         cache)
  return tasks, shots


@pytest.fixture(scope='module')
def lm(synthetic_lm_dir):
  return load_lm(str(synthetic_lm_dir))


@functools.partial(jax.jit, static_argnums=0)
def prompt_loss(module, params, embeds, batch):
  """The frozen LM's mean y-token NLL under the prompt embeds [P, D]."""
  return objective.mean_nll(module, params, Prompt(embeds=embeds[None]), batch)


def test_meta_train_counts_passes_and_improves_adapted_query_loss(suite, lm):
  tasks, _ = suite
  train = [t.subset(range(32)) for t in tasks]  # meta-train on the first 32 examples of each
  held = [t.subset(range(32, 64)) for t in tasks]  # evaluate on the other 32
  init, losses, stats = metaprompting.meta_train(lm.module, lm.params, train, SPEC, TINY,
                                                 rng=jax.random.key(0))
  # Per outer step and task: inner_steps fwd + bwd on the support batch, 1 fwd for the query loss
  # before adaptation, 1 fwd + bwd at the adapted prompt.
  assert stats['forward_passes'] == 6 * 2 * (2 + 2) == 48
  assert stats['backward_passes'] == 6 * 2 * (2 + 1) == 36
  assert len(losses) == len(stats['query_loss_before']) == 6
  assert init.shape == (P, lm.config.d_model) and init.dtype == jnp.float32

  vocab, _, _ = metaprompting.meta_train(lm.module, lm.params, train, SPEC,
                                         dataclasses.replace(TINY, meta_steps=0),
                                         rng=jax.random.key(0))  # the init it started from
  table = np.asarray(lm.params[lm.config.embed_param])
  assert all((np.abs(table - row).max(-1) == 0).any() for row in np.asarray(vocab))
  chosen, support, query = metaprompting.sample_episodes(held, TINY, np.random.default_rng(1))
  batches = [metaprompting.stacked_batches(chosen, idx, SPEC) for idx in (support, query)]
  adapted = [metaprompting.meta_gradient(lm.module, lm.params, e, *batches,
                                         jnp.float32(TINY.inner_lr), TINY.inner_steps)[1]
             for e in (vocab, init)]  # the query losses after adaptation [M]
  vocab_loss, meta_loss = (float(a.mean()) for a in adapted)
  assert meta_loss < vocab_loss, (meta_loss, vocab_loss)  # by 0.07 (0.07-0.09 for rng keys 0-3)


def test_outer_gradient_is_first_order_maml(suite, lm):
  """One inner SGD step: g = grad_q(p - lr * grad_s(p)), averaged over two tasks whose batches
  have different bucketed lengths (padded to the longer one for the vmapped step)."""
  tasks, _ = suite
  spec = dataclasses.replace(SPEC, buckets=(4, 8))
  lengths = [np.array([len(x) + len(y) for x, y in zip(t.input_first, t.output_ids)])
             for t in tasks]
  support = [np.flatnonzero(lengths[0] <= 4)[:4], np.flatnonzero(lengths[1] > 4)[:4]]
  query = [np.flatnonzero(lengths[0] > 4)[:4], np.flatnonzero(lengths[1] <= 4)[:4]]
  s_batches = [common.train_batch(t, i, spec) for t, i in zip(tasks, support)]
  q_batches = [common.train_batch(t, i, spec) for t, i in zip(tasks, query)]
  assert s_batches[0]['lm_ids'].shape[1] == 4 and s_batches[1]['lm_ids'].shape[1] == 8

  p = soft_prompt.init_from_vocab(jax.random.key(3), lm.module, lm.params, P)
  lr = 1.0
  loss = functools.partial(prompt_loss, lm.module, lm.params)
  grad = functools.partial(jax.jit(jax.grad(prompt_loss, argnums=2), static_argnums=0),
                           lm.module, lm.params)
  ref_before, ref_after, ref_grads = [], [], []
  for s, q in zip(s_batches, q_batches):
    adapted = p - lr * grad(p, s)
    ref_before.append(float(loss(p, q)))
    ref_after.append(float(loss(adapted, q)))
    ref_grads.append(grad(adapted, q))
  ref = (ref_grads[0] + ref_grads[1]) / 2

  before, after, g = metaprompting.meta_gradient(
      lm.module, lm.params, p, metaprompting.stacked_batches(tasks, support, spec),
      metaprompting.stacked_batches(tasks, query, spec), jnp.float32(lr), 1)
  np.testing.assert_allclose(np.asarray(before), ref_before, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(after), ref_after, rtol=1e-5)
  scale = float(jnp.abs(ref).max())
  np.testing.assert_allclose(np.asarray(g), np.asarray(ref), atol=1e-4 * scale)
  # The inner step matters: the gradient at the unadapted prompt is a different one.
  at_init = (grad(p, q_batches[0]) + grad(p, q_batches[1])) / 2
  assert float(jnp.abs(at_init - ref).max()) > 0.01 * scale


def test_run_adapts_the_init_by_the_inner_loop(suite, lm):
  """A test task adapts the meta-learned init as meta-training does: test_steps (default
  inner_steps) full-batch SGD steps at inner_lr, one forward + one backward pass each, within
  SoftPrompt's 10 + 10; equal to the steps written out with jax.grad."""
  tasks, shots = suite
  init = 0.1 * jax.random.normal(jax.random.key(0), (P, lm.config.d_model))
  hp = metaprompting.Hparams(prompt_len=P, inner_lr=0.3)
  assert hp.inner_steps == 5 and hp.test_steps == 0

  same = metaprompting.run(lm.module, lm.params, shots, range(16), SPEC,
                           dataclasses.replace(hp, inner_steps=0), rng=0, init_embeds=init)
  assert same.forward_passes == same.backward_passes == 0 and same.losses == []
  np.testing.assert_array_equal(np.asarray(same.prompt.embeds), np.asarray(init)[None])

  res = metaprompting.run(lm.module, lm.params, shots, range(16), SPEC, hp, rng=0,
                          init_embeds=init)
  assert res.forward_passes == res.backward_passes == len(res.losses) == 5
  batch = common.train_batch(shots, range(16), SPEC)
  p, want = init, []
  for _ in range(5):
    loss, g = jax.value_and_grad(prompt_loss, argnums=2)(lm.module, lm.params, p, batch)
    want.append(float(loss))
    p = p - 0.3 * g
  np.testing.assert_allclose(res.losses, want, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(res.prompt.embeds[0]), np.asarray(p), atol=1e-5)
  assert res.losses[-1] < res.losses[0]
  three = metaprompting.run(lm.module, lm.params, shots, range(16), SPEC,
                            dataclasses.replace(hp, test_steps=3), rng=0, init_embeds=init)
  assert three.forward_passes == 3 and three.losses == pytest.approx(want[:3], rel=1e-5)

  with pytest.raises(ValueError, match='prompt_len'):
    metaprompting.run(lm.module, lm.params, shots, range(16), SPEC,
                      dataclasses.replace(hp, prompt_len=P + 1), rng=0, init_embeds=init)


def test_save_load_init_round_trip(suite, tmp_path):
  tasks, _ = suite
  init = jax.random.normal(jax.random.key(1), (P, 32))
  meta = metaprompting.init_meta(TINY, tasks, seed=0)
  assert meta['n_tasks'] == 2 and len(meta['fingerprints']) == 2
  path = str(tmp_path / 'init.npz')
  metaprompting.save_init(path, jnp.zeros_like(init), meta)
  metaprompting.save_init(path, init, meta)  # replaces the file
  loaded, loaded_meta = metaprompting.load_init(path)
  np.testing.assert_array_equal(np.asarray(loaded), np.asarray(init))
  assert loaded.dtype == jnp.float32 and loaded_meta == meta
  assert os.listdir(tmp_path) == ['init.npz']  # no temporary file left behind
  # A cache of other tasks or hyperparameters is told apart by its meta.
  assert metaprompting.init_meta(TINY, tasks[:1], seed=0) != loaded_meta
  assert metaprompting.init_meta(dataclasses.replace(TINY, inner_lr=1.0), tasks, seed=0) != meta
  with pytest.raises(ValueError, match='fingerprints'):
    metaprompting.save_init(path, init, {'hparams': {}, 'n_tasks': 2})
