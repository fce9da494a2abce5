"""AutoPrompt (metal_jax.baselines.autoprompt) on a tiny random GPT-2 and the synthetic task.

* run() counts 1 + num_cand forward passes and 1 backward pass an iteration, keeps a
  trigger whose loss never rises, ends below the initial trigger's loss, and returns it;
* the candidates are the top-k of table @ -g over the allowed ids, g the gradient of the
  loss w.r.t. the position's embedding (HotFlip), as numpy ranks them;
* the batched candidate losses equal each candidate trigger scored alone;
* search (every iteration in one jitted call) keeps what search_step an iteration at a time
  with the choice on the host keeps;
* the same rng gives the same trigger.

Every test uses the same shapes (P = 4, 4 candidates, 6 iterations), so each jitted function
compiles once or twice (run() pads the short examples to 8 tokens, the batch fixture to 32).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metal_jax import objective
from metal_jax.baselines import autoprompt, common
from metal_jax.data import synthetic
from metal_jax.data.episodes import EpisodeSpec
from metal_jax.data.tasks import load_tokenized
from metal_jax.models.hf import load_lm
from metal_jax.pgm import Prompt

P, K = 4, 4
SPEC = EpisodeSpec(n_prompt_examples=16, n_lm_examples=0, prompt_len=P, max_len=128)
HP = autoprompt.Hparams(prompt_len=P, iters=6, num_cand=K)

_mean_nll = jax.jit(objective.mean_nll, static_argnums=0)


@pytest.fixture(scope='module')
def shots(tmp_path_factory):
  """A synthetic test task's 16 few-shot examples (seed 100)."""
  d = str(tmp_path_factory.mktemp('suite'))
  setting = synthetic.write_suite(d, n_train_tasks=0, n_test_tasks=1, n_train_examples=1,
                                  n_test_examples=8)
  path = synthetic.few_shot_path(d, setting['test'][0], 100, 'train')
  return load_tokenized(path, synthetic.build_tokenizer(), os.path.join(d, 'cache'))


@pytest.fixture(scope='module')
def lm(synthetic_lm_dir):
  """A tiny random GPT-2 over the synthetic tokenizer's vocabulary (eos = bos = 0)."""
  return load_lm(str(synthetic_lm_dir))


@pytest.fixture(scope='module')
def batch(shots):
  return common.train_batch(shots, range(16), SPEC)


def run(lm, shots, rng):
  return autoprompt.run(lm.module, lm.params, shots, range(16), SPEC, HP, rng=rng)


def test_run_counts_passes_and_lowers_the_loss(lm, shots, batch):
  res = run(lm, shots, jax.random.key(0))
  assert res.forward_passes == HP.iters * (1 + K) == 30 and res.backward_passes == HP.iters == 6
  assert len(res.losses) == HP.iters and res.note == ''
  assert all(b <= a for a, b in zip(res.losses, res.losses[1:])), res.losses
  table = lm.params[lm.config.embed_param]
  init = autoprompt.initial_trigger(lm.config, HP)
  np.testing.assert_array_equal(init, np.zeros(P))  # the eos id, P times
  start = float(_mean_nll(lm.module, lm.params, autoprompt.trigger_prompt(table, init), batch))
  assert res.losses[0] <= start and res.losses[-1] < start, (start, res.losses)
  tokens = np.asarray(res.prompt.tokens)
  assert tokens.shape == (1, P) and res.prompt.embeds.shape == (1, P, lm.config.d_model)
  np.testing.assert_array_equal(np.asarray(res.prompt.embeds), np.asarray(table)[tokens])
  assert (tokens != 0).any()  # some position was flipped away from eos
  final = float(_mean_nll(lm.module, lm.params, res.prompt, batch))
  assert abs(final - res.losses[-1]) < 1e-5


