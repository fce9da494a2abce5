"""RLPrompt (Deng et al. 2022): a discrete prompt found by soft Q-learning, the LM frozen.

Follows github.com/mingkaid/rl-prompt's few-shot classification defaults (run_fsc.py,
fsc_config.yaml and the configs it composes):

Policy (LMAdaptorModel, SinglePromptModel). The frozen LM reads a fixed input, rl-prompt's
source_str "<|endoftext|>": here the LM's BOS token (GPT-2's is <|endoftext|>), else its
first EOS. A trainable MLP D -> mlp_width (2048) -> D with a ReLU maps the LM's final hidden
state (after the final norm) to a vector that REPLACES it before the frozen LM head
(`_mlp_forward`: lm_head(mlp(last_hidden)), logit_bias 0, fluent off); both layers start as
rl-prompt's: Xavier-uniform weights of gain 1e-4, biases -1e-4, so the untrained policy is
nearly uniform over the vocabulary. The policy emits prompt_len (5) tokens autoregressively,
no EOS: sampled from the top-k (256) logits in training, greedy for the returned prompt.

Reward (fsc_reward.PromptedClassificationReward). Every step samples n_prompts (16) prompts and
scores each on all the few-shot examples (run_fsc puts every example in every step): class
probabilities = the options' probabilities renormalised over the example's options; gap =
P(gold) - max P(other option); the example's reward is 200 * gap if gap > 0 (correct), else
180 * gap; a prompt's reward is the mean over the examples. The step's rewards are z-scored
over its prompts, (r - mean) / (std + 1e-4), then scaled by 5 (reward shaping [0, 1] ->
[0, 5]).

Loss (SQLModule, sql_losses). On-policy soft Q-learning with Q = the chosen token's logit and
V = logsumexp of the logits; rl-prompt's default 'v2_v2r_v3_v3r', which SQLModule calls with
no reverse coefficient, is the mean of the single-step term (v2: A_t = Q_t - V_t against
V'_{t+1} - V'_t, the last step against r - V'_t) and the multi-step path term (v3: sum_{s>=t}
A_s against r - V'_t); V' from the target network; summed over the steps, averaged over the
prompts. The target starts as a copy of the policy and moves toward it by Polyak averaging at
rate 0.001 before every step (`_pre_steps`). Adam (lr 5e-5, constant), gradient norm clipped
at 5.

Adapted to this project, with the reasons:
- The policy's LM is the task LM (rl-prompt uses a separate distilgpt2 policy).
- The prompt goes before x, where every method's prompt goes here (evaluation scores
  prompt + x + option); rl-prompt's GPT-2 template puts it after x.
- The verbalisers are the example's options, tokenised as scoring reads them (with their
  leading newline). An option's probability is exp(-mean NLL of its tokens) (objective.score),
  renormalised over the options: rl-prompt's softmax over the verbaliser logits when every
  option is one token. "Other option" means every option but the gold's index (rl-prompt
  masks every class whose probability equals the gold's).
- Sampled ids are fed back as ids (rl-prompt decodes each to text and re-tokenises it), and
  no KV cache: decoding step t re-runs the LM over the P-slot buffer [source, a_1, ...,
  a_{P-1}] and reads position t (causal attention: the same numbers).
- The target shares the frozen LM: its MLP reads the hidden states of the policy's own
  decoding passes (rl-prompt re-runs a copy of the LM on the sampled tokens). The policy's
  logits in the loss are those it sampled from, as in rl-prompt; the gradient reaches the MLP
  only (the LM is frozen and its hidden states do not depend on the MLP).
- In training a prompt's reward is scored on its raw ids' embeddings (always P tokens, one
  batched call for the step's prompts); only the returned prompt is decoded to text and
  re-tokenised (`tokenizer(text, add_special_tokens=False)`), as rl-prompt hands its prompt
  as text to the task LM. Its length may then differ from P (the raw ids if it re-tokenises
  to nothing); evaluation.prompt_text gives the text.

Budget. The paper (PAPER.md) gives RLPrompt "5 epochs of batch 16" and "at least 320 x
(number of classes) forward passes". rl-prompt puts all 16 examples in every step, so the
stated pass count is what fixes the budget: a prompt's reward reads the examples once per
option (each option is its own row here), C passes over the batch of examples for C
classes, 16 * C a step, so 320 * C are `steps` = 20 steps. Counted (one pass = one batch
through the LM): per step, prompt_len rollout passes (the step's prompts decoded together,
one pass a token) and n_prompts * ceil(R / n) reward passes (R (example, option) rows of n
examples: C for C classes), then prompt_len passes of the final greedy decoding:
steps * (prompt_len + n_prompts * C) + prompt_len in all, 20 * (5 + 16 C) + 5 by default.
Backward: one per step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from metal_jax import objective
from metal_jax.baselines import common
from metal_jax.data.episodes import EpisodeSpec, build_lm_half, collate_lm, lm_lengths
from metal_jax.data.tasks import TokenizedTask
from metal_jax.pgm import Prompt
from metal_jax.serving import generate

Z_EPS = 1e-4  # rl-prompt's z-score: (r - mean) / (std + 1e-4)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Hparams:
  """rl-prompt's few-shot classification defaults; `steps` from the paper's budget (above)."""
  steps: int = 20
  n_prompts: int = 16  # prompts sampled a step (prompt_train_batch_size)
  prompt_len: int = 5
  mlp_width: int = 2048
  top_k: int = 256
  lr: float = 5e-5
  clip_norm: float = 5.0
  target_rate: float = 1e-3  # Polyak averaging of the target network
  correct_coeff: float = 200.0
  incorrect_coeff: float = 180.0
  reward_scale: float = 5.0  # reward shaping [0, 1] -> [0, 5] after the z-score


class AdaptorMLP(nn.Module):
  """rl-prompt's adaptor: [..., D] -> [..., D] through `width` ReLU units (float32)."""
  width: int
  d_model: int

  @nn.compact
  def __call__(self, h):
    kernel = nn.initializers.variance_scaling(1e-8, 'fan_avg', 'uniform')  # Xavier, gain 1e-4
    bias = nn.initializers.constant(-1e-4)
    h = nn.Dense(self.width, kernel_init=kernel, bias_init=bias)(h.astype(jnp.float32))
    return nn.Dense(self.d_model, kernel_init=kernel, bias_init=bias)(nn.relu(h))


