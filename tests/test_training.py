"""Meta-training (metal_jax.pgm / objective / training / sharding) end to end on tiny models.

* the batched loss (collate: left-padded PGM input, right-padded LM input, logits only at the
  answer's positions) equals a hand computation on unpadded episodes (full logits, log-softmax);
* the Llama prefix does not depend on the PGM input's left padding;
* only the trainable pytree is differentiated; the frozen params survive donated steps bit for bit;
* every prompt design trains: on a fixed batch the loss of the prompt generated at inference falls
  (and the training loss, except the discrete design's, whose Gumbel samples are noise at first);
* the step sharded over a data x fsdp x tensor mesh of 8 fake CPU devices equals one device, and
  gradient accumulation equals the full batch; Q queries an episode equal Q one-query episodes;
* train() stopped at step N and resumed equals the uninterrupted run (losses, params, data state),
  with batches built ahead in the prefetch thread (the default) or not, and after a preemption;
* a prompt saved and loaded gives the same LM logits.

Run with `pytest -s` to see the measured differences.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from conftest import save_hf
from metal_jax import experiment, lora, objective, pgm, run_train, sharding, training
from metal_jax.data import synthetic
from metal_jax.data.episodes import (Episode, EpisodeSampler, EpisodeSpec, batch_shapes,
                                     collate, make_episode)
from metal_jax.data.prefetch import Prefetcher
from metal_jax.data.tasks import load_tokenized, meta_train_file
from metal_jax.models import config_from_hf
from metal_jax.models.hf import load_lm, read_hf_config

REL_TOL = 1e-5  # float32, same math in another order (padding, sharding, accumulation)
RESUME_TOL = 1e-6
P = 4  # prompt length
SPEC = EpisodeSpec(prompt_len=P, max_len=128)  # n_P, n_L vary per episode (make_episode)
LORA = lora.LoraConfig(rank=4, alpha=8.0, targets=('q', 'k', 'v', 'down'))
ROOT = Path(__file__).resolve().parents[1]


def pgm_cfg(design='prefix', **kw):
  # One LSTM layer in the padding encoder: compiling its gradient is a large share of each
  # step's compile time, and nothing here depends on its depth.
  return pgm.PGMConfig(prompt_len=P, design=design, lora=LORA, lstm_layers=1, **kw)


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
  rng = np.random.default_rng(seed)
  leaves = [jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype) if path[-1].key == 'b'
            else x for path, x in leaves]
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
  """Tiny random checkpoints: GPT-2 (4 heads; vocab = the tokenizer's 327, odd, so the vocab
  dimension stays replicated under tensor parallelism) and Llama GQA (4 heads, 2 kv heads;
  vocab 328 = the tokenizer's + 1, so the embedding is split over tensor x fsdp)."""
  assert len(tokenizer) % 2 == 1, 'the GPT-2 case needs an odd vocabulary'
  out = {}
  for name, kw in [('gpt2', dict(vocab_size=len(tokenizer), n_positions=128)),
                   ('llama', dict(vocab_size=len(tokenizer) + 1, max_position_embeddings=128))]:
    d = tmp_path_factory.mktemp(name)
    save_hf(name, d, **kw)
    out[name] = load_lm(str(d))
  return out


@pytest.fixture(scope='module')
def compiled():
  """Jitted functions shared between tests (compiling dominates this file's runtime)."""
  return {}


@pytest.fixture(scope='module')
def episodes(tasks):
  """Episodes of different shapes: n_P prompt examples and n_L demonstrations vary (n_L = 0:
  the query's input is bare), so the PGM and LM inputs are longer and shorter than each other."""
  out = []
  for i, (n_p, n_l) in enumerate([(2, 1), (4, 0), (1, 2), (3, 3)]):
    idx = np.random.default_rng(i).permutation(len(tasks[i]))
    out.append(make_episode(tasks[i], idx[:n_p], idx[n_p:n_p + n_l], int(idx[n_p + n_l]), SPEC))
  return out


@pytest.fixture(scope='module')
def batch8(tasks):
  spec = EpisodeSpec(n_prompt_examples=3, n_lm_examples=0, prompt_len=P, max_len=128)
  return EpisodeSampler(tasks, spec, 8, seed=1).batch(0)


def single_device_mesh():
  return sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, devices=jax.devices()[:1])


