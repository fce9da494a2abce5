"""Decoding for served prompts: an explicit functional KV cache, per-row prompts, jitted steps.

Each row of a batch has its own prompt (a prefix of keys/values, embeddings run through the LM
into one, or none), its own input length and its own SamplingParams. The decode machinery is
pure: `prefill` and `decode` map a `DecodeState` pytree to the next one under jax.jit, and
`generate` drives them from the host (stop strings, results).

Cache layout. `Cache.k` / `Cache.v` are [L, B, S, K, H] (the compute dtype) with
S = P + T + N, every size bucketed to a power of two so that a few compilations serve every
request: P the widest prompt, T the longest input, N the most new tokens of any row. Row b's slots:

  [0, p_b)                    its prompt's keys/values (slots p_b..P-1 are padding)
  [P, P + t_b)                its input, written by `prefill` (right padding after it)
  [P + t_b, P + t_b + n)      the tokens it generated and fed back, one slot per decode step

`Cache.valid` [B, S] marks the slots a query may see (padding never becomes valid; a decode step
writes at `Cache.length[b]` and overwrites the input's padding). Every step attends to the whole
cache as the model's prefix, with `prefix_mask=valid`.

Position convention. A row whose prompt has p_b slots sees its input at positions p_b..p_b+t_b-1
and its i-th fed-back token (i from 0) at p_b + t_b + i, whatever the padding around it: exactly
what a plain forward pass over [prompt; input; generated] uses, and what transformers does given
`past_key_values` of length p_b (CausalLM's default positions P..P+T-1 for a prefix of P slots).
`Cache.position[b]` is the position of the next token fed. Llama's cached keys are rotated at
those positions (prompt keys arrive already rotated for 0..p_b-1); GPT-2's learned position
embeddings see them directly. An embeddings prompt ([1, P, D]) is run through the LM at
positions 0..P-1 and its keys/values act as the prefix: the same numbers as prepending the
embeddings to the input (pgm.apply_with_prompt).

Sampling happens inside the jitted step in float32 on the logits: temperature 0 is greedy
(argmax); otherwise logits / temperature, then top-k, then top-p (nucleus), then a categorical
draw with key fold_in(row key, index of the token), so a row's tokens depend on its own key
only, not on its batch companions or on how the host splits the decoding into calls.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from metal_jax.models.base import CausalLM
from metal_jax.models.layers import KV
from metal_jax.pgm import Prompt

FINISH_REASONS = ('stop', 'eos', 'length')
MIN_BUCKET = 8  # smallest bucket of the length axes (input, prompt, new tokens)

# Traces of each jitted function (a Python side effect, so it counts compilations of new shapes,
# not calls): lets tests and the service check that the buckets keep compilations bounded.
TRACES: collections.Counter = collections.Counter()


# ----------------------------------------------------------------------------- parameters


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How one request is decoded.

  max_new_tokens  tokens to generate at most (>= 1)
  temperature     0: greedy; otherwise softmax(logits / temperature)
  top_k           keep the k most likely tokens (0: off)
  top_p           keep the smallest most-likely set of probability >= top_p (1.0: off)
  stop            stop strings: the text is cut before the first one (needs a tokenizer)
  """
  max_new_tokens: int = 16
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  stop: tuple[str, ...] = ()

  def __post_init__(self):
    def fail(field, msg):
      raise ValueError(f'{field}: {msg} (got {getattr(self, field)!r})')

    is_int = lambda x: isinstance(x, (int, np.integer)) and not isinstance(x, bool)
    is_num = lambda x: isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(
        x, bool)
    if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
      fail('max_new_tokens', 'must be an int >= 1')
    if not is_num(self.temperature) or not math.isfinite(self.temperature):
      fail('temperature', 'must be a finite number')
    if self.temperature < 0:
      fail('temperature', 'must be >= 0')
    if not is_int(self.top_k) or self.top_k < 0:
      fail('top_k', 'must be an int >= 0')
    if not is_num(self.top_p) or not 0 < self.top_p <= 1:
      fail('top_p', 'must be in (0, 1]')
    if isinstance(self.stop, str):  # a bare string would iterate as characters
      fail('stop', 'must be a tuple of strings, not a string')
    stop = tuple(self.stop)
    if not all(isinstance(s, str) and s for s in stop):
      fail('stop', 'must hold non-empty strings')
    object.__setattr__(self, 'stop', stop)  # a list becomes a tuple (hashable, frozen)


