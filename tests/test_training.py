"""Meta-training (metal_jax.pgm / objective / training / sharding) end to end on tiny models.

* the batched loss (collate: left-padded PGM input, right-padded LM input, logits only at the
  answer's positions) equals a hand computation on each unpadded episode;
* the Llama prefix does not depend on the PGM input's left padding;
* only the trainable pytree is differentiated; the frozen params survive donated steps bit for bit;
* every prompt design trains (the loss falls on a fixed batch);
* the step sharded over a data x fsdp x tensor mesh of 8 fake CPU devices equals one device, and
  gradient accumulation equals the full batch;
* train() stopped at step N and resumed equals the uninterrupted run (losses, params, data state);
* a prompt saved and loaded gives the same LM logits.

Run with `pytest -s` to see the measured differences.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import save_hf
from metal_jax import experiment, lora, objective, pgm, sharding, training
from metal_jax.data import synthetic
from metal_jax.data.episodes import EpisodeSampler, EpisodeSpec, batch_shapes, collate
from metal_jax.data.tasks import load_tokenized, meta_train_file
from metal_jax.models import config_from_hf
from metal_jax.models.hf import load_lm, read_hf_config

REL_TOL = 1e-5  # float32, same math in another order (padding, sharding, accumulation)
RESUME_TOL = 1e-6
P = 4  # prompt length
SPEC = EpisodeSpec(n_prompt_examples=3, n_lm_examples=1, prompt_len=P, max_len=128)
LORA = lora.LoraConfig(rank=4, alpha=8.0, targets=('q', 'k', 'v', 'down'))
ROOT = Path(__file__).resolve().parents[1]


def pgm_cfg(design='prefix', **kw):
  return pgm.PGMConfig(prompt_len=P, design=design, lora=LORA, **kw)


def rel(a, b) -> float:
  """max |a - b| / max |b| (0 when both are exactly zero)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  diff, scale = np.abs(a - b).max(initial=0.0), np.abs(b).max(initial=0.0)
  return float(diff / scale) if scale > 0 else (0.0 if diff == 0 else float('inf'))


def tree_rel(a, b) -> float:
  assert jax.tree.structure(a) == jax.tree.structure(b)
  return max(rel(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def perturbed_trainable(lm_config, cfg, seed=0, scale=0.05):
  """A fresh trainable pytree with LoRA B nonzero, so the PGM is not the base LM."""
  tr = pgm.init_trainable(jax.random.key(seed), lm_config, cfg)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tr['lora'])
  key = jax.random.key(seed + 1000)
  leaves = [scale * jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
            if path[-1].key == 'b' else x for i, (path, x) in enumerate(leaves)]
  return {**tr, 'lora': jax.tree.unflatten(treedef, leaves)}


def np_tree(tree):
  return jax.tree.map(lambda x: np.array(x, copy=True), tree)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope='module')
def tokenizer():
  return synthetic.build_tokenizer()


@pytest.fixture(scope='module')
def tasks(tmp_path_factory, tokenizer):
  d = str(tmp_path_factory.mktemp('suite'))
  setting = synthetic.write_suite(d, n_train_tasks=4, n_test_tasks=2, n_train_examples=64,
                                  n_test_examples=8)
  return [load_tokenized(meta_train_file(d, t), tokenizer, os.path.join(d, 'cache'))
          for t in setting['train']]


@pytest.fixture(scope='module')
def models(tmp_path_factory, tokenizer):
  """Tiny random checkpoints: GPT-2 (vocab = the tokenizer's 287, odd: stays replicated under
  tensor parallelism), GPT-2 with vocab 288 and Llama GQA (4 heads, 2 kv heads) with vocab 288
  (every sharded dimension divides the mesh)."""
  v = len(tokenizer)
  out = {}
  for name, kind, kw in [('gpt2', 'gpt2', dict(vocab_size=v, n_positions=128)),
                         ('gpt2_288', 'gpt2', dict(vocab_size=288, n_positions=128)),
                         ('llama', 'llama', dict(vocab_size=288, max_position_embeddings=128))]:
    d = tmp_path_factory.mktemp(name)
    save_hf(kind, d, **kw)
    out[name] = load_lm(str(d))
  return out


