"""The LM service's engine: a trained run's PGM and frozen LM, the prompt store, a device slot
table of active prompts, and batched classification and generation over many tasks' prompts.

Synchronous and not thread-safe by design: the HTTP layer (serving.server) runs every engine call
on one worker thread, batching concurrent requests into single calls.

Prompt ids are the store's content hashes of (identity, examples, owner); identity is what
determines a prompt: the run and checkpoint step, the base LM, the PGM design and length, and the
run's split. Registering the same examples again returns the same id without a PGM pass.

Classification is MetaICL scoring: the mean NLL of each option's tokens after the prompt and the
input (direct format: the input as a first example, each option with its leading newline), the
lowest wins; `serving.scoring` computes it, the path eval.py scores with, so a served score equals
the evaluated one. Rows of any prompts share a call (R = 1 row per block): each row gathers its
prompt's slot from the device-resident `SlotTable`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from metal_jax import evaluation, experiment
from metal_jax.data.tasks import tokenize_examples
from metal_jax.models.layers import KV
from metal_jax.pgm import Prompt
from metal_jax.serving import generate as gen
from metal_jax.serving import scoring
from metal_jax.serving.store import PromptStore

CHARS_PER_TOKEN = 64  # more characters a token than any tokenizer packs: a cheap length bound


class RequestError(ValueError):
  """A request's own mistake: `field` names the JSON field at fault; `status` is the HTTP answer
  (422 a malformed field, 413 one over a size limit)."""

  def __init__(self, field: str, message: str, status: int = 422):
    super().__init__(f'{field}: {message}')
    self.field, self.status = field, status


@functools.partial(jax.jit, donate_argnums=(0,))
def _set_slot(table: KV, slot: jax.Array, kv: KV) -> KV:
  """table [L, S, C, K, H] with slot `slot` overwritten by kv [L, C, K, H] (in place: donated)."""
  return KV(table.k.at[:, slot].set(kv.k), table.v.at[:, slot].set(kv.v))


class SlotTable:
  """Active prompts' encoded contexts on the device, stacked on a slot axis (JetStream's adapter
  slots): k, v [L, S, C, K, H], each slot's length [S]; least recently used slot evicted.
  A slot holds [prompt ; lead]: lead is the spec's BOS when the tokenizer adds one (a served
  query then reads what eval's rows read, scoring.Job.context_tokens with no X^L)."""

  def __init__(self, module, params, n_slots: int, width: int, lead: np.ndarray | None = None):
    cfg = module.config
    self.module, self.params = module, params
    self.lead = np.zeros(0, np.int32) if lead is None else np.asarray(lead, np.int32)
    self.width = gen.bucket(width)
    shape = (cfg.n_layers, n_slots, self.width, cfg.n_kv_heads, cfg.head_dim)
    self.kv = KV(jnp.zeros(shape, cfg.jnp_dtype), jnp.zeros(shape, cfg.jnp_dtype))
    self.length = np.zeros((n_slots,), np.int32)
    self.slots: collections.OrderedDict[str, int] = collections.OrderedDict()
    self.free = list(range(n_slots))  # slots holding nothing servable
    self.n_slots = n_slots
    self.loads = self.evictions = 0

  @property
  def nbytes(self) -> int:
    return 2 * self.kv.k.size * self.kv.k.dtype.itemsize

  def assign(self, keys: Sequence[str], prompt_of) -> list[int]:
    """The slot of each key (loading prompt_of(key) into a free or least recently used slot when
    absent). At most n_slots distinct keys: a call's prompts must all be resident at once."""
    distinct = list(dict.fromkeys(keys))
    if len(distinct) > self.n_slots:
      raise ValueError(f'{len(distinct)} prompts in one call, the table has {self.n_slots} slots')
    for key in distinct:  # the call's own keys are the most recent: never evicted below
      if key in self.slots:
        self.slots.move_to_end(key)
    for key in distinct:
      if key in self.slots:
        continue
      # Encoded before a slot is taken: a failure leaves the table as it was.
      ctx = scoring.encode_context(self.module, self.params, prompt_of(key), self.lead)
      if ctx.length > self.width:
        raise ValueError(f'a prompt of {ctx.length} positions exceeds the slot width {self.width}')
      if self.free:
        slot = self.free.pop()
      else:
        _, slot = self.slots.popitem(last=False)
        self.evictions += 1
      pad = lambda a: jnp.pad(a[:, 0], ((0, 0), (0, self.width - ctx.length), (0, 0), (0, 0)))
      self.kv = _set_slot(self.kv, jnp.int32(slot), KV(pad(ctx.kv.k), pad(ctx.kv.v)))
      self.length[slot] = ctx.length
      self.slots[key] = slot
      self.loads += 1
    return [self.slots[k] for k in keys]

  def table(self) -> scoring.ContextTable:
    return scoring.ContextTable(self.kv, jnp.asarray(self.length))

  def drop(self, key: str) -> None:
    """Frees key's slot (its contents are overwritten by the slot's next use)."""
    slot = self.slots.pop(key, None)
    if slot is not None:
      self.free.append(slot)


