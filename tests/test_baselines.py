"""The prompt-tuning baselines (metal_jax.baselines) end to end on tiny random models.

* the few-shot training batch is prompt + bare x + y with the loss on y, as in scoring;
* every method runs, lowers its own training loss, returns a batch-1 prompt that
  evaluation.score_options accepts, and counts its passes (gradient methods: one
  forward + one backward per optimizer step; BBTv2: one forward per candidate);
* MetaL(+Tune) starts exactly at the PGM's prompt;
* BBTv2 never exceeds its forward-pass budget and, below one generation, says
  the prompt is untuned; with the LM on a mesh it compiles one generation program;

Learning rates are far above the paper's so that a few steps on a random tiny
model show a decrease.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import save_hf
from metal_jax import evaluation, methods, objective, pgm, sharding
from metal_jax.baselines import bbtv2, common, metal_tune, p_tuning, prefix_tuning, soft_prompt
from metal_jax.data import synthetic
from metal_jax.data.episodes import EpisodeSpec
from metal_jax.data.tasks import load_tokenized
from metal_jax.models import KV
from metal_jax.models.hf import load_lm

P = 4
SPEC = EpisodeSpec(n_prompt_examples=16, n_lm_examples=0, prompt_len=P, max_len=128)
FAST = {  # high learning rates, short prompts: a visible decrease within 10 steps
    'soft_prompt': dict(lr=0.05, prompt_len=P),
    'p_tuning': dict(lr=0.01, prompt_len=P, lstm_layers=1),
    'prefix_tuning': dict(lr=0.01, prompt_len=P, hidden=16),
}


@pytest.fixture(scope='module')
def tokenizer():
  return synthetic.build_tokenizer()


@pytest.fixture(scope='module')
def data(tmp_path_factory, tokenizer):
  """A test task's 16 few-shot examples (seed 100) and its 8 evaluation queries."""
  d = str(tmp_path_factory.mktemp('suite'))
  setting = synthetic.write_suite(d, n_train_tasks=0, n_test_tasks=1, n_train_examples=1,
                                  n_test_examples=8)
  task = setting['test'][0]
  cache = os.path.join(d, 'cache')
  shots = load_tokenized(synthetic.few_shot_path(d, task, 100, 'train'), tokenizer, cache)
  queries = load_tokenized(synthetic.few_shot_path(d, task, 100, 'test'), tokenizer, cache)
  assert len(shots) == 16
  return shots, queries


@pytest.fixture(scope='module')
def models(tmp_path_factory, tokenizer):
  v = len(tokenizer)
  out = {}
  for kind, kw in [('gpt2', dict(vocab_size=v, n_positions=128)),
                   ('llama', dict(vocab_size=v, max_position_embeddings=128))]:
    d = tmp_path_factory.mktemp(kind)
    save_hf(kind, d, **kw)
    out[kind] = load_lm(str(d))
  return out


_prompt_loss = jax.jit(objective.mean_nll, static_argnums=0)


MODULES = {'soft_prompt': soft_prompt, 'p_tuning': p_tuning, 'prefix_tuning': prefix_tuning,
           'metal_tune': metal_tune, 'bbtv2': bbtv2}


def run_baseline(name, lm, shots, *, rng, init_prompt=None, **hp):
  """A baselines module's run() on the 16 shots, `hp` overriding its Hparams by name."""
  mod = MODULES[name]
  kw = {} if init_prompt is None else {'init_prompt': init_prompt}
  return mod.run(lm.module, lm.params, shots, range(16), SPEC, mod.Hparams(**hp), rng=rng, **kw)


def loss_of(lm, prompt, shots, spec=SPEC):
  batch = common.train_batch(shots, range(len(shots)), spec.with_prompt_len(prompt.length))
  return float(_prompt_loss(lm.module, lm.params, prompt, batch))