@pytest.fixture(scope='module')
def episodes(tasks):
  return [EpisodeSampler(tasks, SPEC, 4, seed=0).episode(0, i) for i in range(6)]


@pytest.fixture(scope='module')
def batch8(tasks):
  spec = EpisodeSpec(n_prompt_examples=3, n_lm_examples=0, prompt_len=P, max_len=128)
  return EpisodeSampler(tasks, spec, 8, seed=1).batch(0)


# ----------------------------------------------------------------------------- 1. hand == batched


def hand_nll(cfg, lm, trainable, ep) -> tuple[float, int]:
  """Sum of y's NLLs and their count for one episode, unpadded, from full-sequence logits."""
  p = cfg.prompt_len
  pgm_ids = jnp.asarray(np.concatenate([ep.pgm_tokens, np.zeros(p, np.int32)])[None])
  seq = np.concatenate([ep.lm_context, ep.target])
  ids = jnp.asarray(seq[None])

  @jax.jit
  def full_logits(trainable, pgm_ids, ids):
    prompt = pgm.generate(cfg, lm.module, lm.params, trainable, pgm_ids, jnp.ones_like(pgm_ids),
                          train=False)
    return pgm.apply_with_prompt(lm.module, lm.params, prompt, ids, jnp.ones_like(ids)).logits

  logits = np.asarray(full_logits(trainable, pgm_ids, ids)[0], np.float64)
  if cfg.design != 'prefix':  # embedding prompts occupy the first P positions of the LM's input
    assert logits.shape[0] == p + len(seq)
    logits = logits[p:]
  assert logits.shape[0] == len(seq)
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  c = len(ep.lm_context)
  return float(sum(-logp[c - 1 + k, tok] for k, tok in enumerate(ep.target))), len(ep.target)


@pytest.mark.parametrize('model,design', [('gpt2', 'prefix'), ('llama', 'prefix'),
                                          ('llama', 'weighted_sum'), ('gpt2', 'hidden_state')])
def test_hand_built_episode_equals_batched_loss(models, episodes, model, design):
  lm, cfg = models[model], pgm_cfg(design)
  tr = perturbed_trainable(lm.config, cfg)
  batch = collate(episodes, SPEC, *batch_shapes(episodes, SPEC))
  # Padding is exercised on both sides, and the episodes differ in length.
  assert len({len(e.pgm_tokens) for e in episodes}) > 1
  assert len({len(e.lm_context) + len(e.target) for e in episodes}) > 1
  assert (batch['pgm_mask'][:, 0] == 0).all() and (batch['lm_mask'][:, -1] == 0).all()

  loss_fn = jax.jit(lambda tr, b: objective.loss(cfg, lm.module, lm.params, tr, b, train=False))
  hand = [hand_nll(cfg, lm, tr, ep) for ep in episodes]
  diffs = []
  for i in range(len(episodes)):  # each episode alone: the other rows' y tokens masked out
    b = {**batch, 'target_mask': batch['target_mask'] * (np.arange(len(episodes)) == i)[:, None]}
    diffs.append(rel(loss_fn(tr, b), hand[i][0] / hand[i][1]))
  whole = rel(loss_fn(tr, batch), sum(h[0] for h in hand) / sum(h[1] for h in hand))
  print(f'\n{model}/{design}: per-episode max rel diff {max(diffs):.2e}, batch {whole:.2e}')
  assert max(diffs) <= REL_TOL and whole <= REL_TOL, (diffs, whole)
  # The perturbed LoRA matters: with B = 0 (the PGM is the base LM) the loss differs.
  zero_b = {**tr, 'lora': jax.tree.map(jnp.zeros_like, tr['lora'])}
  assert abs(float(loss_fn(zero_b, batch)) - float(loss_fn(tr, batch))) > 1e-4


# ----------------------------------------------------------------------------- 2. left padding


