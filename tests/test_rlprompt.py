"""RLPrompt (metal_jax.baselines.rlprompt) on a tiny random GPT-2 with the synthetic tokenizer.

* run() trains: its greedy prompt earns more reward than the untrained policy's and than nine in
  ten random prompts, it counts its passes as the module docstring says, and it is
  deterministic given rng;
* the reward, the soft Q-learning loss and the Polyak update equal references written out in
  numpy;
* the policy's MLP sits between the LM's final hidden state and its own head (tied or not);
* with the LM on a mesh (as eval.py loads it) a run compiles its step once, and short examples
  are padded to 8 tokens, not the spec's 32.

The learning rate and MLP width are far from rl-prompt's so that a few steps show learning.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import save_hf
from metal_jax import evaluation, objective, sharding
from metal_jax.baselines import common, rlprompt
from metal_jax.data import synthetic
from metal_jax.data.episodes import EpisodeSpec
from metal_jax.data.tasks import tokenize_examples
from metal_jax.models.hf import load_lm

P = 5
SPEC = EpisodeSpec(n_prompt_examples=16, n_lm_examples=0, prompt_len=P, max_len=128)
FAST = rlprompt.Hparams(steps=8, lr=1e-3, mlp_width=64)  # 16 prompts a step, top-k 256


@pytest.fixture(scope='module')
def tokenizer():
  return synthetic.build_tokenizer()


@pytest.fixture(scope='module')
def shots(tmp_path_factory, tokenizer):
  """A synthetic test task's 16 few-shot examples (seed 100), every one with the task's options
  (tokenised in memory as a task file's)."""
  d = str(tmp_path_factory.mktemp('suite'))
  setting = synthetic.write_suite(d, n_train_tasks=0, n_test_tasks=1, n_train_examples=1,
                                  n_test_examples=8)
  with open(synthetic.few_shot_path(d, setting['test'][0], 100, 'train')) as f:
    task = tokenize_examples([json.loads(line) for line in f], tokenizer)
  assert len(task) == 16 and len({len(o) for o in task.option_ids}) == 1
  return task


@pytest.fixture(scope='module')
def lm(synthetic_lm_dir):
  return load_lm(str(synthetic_lm_dir))


@pytest.fixture(scope='module')
def trained(lm, shots, tokenizer):
  return rlprompt.run(lm.module, lm.params, shots, range(16), SPEC, FAST, rng=jax.random.key(0),
                      tokenizer=tokenizer)


def test_run_trains_and_counts_passes(lm, shots, tokenizer, trained):
  res = trained
  assert isinstance(res, common.TuneResult) and res.note == ''
  # Per step: P rollout passes and 16 prompts x C option batches; then the greedy decoding's P
  # passes. One backward pass a step.
  c = len(shots.option_ids[0])
  assert res.forward_passes == 8 * (P + 16 * c) + P
  assert res.backward_passes == len(res.losses) == 8 and np.isfinite(res.losses).all()
  # The prompt: the re-tokenised text of the greedy ids, embedded by the LM's own table.
  ids = np.asarray(res.prompt.tokens)
  assert ids.shape == (1, P) and res.prompt.kv is None  # the synthetic words round-trip
  table = np.asarray(lm.params[lm.config.embed_param])
  np.testing.assert_array_equal(np.asarray(res.prompt.embeds), table[ids])
  text = evaluation.prompt_text(tokenizer, res.prompt)
  assert tokenizer(text, add_special_tokens=False)['input_ids'] == ids[0].tolist()

  untrained = rlprompt.run(lm.module, lm.params, shots, range(16), SPEC,
                           rlprompt.Hparams(steps=0, mlp_width=64), rng=jax.random.key(0),
                           tokenizer=tokenizer)
  assert untrained.forward_passes == P and untrained.backward_passes == 0
  assert untrained.losses == []
  # The trained policy's prompt earns more reward on the examples than the untrained one's and
  # than 9 in 10 random prompts.
  random_ids = jax.random.randint(jax.random.key(1), (64, P), 0, len(tokenizer))
  prompts = jnp.concatenate([untrained.prompt.tokens, ids, random_ids])
  batch = rlprompt.reward_batch(shots, range(16), SPEC)
  before, after, *random = np.asarray(
      rlprompt.prompt_rewards(lm.module, lm.params, prompts, batch, 200.0, 180.0))
  assert after > before and after > np.quantile(random, 0.9), (before, after, random)


def test_retokenize_falls_back_to_raw_ids():
  """Text that tokenises to nothing keeps the policy's own ids."""

  class Blank:
    def decode(self, ids, **kw):
      return ''

    def __call__(self, text, add_special_tokens=True):
      return {'input_ids': []}

  np.testing.assert_array_equal(rlprompt.retokenize(Blank(), np.asarray([4, 2, 9])), [4, 2, 9])


def test_deterministic_given_rng(lm, shots, tokenizer, trained):
  again = rlprompt.run(lm.module, lm.params, shots, range(16), SPEC, FAST, rng=jax.random.key(0),
                       tokenizer=tokenizer)
  np.testing.assert_array_equal(np.asarray(again.prompt.tokens), np.asarray(trained.prompt.tokens))
  assert again.losses == trained.losses


def test_reward_equals_numpy_reference(lm, shots):
  """Gap reward from objective.score's option NLLs (each option scored as the output of its own
  train_batch), 200 / 180 coefficients, mean over examples, z-score over prompts, x5; one example
  has an option fewer, so the others' maximum skips the missing slot."""
  n, c = 6, len(shots.option_ids[0])
  full = shots.subset(range(n))
  prompts = np.asarray(jax.random.randint(jax.random.key(2), (3, P), 0, lm.config.vocab_size))
  score = jax.jit(objective.score, static_argnums=0)
  logp = np.zeros((3, n, c))
  for o in range(c):
    full.output_ids = [opts[o] for opts in full.option_ids]
    batch = common.train_batch(full, range(n), SPEC)
    for g, p in enumerate(prompts):
      prompt = rlprompt.discrete_prompt(lm.module, lm.params, jnp.asarray(p)[None])
      nll, count = score(lm.module, lm.params, prompt, batch)
      logp[g, :, o] = -np.asarray(nll) / np.asarray(count)
  task = shots.subset(range(n))
  drop = next(i for i in range(n) if task.answer[i] != c - 1)
  task.option_ids[drop] = task.option_ids[drop][:-1]
  ref = np.zeros(3)
  for g in range(3):
    for i in range(n):
      q = np.exp(logp[g, i, :len(task.option_ids[i])])
      q /= q.sum()
      gap = q[task.answer[i]] - np.delete(q, task.answer[i]).max()
      ref[g] += gap * (200.0 if gap > 0 else 180.0) / n
  shaped = 5.0 * (ref - ref.mean()) / (ref.std() + 1e-4)

  batch = rlprompt.reward_batch(task, range(n), SPEC)
  assert rlprompt.reward_passes(batch) == c  # n c - 1 rows in batches of n examples
  raw = rlprompt.prompt_rewards(lm.module, lm.params, jnp.asarray(prompts), batch, 200.0, 180.0)
  np.testing.assert_allclose(np.asarray(raw), ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(rlprompt.shape_rewards(raw, 5.0)), shaped, rtol=1e-3,
                             atol=1e-3)


def test_sql_loss_equals_numpy_reference():
  """rl-prompt's 'v2_v2r_v3_v3r' (no reverse coefficient) written out step by step."""
  rng = np.random.default_rng(0)
  n, p, v = 3, 4, 7
  logits = rng.normal(size=(n, p, v)).astype(np.float32)
  target = rng.normal(size=(n, p, v)).astype(np.float32)
  actions = rng.integers(0, v, (n, p))
  rewards = rng.normal(size=(n,)).astype(np.float32) * 5

  lse = lambda x: np.log(np.exp(x.astype(np.float64)).sum(-1))
  total = 0.0
  for b in range(n):
    a = [logits[b, t, actions[b, t]] - lse(logits[b, t]) for t in range(p)]
    vt = [lse(target[b, t]) for t in range(p)]
    for t in range(p):
      onestep = (vt[t + 1] - vt[t]) if t < p - 1 else rewards[b] - vt[t]
      single = (a[t] - onestep) ** 2
      multi = (sum(a[t:]) - (rewards[b] - vt[t])) ** 2
      total += (single + multi) / 2
  # The target network's logits are constants of the loss: no gradient reaches them.
  loss, grad = jax.jit(jax.value_and_grad(rlprompt.sql_loss, argnums=1))(
      *[jnp.asarray(x) for x in (logits, target, actions, rewards)])
  np.testing.assert_allclose(float(loss), total / n, rtol=1e-5)
  assert not np.asarray(grad).any()


def test_target_moves_toward_policy_by_polyak_rate(lm, shots):
  """In a real step the target becomes 0.999 target + 0.001 policy (before the policy moves)."""
  mlp = rlprompt.AdaptorMLP(FAST.mlp_width, lm.config.d_model)
  policy = rlprompt.init_adaptor(mlp, jax.random.key(0))
  target = jax.tree.map(lambda x: x + 1.0, policy)
  state = {**rlprompt.init_state(policy, FAST), 'target': target}
  batch = rlprompt.reward_batch(shots, range(16), SPEC)
  new, _ = rlprompt.train_step(lm.module, mlp, lm.params, state, batch, jnp.int32(0),
                               jax.random.key(3), rlprompt.step_hparams(FAST), n=16, prompt_len=P)
  for t, p, t2, p2 in zip(*(jax.tree.leaves(x) for x in (target, policy, new['target'],
                                                         new['policy']))):
    np.testing.assert_allclose(np.asarray(t2), 0.999 * np.asarray(t) + 0.001 * np.asarray(p),
                               rtol=1e-6, atol=1e-7)
    assert np.abs(np.asarray(p2) - np.asarray(p)).max() > 0  # the policy took its Adam step


def test_policy_mlp_replaces_hidden_state_before_the_head(tmp_path, lm):
  """With the MLP set to the identity (relu(h) - relu(-h)), the policy's logits are the LM's own,
  for GPT-2's tied head and for an untied Llama head."""
  save_hf('llama', tmp_path, vocab_size=lm.config.vocab_size)
  llama = load_lm(str(tmp_path))
  assert not llama.config.tie_word_embeddings
  ids = jnp.asarray([[3, 9, 4, 1], [7, 7, 2, 5]], jnp.int32)
  pos = jnp.asarray([[1, 3], [0, 2]], jnp.int32)
  for model in (lm, llama):
    d = model.config.d_model
    mlp = rlprompt.AdaptorMLP(2 * d, d)
    eye = np.eye(d, dtype=np.float32)
    identity = {'Dense_0': {'kernel': np.concatenate([eye, -eye], 1), 'bias': np.zeros(2 * d)},
                'Dense_1': {'kernel': np.concatenate([eye, -eye], 0), 'bias': np.zeros(d)}}
    zero = jax.tree.map(np.zeros_like, identity)
    out = jax.jit(rlprompt.policy_logits, static_argnums=(0, 2))(
        model.module, model.params, mlp, [identity, zero], ids, pos)
    plain = jax.jit(lambda p: model.module.apply({'params': p}, ids, logit_positions=pos).logits)(
        model.params)
    assert out.shape == (2,) + plain.shape
    np.testing.assert_allclose(np.asarray(out[0]), np.asarray(plain), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out[1]), 0.0, atol=1e-6)  # a zero state: zero logits


def test_on_a_mesh_the_step_compiles_once_for_short_rows(lm, shots, tokenizer, monkeypatch):
  """The LM's params on a mesh, as eval.py loads them: the first step's state is on that mesh as
  the step returns it, so a run compiles one step, not one for its first call and one for the
  rest; the synthetic rows (a few tokens) are padded to 8, not the spec's shortest bucket."""
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, devices=jax.devices()[:1])
  params = jax.device_put(lm.params, sharding.replicated(mesh))
  original, batches = rlprompt.reward_batch, []

  def recording(*args):
    batches.append(original(*args))
    return batches[-1]

  monkeypatch.setattr(rlprompt, 'reward_batch', recording)
  n = rlprompt.train_step._cache_size()
  hp = rlprompt.Hparams(steps=3, n_prompts=2, mlp_width=16)
  res = rlprompt.run(lm.module, params, shots, range(16), SPEC, hp, rng=jax.random.key(0),
                     tokenizer=tokenizer)
  assert rlprompt.train_step._cache_size() == n + 1 and len(res.losses) == 3
  assert batches[0]['lm_ids'].shape[1] == 8
