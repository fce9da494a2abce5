"""Every evaluation method behind one interface, and the one registry that names them.

A method turns one test task under one seed into what the frozen LM gets for
scoring: a prompt (or none) and the demonstrations X^L, with its cost in LM
passes (`evaluation.MethodOutput`). Its hyperparameters are a frozen dataclass,
`Hparams`, with the paper's values as defaults; eval.py's `--hparams=method.field=value`
overrides fields by name (`hparams_from`).
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
import logging
import os
import zlib
from typing import Any, ClassVar, Sequence

import jax

from metal_jax import evaluation
from metal_jax.data.tasks import DataError
from metal_jax.errors import FlagError
from metal_jax.baselines import (autoprompt, bbtv2, metal_tune, metaprompting, p_tuning,
                                 prefix_tuning, rlprompt, soft_prompt)
from metal_jax.evaluation import Context, MethodOutput, TaskSeed


@dataclasses.dataclass(frozen=True, kw_only=True)
class NoHparams:
  """A method without hyperparameters."""


class Method(abc.ABC):
  """The interface: `prompt(ctx, ts, hp, rng) -> MethodOutput` for one task and seed."""
  Hparams: ClassVar[type] = NoHparams

  @abc.abstractmethod
  def prompt(self, ctx: Context, ts: TaskSeed, hp, rng) -> MethodOutput:
    """What the frozen LM gets for task-seed `ts`: a prompt, demonstrations, the cost."""


def few_shot_idx(ts: TaskSeed) -> list[int]:
  """The (up to) 16 examples of the task's train split: ICL's demonstrations, the tuners' data."""
  return list(range(min(len(ts.train), 16)))


class ZeroShot(Method):
  """No prompt, no demonstrations."""

  def prompt(self, ctx, ts, hp, rng):
    return MethodOutput(None, [])


class ICL(Method):
  """The 16 examples as demonstrations."""

  def prompt(self, ctx, ts, hp, rng):
    return MethodOutput(None, few_shot_idx(ts))


class MetaL(Method):
  """The PGM's prompt from X^P (the first n_P examples), X^L the next n_L."""
  shuffled: ClassVar[bool] = False  # the control: X^P from another test task, same seed

  def prompt(self, ctx, ts, hp, rng):
    prompt_idx, demo_idx = evaluation.split_indices(*ctx.split)
    source = ctx.others[(ts.task, ts.seed)] if self.shuffled else ts.train
    prompt = evaluation.prompt_for(ctx.pgm_cfg, ctx.lm.module, ctx.lm.params, ctx.trainable,
                                   source, prompt_idx, ctx.spec)
    return MethodOutput(prompt, demo_idx, forward_passes=1)


class MetaLShuffled(MetaL):
  shuffled = True


class Tuned(Method):
  """A prompt tuned on the task's 16 examples by a baselines module's run(); X^L as MetaL's."""

  def __init__(self, module):
    self.module = module
    self.Hparams = module.Hparams

  def tune(self, ctx, ts, hp, rng):
    return self.module.run(ctx.lm.module, ctx.lm.params, ts.train, few_shot_idx(ts), ctx.spec,
                           hp, rng=rng)

  def prompt(self, ctx, ts, hp, rng):
    res = self.tune(ctx, ts, hp, rng)
    return MethodOutput(res.prompt, evaluation.split_indices(*ctx.split)[1], res.forward_passes,
                        res.backward_passes, res.note)


class MetaLTune(Tuned):
  """MetaL(+Tune): the PGM's prompt (one more forward pass) tuned on the 16 examples."""

  def tune(self, ctx, ts, hp, rng):
    init = MetaL().prompt(ctx, ts, None, rng)
    res = self.module.run(ctx.lm.module, ctx.lm.params, ts.train, few_shot_idx(ts), ctx.spec,
                          hp, rng=rng, init_prompt=init.prompt)
    return dataclasses.replace(res, forward_passes=res.forward_passes + init.forward_passes)


@dataclasses.dataclass(frozen=True, kw_only=True)
class IterativeHparams:
  examples: int = 64  # the first `examples` of the task's train split, n_P a PGM pass


class MetaLIterative(Method):
  """Iterative generation (the paper's extension): the PGM reads the task's first `examples`
  examples n_P at a time, each pass refining the previous pass's prompt; one prompt for the
  task, one PGM pass per n_P examples (eval.py --analysis=iterative; not in the registry: it
  needs train splits of more than 16 examples)."""
  Hparams = IterativeHparams

  def prompt(self, ctx, ts, hp, rng):
    if len(ts.train) < hp.examples:
      raise DataError(f'{ts.train.path}: {len(ts.train)} examples; iterative generation over '
                      f'{hp.examples} needs that many')
    prompt, passes = evaluation.iterative_prompt(
        ctx.pgm_cfg, ctx.lm.module, ctx.lm.params, ctx.trainable, ts.train, range(hp.examples),
        ctx.spec)
    return MethodOutput(prompt, evaluation.split_indices(*ctx.split)[1], forward_passes=passes)


class AutoPrompt(Tuned):
  """AutoPrompt's trigger search; candidates limited to the tokenizer's ids (an embedding table
  padded past them, as GPT-2's checkpoints may be, has rows no text maps to)."""

  def __init__(self):
    super().__init__(autoprompt)

  def tune(self, ctx, ts, hp, rng):
    if not hp.vocab_limit and ctx.tokenizer is not None:
      hp = dataclasses.replace(hp, vocab_limit=len(ctx.tokenizer))
    return super().tune(ctx, ts, hp, rng)