def mesh_222():
  return sharding.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})


def grads_fn(compiled, lm, model, design, mesh_name, accum):
  """training.grads_and_metrics jitted with the params sharded on the mesh, the batch split."""
  key = ('grads', model, design, mesh_name, accum)
  if key not in compiled:
    mesh = single_device_mesh() if mesh_name == 'one' else mesh_222()
    psh = sharding.param_shardings(lm.module, mesh)
    rep = sharding.replicated(mesh)
    cfg = pgm_cfg(design)
    fn = jax.jit(
        lambda p, t, b, r: training.grads_and_metrics(cfg, lm.module, p, t, b, r, accum),
        in_shardings=(psh, rep, sharding.batch_sharding(mesh), rep), out_shardings=rep)
    params = jax.device_put(lm.params, psh)
    compiled[key] = lambda tr, batch: jax.device_get(
        fn(params, tr, sharding.global_batch(batch, mesh), jax.random.key(0)))
    compiled[key].params = params
  return compiled[key]


STEPS = 30
OPTIM = training.OptimConfig(lr=1e-2, end_lr=1e-2)


def step_fn(compiled, lm, model, design):
  """training.jit_train_step (state donated) on a one-device mesh."""
  key = ('step', model, design)
  if key not in compiled:
    mesh = single_device_mesh()
    tx = training.make_optimizer(OPTIM, training.make_schedule(OPTIM, STEPS))
    cfg = pgm_cfg(design)
    state = training.init_state(pgm.init_trainable(jax.random.key(0), lm.config, cfg), tx)
    step = training.jit_train_step(training.make_train_step(cfg, lm.module, tx), mesh,
                                   sharding.param_shardings(lm.module, mesh), state)
    # The state placed as train() places it (replicated on the mesh), so that the first and
    # later steps see the same input shardings and compile once.
    new_state = lambda tr: jax.device_put(training.init_state(tr, tx),
                                          sharding.replicated(mesh))
    compiled[key] = step, new_state
  return compiled[key]


# ----------------------------------------------------------------------------- 1. hand == batched


def hand_nll(cfg, lm, trainable, eps) -> list[tuple[float, int]]:
  """Per episode, unpadded (batch of 1, no padding anywhere), from full-sequence logits:
  (sum of y's NLLs, number of y tokens)."""
  p = cfg.prompt_len
  pgm_ids = [jnp.asarray(np.concatenate([e.pgm_tokens, np.zeros(p, np.int32)])[None])
             for e in eps]
  seqs = [np.concatenate([e.lm_context, e.target]) for e in eps]

  @jax.jit  # one compile for all episodes (each has its own shapes)
  def full_logits(trainable, pgm_ids, lm_ids):
    out = []
    for x, ids in zip(pgm_ids, lm_ids):
      prompt = pgm.generate(cfg, lm.module, lm.params, trainable, x, jnp.ones_like(x))
      out.append(pgm.apply_with_prompt(lm.module, lm.params, prompt, ids,
                                       jnp.ones_like(ids)).logits[0])
    return out

  all_logits = full_logits(trainable, pgm_ids, [jnp.asarray(s[None]) for s in seqs])
  result = []
  for e, seq, logits in zip(eps, seqs, all_logits):
    logits = np.asarray(logits, np.float64)
    if cfg.design != 'prefix':  # embedding prompts occupy the LM's first P input positions
      assert logits.shape[0] == p + len(seq)
      logits = logits[p:]
    assert logits.shape[0] == len(seq)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    c = len(e.lm_context)  # y's k-th token is predicted at position c - 1 + k
    result.append((float(sum(-logp[c - 1 + k, tok] for k, tok in enumerate(e.target))),
                   len(e.target)))
  return result