def check_scores(lm, prompt, shots, queries):
  """The frozen LM consumes the prompt: score_options gives finite scores for every option."""
  spec = SPEC.with_prompt_len(prompt.length)
  scores = evaluation.score_options(lm.module, lm.params, prompt, shots, [], queries, spec, rows=8)
  assert len(scores) == len(queries)
  for q, s in enumerate(scores):
    assert s.shape == (len(queries.option_ids[q]),) and np.isfinite(s).all()
  m = evaluation.metrics(evaluation.predict(scores, queries), [o for o in queries.raw['output']])
  assert 0 <= m['accuracy'] <= 100


# ----------------------------------------------------------------------------- the batch


def test_train_batch_is_bare_x_then_y(data, models):
  shots, _ = data
  idx = [3, 0, 7]
  b = common.train_batch(shots, idx, SPEC)
  assert set(b) == {'lm_ids', 'lm_mask', 'target_pos', 'target_ids', 'target_mask'}  # LM half only
  for r, i in enumerate(idx):
    seq = np.concatenate([shots.input_first[i], shots.output_ids[i]])
    n, ny = len(seq), len(shots.output_ids[i])
    np.testing.assert_array_equal(np.asarray(b['lm_ids'][r, :n]), seq)
    assert int(b['lm_mask'][r].sum()) == n  # right-padded
    np.testing.assert_array_equal(np.asarray(b['target_ids'][r, :ny]), shots.output_ids[i])
    np.testing.assert_array_equal(np.asarray(b['target_pos'][r, :ny]), n - ny - 1 + np.arange(ny))
    assert int(b['target_mask'][r].sum()) == ny
  # the loss without a prompt is the mean y-token NLL of the plain LM, as scoring computes it.
  lm = models['gpt2']
  logits = jax.jit(lambda p, ids, m: lm.module.apply({'params': p}, ids, m).logits)(
      lm.params, b['lm_ids'], b['lm_mask'])
  logp = jax.nn.log_softmax(logits, -1)
  nll = [-float(logp[r, int(b['target_pos'][r, j]), int(b['target_ids'][r, j])])
         for r in range(len(idx)) for j in range(int(b['target_mask'][r].sum()))]
  assert abs(float(_prompt_loss(lm.module, lm.params, None, b)) - np.mean(nll)) < 1e-5


# ----------------------------------------------------------------------------- gradient methods


@pytest.mark.parametrize('method,model', [('soft_prompt', 'gpt2'), ('p_tuning', 'gpt2'),
                                          ('prefix_tuning', 'gpt2'), ('prefix_tuning', 'llama')])
def test_gradient_method_trains_and_counts(data, models, method, model):
  shots, queries = data
  lm = models[model]
  res = run_baseline(method, lm, shots, rng=jax.random.key(0), epochs=10, batch_size=16, **FAST[method])
  assert isinstance(res, common.TuneResult) and res.note == ''
  # 10 epochs of batch 16 over 16 examples: one step an epoch.
  assert res.forward_passes == res.backward_passes == len(res.losses) == 10
  assert res.losses[-1] < res.losses[0], res.losses
  cfg = lm.config
  if method == 'prefix_tuning':
    assert res.prompt.embeds is None
    assert res.prompt.kv.k.shape == res.prompt.kv.v.shape == (
        cfg.n_layers, 1, P, cfg.n_kv_heads, cfg.head_dim)
  else:
    assert res.prompt.kv is None and res.prompt.embeds.shape == (1, P, cfg.d_model)
  final = loss_of(lm, res.prompt, shots)
  assert final < res.losses[0], (final, res.losses)
  check_scores(lm, res.prompt, shots, queries)


def test_minibatches_count_steps_and_compile_once(data, models):
  shots, _ = data
  lm = models['gpt2']
  run = functools.partial(run_baseline, 'soft_prompt')
  res = run(lm, shots, rng=jax.random.key(1), epochs=3,
            batch_size=8, **FAST['soft_prompt'])
  assert res.forward_passes == res.backward_passes == len(res.losses) == 6  # 2 steps an epoch
  assert common.steps_per_epoch(12, 8) == 2 and common.steps_per_epoch(16, 16) == 1
  # Another task (seed) with the same shapes reuses the compiled step.
  n = common._train_step._cache_size()
  res = run(lm, shots, rng=jax.random.key(2), epochs=1,
            batch_size=8, **FAST['soft_prompt'])
  assert common._train_step._cache_size() == n and res.forward_passes == 2