@pytest.mark.parametrize('model', ['llama', 'gpt2'])
def test_prefix_prompt_independent_of_left_padding(models, episodes, model):
  lm, cfg = models[model], pgm_cfg('prefix')
  tr = perturbed_trainable(lm.config, cfg)
  x = episodes[0].pgm_tokens
  gen = jax.jit(lambda ids, mask: pgm.generate(cfg, lm.module, lm.params, tr, ids, mask).kv)
  kvs = []
  for pad in (0, 5, 23):
    ids = np.concatenate([np.zeros(pad, np.int32), x, np.zeros(P, np.int32)])[None]
    mask = (np.arange(ids.shape[1]) >= pad).astype(np.int32)[None]
    kvs.append(gen(jnp.asarray(ids), jnp.asarray(mask)))
    assert kvs[-1].k.shape == (lm.config.n_layers, 1, P, lm.config.n_kv_heads,
                               lm.config.head_dim)
  d = max(tree_rel(tuple(kv), tuple(kvs[0])) for kv in kvs[1:])
  print(f'\n{model}: prefix vs left padding max rel diff {d:.2e}')
  assert d <= REL_TOL


# ----------------------------------------------------------------------------- 3. frozen params


def test_gradients_only_trainable_frozen_params_bit_identical(models, batch8):
  lm, cfg = models['gpt2'], pgm_cfg('prefix')
  tr = perturbed_trainable(lm.config, cfg)
  grads, metrics = jax.jit(lambda tr, b: training.grads_and_metrics(
      cfg, lm.module, lm.params, tr, b, jax.random.key(0)))(tr, batch8)
  assert jax.tree.structure(grads) == jax.tree.structure(tr)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.isfinite(g).all() and float(jnp.abs(g).max()) > 0, path

  tx = training.make_optimizer(training.OptimConfig(lr=1e-2), 10)
  mesh = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  psh = sharding.param_shardings(lm.module, mesh)
  params = jax.device_put(lm.params, psh)
  before = np_tree(params)
  before_orig = np_tree(lm.params)
  tr0 = np_tree(tr)
  state = training.init_state(jax.tree.map(jnp.array, tr), tx)
  step = training.jit_train_step(training.make_train_step(cfg, lm.module, tx), mesh, psh, state)
  plain = jax.jit(training.make_train_step(cfg, lm.module, tx), donate_argnums=(0,))
  batch = sharding.global_batch(batch8, mesh)
  for i in range(3):
    state, _ = step(state, params, batch, jax.random.key(0))
  state1 = training.init_state(jax.tree.map(jnp.array, tr), tx)
  for i in range(3):  # unsharded, the frozen params on one device
    state1, _ = plain(state1, lm.params, batch8, jax.random.key(0))
  jax.block_until_ready((state, state1))
  for p in (params, lm.params):
    assert not any(x.is_deleted() for x in jax.tree.leaves(p))
  jax.tree.map(np.testing.assert_array_equal, before, np_tree(params))
  jax.tree.map(np.testing.assert_array_equal, before_orig, np_tree(lm.params))
  # ... while every trainable leaf moved.
  assert int(state['step']) == 3
  for s in (state, state1):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(tr0),
                            jax.tree.leaves(s['trainable'])):
      assert np.abs(np.asarray(b) - a).max() > 0, jax.tree_util.keystr(path)


# ----------------------------------------------------------------------------- 4. designs train


@pytest.mark.parametrize('design', pgm.DESIGNS)
def test_design_loss_falls(models, batch8, design):
  lm, cfg = models['gpt2'], pgm_cfg(design)
  tx = training.make_optimizer(training.OptimConfig(lr=1e-2, end_lr=1e-2), 30)
  state = training.init_state(pgm.init_trainable(jax.random.key(0), lm.config, cfg), tx)
  step = jax.jit(training.make_train_step(cfg, lm.module, tx), donate_argnums=(0,))
  batch = jax.tree.map(jnp.asarray, batch8)
  losses = []
  for _ in range(30):
    state, m = step(state, lm.params, batch, jax.random.key(1))
    losses.append(m['loss'])
  losses = np.asarray(jax.device_get(losses))
  first, last = losses[:5].mean(), losses[-5:].mean()
  print(f'\n{design}: loss first5 {first:.4f} last5 {last:.4f}')
  assert np.isfinite(losses).all()
  assert last < first


# ----------------------------------------------------------------------------- 5. sharding


def single_device_mesh():
  return sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, devices=jax.devices()[:1])