@pytest.mark.parametrize('model,design', [('gpt2', 'prefix'), ('llama', 'prefix'),
                                          ('llama', 'weighted_sum')])
def test_hand_built_episode_equals_batched_loss(models, episodes, model, design):
  lm, cfg = models[model], pgm_cfg(design)
  tr = perturbed_trainable(lm.config, cfg)
  batch = collate(episodes, SPEC, *batch_shapes(episodes, SPEC))
  # Padding is exercised on both sides (every row), and the episodes differ in length.
  pgm_lens = [len(e.pgm_tokens) for e in episodes]
  lm_lens = [len(e.lm_context) + len(e.target) for e in episodes]
  assert min(pgm_lens) < max(pgm_lens) and min(lm_lens) < max(lm_lens), (pgm_lens, lm_lens)
  assert (batch['pgm_mask'][:, 0] == 0).all() and (batch['lm_mask'][:, -1] == 0).all()

  loss_fn = jax.jit(lambda tr, b: objective.loss(cfg, lm.module, lm.params, tr, b, train=False))
  # By hand: the episode with the most left padding on the PGM side (the fewest X^P tokens) and
  # the one with the most right padding on the LM side (the shortest X^L + x + y).
  rows = sorted({int(np.argmin(pgm_lens)), int(np.argmin(lm_lens))})
  assert len(rows) == 2
  hand = hand_nll(cfg, lm, tr, [episodes[i] for i in rows])
  diffs = []
  for i, (nll, count) in zip(rows, hand):  # the batched loss with only row i's y tokens scored
    b = {**batch, 'target_mask': batch['target_mask'] * (np.arange(len(episodes)) == i)[:, None]}
    diffs.append(rel(loss_fn(tr, b), nll / count))
  print(f'\n{model}/{design}: hand-built vs batched loss, rel diff {max(diffs):.2e}')
  assert max(diffs) <= REL_TOL, diffs
  # The perturbed LoRA matters: with B = 0 (the PGM is the base LM) the loss differs.
  zero_b = {**tr, 'lora': jax.tree.map(jnp.zeros_like, tr['lora'])}
  assert abs(float(loss_fn(zero_b, batch)) - float(loss_fn(tr, batch))) > 1e-4


# ----------------------------------------------------------------------------- 2. left padding


def test_llama_prefix_independent_of_left_padding(models, episodes):
  lm, cfg = models['llama'], pgm_cfg('prefix')
  tr = perturbed_trainable(lm.config, cfg)
  x = episodes[0].pgm_tokens
  pads = (0, 3, 21)
  ids = [np.concatenate([np.zeros(n, np.int32), x, np.zeros(P, np.int32)])[None] for n in pads]
  masks = [(np.arange(i.shape[1]) >= n).astype(np.int32)[None] for i, n in zip(ids, pads)]

  @jax.jit
  def gen(ids, masks):
    return [tuple(pgm.generate(cfg, lm.module, lm.params, tr, i, m).kv) for i, m in zip(ids, masks)]

  kvs = gen(ids, masks)
  for kv in kvs:
    assert kv[0].shape == (lm.config.n_layers, 1, P, lm.config.n_kv_heads, lm.config.head_dim)
  d = max(tree_rel(kv, kvs[0]) for kv in kvs[1:])
  print(f'\nllama: prefix vs left padding max rel diff {d:.2e}')
  assert d <= REL_TOL


# ----------------------------------------------------------------------------- 3. frozen params