@dataclasses.dataclass
class GenerationResult:
  """One row's output. `tokens` are the new tokens (an EOS token included, as transformers
  returns it; with a stop string, up to the token that completed it). `text` (with a tokenizer)
  decodes them without the EOS token and is cut before the first stop string."""
  tokens: list[int]
  text: str | None
  finish_reason: str  # 'stop' | 'eos' | 'length'


# ----------------------------------------------------------------------------- state


@flax.struct.dataclass
class Cache:
  """The KV cache (layout and positions: the module docstring)."""
  k: jax.Array  # [L, B, S, K, H]
  v: jax.Array  # [L, B, S, K, H]
  valid: jax.Array  # [B, S] bool: slots a query may attend to
  length: jax.Array  # [B] int32: the slot the next fed token's keys/values go to
  position: jax.Array  # [B] int32: the position of the next fed token


@flax.struct.dataclass
class DecodeState:
  """Everything a decode step reads and writes; rows are independent."""
  cache: Cache
  last: jax.Array  # [B] int32: the last sampled token (fed at the next step)
  tokens: jax.Array  # [B, N] int32: sampled tokens (the first n_new[b] are meaningful)
  n_new: jax.Array  # [B] int32: tokens sampled so far
  done: jax.Array  # [B] bool: the row no longer changes
  eos: jax.Array  # [B] bool: finished by an EOS token
  keys: jax.Array  # [B, ...] uint32: each row's raw PRNG key
  temperature: jax.Array  # [B] float32
  top_k: jax.Array  # [B] int32
  top_p: jax.Array  # [B] float32
  max_new: jax.Array  # [B] int32


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
  """The power of two >= max(n, minimum): the fixed sizes compilations are keyed on."""
  return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def eos_ids(config) -> tuple[int, ...]:
  eos = getattr(config, 'eos_token_id', None)
  if eos is None:
    return ()
  return tuple(int(e) for e in (eos if isinstance(eos, (tuple, list)) else (eos,)))


def _learned_positions(module: CausalLM) -> bool:
  """Learned position embeddings (GPT-2) have a table of config.max_len rows to stay within."""
  return type(module).embed_positions is not CausalLM.embed_positions


# ----------------------------------------------------------------------------- sampling


def sample(logits: jax.Array, keys: jax.Array, index: jax.Array, temperature: jax.Array,
           top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """One token per row from logits [B, V] (float32): greedy where temperature == 0, otherwise
  a draw from softmax(logits / temperature) restricted to the top_k (0: all) and then to the
  top_p nucleus (1.0: all), with key fold_in(keys[b], index[b]). -> [B] int32."""
  logits = logits.astype(jnp.float32)
  v = logits.shape[-1]
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  x = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
  desc = -jnp.sort(-x, axis=-1)  # [B, V], most likely first
  k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
  in_k = jnp.arange(v)[None] < k[:, None]
  kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)
  x = jnp.where(x >= kth, x, -jnp.inf)
  # Nucleus over what top-k kept: the most likely tokens whose preceding mass is < top_p (the
  # first always), i.e. the smallest set reaching top_p; the threshold is its least logit.
  probs = jax.nn.softmax(jnp.where(in_k, desc, -jnp.inf), axis=-1)
  keep = ((jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]) & in_k
  keep = keep | (jnp.arange(v)[None] == 0)
  floor = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
  x = jnp.where((top_p[:, None] >= 1.0) | (x >= floor), x, -jnp.inf)  # 1.0: exactly off
  row_keys = jax.vmap(jax.random.fold_in)(keys, index)
  drawn = jax.vmap(jax.random.categorical)(row_keys, x).astype(jnp.int32)
  return jnp.where(temperature > 0, drawn, greedy)