def grads_on(mesh, lm, cfg, tr, batch_np, accum):
  psh = sharding.param_shardings(lm.module, mesh)
  rep = sharding.replicated(mesh)
  fn = jax.jit(lambda p, t, b, r: training.grads_and_metrics(cfg, lm.module, p, t, b, r, accum),
               in_shardings=(psh, rep, sharding.batch_sharding(mesh), rep), out_shardings=rep)
  params = jax.device_put(lm.params, psh)
  return jax.device_get(fn(params, tr, sharding.global_batch(batch_np, mesh), jax.random.key(0)))


@pytest.mark.parametrize('model', ['gpt2_288', 'llama'])
def test_sharded_equals_single_device(models, batch8, model):
  lm, cfg = models[model], pgm_cfg('prefix')
  tr = perturbed_trainable(lm.config, cfg)
  mesh, one = sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2}), single_device_mesh()
  # The mesh really splits the frozen params: over fsdp (embed) and tensor (heads, vocab).
  psh = sharding.param_shardings(lm.module, mesh)
  specs = {tuple(s.spec) for s in jax.tree.leaves(psh)}
  assert any('fsdp' in str(s) for s in specs) and any('tensor' in str(s) for s in specs), specs
  emb = psh[lm.config.embed_param].spec
  assert tuple(emb) == ('tensor', 'fsdp'), emb  # vocab 288 and width 32 both divide

  g1, m1 = grads_on(one, lm, cfg, tr, batch8, 1)
  g8, m8 = grads_on(mesh, lm, cfg, tr, batch8, 1)
  g8_acc, m8_acc = grads_on(mesh, lm, cfg, tr, batch8, 2)
  g1_acc, m1_acc = grads_on(one, lm, cfg, tr, batch8, 2)
  d = {'sharded': (tree_rel(g8, g1), rel(m8['loss'], m1['loss'])),
       'sharded accum2': (tree_rel(g8_acc, g1), rel(m8_acc['loss'], m1['loss'])),
       'accum2': (tree_rel(g1_acc, g1), rel(m1_acc['loss'], m1['loss']))}
  for m in (m8, m8_acc, m1_acc):
    assert float(m['target_tokens']) == float(m1['target_tokens'])

  # The real train step (jit_train_step, state donated) on both meshes: one update.
  tx = training.make_optimizer(training.OptimConfig(lr=1e-2), 10)
  after = {}
  for name, msh in (('one', one), ('mesh', mesh)):
    psh_m = sharding.param_shardings(lm.module, msh)
    state = training.init_state(jax.tree.map(jnp.array, tr), tx)
    step = training.jit_train_step(training.make_train_step(cfg, lm.module, tx), msh, psh_m, state)
    after[name] = jax.device_get(step(state, jax.device_put(lm.params, psh_m),
                                      sharding.global_batch(batch8, msh), jax.random.key(0)))
  d['step trainable'] = (tree_rel(after['mesh'][0]['trainable'], after['one'][0]['trainable']),
                         rel(after['mesh'][1]['loss'], after['one'][1]['loss']))
  print(f'\n{model}: max rel diff (grads, loss): '
        + ', '.join(f'{k} ({a:.2e}, {b:.2e})' for k, (a, b) in d.items()))
  for k, (a, b) in d.items():
    assert a <= REL_TOL and b <= REL_TOL, (k, a, b)


# ----------------------------------------------------------------------------- 6. resume


def default_config():
  spec = importlib.util.spec_from_file_location('default_config', ROOT / 'configs' / 'default.py')
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


N = 3


@pytest.fixture(scope='module')
def tiny_run_config(tmp_path_factory, tokenizer):
  model_dir = tmp_path_factory.mktemp('run_model')
  save_hf('gpt2', model_dir, vocab_size=len(tokenizer), n_positions=128)
  tokenizer.save_pretrained(str(model_dir))
  c = default_config()
  c.model = str(model_dir)
  c.data_dir = ''
  c.synthetic.update(n_train_tasks=4, n_test_tasks=2, n_train_examples=64, n_test_examples=8)
  c.n_prompt_examples = 3
  c.max_len = 128
  c.pgm.prompt_len = P
  c.lora.rank = 4
  c.batch_size = 4
  c.num_steps = 2 * N
  c.optim.lr = 1e-2
  c.mesh.update(data=2, fsdp=2, tensor=2)
  c.save_every = N
  c.log_every = 1
  c.progress = False
  return c


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