def test_gradients_reach_only_trainable(models, batch8, compiled):
  lm = models['gpt2']
  tr = perturbed_trainable(lm.config, pgm_cfg('prefix'))
  grads, _ = grads_fn(compiled, lm, 'gpt2', 'prefix', 'one', 1)(tr, batch8)
  assert jax.tree.structure(grads) == jax.tree.structure(tr)
  # With the prefix design only the keys/values of the padding slots leave the PGM: the last
  # layer's query and MLP output feed nothing, so their LoRA gets exactly zero gradient.
  last = f'layers_{lm.config.n_layers - 1}'
  dead = {f"['lora']['{last}']['attn']['q']", f"['lora']['{last}']['mlp']['down']"}
  is_dead = lambda path: jax.tree_util.keystr(path[:4]) in dead
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.isfinite(g).all(), path
    assert (float(np.abs(g).max()) == 0) == is_dead(path), jax.tree_util.keystr(path)

  # A few donated train steps move every trainable leaf that has a gradient, and leave the
  # frozen params (passed to the step as an argument, not donated) bit for bit as they were.
  step, new_state = step_fn(compiled, lm, 'gpt2', 'prefix')
  before, tr0 = np_tree(lm.params), np_tree(tr)
  state = new_state(jax.tree.map(jnp.array, tr))
  for i in range(3):
    old = state
    state, _ = step(state, lm.params, batch8, jax.random.key(0))
    if i == 0:  # the state really was donated
      assert all(x.is_deleted() for x in jax.tree.leaves(old))
  assert int(state['step']) == 3
  assert not any(x.is_deleted() for x in jax.tree.leaves(lm.params))
  jax.tree.map(np.testing.assert_array_equal, before, np_tree(lm.params))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(tr0),
                          jax.tree.leaves(state['trainable'])):
    assert (np.abs(np.asarray(b) - a).max() > 0) != is_dead(path), jax.tree_util.keystr(path)


# ----------------------------------------------------------------------------- 4. designs train


@pytest.mark.parametrize('design', pgm.DESIGNS)
def test_design_loss_falls(models, batch8, compiled, design):
  """30 steps lower the loss of the prompt the PGM generates at inference (train=False: for
  `discrete`, the argmax tokens a service would store) and, for the three deterministic designs,
  the training loss too. The discrete design's training loss is not asserted: each step draws
  new Gumbel noise, and with near-uniform logits at tau=1 the sampled tokens, hence the loss,
  are noise (±0.03 here) larger than what 30 straight-through steps gain."""
  lm = models['gpt2']
  step, new_state = step_fn(compiled, lm, 'gpt2', design)
  cfg = pgm_cfg(design)
  infer = jax.jit(lambda tr: objective.loss(cfg, lm.module, lm.params, tr, batch8, train=False))
  tr0 = pgm.init_trainable(jax.random.key(0), lm.config, cfg)
  infer0 = float(infer(tr0))
  state = new_state(tr0)
  before = np_tree(lm.params)
  losses = []
  for _ in range(STEPS):
    state, m = step(state, lm.params, batch8, jax.random.key(1))
    losses.append(m['loss'])
  losses = np.asarray(jax.device_get(losses))
  infer1 = float(infer(state['trainable']))
  first, last = losses[:5].mean(), losses[-5:].mean()
  print(f'\n{design}: training loss first5 {first:.4f} last5 {last:.4f}; '
        f'inference loss {infer0:.4f} -> {infer1:.4f}')
  assert np.isfinite(losses).all()
  assert infer1 < infer0
  if design != 'discrete':
    assert losses[0] == pytest.approx(infer0, rel=1e-5)  # same function without noise
    assert last < first
  jax.tree.map(np.testing.assert_array_equal, before, np_tree(lm.params))


# ----------------------------------------------------------------------------- 5. sharding


