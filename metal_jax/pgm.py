"""The prompt generation model (PGM): the frozen LM + a LoRA pytree, reading X^P
followed by P trainable padding embeddings, emitting a prompt in one forward pass.

The padding embeddings are reparameterised as in P-tuning: an embedding table
fed through a two-layer bidirectional LSTM and a two-layer MLP. The trainable
pytree is {'lora': ..., 'padding': ...}; the frozen params are the LM's own.

Four prompt designs (the paper's Section 3.3):
  prefix        each layer's keys/values at the padding positions, the frozen LM's prefix
                (Llama: keys taken before RoPE and rotated for positions 0..P-1)
  weighted_sum  softmax(logits / temperature) @ word embeddings, as input embeddings
  hidden_state  the hidden states entering the LM head, as input embeddings
  discrete      Gumbel-softmax straight-through in training, argmax tokens at inference
"""

from __future__ import annotations

import dataclasses
import json

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from metal_jax import atomic, lora, sharding
from metal_jax.models import KV, rope

DESIGNS = ('prefix', 'weighted_sum', 'hidden_state', 'discrete')


@dataclasses.dataclass(frozen=True, kw_only=True)
class PGMConfig:
  prompt_len: int = 20  # P
  design: str = 'prefix'
  temperature: float = 1.0  # weighted_sum: softmax temperature
  gumbel_tau: float = 1.0  # discrete: Gumbel-softmax temperature
  lstm_layers: int = 2
  lora: lora.LoraConfig = lora.LoraConfig()

  def __post_init__(self):
    if self.design not in DESIGNS:
      raise ValueError(f'pgm.design={self.design!r}: choose one of {DESIGNS}')
    if self.prompt_len < 1:
      raise ValueError(f'pgm.prompt_len={self.prompt_len}: must be >= 1')