def test_candidates_are_hotflip_top_k(lm, batch):
  """The step's candidates are numpy's top-k of E @ -g over the allowed ids, g = jax.grad of the
  loss w.r.t. the trigger embeddings at the flipped position; excluded ids never appear."""
  table = lm.params[lm.config.embed_param]
  ids, pos = np.asarray([5, 17, 0, 42], np.int32), 1

  def loss_of_embeds(e):
    return objective.mean_nll(lm.module, lm.params, Prompt(embeds=e[None]), batch)

  g = np.asarray(jax.jit(jax.grad(loss_of_embeds))(np.asarray(table)[ids]))[pos]
  scores = np.asarray(table, np.float64) @ -g.astype(np.float64)  # [V]
  allowed = autoprompt.allowed_tokens(lm.config)
  allowed[np.argmax(scores)] = False  # the unmasked best must be skipped
  _, cands, _ = autoprompt.search_step(lm.module, lm.params, ids, pos, jnp.asarray(allowed),
                                       batch, K)
  expected = np.argsort(-np.where(allowed, scores, -np.inf))[:K]
  assert set(np.asarray(cands).tolist()) == set(expected.tolist())
  assert allowed[np.asarray(cands)].all() and 0 not in np.asarray(cands)  # eos excluded


def test_batched_candidate_losses_equal_each_alone(lm, batch):
  table = lm.params[lm.config.embed_param]
  ids, pos = np.asarray([9, 3, 0, 77], np.int32), 2
  allowed = jnp.asarray(autoprompt.allowed_tokens(lm.config))
  loss, cands, cand_losses = autoprompt.search_step(lm.module, lm.params, ids, pos, allowed,
                                                    batch, K)
  alone = lambda t: float(_mean_nll(lm.module, lm.params, autoprompt.trigger_prompt(table, t),
                                    batch))
  assert abs(float(loss) - alone(ids)) < 1e-5  # the gradient pass's loss: the current trigger's
  expected = [alone(np.where(np.arange(P) == pos, c, ids)) for c in np.asarray(cands)]
  np.testing.assert_allclose(np.asarray(cand_losses), expected, rtol=1e-6, atol=1e-6)
  assert len(set(np.asarray(cands).tolist())) == K


def test_search_equals_the_step_by_step_loop(lm, batch):
  """The first iteration's trigger loss starts the kept loss; a candidate replaces the trigger
  only when its loss is lower; the kept loss after each iteration is returned."""
  allowed = jnp.asarray(autoprompt.allowed_tokens(lm.config))
  positions = np.asarray([1, 3, 1, 0, 2, 3], np.int32)  # HP.iters of them
  start = np.asarray([5, 17, 0, 42], np.int32)
  ids, losses = autoprompt.search(lm.module, lm.params, start, jnp.asarray(positions), allowed,
                                  batch, K)
  ref, ref_losses = start.copy(), []
  for t, pos in enumerate(positions.tolist()):
    loss, cands, cand_losses = autoprompt.search_step(lm.module, lm.params, ref, pos, allowed,
                                                      batch, K)
    best = float(loss) if t == 0 else ref_losses[-1]
    i = int(np.argmin(cand_losses))
    if cand_losses[i] < best:
      best, ref[pos] = float(cand_losses[i]), int(np.asarray(cands)[i])
    ref_losses.append(best)
  np.testing.assert_array_equal(np.asarray(ids), ref)
  np.testing.assert_allclose(np.asarray(losses), ref_losses, rtol=1e-6)
  assert (ref != start).any() and ref_losses[-1] < ref_losses[0]


def test_same_rng_same_trigger(lm, shots):
  a, b = run(lm, shots, jax.random.key(3)), run(lm, shots, 3)  # an int seed is the same key
  np.testing.assert_array_equal(np.asarray(a.prompt.tokens), np.asarray(b.prompt.tokens))
  assert a.losses == b.losses


def test_allowed_tokens_and_initial_trigger(lm):
  cfg = lm.config.replace(bos_token_id=7, eos_token_id=(3, 5))
  allowed = autoprompt.allowed_tokens(cfg, vocab_limit=300)
  assert allowed.shape == (cfg.vocab_size,)
  assert set(np.flatnonzero(~allowed).tolist()) == {3, 5, 7} | set(range(300, cfg.vocab_size))
  np.testing.assert_array_equal(np.asarray(autoprompt.initial_trigger(cfg, HP)), [3] * P)
  hp = autoprompt.Hparams(prompt_len=2, init_token=9)
  np.testing.assert_array_equal(np.asarray(autoprompt.initial_trigger(cfg, hp)), [9, 9])
  with pytest.raises(ValueError, match='init_token'):
    autoprompt.initial_trigger(cfg, autoprompt.Hparams(init_token=cfg.vocab_size))