@pytest.mark.parametrize('model,accum', [('gpt2', 1), ('llama', 2)])
def test_sharded_equals_single_device(models, batch8, compiled, model, accum):
  """data=2 x fsdp=2 x tensor=2 (accum micro-batches) == one device, one batch."""
  lm = models[model]
  tr = perturbed_trainable(lm.config, pgm_cfg('prefix'))
  mesh = mesh_222()
  # The mesh really splits the frozen params: over fsdp (embed) and tensor (heads, vocab).
  psh = sharding.param_shardings(lm.module, mesh)
  specs = [tuple(s.spec) for s in jax.tree.leaves(psh)]
  assert any('fsdp' in str(s) for s in specs) and any('tensor' in str(s) for s in specs), specs
  emb = tuple(psh[lm.config.embed_param].spec)
  assert emb == ((None, 'fsdp') if lm.config.vocab_size % 2 else ('tensor', 'fsdp')), emb

  g1, m1 = grads_fn(compiled, lm, model, 'prefix', 'one', 1)(tr, batch8)
  g8, m8 = grads_fn(compiled, lm, model, 'prefix', 'mesh', accum)(tr, batch8)
  sharded_params = compiled[('grads', model, 'prefix', 'mesh', accum)].params
  assert all(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(sharded_params))
  assert sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(sharded_params)) > 0
  dg, dl = tree_rel(g8, g1), rel(m8['loss'], m1['loss'])
  print(f'\n{model}: sharded (accum_steps={accum}) vs one device: grads max rel diff {dg:.2e}, '
        f'loss {dl:.2e}')
  assert float(m8['target_tokens']) == float(m1['target_tokens']) == batch8['target_mask'].sum()
  assert dg <= REL_TOL and dl <= REL_TOL


@pytest.mark.parametrize('model,design', [('gpt2', 'prefix'), ('llama', 'weighted_sum')])
def test_queries_share_their_episodes_prompt(models, tasks, compiled, model, design):
  """queries_per_episode = Q: an episode's Q queries, scored under its one prompt ([B, Q, ...]
  LM keys), give the loss and gradients of B x Q one-query episodes that repeat its X^P (the PGM
  run once per query); sharded over data x fsdp x tensor with 2 micro-batches as on one device."""
  lm, cfg = models[model], pgm_cfg(design)
  tr = perturbed_trainable(lm.config, cfg)
  spec = EpisodeSpec(n_prompt_examples=3, prompt_len=P, max_len=128, queries=2)
  sampler = EpisodeSampler(tasks, spec, 8, seed=2)
  batch = sampler.batch(0)
  eps = [sampler.episode(0, i) for i in range(8)]
  assert batch['lm_ids'].shape[:2] == (8, 2) and batch['pgm_ids'].shape[0] == 8
  flat = [Episode(e.pgm_tokens, h) for e in eps for h in e.lm_halves]
  flat_batch = collate(flat, dataclasses.replace(spec, queries=1), *batch_shapes(eps, spec))
  assert flat_batch['pgm_ids'].shape[0] == flat_batch['lm_ids'].shape[0] == 16
  np.testing.assert_array_equal(flat_batch['lm_ids'], batch['lm_ids'].reshape(16, -1))
  g1, m1 = grads_fn(compiled, lm, model, design, 'one', 1)(tr, flat_batch)
  gq, mq = grads_fn(compiled, lm, model, design, 'mesh', 2)(tr, batch)
  dg, dl = tree_rel(gq, g1), rel(mq['loss'], m1['loss'])
  print(f'\n{model}/{design}: 2 queries an episode vs one-query episodes: grads max rel diff '
        f'{dg:.2e}, loss {dl:.2e}')
  assert float(mq['target_tokens']) == float(m1['target_tokens']) == batch['target_mask'].sum()
  assert dg <= REL_TOL and dl <= REL_TOL
  # Each query counts: scoring only the first query of each episode changes the loss.
  first = {**batch, 'target_mask': batch['target_mask'] * np.array([1, 0])[None, :, None]}
  _, m_first = grads_fn(compiled, lm, model, design, 'mesh', 2)(tr, first)
  assert abs(float(m_first['loss']) - float(mq['loss'])) > 1e-4