def test_adamw_decays_linearly_to_zero_like_a_reference():
  """common.adamw (the schedule traced from the optimizer's own count) equals AdamW written out
  in numpy with lr_t = lr * (1 - t / T), decoupled weight decay, no warmup."""
  rng = np.random.default_rng(0)
  lr, T, wd, b1, b2, eps = 0.1, 5, 0.01, 0.9, 0.999, 1e-8
  w0 = rng.normal(size=(3,)).astype(np.float32)
  grads = [rng.normal(size=(3,)).astype(np.float32) for _ in range(T)]
  tx = common.adamw(jnp.float32(lr), jnp.float32(T), wd)
  w, state = jnp.asarray(w0), tx.init(jnp.asarray(w0))
  for g in grads:
    u, state = tx.update(jnp.asarray(g), state, w)
    w = w + u
  ref, m, v = w0.astype(np.float64), 0.0, 0.0
  for t, g in enumerate(grads):
    m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    mh, vh = m / (1 - b1 ** (t + 1)), v / (1 - b2 ** (t + 1))
    ref = ref - lr * (1 - t / T) * (mh / (np.sqrt(vh) + eps) + wd * ref)
  np.testing.assert_allclose(np.asarray(w), ref, rtol=1e-5, atol=1e-5)  # steps move w by ~0.1


def test_soft_prompt_initialised_from_vocabulary(models):
  lm = models['gpt2']
  emb = soft_prompt.init_from_vocab(jax.random.key(0), lm.module,
                                                          lm.params, P)
  table = np.asarray(lm.params[lm.config.embed_param])
  for row in np.asarray(emb):
    assert (np.abs(table - row).max(-1) == 0).any()
  assert emb.shape == (P, lm.config.d_model)


# ----------------------------------------------------------------------------- MetaL(+Tune)


@pytest.fixture(scope='module')
def metal_prompt(models):
  """A batch-1 prefix prompt of the PGM's shape (KV [L, 1, P, K, H]); random values stand in for
  a PGM's output (evaluation.prompt_for) to keep the test fast."""
  cfg = models['gpt2'].config
  shape = (cfg.n_layers, 1, P, cfg.n_kv_heads, cfg.head_dim)
  k, v = (0.5 * np.random.default_rng(i).standard_normal(shape).astype(np.float32)
          for i in range(2))
  return pgm.Prompt(kv=KV(jnp.asarray(k), jnp.asarray(v)))


def test_metal_tune_starts_at_init_prompt_and_trains(data, models, metal_prompt):
  shots, queries = data
  lm = models['gpt2']
  run = functools.partial(run_baseline, 'metal_tune')
  same = run(lm, shots, rng=jax.random.key(0),
             init_prompt=metal_prompt, epochs=0)
  assert same.forward_passes == same.backward_passes == 0 and same.losses == []
  np.testing.assert_array_equal(np.asarray(same.prompt.kv.k), np.asarray(metal_prompt.kv.k))
  np.testing.assert_array_equal(np.asarray(same.prompt.kv.v), np.asarray(metal_prompt.kv.v))

  res = run(lm, shots, rng=jax.random.key(0),
            init_prompt=metal_prompt)  # the paper's lr 0.02, 9 epochs
  assert res.forward_passes == res.backward_passes == len(res.losses) == 9
  start = loss_of(lm, metal_prompt, shots)
  assert abs(res.losses[0] - start) < 1e-5  # the first step is taken at the init prompt
  assert res.losses[-1] < res.losses[0] and loss_of(lm, res.prompt, shots) < start
  assert res.prompt.kv.k.shape == metal_prompt.kv.k.shape
  check_scores(lm, res.prompt, shots, queries)

  with pytest.raises(TypeError, match='init_prompt'):  # required by the signature
    run(lm, shots, rng=jax.random.key(0))


# ----------------------------------------------------------------------------- BBTv2


BBT = dict(prompt_len=P, popsize=5, intrinsic_dim=8, sigma0=1.0, alpha=4.0)