@functools.partial(jax.jit, static_argnums=0)
def init_adaptor(mlp: AdaptorMLP, key: jax.Array) -> dict:
  """The MLP's initial params (rl-prompt's initialisation)."""
  return mlp.init(key, jnp.zeros((1, mlp.d_model), jnp.float32))['params']


def source_id(config) -> int:
  """The policy's fixed input token: the LM's BOS, else its first EOS."""
  for i in (config.bos_token_id, *generate.eos_ids(config)):
    if i is not None:
      return int(i)
  raise ValueError('rlprompt: the policy reads the LM\'s BOS or EOS token, and the LM config has '
                   'neither')


def policy_logits(module, params: dict, mlp: AdaptorMLP, heads: Sequence[dict], ids: jax.Array,
                  logit_positions: jax.Array) -> jax.Array:
  """Logits [K, B, Y, V] (float32) of K policies in one pass of the frozen LM over ids [B, T]:
  policy k's MLP (params heads[k]) replaces the final hidden states at logit_positions [B, Y]
  before the LM's own head (intercepted, so each model keeps its head: tied or not)."""

  def insert_mlp(next_fun, args, kwargs, context):
    if context.method_name != 'lm_head':
      return next_fun(*args, **kwargs)
    h, table = args  # h: [B, Y, D]
    x = jnp.concatenate([mlp.apply({'params': p}, h).astype(h.dtype) for p in heads])
    return next_fun(x, table, **kwargs)

  with nn.intercept_methods(insert_mlp):
    logits = module.apply({'params': params}, ids, logit_positions=logit_positions).logits
  return logits.reshape((len(heads),) + ids.shape[:1] + logits.shape[1:])