@flax.struct.dataclass
class Prompt:
  """A generated prompt: what a service stores per task and the frozen LM consumes.

  Exactly one of `kv` (prefix design: KV of [L, B, P, K, H]) and `embeds`
  ([B, P, D] input embeddings) is set; `tokens` [B, P] is set for the discrete design.
  Row b of the batch is one prompt: a batch may hold B different prompts (rows of
  different tasks) or one prompt broadcast to B rows; each field's batch axis is
  BATCH_AXIS[field], never guessed from the array's rank.
  """
  kv: KV | None = None
  embeds: jax.Array | None = None
  tokens: jax.Array | None = None

  BATCH_AXIS = {'kv': 1, 'embeds': 0, 'tokens': 0}  # KV: [L, B, P, K, H]
  LOGICAL_AXES = {  # each field's axes for sharding.constrain
      'kv': ('activation_layers', 'activation_batch', 'activation_length', 'activation_kv_heads',
             'activation_head_dim'),
      'embeds': ('activation_batch', 'activation_length', 'activation_embed'),
      'tokens': ('activation_batch', 'activation_length')}

  def _map(self, fn) -> 'Prompt':
    """fn(array, field name) applied to every set field."""
    kv = None if self.kv is None else jax.tree.map(lambda x: fn(x, 'kv'), self.kv)
    embeds = None if self.embeds is None else fn(self.embeds, 'embeds')
    tokens = None if self.tokens is None else fn(self.tokens, 'tokens')
    return Prompt(kv=kv, embeds=embeds, tokens=tokens)

  @property
  def length(self) -> int:
    return self.kv.k.shape[2] if self.kv is not None else self.embeds.shape[1]

  @property
  def batch_size(self) -> int:
    return self.kv.k.shape[1] if self.kv is not None else self.embeds.shape[0]

  def rows(self, idx) -> 'Prompt':
    """The prompts of rows idx (an index array; gathered, e.g. from a table of stored prompts)."""
    idx = jnp.asarray(idx)
    return self._map(lambda x, field: jnp.take(x, idx, axis=self.BATCH_AXIS[field]))

  def constrained(self) -> 'Prompt':
    """Each field constrained to its LOGICAL_AXES on the mesh being traced on (sharding.on_mesh):
    rows over data x fsdp, key/value heads over tensor; unchanged outside a mesh."""
    return self._map(lambda x, field: sharding.constrain(x, self.LOGICAL_AXES[field]))

  def broadcast_to(self, n: int) -> 'Prompt':
    """This prompt for n rows: a batch-n prompt as it is; a batch-G prompt (G dividing n) with
    row g repeated for rows g*n/G .. (g+1)*n/G - 1 (a batch-1 prompt: broadcast)."""
    g = self.batch_size
    if g == n:
      return self
    if n % g:
      raise ValueError(f'a prompt of batch {g} cannot serve {n} rows')
    return self._map(lambda x, field: jnp.repeat(x, n // g, axis=self.BATCH_AXIS[field]))


def save_prompt(path: str, prompt: Prompt, meta: dict | None = None) -> None:
  """Saves a prompt on its own (.npz), with optional metadata (task, model, design)."""
  arrays = {}
  if prompt.kv is not None:
    arrays['k'], arrays['v'] = np.asarray(prompt.kv.k, np.float32), np.asarray(prompt.kv.v, np.float32)
  if prompt.embeds is not None:
    arrays['embeds'] = np.asarray(prompt.embeds, np.float32)
  if prompt.tokens is not None:
    arrays['tokens'] = np.asarray(prompt.tokens)
  atomic.write_npz(path, meta=np.asarray(json.dumps(meta or {})), **arrays)


def load_prompt(path: str) -> tuple[Prompt, dict]:
  with np.load(path) as f:
    meta = json.loads(str(f['meta']))
    kv = KV(jnp.asarray(f['k']), jnp.asarray(f['v'])) if 'k' in f else None
    embeds = jnp.asarray(f['embeds']) if 'embeds' in f else None
    tokens = jnp.asarray(f['tokens']) if 'tokens' in f else None
  return Prompt(kv=kv, embeds=embeds, tokens=tokens), meta


class PaddingEncoder(nn.Module):
  """P-tuning's prompt encoder: embeddings -> bidirectional LSTM -> MLP, giving [P, D]."""
  prompt_len: int
  d_model: int
  lstm_layers: int = 2

  @nn.compact
  def __call__(self):
    d = self.d_model
    x = self.param('embedding', nn.initializers.normal(0.02), (self.prompt_len, d))[None]
    for i in range(self.lstm_layers):
      x = nn.Bidirectional(nn.RNN(nn.OptimizedLSTMCell(d // 2), name=f'fwd_{i}'),
                           nn.RNN(nn.OptimizedLSTMCell(d - d // 2), name=f'bwd_{i}'),
                           name=f'lstm_{i}')(x)
    x = nn.Dense(d, name='mlp_0')(x)
    x = nn.Dense(d, name='mlp_1')(nn.relu(x))
    return x[0]  # [P, D]


def init_trainable(rng: jax.Array, lm_config, cfg: PGMConfig) -> dict:
  """The trainable pytree: {'lora': LoRA A/B, 'padding': the padding encoder} (float32)."""
  r_lora, r_pad = jax.random.split(rng)
  enc = PaddingEncoder(cfg.prompt_len, lm_config.d_model, cfg.lstm_layers)
  return {'lora': lora.init(r_lora, lm_config, cfg.lora),
          'padding': enc.init(r_pad)['params']}


def padding_embeddings(lm_config, cfg: PGMConfig, trainable: dict) -> jax.Array:
  enc = PaddingEncoder(cfg.prompt_len, lm_config.d_model, cfg.lstm_layers)
  return enc.apply({'params': trainable['padding']})  # [P, D]


def generate(cfg: PGMConfig, module, params: dict, trainable: dict, pgm_ids, pgm_mask, *,
             rng: jax.Array | None = None, train: bool = False,
             prev: Prompt | None = None) -> Prompt:
  """One PGM forward pass over X^P (left-padded, the last P slots are the padding) -> Prompt,
  constrained to its logical axes (Prompt.constrained) when traced on a mesh.

  Iterative generation (the paper's extension for more examples than fit): `prev`, the prompt
  generated from the previous examples (B rows, this design's), is read by the PGM before X^P
  as the frozen LM reads a prompt (keys/values as its prefix, embeddings before the input, at
  positions 0..P-1); X^P and the slots keep a first pass's positions (from 0), so a second pass
  reaches no position the first does not (the built-in LM was pretrained on 128 positions, and
  X^P + slots already end near 140); the new prompt refines the previous with the next
  examples."""
  return _generate(cfg, module, params, trainable, pgm_ids, pgm_mask, rng=rng,
                   train=train, prev=prev).constrained()


def _generate(cfg: PGMConfig, module, params: dict, trainable: dict, pgm_ids, pgm_mask, *,
              rng: jax.Array | None, train: bool, prev: Prompt | None = None) -> Prompt:
  lm_cfg = module.config
  b, t = pgm_ids.shape
  p = cfg.prompt_len
  pad = padding_embeddings(lm_cfg, cfg, trainable).astype(lm_cfg.jnp_dtype)
  input_embeds = jnp.zeros((b, t, lm_cfg.d_model), lm_cfg.jnp_dtype).at[:, t - p:].set(pad)
  slot = jnp.arange(t) >= t - p  # [T]
  embeds_mask = jnp.broadcast_to(slot, (b, t))
  positions = jnp.maximum(jnp.cumsum(pgm_mask, axis=1) - 1, 0)  # left padding: real tokens from 0
  prefix, q = None, 0  # the previous prompt: q leading slots
  if prev is not None:
    q = prev.length
    if prev.kv is not None:
      prefix = prev.kv
    else:  # embeddings: before the (left-padded) input, at positions 0..q-1
      pgm_ids = jnp.concatenate([jnp.zeros((b, q), pgm_ids.dtype), pgm_ids], axis=1)
      pgm_mask = jnp.concatenate([jnp.ones((b, q), pgm_mask.dtype), pgm_mask], axis=1)
      input_embeds = jnp.concatenate([prev.embeds.astype(input_embeds.dtype), input_embeds], 1)
      embeds_mask = jnp.concatenate([jnp.ones((b, q), bool), embeds_mask], axis=1)
      positions = jnp.concatenate([jnp.broadcast_to(jnp.arange(q), (b, q)), positions], axis=1)
      t += q
  slot_pos = jnp.broadcast_to(jnp.arange(t - p, t), (b, p))
  design = cfg.design
  out = module.apply(
      lora.variables(params, trainable['lora'], cfg.lora), pgm_ids, pgm_mask, prefix,
      input_embeds=input_embeds, embeds_mask=embeds_mask, positions=positions,
      logit_positions=slot_pos, return_kv=design == 'prefix',
      return_hidden=design == 'hidden_state',
      return_logits=design in ('weighted_sum', 'discrete'))
  if design == 'prefix':
    v = out.kv.v[:, :, t - p:]  # [L, B, P, K, H]
    if out.kv.k_raw is not None:  # RoPE models: re-rotate for prompt positions 0..P-1
      k_raw = out.kv.k_raw[:, :, t - p:]
      pos = jnp.broadcast_to(jnp.arange(p), (b, p))
      k = jax.vmap(lambda x: rope.apply_rope(x, pos, lm_cfg.inv_freq))(k_raw)
    else:
      k = out.kv.k[:, :, t - p:]
    return Prompt(kv=KV(k, v))
  if design == 'hidden_state':
    return Prompt(embeds=out.hidden[:, t - p:])
  table = jnp.asarray(params[lm_cfg.embed_param], lm_cfg.jnp_dtype)  # [V, D]
  logits = out.logits  # [B, P, V] float32
  if design == 'weighted_sum':
    probs = jax.nn.softmax(logits / cfg.temperature, axis=-1)
    return Prompt(embeds=jnp.einsum('bpv,vd->bpd', probs.astype(table.dtype), table))
  # discrete
  if train:
    if rng is None:
      raise ValueError('the discrete design needs an rng in training (Gumbel noise)')
    g = jax.random.gumbel(rng, logits.shape, logits.dtype)
    soft = jax.nn.softmax((logits + g) / cfg.gumbel_tau, axis=-1)
    tokens = jnp.argmax(soft, axis=-1)
    hard = jax.nn.one_hot(tokens, logits.shape[-1], dtype=soft.dtype)
    onehot = hard - jax.lax.stop_gradient(soft) + soft  # straight-through
    embeds = jnp.einsum('bpv,vd->bpd', onehot.astype(table.dtype), table)
  else:
    tokens = jnp.argmax(logits, axis=-1)
    embeds = jnp.take(table, tokens, axis=0)
  return Prompt(embeds=embeds, tokens=tokens.astype(jnp.int32))


def apply_with_prompt(module, params: dict, prompt: Prompt | None, input_ids, attention_mask,
                      *, logit_positions=None, **kw):
  """The frozen LM on input_ids given a prompt (or none): logits at logit_positions of input_ids."""
  if prompt is None:
    return module.apply({'params': params}, input_ids, attention_mask,
                        logit_positions=logit_positions, **kw)
  if prompt.kv is not None:
    return module.apply({'params': params}, input_ids, attention_mask, prefix=prompt.kv,
                        logit_positions=logit_positions, **kw)
  b, t = input_ids.shape
  p = prompt.embeds.shape[1]
  d = prompt.embeds.shape[-1]
  ids = jnp.concatenate([jnp.zeros((b, p), input_ids.dtype), input_ids], axis=1)
  mask = jnp.concatenate([jnp.ones((b, p), attention_mask.dtype), attention_mask], axis=1)
  embeds = jnp.concatenate([prompt.embeds, jnp.zeros((b, t, d), prompt.embeds.dtype)], axis=1)
  sel = jnp.broadcast_to(jnp.arange(p + t) < p, (b, p + t))
  pos = None if logit_positions is None else logit_positions + p
  return module.apply({'params': params}, ids, mask, input_embeds=embeds, embeds_mask=sel,
                      logit_positions=pos, **kw)