# ----------------------------------------------------------------------------- 6. resume


N = 3


@pytest.fixture(scope='module')
def tiny_run_config(tmp_path_factory, tokenizer):
  model_dir = tmp_path_factory.mktemp('run_model')
  save_hf('gpt2', model_dir, vocab_size=len(tokenizer), n_positions=128)
  tokenizer.save_pretrained(str(model_dir))
  c = default.get_config()
  c.model = str(model_dir)
  c.data_dir = ''
  c.synthetic.update(n_train_tasks=4, n_test_tasks=2, n_train_examples=64, n_test_examples=8)
  c.n_prompt_examples = 3
  c.max_len = 128
  c.pgm.prompt_len = P
  c.pgm.lstm_layers = 1
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
  mngr = training.checkpoint_manager(os.path.join(workdir, 'checkpoints'), read_only=True)
  out = {s: training.restore_checkpoint(mngr, s, abstract)[1] for s in steps}
  mngr.close()
  return out


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, tiny_run_config):
  """The workdir of tiny_run_config trained 2N steps straight."""
  wa = str(tmp_path_factory.mktemp('uninterrupted'))
  run_train.train(tiny_run_config, wa)
  return wa


def batch_threads(monkeypatch) -> list[str]:
  """The name of the thread that built each batch the loop was fed, in order, from now on."""
  names, batch = [], EpisodeSampler.batch

  def spy(self, step):
    names.append(threading.current_thread().name)
    return batch(self, step)

  monkeypatch.setattr(EpisodeSampler, 'batch', spy)
  return names


@pytest.mark.parametrize('first_prefetch', [2, 0], ids=['prefetch', 'none-then-prefetch'])
def test_resume_equals_uninterrupted(tmp_path, tiny_run_config, uninterrupted, monkeypatch,
                                     first_prefetch):
  """Stopped at N (prefetching, or not) and resumed (prefetching) equals the uninterrupted run
  (prefetching, the default): the prefetch thread changes neither which batch a step gets nor,
  on resume, where the batches start."""
  c = tiny_run_config
  assert c.prefetch == 2  # the default config's: the uninterrupted run builds batches ahead
  wa, wb = uninterrupted, str(tmp_path / 'b')
  c1 = c.copy_and_resolve_references()
  c1.stop_at = N  # same num_steps (hence the same LR schedule), stopped half way
  c1.prefetch = first_prefetch  # (a loop-only field: resuming with another value is allowed)
  threads = batch_threads(monkeypatch)
  out1 = run_train.train(c1, wb)
  assert threads == ['prefetch-from-step-0' if first_prefetch else 'MainThread'] * N
  assert [r['step'] for r in read_metrics(wb)] == list(range(1, N + 1))
  assert out1['last']['lr'] == pytest.approx(float(training.make_schedule(
      experiment.optim_config(c), 2 * N)(N - 1)))
  threads.clear()
  run_train.train(c, wb)  # resumes at N
  assert threads == [f'prefetch-from-step-{N}'] * N  # batches N..2N-1, none past the end

  ma, mb = read_metrics(wa), read_metrics(wb)
  assert [r['step'] for r in ma] == [r['step'] for r in mb] == list(range(1, 2 * N + 1))
  diffs = {}
  for key in ('loss', 'grad_norm', 'lr', 'target_tokens'):
    diffs[key] = max(rel(b[key], a[key]) for a, b in zip(ma, mb))

  lm_cfg = config_from_hf(read_hf_config(c.model))
  pc, oc = experiment.pgm_config(c), experiment.optim_config(c)
  ta, sa = training.restore_trainable(wa, lm_cfg, pc)
  tb, sb = training.restore_trainable(wb, lm_cfg, pc)
  assert sa == sb == 2 * N
  diffs['trainable'] = tree_rel(tb, ta)
  t_mid, _ = training.restore_trainable(wb, lm_cfg, pc, step=N)
  assert tree_rel(t_mid, ta) > 1e-3  # the comparison is not vacuous: training moved the params

  tx = training.make_optimizer(oc, training.make_schedule(oc, 2 * N))
  abstract = jax.eval_shape(lambda: training.init_state(
      pgm.init_trainable(jax.random.key(0), lm_cfg, pc), tx))
  da, db = data_states(wa, [N, 2 * N], abstract), data_states(wb, [N, 2 * N], abstract)
  assert da == db
  assert {s: {k: v for k, v in d.items() if k != 'tasks'} for s, d in da.items()} == {
      N: {'seed': c.seed, 'step': N}, 2 * N: {'seed': c.seed, 'step': 2 * N}}
  assert sorted(da[N]['tasks']) == sorted(f'{t}_16384_100_train.jsonl'
                                           for t in experiment.data_location(c, wa)[1]['train'])
  print('\nresume max rel diff: ' + ', '.join(f'{k} {v:.2e}' for k, v in diffs.items()))
  for k, v in diffs.items():
    assert v <= RESUME_TOL, (k, v)

  # A task file edited under the run: resuming is refused, naming it, and the checkpoints stay.
  data_dir, setting = experiment.data_location(c, wb)
  path = os.path.join(data_dir, setting['train'][0], f'{setting["train"][0]}_16384_100_train.jsonl')
  with open(path, encoding='utf-8') as f:
    lines = f.readlines()
  with open(path, 'w', encoding='utf-8') as f:
    f.writelines(lines[::-1])
  ckpts = sorted(os.listdir(os.path.join(wb, 'checkpoints')))
  with pytest.raises(ValueError, match=rf'{os.path.basename(path)} \(changed\)'):
    run_train.train(c, wb)
  assert sorted(os.listdir(os.path.join(wb, 'checkpoints'))) == ckpts