class RLPrompt(Tuned):
  """RLPrompt's policy, trained on the 16 examples; its prompt is decoded to text and
  re-tokenised with the run's tokenizer, as the task LM would be handed it."""

  def __init__(self):
    super().__init__(rlprompt)

  def tune(self, ctx, ts, hp, rng):
    if ctx.tokenizer is None:
      raise ValueError('rlprompt needs the run\'s tokenizer (evaluation.Context.tokenizer)')
    return self.module.run(ctx.lm.module, ctx.lm.params, ts.train, few_shot_idx(ts), ctx.spec,
                           hp, rng=rng, tokenizer=ctx.tokenizer)


class MetaPrompting(Method):
  """MetaPrompting: a soft-prompt initialisation meta-trained (FOMAML) once on the run's
  meta-train tasks, cached in the run's workdir, then adapted to each test task's 16 examples.
  The meta-training's passes are a one-off cost, like the PGM's training: they are stated in the
  note, not in the per-task cost."""
  Hparams = metaprompting.Hparams

  def __init__(self):
    self._loaded: dict[str, tuple] = {}

  def init(self, ctx, hp):
    """(init_embeds [P, D], meta) for hp: from memory, the cache file, or meta-trained now."""
    if ctx.meta_tasks is None:
      raise ValueError('metaprompting needs the run\'s meta-train tasks (evaluation.Context)')
    tasks = ctx.meta_tasks()
    meta = metaprompting.init_meta(hp, tasks, run=ctx.run_key)
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(ctx.cache_dir, f'metaprompting-{key}.npz')
    if path not in self._loaded:
      if os.path.exists(path):
        init, saved = metaprompting.load_init(path)
        if {k: saved.get(k) for k in meta} != meta:
          raise ValueError(f'{path}: a cached MetaPrompting init of other tasks or '
                           'hyperparameters under this key; delete it to meta-train again')
        meta = saved
      else:
        logging.getLogger('metal_jax').info(
            'metaprompting: meta-training the prompt initialisation on %d tasks (%d steps)',
            len(tasks), hp.meta_steps)
        rng = jax.random.key(zlib.crc32(f'{ctx.run_key}/metaprompting'.encode()))
        init, losses, stats = metaprompting.meta_train(ctx.lm.module, ctx.lm.params, tasks,
                                                       ctx.spec, hp, rng=rng)
        meta = {**meta, 'forward_passes': stats['forward_passes'],
                'backward_passes': stats['backward_passes'], 'query_loss_after': losses}
        os.makedirs(ctx.cache_dir, exist_ok=True)
        metaprompting.save_init(path, init, meta)
      self._loaded[path] = (init, meta)
    return self._loaded[path]

  def prompt(self, ctx, ts, hp, rng):
    init, meta = self.init(ctx, hp)
    res = metaprompting.run(ctx.lm.module, ctx.lm.params, ts.train, few_shot_idx(ts), ctx.spec,
                            hp, rng=rng, init_embeds=init)
    note = (f'meta-trained once on {meta["n_tasks"]} tasks: {meta["forward_passes"]} forward + '
            f'{meta["backward_passes"]} backward passes, not in the per-task cost')
    return MethodOutput(res.prompt, evaluation.split_indices(*ctx.split)[1], res.forward_passes,
                        res.backward_passes, note)


REGISTRY: dict[str, Method] = {
    'zero_shot': ZeroShot(),
    'icl': ICL(),
    'metal': MetaL(),
    'metal_shuffled': MetaLShuffled(),
    'soft_prompt': Tuned(soft_prompt),
    'p_tuning': Tuned(p_tuning),
    'prefix_tuning': Tuned(prefix_tuning),
    'metal_tune': MetaLTune(metal_tune),
    'bbtv2': Tuned(bbtv2),
    'autoprompt': AutoPrompt(),
    'rlprompt': RLPrompt(),
    'metaprompting': MetaPrompting(),
}


def resolve(names: Sequence[str]) -> list[str]:
  """--methods' names in order; 'all' = every registered method. An unknown name is an error."""
  names = [n.strip() for n in names if n.strip()]
  if names == ['all']:
    names = list(REGISTRY)
  unknown = [n for n in names if n not in REGISTRY]
  if unknown:
    raise FlagError(f'--methods: unknown {unknown}; known: {list(REGISTRY)}')
  return names


def hparams_from(overrides: Sequence[str], base: dict[str, Any] | None = None) -> dict[str, Any]:
  """{method: Hparams} from "method.field=value" strings (absl list flag --hparams), over `base`
  (method -> Hparams) and the defaults; an unknown method or field is an error naming it."""
  out = {n: (base or {}).get(n) or m.Hparams() for n, m in REGISTRY.items()}
  for item in overrides:
    key, sep, value = item.partition('=')
    method, dot, field = key.strip().partition('.')
    if not sep or not dot:
      raise FlagError(f'--hparams={item!r}: expected method.field=value')
    if method not in out:
      raise FlagError(f'--hparams={item!r}: unknown method {method!r} (known: {sorted(out)})')
    hp = out[method]
    names = [f.name for f in dataclasses.fields(hp)]
    if field not in names:
      raise FlagError(f'--hparams={item!r}: {method} has no hyperparameter {field!r} '
                       f'(its hyperparameters: {names})')
    kind = type(getattr(hp, field))
    try:
      parsed = kind(value) if kind is not bool else value.lower() in ('1', 'true', 'yes')
    except ValueError:
      raise FlagError(f'--hparams={item!r}: {field} takes a {kind.__name__}') from None
    out[method] = dataclasses.replace(hp, **{field: parsed})
  return out