# ----------------------------------------------------------------------------- jitted steps


def _write(cache: jax.Array, new: jax.Array, slot: jax.Array) -> jax.Array:
  """cache [L, B, S, K, H] with new [L, B, 1, K, H] written at slot[b] of each row b."""
  upd = lambda c, n, s: jax.lax.dynamic_update_slice(c, n, (0, s, 0, 0))
  return jax.vmap(upd, in_axes=(1, 1, 0), out_axes=1)(cache, new.astype(cache.dtype), slot)


@functools.partial(jax.jit, static_argnames=('module', 'n_new'))
def prefill(module: CausalLM, params: dict, prefix: KV | None, prefix_len: jax.Array,
            input_ids: jax.Array, input_len: jax.Array, keys: jax.Array, temperature: jax.Array,
            top_k: jax.Array, top_p: jax.Array, max_new: jax.Array, *, n_new: int
            ) -> DecodeState:
  """Runs the prompts' prefix (KV of [L, B, P, K, H], row b's first prefix_len[b] slots real)
  and the right-padded input_ids [B, T] (row b's first input_len[b] real), fills a cache of
  S = P + T + n_new slots and samples each row's first token from the logits at its last real
  input token. Rows with input_len 0 are batch padding: done from the start."""
  TRACES['prefill'] += 1
  cfg = module.config
  b, t = input_ids.shape
  p = 0 if prefix is None else prefix.k.shape[2]
  s = p + t + n_new
  in_mask = jnp.arange(t)[None] < input_len[:, None]  # [B, T]
  pre_mask = jnp.arange(p)[None] < prefix_len[:, None]  # [B, P]
  # Padding gets position 0: in range of GPT-2's position table whatever the bucket.
  positions = jnp.where(in_mask, prefix_len[:, None] + jnp.arange(t)[None], 0)
  last = jnp.maximum(input_len - 1, 0)
  out = module.apply({'params': params}, input_ids, in_mask.astype(jnp.int32), prefix,
                     prefix_mask=None if prefix is None else pre_mask, positions=positions,
                     logit_positions=last[:, None], return_kv=True)
  dtype = cfg.jnp_dtype

  def fill(pre, inp):  # [L, B, P, K, H], [L, B, T, K, H] -> [L, B, S, K, H]
    parts = ([] if pre is None else [pre.astype(dtype)]) + [inp.astype(dtype)]
    tail = jnp.zeros(inp.shape[:2] + (n_new,) + inp.shape[3:], dtype)
    return jnp.concatenate(parts + [tail], axis=2)

  cache = Cache(k=fill(None if prefix is None else prefix.k, out.kv.k),
                v=fill(None if prefix is None else prefix.v, out.kv.v),
                valid=jnp.concatenate([pre_mask, in_mask, jnp.zeros((b, n_new), bool)], axis=1),
                length=(p + input_len).astype(jnp.int32),
                position=(prefix_len + input_len).astype(jnp.int32))
  assert cache.k.shape[2] == s
  tok = sample(out.logits[:, 0], keys, jnp.zeros((b,), jnp.int32), temperature, top_k, top_p)
  real = input_len > 0
  is_eos = jnp.isin(tok, jnp.asarray(eos_ids(cfg) or (-1,), jnp.int32)) & real
  return DecodeState(
      cache=cache, last=tok, tokens=jnp.zeros((b, n_new), jnp.int32).at[:, 0].set(tok),
      n_new=real.astype(jnp.int32), done=~real | is_eos | (max_new <= 1), eos=is_eos,
      keys=keys, temperature=temperature, top_k=top_k, top_p=top_p, max_new=max_new)