@pytest.mark.parametrize('model', ['gpt2', 'llama'])
def test_bbtv2_respects_budget_and_lowers_loss(data, models, model):
  shots, queries = data
  lm = models[model]
  cfg = lm.config
  budget = 63  # 12 generations of 5 (60 passes), 6 per layer; a 13th would exceed it
  res = run_baseline('bbtv2', lm, shots, rng=jax.random.key(0), budget=budget, **BBT)
  assert res.forward_passes == 60 <= budget and res.backward_passes == 0
  assert len(res.losses) == 12 and res.note == ''
  assert all(b <= a for a, b in zip(res.losses, res.losses[1:]))  # elitist: never rises
  assert res.losses[-1] < res.losses[0], res.losses
  assert res.prompt.kv.k.shape == (cfg.n_layers, 1, P, cfg.n_kv_heads, cfg.head_dim)
  # The kept prompt's loss is the last recorded loss, and below the untuned (zero) prompt's.
  final = loss_of(lm, res.prompt, shots)
  assert abs(final - res.losses[-1]) < 1e-5
  zero = loss_of(lm, pgm.Prompt(kv=jax.tree.map(jnp.zeros_like, res.prompt.kv)), shots)
  assert final < zero
  check_scores(lm, res.prompt, shots, queries)


def test_bbtv2_budget_below_one_generation(data, models):
  shots, _ = data
  lm = models['gpt2']
  res = run_baseline('bbtv2', lm, shots, rng=jax.random.key(0), budget=4, **BBT)
  assert res.note == bbtv2.UNTUNED_NOTE == 'budget allows 0 CMA-ES iterations: prompt is untuned'
  assert res.forward_passes == res.backward_passes == 0 and res.losses == []
  assert not np.asarray(res.prompt.kv.k).any() and not np.asarray(res.prompt.kv.v).any()
  assert res.prompt.kv.k.shape[2] == P


def test_bbtv2_deterministic_and_leaves_numpy_rng(data, models):
  shots, _ = data
  lm = models['gpt2']
  np.random.seed(123)
  expected = np.random.rand()
  np.random.seed(123)
  runs = [run_baseline('bbtv2', lm, shots, rng=jax.random.key(5), budget=20, **BBT) for _ in range(2)]
  assert np.random.rand() == expected
  assert runs[0].losses == runs[1].losses
  np.testing.assert_array_equal(np.asarray(runs[0].prompt.kv.k), np.asarray(runs[1].prompt.kv.k))


def test_bbtv2_on_a_mesh_compiles_one_generation(data, models):
  """The LM's params on a mesh, as eval.py loads them: the kept prompt starts on that mesh, as
  generation() returns it, so a run compiles one generation program, not one for its first call
  and one for the rest."""
  shots, _ = data
  lm = models['gpt2']
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, devices=jax.devices()[:1])
  on_mesh = dataclasses.replace(lm, params=jax.device_put(lm.params, sharding.replicated(mesh)))
  n = bbtv2.generation._cache_size()
  res = run_baseline('bbtv2', on_mesh, shots, rng=jax.random.key(0), budget=15, **BBT)
  assert bbtv2.generation._cache_size() == n + 1 and len(res.losses) == 3


def test_bbtv2_cached_projections_equal_drawn_ones(data, models, monkeypatch):
  """Projections drawn once per task (small LMs) give the run that redraws them every generation."""
  shots, _ = data
  lm = models['gpt2']
  run = lambda: run_baseline('bbtv2', lm, shots, rng=jax.random.key(3), budget=30, **BBT)
  cached = run()
  monkeypatch.setattr(bbtv2, 'CACHE_BYTES', 0)  # force drawing A_l at every generation
  drawn = run()
  np.testing.assert_allclose(cached.losses, drawn.losses, rtol=1e-6)
  for a, b in ((cached.prompt.kv.k, drawn.prompt.kv.k), (cached.prompt.kv.v, drawn.prompt.kv.v)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  assert len(cached.losses) == 6 and cached.losses[-1] < cached.losses[0]