@dataclasses.dataclass
class ClassifyRequest:
  prompt_id: str
  inputs: list[str]
  options: list[str]
  owner: str = ''


@dataclasses.dataclass
class GenerateRequest:
  prompt_id: str
  input: str
  params: gen.SamplingParams
  owner: str = ''
  seed: int = 0


class Engine:
  """serve.py's engine over a trained run (its latest checkpoint, or `step`)."""

  def __init__(self, workdir: str, *, step: int | None = None, store_dir: str = '',
               host_budget_bytes: int = 256 << 20, slots: int = 64,
               device_budget_bytes: int = 1 << 30, max_rows: int = 64, max_examples: int = 64,
               max_input_tokens: int = 0, truncate_inputs: bool = False):
    """max_input_tokens: tokens an input may have (0 or more than the run's max_example_len: that
    length, which eval.py cuts its inputs to); longer inputs are refused (413) or, with
    truncate_inputs, cut from the left as eval.py cuts them."""
    self.trained = tr = experiment.load_trained(workdir, step)
    self.lm, self.spec, self.tokenizer = tr.lm, tr.spec, tr.tokenizer
    cfg = tr.config
    self.identity = {'workdir': os.path.abspath(workdir), 'step': int(tr.step),
                     'model': str(cfg.model), 'design': tr.pgm_cfg.design,
                     'prompt_len': int(tr.pgm_cfg.prompt_len),
                     'split': [int(cfg.n_prompt_examples), int(cfg.n_lm_examples)]}
    self.store = PromptStore(store_dir or os.path.join(workdir, 'prompts'), self.identity,
                             host_budget_bytes)
    c = tr.lm.config
    width = gen.bucket(tr.pgm_cfg.prompt_len + len(self.spec.bos))
    per_slot = 2 * c.n_layers * width * c.n_kv_heads * c.head_dim * jnp.dtype(c.jnp_dtype).itemsize
    n_slots = max(1, min(slots, device_budget_bytes // per_slot))
    self.slots = SlotTable(tr.lm.module, tr.lm.params, n_slots, width, self.spec.bos)
    self.max_rows = max_rows
    self.max_examples = max_examples
    self.max_example_len = int(cfg.max_example_len)
    self.max_input_tokens = min(max_input_tokens or self.max_example_len, self.max_example_len)
    self.truncate_inputs = truncate_inputs

  # ------------------------------------------------------------------- prompts

  def register(self, examples: Sequence[dict], task: str = '', owner: str = ''
               ) -> tuple[str, bool, float]:
    """(prompt_id, created, pgm_ms): one PGM pass over the examples, unless already stored."""
    if not isinstance(examples, (list, tuple)) or not examples:
      raise RequestError('examples', 'a non-empty list of {"input", "output"} objects')
    if len(examples) > self.max_examples:
      raise RequestError('examples', f'{len(examples)} examples; at most {self.max_examples}',
                         413)
    for i, e in enumerate(examples):
      if not isinstance(e, dict) or set(e) != {'input', 'output'}:
        raise RequestError(f'examples[{i}]', 'an object with exactly "input" and "output"')
      for k in ('input', 'output'):
        if not isinstance(e[k], str) or (k == 'output' and not e[k].strip()):
          raise RequestError(f'examples[{i}].{k}', 'a string' + (' (non-empty)' if k == 'output'
                                                                  else ''))

    def make(canonical):
      task_ = tokenize_examples(list(canonical), self.tokenizer, self.max_example_len, 'request')
      tr = self.trained
      prompt = evaluation.prompt_for(tr.pgm_cfg, tr.lm.module, tr.lm.params, tr.trainable,
                                     task_, range(len(task_)), self.spec)
      return Prompt(kv=prompt.kv, embeds=prompt.embeds)

    return self.store.register(list(examples), make, task=task, owner=owner)

  def delete(self, pid: str, owner: str = '') -> None:
    self.store.delete(pid, owner)
    self.slots.drop(pid)

  # ------------------------------------------------------------------- requests

  def _input_ids(self, text: str) -> list[int]:
    return self.tokenizer(text, add_special_tokens=False)['input_ids']

  def _bounded(self, field: str, text: str) -> str:
    """A text whose tokenisation cannot stall the worker: over CHARS_PER_TOKEN characters a
    token allowed, refused (413) without tokenising, or its tail kept when truncating."""
    limit = CHARS_PER_TOKEN * self.max_input_tokens
    if len(text) <= limit:
      return text
    if not self.truncate_inputs:
      raise RequestError(field, f'{len(text)} characters; at most {self.max_input_tokens} tokens '
                         '(the server can cut longer inputs from the left: serve.py '
                         '--truncate_inputs)', 413)
    return text[-limit:]

  def _check_length(self, field: str, n: int) -> None:
    if n > self.max_input_tokens:
      raise RequestError(field, f'{n} tokens; at most {self.max_input_tokens} (the server can '
                         'cut longer inputs from the left: serve.py --truncate_inputs)', 413)

  def check(self, r: ClassifyRequest | GenerateRequest) -> Prompt:
    """The request's prompt, if the request can be served alone: raises the store's errors
    (unknown, another owner's, corrupt) or RequestError naming the field at fault. The server
    checks each request before batching, so one bad request never fails its batch."""
    prompt = self.store.get(r.prompt_id, r.owner)
    if isinstance(r, ClassifyRequest):
      if not r.options or len(set(r.options)) != len(r.options):
        raise RequestError('options', 'a non-empty list of distinct strings')
      for i, x in enumerate(r.inputs):
        x = self._bounded(f'inputs[{i}]', x)
        if not self.truncate_inputs:
          self._check_length(f'inputs[{i}]', len(self._input_ids(x)))
      return prompt
    n = len(self._input_ids(self._bounded('input', r.input)))
    if not self.truncate_inputs:
      self._check_length('input', n)
    n = min(n, self.max_input_tokens)
    if not n:
      raise RequestError('input', 'tokenises to nothing (generation needs at least a token)')
    n += len(self.spec.bos)
    if gen._learned_positions(self.lm.module):  # a position table bounds prompt + input + output
      limit = self.lm.config.max_len
      if prompt.length + n + r.params.max_new_tokens - 1 > limit:
        raise RequestError('max_new_tokens', f'the prompt ({prompt.length}) + input ({n} tokens)'
                           f' + max_new_tokens ({r.params.max_new_tokens}) exceed the model\'s '
                           f'{limit} positions')
    return prompt

  # ------------------------------------------------------------------- classification

  def classify(self, requests: Sequence[ClassifyRequest]) -> list[np.ndarray]:
    """Per request, scores [n_inputs, n_options] (mean option NLL; the argmin wins), all
    requests' rows in shared calls. Unknown prompts raise the store's UnknownPrompt."""
    for r in requests:
      self.check(r)  # ownership, integrity and the request's own fields, before any work
    keys = [r.prompt_id for r in requests]
    out = [np.zeros((len(r.inputs), len(r.options)), np.float32) for r in requests]
    # Chunks of at most n_slots distinct prompts (each call's prompts resident together).
    for start in range(0, len(requests), self.slots.n_slots):
      chunk = range(start, min(start + self.slots.n_slots, len(requests)))
      slots = self.slots.assign([keys[i] for i in chunk],
                                lambda k: self.store.get(k, requests[keys.index(k)].owner))
      rows, where = [], []
      for i, slot in zip(chunk, slots):
        r = requests[i]
        q = tokenize_examples([{'input': self._bounded('inputs', x), 'options': r.options}
                               for x in r.inputs], self.tokenizer, self.max_example_len)
        cut = lambda ids: ids[max(0, len(ids) - self.max_input_tokens):]  # the operator's limit
        job = scoring.Job(None, np.zeros(0, np.int32),
                          [(cut(a), cut(b), o) for a, b, o in
                           zip(q.input_first, q.input_rest, q.option_ids)], self.spec)
        for k, (_, query, y) in enumerate(scoring.job_rows(job)):  # no X^L: start 0
          rows.append(scoring.Row(slot, query, y))
          where.append((i, k // len(r.options), k % len(r.options)))
      for s0 in range(0, len(rows), self.max_rows):
        part = rows[s0:s0 + self.max_rows]
        got = scoring.score_rows(self.lm.module, self.lm.params, self.slots.table(), part,
                                 self.spec, rows_per_block=1,
                                 blocks_per_call=gen.bucket(len(part), 1))
        for (i, a, b), s in zip(where[s0:s0 + self.max_rows], got):
          out[i][a, b] = s
    return out

  # ------------------------------------------------------------------- generation

  def generate(self, requests: Sequence[GenerateRequest]) -> list[gen.GenerationResult]:
    if not requests:
      return []
    prompts = [self.check(r) for r in requests]
    # BOS (if the tokenizer adds one) first, as tokenizer(text) gives it; the input's tail fits.
    ids = [self.spec.bos.tolist() + self._input_ids(self._bounded('input', r.input))[
        -self.max_input_tokens:] for r in requests]
    keys = jnp.stack([jax.random.key(r.seed) for r in requests])
    return gen.generate(self.lm.module, self.lm.params, prompts, ids,
                        [r.params for r in requests], rng=keys, tokenizer=self.tokenizer)