def data_states(workdir, steps, abstract):
  mngr = training.checkpoint_manager(os.path.join(workdir, 'checkpoints'), N, 3, async_save=False)
  out = {s: training.restore_checkpoint(mngr, s, abstract)[1] for s in steps}
  mngr.close()
  return out


def test_resume_equals_uninterrupted(tmp_path, tiny_run_config):
  c = tiny_run_config
  wa, wb = str(tmp_path / 'a'), str(tmp_path / 'b')
  training.train(c, wa)
  c1 = c.copy_and_resolve_references()
  c1.stop_at = N  # same num_steps (hence the same LR schedule), stopped half way
  out1 = training.train(c1, wb)
  assert [r['step'] for r in read_metrics(wb)] == list(range(1, N + 1))
  assert out1['last']['lr'] == pytest.approx(float(training.make_schedule(
      experiment.optim_config(c), 2 * N)(N - 1)))
  training.train(c, wb)  # resumes at N

  ma, mb = read_metrics(wa), read_metrics(wb)
  assert [r['step'] for r in ma] == [r['step'] for r in mb] == list(range(1, 2 * N + 1))
  diffs = {}
  for key in ('loss', 'grad_norm', 'lr', 'target_tokens'):
    diffs[key] = max(rel(b[key], a[key]) for a, b in zip(ma, mb))

  lm_cfg = config_from_hf(read_hf_config(c.model))
  pc, oc = experiment.pgm_config(c), experiment.optim_config(c)
  ta, sa = training.restore_trainable(wa, lm_cfg, pc, oc)
  tb, sb = training.restore_trainable(wb, lm_cfg, pc, oc)
  assert sa == sb == 2 * N
  diffs['trainable'] = tree_rel(tb, ta)
  t_mid, _ = training.restore_trainable(wb, lm_cfg, pc, oc, step=N)
  assert tree_rel(t_mid, ta) > 1e-3  # the comparison is not vacuous: training moved the params

  tx = training.make_optimizer(oc, 2 * N)
  abstract = jax.eval_shape(lambda: training.init_state(
      pgm.init_trainable(jax.random.key(0), lm_cfg, pc), tx))
  da, db = data_states(wa, [N, 2 * N], abstract), data_states(wb, [N, 2 * N], abstract)
  assert da == db == {N: {'seed': c.seed, 'step': N}, 2 * N: {'seed': c.seed, 'step': 2 * N}}
  print('\nresume max rel diff: ' + ', '.join(f'{k} {v:.2e}' for k, v in diffs.items()))
  for k, v in diffs.items():
    assert v <= RESUME_TOL, (k, v)


# ----------------------------------------------------------------------------- 7. save/load


@pytest.mark.parametrize('model,design', [('gpt2', 'prefix'), ('gpt2', 'discrete'),
                                          ('llama', 'prefix')])
def test_prompt_save_load_round_trip(tmp_path, models, batch8, model, design):
  lm, cfg = models[model], pgm_cfg(design)
  tr = perturbed_trainable(lm.config, cfg)
  b = jax.tree.map(lambda x: jnp.asarray(x[:2]), batch8)
  prompt = pgm.generate(cfg, lm.module, lm.params, tr, b['pgm_ids'], b['pgm_mask'])
  path = str(tmp_path / 'prompt.npz')
  meta = {'task': 'kw_cls_000', 'design': design}
  pgm.save_prompt(path, prompt, meta)
  loaded, meta2 = pgm.load_prompt(path)
  assert meta2 == meta
  assert jax.tree.structure(loaded) == jax.tree.structure(prompt)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), jax.device_get(prompt))
  if design == 'discrete':
    assert loaded.tokens.shape == (2, P)
  logits = [pgm.apply_with_prompt(lm.module, lm.params, pr, b['lm_ids'], b['lm_mask'],
                                  logit_positions=b['target_pos']).logits
            for pr in (prompt, loaded)]
  np.testing.assert_array_equal(np.asarray(logits[1]), np.asarray(logits[0]))
