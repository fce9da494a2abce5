"""Meta-training episodes: X^P for the PGM, X^L + (x, y) for the frozen LM.

An episode draws one task, then n_P + n_L + Q distinct examples from it (Q queries, 1 by
default, each scored under the episode's one prompt). Sequences
follow MetaICL's direct format (the first example's input bare, later ones after
three newlines; outputs after one newline), are cut from the left to fit, and are
padded to a few bucket lengths so that jit compiles a handful of shapes.

Batches are a pure function of (seed, step): episode i of step s uses the RNG
seeded by (seed, s, i), whatever the number of processes; a process builds only
its own rows. The iterator's whole state is {seed, step}.

A batch comes in halves, built and collated separately: the PGM half (X^P and
the P slots: collate_pgm) and the LM half (X^L, x, y and the targets:
collate_lm); an episode is the pair, its batch both halves' keys (collate).
Scoring and prompt tuning use the LM half alone, prompt generation the PGM half.

Batch layout (numpy):
  pgm_ids   [B, Tp] int32  (BOS,) X^P then P placeholder slots, LEFT-padded (slots are
                           always the last P positions)
  pgm_mask  [B, Tp] int32  1 on real tokens and slots
  lm_ids    [B, Tl] int32  (BOS,) X^L, x, y, right-padded
  lm_mask   [B, Tl] int32
  target_pos  [B, Y] int32  positions in lm_ids whose next token is a y token
  target_ids  [B, Y] int32  the y tokens
  target_mask [B, Y] int32  1 where a y token is scored
  pgm_ids_i, pgm_mask_i      iterative generation (spec.prompt_chunks > 1): pass i's PGM half
With Q > 1 queries (spec.queries) the LM half's keys are [B, Q, ...]: episode b's queries
share its prompt (objective.nll_sum flattens them to B x Q consecutive rows).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from metal_jax.data.tasks import TokenizedTask

PAD_ID = 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class EpisodeSpec:
  n_prompt_examples: int = 16  # n_P: examples the PGM reads
  n_lm_examples: int = 0  # n_L: demonstrations the frozen LM sees
  prompt_len: int = 20  # P: padding slots / prompt positions
  max_len: int = 1024  # the model's limit (GPT-2: n_positions)
  buckets: tuple[int, ...] = ()  # sequence lengths to pad to; () = buckets_per_octave's
  # With buckets (): lengths from 32 up to max_len, this many per doubling (1: powers of two;
  # 4: 32, 40, 48, 56, 64, 80, ...): padding at most 1/n of a bucket, up to n times the shapes.
  buckets_per_octave: int = 1
  target_buckets: tuple[int, ...] = (4, 8, 16, 32, 64, 128, 256)
  # Iterative generation: PGM passes per episode, each reading n_P more examples and the previous
  # pass's prompt (pgm.generate's prev); the loss is the mean over the passes' prompts.
  prompt_chunks: int = 1
  # Queries (x, y) per episode, each scored under the episode's prompt: Equation 1's sum over
  # queries estimated with Q draws per PGM pass instead of one (the PGM pass costs the most).
  queries: int = 1
  # The tokenizer's BOS when it adds one (Llama; tasks.bos_token): the first token of every
  # sequence the PGM or the LM reads, as tokenizer(text) puts it. None: no BOS (GPT-2).
  bos_id: int | None = None

  @property
  def pgm_budget(self) -> int:
    return self.max_len - self.prompt_len  # BOS and X^P tokens; the P slots follow

  @property
  def lm_budget(self) -> int:
    return self.max_len - self.prompt_len  # the prompt takes positions 0..P-1

  @property
  def bos(self) -> np.ndarray:
    """[BOS] (int32), or no token when the tokenizer adds none."""
    return np.asarray([] if self.bos_id is None else [self.bos_id], np.int32)

  def with_prompt_len(self, prompt_len: int) -> 'EpisodeSpec':
    """This spec with room for a prompt of `prompt_len` positions (sequences are cut to
    max_len - P): score a prompt longer than prompt_len (BBTv2's 50) with it."""
    return self if prompt_len == self.prompt_len else dataclasses.replace(self, prompt_len=prompt_len)

  def length_buckets(self) -> tuple[int, ...]:
    if self.buckets:
      return tuple(sorted(set(self.buckets) | {self.max_len}))
    n = self.buckets_per_octave
    if n < 1 or 32 % n:
      raise ValueError(f'buckets_per_octave={n}: must be 1, 2, 4, 8, 16 or 32')
    b, out = 32, []
    while b < self.max_len:
      out += [x for x in range(b, 2 * b, b // n) if x < self.max_len]
      b *= 2
    return tuple(out) + (self.max_len,)


def bucket(n: int, buckets: Sequence[int]) -> int:
  for b in buckets:
    if n <= b:
      return b
  raise ValueError(f'length {n} exceeds the largest bucket {buckets[-1]}')


def concat_examples(task: TokenizedTask, idx: Sequence[int], with_outputs: bool = True) -> np.ndarray:
  """MetaICL direct concatenation of examples idx (input, then output)."""
  parts = []
  for j, e in enumerate(idx):
    parts.append(task.input_first[e] if j == 0 else task.input_rest[e])
    if with_outputs:
      parts.append(task.output_ids[e])
  return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


def left_truncate(x: np.ndarray, n: int) -> np.ndarray:
  return x[len(x) - n:] if len(x) > n else x


@dataclasses.dataclass
class LMHalf:
  """What the frozen LM reads and scores: BOS (if any), X^L + x (cut from the left to fit),
  then y."""
  context: np.ndarray  # BOS, X^L + x
  target: np.ndarray  # y


@dataclasses.dataclass
class Episode:
  """A meta-training episode: the PGM half (X^P, truncated) and the LM half (one a query)."""
  pgm_tokens: np.ndarray  # BOS (if any) and X^P, truncated
  lm: LMHalf
  more_pgm: tuple[np.ndarray, ...] = ()  # iterative generation: the next passes' PGM halves
  more_lm: tuple[LMHalf, ...] = ()  # the queries after the first (spec.queries > 1)

  @property
  def lm_halves(self) -> tuple[LMHalf, ...]:
    return (self.lm,) + tuple(self.more_lm)

  @property
  def pgm_chunks(self) -> tuple[np.ndarray, ...]:
    return (self.pgm_tokens,) + tuple(self.more_pgm)

  @property
  def lm_context(self) -> np.ndarray:
    return self.lm.context

  @property
  def target(self) -> np.ndarray:
    return self.lm.target


def build_pgm_half(pgm_tokens: np.ndarray, spec: EpisodeSpec) -> np.ndarray:
  """BOS (if any), then X^P cut from the left so that they and the P slots fit the model."""
  return np.concatenate([spec.bos, left_truncate(pgm_tokens, spec.pgm_budget - len(spec.bos))])


def build_lm_half(demo_tokens: np.ndarray, x_first: np.ndarray, x_rest: np.ndarray,
                  y: np.ndarray, spec: EpisodeSpec) -> LMHalf:
  """BOS (if any), then (X^L, x) cut from the left to fit after the prompt; x is bare when X^L
  is empty."""
  x = x_rest if len(demo_tokens) else x_first
  seq = left_truncate(np.concatenate([demo_tokens, x]), spec.lm_budget - len(y) - len(spec.bos))
  return LMHalf(np.concatenate([spec.bos, seq]).astype(np.int32), y)


def make_episode(task: TokenizedTask, prompt_idx: Sequence[int], demo_idx: Sequence[int],
                 query: int | Sequence[int], spec: EpisodeSpec,
                 more_prompt_idx: Sequence[Sequence[int]] = ()) -> Episode:
  """One meta-training episode, all examples from `task` (query: one example or several, each
  after the same X^L; more_prompt_idx: the examples of the iterative passes after the first)."""
  demos = concat_examples(task, demo_idx)
  lm = [build_lm_half(demos, task.input_first[q], task.input_rest[q], task.output_ids[q], spec)
        for q in np.atleast_1d(query)]
  return Episode(build_pgm_half(concat_examples(task, prompt_idx), spec), lm[0],
                 tuple(build_pgm_half(concat_examples(task, i), spec) for i in more_prompt_idx),
                 tuple(lm[1:]))


def collate_pgm(pgm_tokens: Sequence[np.ndarray], spec: EpisodeSpec,
                pgm_len: int) -> dict[str, np.ndarray]:
  """PGM halves -> pgm_ids, pgm_mask [B, pgm_len]: X^P left-padded, the P slots last."""
  b, p = len(pgm_tokens), spec.prompt_len
  out = {'pgm_ids': np.full((b, pgm_len), PAD_ID, np.int32),
         'pgm_mask': np.zeros((b, pgm_len), np.int32)}
  for i, x in enumerate(pgm_tokens):
    n = len(x)
    out['pgm_ids'][i, pgm_len - p - n:pgm_len - p] = x
    out['pgm_mask'][i, pgm_len - p - n:] = 1
  return out


def collate_lm(halves: Sequence[LMHalf], lm_len: int, target_len: int) -> dict[str, np.ndarray]:
  """LM halves -> lm_ids, lm_mask [B, lm_len] (right-padded) and target_pos, target_ids,
  target_mask [B, target_len]."""
  b = len(halves)
  out = {'lm_ids': np.full((b, lm_len), PAD_ID, np.int32),
         'lm_mask': np.zeros((b, lm_len), np.int32),
         'target_pos': np.zeros((b, target_len), np.int32),
         'target_ids': np.full((b, target_len), PAD_ID, np.int32),
         'target_mask': np.zeros((b, target_len), np.int32)}
  for i, h in enumerate(halves):
    seq = np.concatenate([h.context, h.target])
    out['lm_ids'][i, :len(seq)] = seq
    out['lm_mask'][i, :len(seq)] = 1
    ny = len(h.target)
    out['target_pos'][i, :ny] = len(h.context) - 1 + np.arange(ny)
    out['target_ids'][i, :ny] = h.target
    out['target_mask'][i, :ny] = 1
  return out


def collate(episodes: Sequence[Episode], spec: EpisodeSpec, pgm_len: int, lm_len: int,
            target_len: int) -> dict[str, np.ndarray]:
  """Episodes -> both halves' keys (the layout in the module docstring); iterative passes
  after the first add pgm_ids_{i}, pgm_mask_{i} (i = 1, 2, ...: pgm_chunk_keys); Q > 1 queries
  an episode give the LM keys [B, Q, ...]."""
  q = len(episodes[0].lm_halves)
  if any(len(e.lm_halves) != q for e in episodes):
    raise ValueError('every episode of a batch must have the same number of queries')
  out = collate_lm([h for e in episodes for h in e.lm_halves], lm_len, target_len)
  if q > 1:
    out = {k: v.reshape(len(episodes), q, *v.shape[1:]) for k, v in out.items()}
  for i in range(len(episodes[0].pgm_chunks)):
    half = collate_pgm([e.pgm_chunks[i] for e in episodes], spec, pgm_len)
    ids, mask = pgm_chunk_keys(i)
    out.update({ids: half['pgm_ids'], mask: half['pgm_mask']})
  return out


def pgm_chunk_keys(i: int) -> tuple[str, str]:
  """The batch keys of iterative pass i's PGM half: pgm_ids, pgm_mask; then pgm_ids_1, ..."""
  return ('pgm_ids', 'pgm_mask') if i == 0 else (f'pgm_ids_{i}', f'pgm_mask_{i}')


def pgm_length(pgm_tokens: Sequence[np.ndarray], spec: EpisodeSpec) -> int:
  """The bucketed PGM length that fits every X^P and the P slots."""
  return bucket(max(len(x) for x in pgm_tokens) + spec.prompt_len, spec.length_buckets())


def lm_lengths(halves: Sequence[LMHalf], spec: EpisodeSpec) -> tuple[int, int]:
  """Bucketed (lm_len, target_len) that fit every LM half (after a prompt of spec.prompt_len)."""
  lm_buckets = tuple(b for b in spec.length_buckets() if b < spec.lm_budget) + (spec.lm_budget,)
  lm = bucket(max(len(h.context) + len(h.target) for h in halves), lm_buckets)
  tgt = bucket(max(len(h.target) for h in halves), spec.target_buckets + (spec.lm_budget,))
  return lm, tgt


def batch_shapes(episodes: Sequence[Episode], spec: EpisodeSpec) -> tuple[int, int, int]:
  """Bucketed (pgm_len, lm_len, target_len) that fit every episode."""
  return (pgm_length([x for e in episodes for x in e.pgm_chunks], spec),
          *lm_lengths([h for e in episodes for h in e.lm_halves], spec))


class EpisodeSampler:
  """Deterministic meta-training batches over a list of tokenised tasks."""

  def __init__(self, tasks: Sequence[TokenizedTask], spec: EpisodeSpec, batch_size: int,
               seed: int, process_index: int = 0, process_count: int = 1):
    need = spec.prompt_chunks * spec.n_prompt_examples + spec.n_lm_examples + spec.queries
    small = [t.path for t in tasks if len(t) < need]
    if small:
      raise ValueError(f'tasks with fewer than chunks x n_P + n_L + queries = {need} examples: '
                       f'{small}')
    if batch_size % process_count:
      raise ValueError(f'batch_size={batch_size} is not divisible by {process_count} processes')
    self.tasks, self.spec, self.batch_size, self.seed = list(tasks), spec, batch_size, seed
    self.process_index, self.process_count = process_index, process_count
    self.step = 0
    # Task file -> fingerprint (content, tokenizer, example cap): fixed for the sampler's life.
    self.fingerprints = {os.path.basename(t.path): f'{t.fingerprint}:{len(t)}' for t in self.tasks}

  @property
  def episodes_per_epoch(self) -> int:
    spec = self.spec
    per = spec.prompt_chunks * spec.n_prompt_examples + spec.n_lm_examples + spec.queries
    return sum(len(t) // per for t in self.tasks)

  def episode(self, step: int, i: int) -> Episode:
    rng = np.random.default_rng([self.seed, step, i])
    task = self.tasks[rng.integers(len(self.tasks))]
    spec = self.spec
    n_p, c, q = spec.n_prompt_examples, spec.prompt_chunks, spec.queries
    idx = rng.choice(len(task), c * n_p + spec.n_lm_examples + q, replace=False)
    chunks = [idx[i * n_p:(i + 1) * n_p] for i in range(c)]
    return make_episode(task, chunks[0], idx[c * n_p:-q], idx[-q:], spec, chunks[1:])

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of the global batch for `step`, padded to global bucket lengths."""
    episodes = [self.episode(step, i) for i in range(self.batch_size)]
    shapes = batch_shapes(episodes, self.spec)  # from the global batch: equal on every process
    per = self.batch_size // self.process_count
    mine = episodes[self.process_index * per:(self.process_index + 1) * per]
    return collate(mine, self.spec, *shapes)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    out = self.batch(self.step)
    self.step += 1
    return out

  def state(self) -> dict:
    return {'seed': self.seed, 'step': self.step, 'tasks': self.fingerprints}

  def restore(self, state: dict, where: str = 'data iterator state') -> None:
    """Continues from `state`; refuses if the seed or the task files differ from the saved ones."""
    if state['seed'] != self.seed:
      raise ValueError(f'{where}: saved with seed {state["seed"]}, config has {self.seed}')
    saved = state.get('tasks')
    if saved is not None:  # checkpoints written before the fingerprints were saved have none
      now = self.fingerprints
      diff = ([f'{f} (changed)' for f in sorted(set(saved) & set(now)) if saved[f] != now[f]] +
              [f'{f} (removed)' for f in sorted(set(saved) - set(now))] +
              [f'{f} (added)' for f in sorted(set(now) - set(saved))])
      if diff:
        more = f' and {len(diff) - 5} more' if len(diff) > 5 else ''
        raise ValueError(
            f'{where}: the meta-training data differ from the data this checkpoint was trained on: '
            f'{", ".join(diff[:5])}{more}. Resuming would draw different episodes; restore the '
            f'data, or start in a new --workdir.')
    self.step = int(state['step'])