def _decode(module, params, mlp, heads, source, key, temperature, top_k, *, n: int,
            prompt_len: int):
  """n prompts [n, P] from the policy heads[0] (generate.sample: temperature 0 is greedy), and
  every head's logits at each step [K, n, P, V] (the policy's first)."""
  buf = jnp.full((n, prompt_len), source, jnp.int32)  # [n, P]: source, a_1, ..., a_{P-1}
  keys = jax.random.split(key, n)
  ones = jnp.ones((n,), jnp.float32)

  def step(buf, t):
    pos = jnp.full((n, 1), t, jnp.int32)
    logits = policy_logits(module, params, mlp, heads, buf, pos)[:, :, 0]  # [K, n, V]
    tok = generate.sample(jax.lax.stop_gradient(logits[0]), keys, jnp.full((n,), t),
                          temperature * ones, jnp.full((n,), top_k, jnp.int32), ones)
    return jnp.where(jnp.arange(prompt_len) == t + 1, tok[:, None], buf), (tok, logits)

  _, (toks, logits) = jax.lax.scan(step, buf, jnp.arange(prompt_len))
  return toks.T, jnp.moveaxis(logits, 0, 2)  # [n, P], [K, n, P, V]


@functools.partial(jax.jit, static_argnames=('module', 'mlp', 'prompt_len'))
def greedy(module, params, mlp, head, source, *, prompt_len: int) -> jax.Array:
  """The policy's greedy prompt [1, P] (the key is unused at temperature 0)."""
  return _decode(module, params, mlp, [head], source, jax.random.key(0), 0.0, 0, n=1,
                 prompt_len=prompt_len)[0]


# ----------------------------------------------------------------------------- reward


def reward_batch(task: TokenizedTask, idx: Sequence[int], spec: EpisodeSpec) -> dict:
  """Every (example, option) pair of the examples idx as one LM half (prompt + bare x + option,
  the option's tokens scored; R rows, jnp arrays), with `example`, `option` [R] (each row's
  example and option index), `answer` [N] (the gold option) and `valid` [N, O] (the examples'
  options among O slots)."""
  idx = [int(i) for i in idx]
  empty = np.zeros((0,), np.int32)
  halves, example, option = [], [], []
  for e, i in enumerate(idx):
    if not task.option_ids[i]:
      raise ValueError(f'rlprompt: example {i} of {task.path} has no options; the reward '
                       'compares the gold option with the others')
    for o, y in enumerate(task.option_ids[i]):
      halves.append(build_lm_half(empty, task.input_first[i], task.input_rest[i], y, spec))
      example.append(e)
      option.append(o)
  n_opts = [len(task.option_ids[i]) for i in idx]
  valid = np.arange(max(n_opts))[None] < np.asarray(n_opts)[:, None]
  batch = collate_lm(halves, *lm_lengths(halves, spec))
  batch.update(example=np.asarray(example, np.int32), option=np.asarray(option, np.int32),
               answer=task.answer[idx], valid=valid)
  return {k: jnp.asarray(v) for k, v in batch.items()}


def reward_passes(batch: dict) -> int:
  """LM passes a prompt's reward takes: its rows in batches of the examples (C for C classes)."""
  return math.ceil(batch['example'].shape[0] / batch['answer'].shape[0])


def discrete_prompt(module, params: dict, ids: jax.Array) -> Prompt:
  """Prompts of token ids [G, P] as the frozen LM reads them: Prompt(embeds=[G, P, D], tokens)."""
  return Prompt(embeds=jnp.take(params[module.config.embed_param], ids, axis=0), tokens=ids)