def decode_step(module: CausalLM, params: dict, state: DecodeState) -> DecodeState:
  """Feeds each row's last token (attending to the whole cache, prefix_mask = valid slots, at
  the row's next position), writes its keys/values at the row's slot and samples the next
  token. Rows that are done stay as they are."""
  c = state.cache
  active = ~state.done
  # A finished row is still computed (fixed shapes); position 0 keeps it in GPT-2's table.
  positions = jnp.where(active, c.position, 0)[:, None]
  out = module.apply({'params': params}, state.last[:, None],
                     jnp.ones_like(state.last)[:, None], KV(c.k, c.v), prefix_mask=c.valid,
                     positions=positions, return_kv=True)
  written = jax.nn.one_hot(c.length, c.valid.shape[1], dtype=bool) & active[:, None]
  cache = Cache(k=_write(c.k, out.kv.k, c.length), v=_write(c.v, out.kv.v, c.length),
                valid=c.valid | written, length=c.length + active, position=c.position + active)
  tok = sample(out.logits[:, 0], state.keys, state.n_new, state.temperature, state.top_k,
               state.top_p)
  n_cols = state.tokens.shape[1]
  tokens = jnp.where(active[:, None] & (jnp.arange(n_cols)[None] == state.n_new[:, None]),
                     tok[:, None], state.tokens)
  n_new = state.n_new + active
  eos = jnp.isin(tok, jnp.asarray(eos_ids(module.config) or (-1,), jnp.int32)) & active
  return state.replace(cache=cache, last=jnp.where(active, tok, state.last), tokens=tokens,
                       n_new=n_new, done=state.done | eos | (n_new >= state.max_new),
                       eos=state.eos | eos)


@functools.partial(jax.jit, static_argnames=('module',), donate_argnames=('state',))
def decode(module: CausalLM, params: dict, state: DecodeState, n_steps: jax.Array
           ) -> DecodeState:
  """Up to n_steps decode steps (a traced count: any number, one compilation), stopping early
  once every row is done."""
  TRACES['decode'] += 1

  def cond(carry):
    i, st = carry
    return (i < n_steps) & ~jnp.all(st.done)

  def body(carry):
    i, st = carry
    return i + 1, decode_step(module, params, st)

  return jax.lax.while_loop(cond, body, (jnp.int32(0), state))[1]


@functools.partial(jax.jit, static_argnames=('module',))
def embeds_kv(module: CausalLM, params: dict, embeds: jax.Array, length: jax.Array) -> KV:
  """An embeddings prompt [B, P, D] (row b's first length[b] real, right padded) -> its keys
  and values [L, B, P, K, H] at positions 0..P-1, to serve as a prefix."""
  TRACES['embeds_kv'] += 1
  b, p = embeds.shape[:2]
  mask = jnp.arange(p)[None] < length[:, None]
  out = module.apply({'params': params}, None, mask.astype(jnp.int32), input_embeds=embeds,
                     positions=jnp.where(mask, jnp.arange(p)[None], 0), return_kv=True,
                     return_logits=False)
  return KV(out.kv.k, out.kv.v)


# ----------------------------------------------------------------------------- host driver


def _row_keys(rng, n: int, n_rows: int) -> np.ndarray:
  """Raw uint32 keys, one per row of the padded batch: rng is one key (request i gets
  fold_in(rng, i)) or one key per request ([n] typed keys or [n, 2] raw keys)."""
  rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
  typed = jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
  per_row = rng.ndim == (1 if typed else 2)
  if per_row:
    if rng.shape[0] != n:
      raise ValueError(f'rng: {rng.shape[0]} keys for {n} requests')
    keys = rng
  else:
    keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(n))
  keys = np.asarray(jax.random.key_data(keys) if typed else keys, np.uint32)
  return np.concatenate([keys, np.zeros((n_rows - n,) + keys.shape[1:], np.uint32)])