def test_sigterm_saves_then_resume_completes(tmp_path, tiny_run_config, uninterrupted,
                                             monkeypatch):
  """A preemption notice (SIGTERM) mid-run: the step in flight is finished and checkpointed, train()
  returns, the handler is restored, and rerunning continues to the same result as no interruption."""
  c = tiny_run_config.copy_and_resolve_references()
  c.save_every = 100  # no periodic checkpoint before the end: the only one is the preemption's
  wa, wb = uninterrupted, str(tmp_path / 'b')  # (save_every does not change the numbers)
  assert c.prefetch > 0  # batches are built ahead, in the prefetch thread, as in a default run
  before = signal.getsignal(signal.SIGTERM)
  next_batch = Prefetcher.__next__

  def next_then_sigterm(self):
    if self.step == 2:  # the notice arrives as the loop takes step 3's (index 2) batch
      os.kill(os.getpid(), signal.SIGTERM)
    return next_batch(self)

  monkeypatch.setattr(Prefetcher, '__next__', next_then_sigterm)
  threads = batch_threads(monkeypatch)
  out = run_train.train(c, wb)
  monkeypatch.undo()
  assert out['preempted_at'] == 3
  assert set(threads) == {'prefetch-from-step-0'} and 3 <= len(threads) <= 2 * N
  assert signal.getsignal(signal.SIGTERM) == before
  assert [r['step'] for r in read_metrics(wb)] == [1, 2, 3]
  mngr = training.checkpoint_manager(os.path.join(wb, 'checkpoints'), read_only=True)
  assert mngr.latest_step() == 3  # Orbax also keeps its first save (step 1); 3 is the notice's
  mngr.close()

  threads = batch_threads(monkeypatch)
  assert run_train.train(c, wb)['preempted_at'] is None  # resumes at 3
  assert threads == ['prefetch-from-step-3'] * (2 * N - 3)
  ma, mb = read_metrics(wa), read_metrics(wb)
  assert [r['step'] for r in mb] == list(range(1, 2 * N + 1))
  for a, b in zip(ma, mb):
    assert rel(b['loss'], a['loss']) <= RESUME_TOL, (a, b)