@functools.partial(jax.jit, static_argnames=('module',))
def prompt_rewards(module, params: dict, ids: jax.Array, batch: dict, correct_coeff,
                   incorrect_coeff) -> jax.Array:
  """rl-prompt's classification reward [G] of prompts ids [G, P] on a reward_batch: one call,
  the prompts in turn (lax.map), each over all the batch's rows."""
  half = {k: batch[k] for k in ('lm_ids', 'lm_mask', 'target_pos', 'target_ids', 'target_mask')}
  nll, count = jax.lax.map(  # [G, R] each
      lambda p: objective.score(module, params, discrete_prompt(module, params, p[None]), half),
      ids)
  g = ids.shape[0]
  valid, answer = batch['valid'], batch['answer']  # [N, O], [N]
  logp = jnp.full((g,) + valid.shape, -jnp.inf).at[:, batch['example'], batch['option']].set(
      -nll / jnp.maximum(count, 1.0))  # [G, N, O] mean option log-probabilities
  probs = jax.nn.softmax(logp, axis=-1)
  gold = jnp.take_along_axis(probs, answer[None, :, None], axis=-1)[..., 0]  # [G, N]
  is_other = valid & (jnp.arange(valid.shape[1])[None] != answer[:, None])  # [N, O]
  gap = gold - jnp.max(jnp.where(is_other, probs, -1.0), axis=-1)
  return jnp.mean(gap * jnp.where(gap > 0, correct_coeff, incorrect_coeff), axis=-1)


def shape_rewards(rewards: jax.Array, scale) -> jax.Array:
  """A step's rewards [G] z-scored over its prompts, times `scale` (rl-prompt's reward shaping)."""
  return scale * (rewards - rewards.mean()) / (rewards.std() + Z_EPS)


# ----------------------------------------------------------------------------- soft Q-learning


def sql_loss(logits: jax.Array, target_logits: jax.Array, actions: jax.Array,
             rewards: jax.Array) -> jax.Array:
  """rl-prompt's default soft Q-learning loss (a scalar) for sequences of one length P.

  logits, target_logits [N, P, V] (the policy's and the target's at each step), actions [N, P],
  rewards [N] (the shaped reward of each sequence, given at its end). Per step, the mean of the
  single-step term (A_t - (V'_{t+1} - V'_t))^2, the last step's target r - V'_{P-1}, and the
  multi-step term (sum_{s>=t} A_s - (r - V'_t))^2, with A = Q - V; summed over the steps,
  averaged over the sequences.
  """
  q = jnp.take_along_axis(logits, actions[..., None].astype(jnp.int32), axis=-1)[..., 0]  # [N, P]
  a = q - jax.nn.logsumexp(logits, axis=-1)
  v_ = jax.nn.logsumexp(jax.lax.stop_gradient(target_logits), axis=-1)  # [N, P]
  single_target = jnp.concatenate([v_[:, 1:] - v_[:, :-1], (rewards - v_[:, -1])[:, None]], axis=1)
  single = (a - single_target) ** 2
  path = jnp.flip(jnp.cumsum(jnp.flip(a, axis=1), axis=1), axis=1)  # sum_{s>=t} A_s
  multi = (path - (rewards[:, None] - v_)) ** 2
  return jnp.mean(jnp.sum((single + multi) / 2, axis=1))


def polyak(target, policy, rate):
  """The target network moved toward the policy: (1 - rate) * target + rate * policy."""
  return jax.tree.map(lambda t, p: (1 - rate) * t + rate * p, target, policy)


def optimizer(lr, clip_norm) -> optax.GradientTransformation:
  """rl-prompt's Trainer: gradient norm clipped, then Adam (b1 0.9, b2 0.999, eps 1e-8)."""
  return optax.chain(optax.clip_by_global_norm(clip_norm), optax.adam(lr))