def _prompt_kvs(module: CausalLM, params: dict, prompts: Sequence[Prompt | None]
                ) -> list[tuple[np.ndarray, np.ndarray] | None]:
  """Each row's prompt as float32 keys/values [L, p, K, H] (embeddings run through the LM)."""
  cfg = module.config
  want = (cfg.n_layers, cfg.n_kv_heads, cfg.head_dim)
  out = []
  for i, pr in enumerate(prompts):
    if pr is None:
      out.append(None)
      continue
    if not isinstance(pr, Prompt) or (pr.kv is None) == (pr.embeds is None):
      raise ValueError(f'prompts[{i}]: expected a Prompt with kv or embeds, or None')
    if pr.batch_size != 1:
      raise ValueError(f'prompts[{i}]: a row\'s prompt has batch 1, got {pr.batch_size}')
    if pr.kv is not None:
      k, v = (np.asarray(a[:, 0], np.float32) for a in (pr.kv.k, pr.kv.v))
      got = (k.shape[0],) + k.shape[2:]
      if got != want or v.shape != k.shape:
        raise ValueError(f'prompts[{i}]: kv of [L, K, H] = {got}, the model has {want}')
    else:
      e = np.asarray(pr.embeds, np.float32)
      if e.shape[-1] != cfg.d_model:
        raise ValueError(f'prompts[{i}]: embeds of width {e.shape[-1]}, the model has '
                         f'{cfg.d_model}')
      p = e.shape[1]
      padded = np.zeros((1, bucket(p), e.shape[2]), np.float32)
      padded[:, :p] = e
      kv = embeds_kv(module, params, jnp.asarray(padded, cfg.jnp_dtype), jnp.asarray([p]))
      k, v = (np.asarray(a[:, 0, :p], np.float32) for a in (kv.k, kv.v))
    out.append((k, v))
  return out


def _stop_cut(tokenizer, toks: list[int], stops: tuple[str, ...], start: int
              ) -> tuple[int, str] | None:
  """The first n > start at which decode(toks[:n]) holds a stop string: (n, text cut before
  the earliest stop string), or None."""
  for n in range(start + 1, len(toks) + 1):
    text = tokenizer.decode(toks[:n])
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    if hits:
      return n, text[:min(hits)]
  return None