# ----------------------------------------------------------------------------- 7. save/load


@pytest.mark.parametrize('design', ['prefix', 'discrete'])
def test_prompt_save_load_round_trip(tmp_path, models, batch8, design):
  lm, cfg = models['gpt2'], pgm_cfg(design)
  tr = perturbed_trainable(lm.config, cfg)
  b = jax.tree.map(lambda x: jnp.asarray(x[:2]), batch8)
  prompt = jax.jit(lambda tr: pgm.generate(cfg, lm.module, lm.params, tr, b['pgm_ids'],
                                           b['pgm_mask']))(tr)
  path = str(tmp_path / 'prompt.npz')
  meta = {'task': 'kw_cls_000', 'design': design}
  pgm.save_prompt(path, prompt, meta)
  loaded, meta2 = pgm.load_prompt(path)
  assert meta2 == meta
  assert jax.tree.structure(loaded) == jax.tree.structure(prompt)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), jax.device_get(prompt))
  if design == 'discrete':
    assert loaded.tokens.shape == (2, P) and loaded.kv is None
  else:
    assert loaded.embeds is None and loaded.tokens is None
  apply = jax.jit(lambda pr: pgm.apply_with_prompt(lm.module, lm.params, pr, b['lm_ids'],
                                                   b['lm_mask'],
                                                   logit_positions=b['target_pos']).logits)
  np.testing.assert_array_equal(np.asarray(apply(loaded)), np.asarray(apply(prompt)))


def test_resume_refuses_changed_config():
  """Resuming under a config that changes the schedule or data is refused, naming the fields."""
  saved = json.loads(default.get_config().to_json_best_effort())
  ok = json.loads(json.dumps(saved))
  ok['stop_at'], ok['log_every'], ok['mesh']['fsdp'] = 7, 3, 2  # harmless for the numbers
  training.check_resume_config(saved, ok, '/ckpt')
  bad = json.loads(json.dumps(saved))
  n = bad['num_steps']
  bad['num_steps'] += 1
  bad['optim']['lr'] *= 2
  with pytest.raises(ValueError, match=rf'/ckpt: .*num_steps \({n} -> {n + 1}\).*optim\.lr'):
    training.check_resume_config(saved, bad, '/ckpt')


def checkpoint_files(workdir) -> dict:
  root = os.path.join(workdir, 'checkpoints')
  return {os.path.relpath(os.path.join(d, f), root): os.path.getmtime(os.path.join(d, f))
          for d, _, fs in os.walk(root) for f in fs}


def test_resume_with_scan_layers_toggled_is_refused_up_front(tmp_path, tiny_run_config,
                                                             uninterrupted):
  """scan_layers stacks the LoRA pytree's layers, so a checkpoint of one layout cannot resume
  under the other: train.py stops before preparing anything, with one message naming the field,
  exit code non-zero, no traceback, and the checkpoints untouched."""
  before = checkpoint_files(uninterrupted)
  c = tiny_run_config.copy_and_resolve_references()
  c.scan_layers = True
  with pytest.raises(training.ResumeError, match=r'scan_layers \(False -> True\)'):
    run_train.train(c, uninterrupted)
  cfg_file = tmp_path / 'cfg.py'
  cfg_file.write_text('import json\nimport ml_collections\n\n\ndef get_config():\n'
                      f'  return ml_collections.ConfigDict(json.loads({tiny_run_config.to_json()!r}))\n')
  import subprocess
  import sys
  proc = subprocess.run([sys.executable, str(ROOT / 'train.py'), f'--config={cfg_file}',
                         f'--workdir={uninterrupted}', '--config.scan_layers=True'],
                        capture_output=True, text=True, timeout=300, cwd=str(ROOT))
  assert proc.returncode != 0
  assert 'scan_layers (False -> True)' in proc.stderr
  assert 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  assert checkpoint_files(uninterrupted) == before