@functools.partial(jax.jit, static_argnames=('module', 'mlp', 'n', 'prompt_len'))
def train_step(module, mlp, params, state, batch, source, key, hp, *, n: int, prompt_len: int):
  """One step: Polyak target update, n sampled prompts, their rewards, one Adam step on the SQL
  loss. state {'policy', 'target', 'opt'}; hp the Hparams fields the step reads, as arrays
  (traced: one compilation serves every value). Returns (state, SQL loss)."""
  target = polyak(state['target'], state['policy'], hp['target_rate'])

  def loss_fn(policy):
    ids, (logits, target_logits) = _decode(module, params, mlp, [policy, target], source, key,
                                           1.0, hp['top_k'], n=n, prompt_len=prompt_len)
    raw = prompt_rewards(module, params, ids, batch, hp['correct_coeff'], hp['incorrect_coeff'])
    return sql_loss(logits, target_logits, ids, shape_rewards(raw, hp['reward_scale']))

  loss, grads = jax.value_and_grad(loss_fn)(state['policy'])
  tx = optimizer(hp['lr'], hp['clip_norm'])
  updates, opt = tx.update(grads, state['opt'], state['policy'])
  policy = optax.apply_updates(state['policy'], updates)
  return {'policy': policy, 'target': target, 'opt': opt}, loss


def forward_passes(hp: Hparams, batch: dict) -> int:
  """LM passes of a run (module docstring): each step's rollout and reward passes, then the
  final greedy decoding."""
  per_step = hp.prompt_len + hp.n_prompts * reward_passes(batch)
  return hp.steps * per_step + hp.prompt_len


def retokenize(tokenizer, ids: np.ndarray) -> np.ndarray:
  """The policy's ids decoded to text and tokenised again for the task LM (the raw ids when the
  text tokenises to nothing)."""
  text = tokenizer.decode([int(i) for i in ids], clean_up_tokenization_spaces=False)
  out = tokenizer(text, add_special_tokens=False)['input_ids']
  return np.asarray(out if out else ids, np.int32)


def step_hparams(hp: Hparams) -> dict:
  """The Hparams fields train_step reads, as arrays."""
  out = {f: jnp.float32(getattr(hp, f)) for f in (
      'lr', 'clip_norm', 'target_rate', 'correct_coeff', 'incorrect_coeff', 'reward_scale')}
  return {**out, 'top_k': jnp.int32(hp.top_k)}


def init_state(policy: dict, hp: Hparams) -> dict:
  """The training state: the policy's MLP, its target (a copy) and the optimizer's state."""
  return {'policy': policy, 'target': policy, 'opt': optimizer(hp.lr, hp.clip_norm).init(policy)}


def run(module, params: dict, task: TokenizedTask, idx: Sequence[int], spec: EpisodeSpec,
        hp: Hparams, *, rng, tokenizer) -> common.TuneResult:
  """RLPrompt on the examples idx; the prompt is the trained policy's greedy prompt, decoded by
  `tokenizer` and re-tokenised. `losses`: the SQL loss of every step."""
  cfg = module.config
  r_init, r_train = jax.random.split(common.as_key(rng))
  mlp = AdaptorMLP(hp.mlp_width, cfg.d_model)
  state = common.on_params_mesh(params, init_state(init_adaptor(mlp, r_init), hp))
  spec = common.short_buckets(spec)
  batch = reward_batch(task, idx, spec.with_prompt_len(hp.prompt_len))
  source = jnp.int32(source_id(cfg))
  traced = step_hparams(hp)
  losses = []  # on the device until the end: no step waits for the host
  for step in range(hp.steps):
    state, loss = train_step(module, mlp, params, state, batch, source,
                             jax.random.fold_in(r_train, step), traced, n=hp.n_prompts,
                             prompt_len=hp.prompt_len)
    losses.append(loss)
  losses = [float(x) for x in jax.device_get(losses)]
  ids = greedy(module, params, mlp, state['policy'], source, prompt_len=hp.prompt_len)
  ids = jnp.asarray(retokenize(tokenizer, np.asarray(ids[0])))
  return common.TuneResult(prompt=discrete_prompt(module, params, ids[None]),
                           forward_passes=forward_passes(hp, batch), backward_passes=hp.steps,
                           losses=losses)