def generate(module: CausalLM, params: dict, prompts: Sequence[Prompt | None],
             inputs: Sequence[Sequence[int] | np.ndarray],
             params_list: Sequence[SamplingParams] | SamplingParams, *, rng,
             tokenizer: Any = None, stop_check_every: int = 4) -> list[GenerationResult]:
  """Generates a continuation of each inputs[i] given prompts[i] (one batch, one row each).

  prompts[i]: a Prompt of kv [L, 1, P, K, H] or embeds [1, P, D], or None; lengths may differ
  between rows. inputs[i]: the row's token ids (at least one). params_list: one SamplingParams
  per row, or one for all. rng: a PRNG key (row i uses fold_in(rng, i)) or one key per row.
  tokenizer: anything with .decode(list[int]) -> str; needed for text and stop strings, which
  are checked on the host every `stop_check_every` decode steps (results do not depend on it).
  Finished rows stop on EOS (module.config.eos_token_id, an int or a tuple), on max_new_tokens
  or on a stop string.
  """
  cfg = module.config
  n = len(inputs)
  if len(prompts) != n:
    raise ValueError(f'prompts: {len(prompts)} for {n} inputs')
  if n == 0:
    return []
  sp = [params_list] * n if isinstance(params_list, SamplingParams) else list(params_list)
  if len(sp) != n or not all(isinstance(x, SamplingParams) for x in sp):
    raise ValueError(f'params_list: expected a SamplingParams or {n} of them')
  if stop_check_every < 1:
    raise ValueError(f'stop_check_every: must be >= 1 (got {stop_check_every})')
  if tokenizer is None and any(x.stop for x in sp):
    raise ValueError('stop: stop strings need a tokenizer (they are matched on the text)')
  ids = [np.asarray(x, np.int64).reshape(-1) for x in inputs]
  for i, x in enumerate(ids):
    if x.size == 0:
      raise ValueError(f'inputs[{i}]: empty (generation needs at least one input token)')
    if x.min() < 0 or x.max() >= cfg.vocab_size:
      raise ValueError(f'inputs[{i}]: token ids outside [0, {cfg.vocab_size})')
  kvs = _prompt_kvs(module, params, prompts)
  p_lens = [0 if kv is None else kv[0].shape[1] for kv in kvs]
  if _learned_positions(module):  # the last fed token sits at p + t + max_new - 2
    for i in range(n):
      if p_lens[i] + ids[i].size + sp[i].max_new_tokens - 1 > cfg.max_len:
        raise ValueError(f'inputs[{i}]: prompt {p_lens[i]} + input {ids[i].size} + '
                         f'max_new_tokens {sp[i].max_new_tokens} exceed the model\'s '
                         f'{cfg.max_len} positions')

  rows = bucket(n, 1)
  t_b = bucket(max(x.size for x in ids))
  n_b = bucket(max(x.max_new_tokens for x in sp))
  p_max = max(p_lens)
  input_ids = np.zeros((rows, t_b), np.int32)
  input_len = np.zeros((rows,), np.int32)
  for i, x in enumerate(ids):
    input_ids[i, :x.size], input_len[i] = x, x.size
  prefix, prefix_len = None, np.zeros((rows,), np.int32)
  if p_max:  # no prompt at all: no prefix (a zero-width one has nothing to attend to)
    p_b = bucket(p_max)
    shape = (cfg.n_layers, rows, p_b, cfg.n_kv_heads, cfg.head_dim)
    k, v = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    for i, kv in enumerate(kvs):
      if kv is not None:
        k[:, i, :p_lens[i]], v[:, i, :p_lens[i]] = kv
        prefix_len[i] = p_lens[i]
    prefix = KV(jnp.asarray(k, cfg.jnp_dtype), jnp.asarray(v, cfg.jnp_dtype))

  def per_row(field, dtype, fill):
    return jnp.asarray([getattr(x, field) for x in sp] + [fill] * (rows - n), dtype)

  state = prefill(module, params, prefix, jnp.asarray(prefix_len), jnp.asarray(input_ids),
                  jnp.asarray(input_len), jnp.asarray(_row_keys(rng, n, rows)),
                  per_row('temperature', jnp.float32, 0.0), per_row('top_k', jnp.int32, 0),
                  per_row('top_p', jnp.float32, 1.0), per_row('max_new_tokens', jnp.int32, 1),
                  n_new=n_b)

  # The host loop: decode until every row is done, checking stop strings between calls.
  checked = [0] * n  # tokens of row i already searched for stop strings
  stopped: dict[int, tuple[int, str]] = {}
  eos_set = set(eos_ids(cfg))
  chunk = stop_check_every if any(x.stop for x in sp) else n_b
  while True:
    tokens, n_new, done, eos = jax.device_get((state.tokens, state.n_new, state.done,
                                                state.eos))
    newly = np.zeros((rows,), bool)
    for i in range(n):
      if not sp[i].stop or i in stopped:
        continue
      toks = [int(x) for x in tokens[i, :n_new[i]]]
      if toks and toks[-1] in eos_set and eos[i]:
        toks = toks[:-1]  # the EOS token is not text
      hit = _stop_cut(tokenizer, toks, sp[i].stop, checked[i])
      checked[i] = len(toks)
      if hit is not None:
        stopped[i] = hit
        newly[i] = not done[i]
    if newly.any():
      state = state.replace(done=state.done | jnp.asarray(newly))
      done = done | newly
    if done[:n].all():
      break
    state = decode(module, params, state, jnp.int32(chunk))

  results = []
  for i in range(n):
    toks = [int(x) for x in tokens[i, :n_new[i]]]
    if i in stopped:
      cut, text = stopped[i]
      results.append(GenerationResult(toks[:cut], text, 'stop'))
      continue
    reason = 'eos' if eos[i] else 'length'
    text = None
    if tokenizer is not None:
      text = tokenizer.decode(toks[:-1] if reason == 'eos' else toks)
    results.append(GenerationResult(toks, text, reason))
  return results
