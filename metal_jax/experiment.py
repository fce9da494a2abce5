"""From an ml_collections config to the pieces a run needs: data, model, PGM config.

Shared by train.py and eval.py, so both read a config the same way; every
config error is raised here, at start-up, naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax
import ml_collections
from jax.experimental import multihost_utils

from metal_jax import lora, pgm, sharding, training
from metal_jax.errors import FlagError
from metal_jax.data import synthetic
from metal_jax.data.episodes import EpisodeSpec
from metal_jax.data.tasks import (DataError, TaskLocator, bos_token, load_setting,
                                  load_tokenized, split_data_dirs)
from metal_jax.models import GPT2Config
from metal_jax.models.hf import (CheckpointError, LoadedLM, load_lm, load_tokenizer,
                                 read_hf_config, resolve)
from metal_jax.models import config_from_hf, module_for
from metal_jax.models.layers import REMAT_POLICIES
from metal_jax.pretrain import PretrainConfig, pretrain
from metal_jax.training import OptimConfig

log = logging.getLogger('metal_jax')
BUILTIN = 'builtin:tiny-gpt2'


def validate(config: ml_collections.ConfigDict) -> None:
  """Start-up checks with messages naming the --config field."""
  def need(cond, field, msg):
    if not cond:
      raise FlagError(f'--config.{field}={config_get(config, field)!r}: {msg}')
  need(config.batch_size > 0, 'batch_size', 'must be positive')
  need(config.n_prompt_examples >= 1, 'n_prompt_examples', 'must be >= 1')
  need(config.n_lm_examples >= 0, 'n_lm_examples', 'must be >= 0')
  field = lambda name: training.config_field(config, name)
  need(field('prompt_chunks') >= 1, 'prompt_chunks', 'must be >= 1 (1: one PGM pass)')
  need(field('buckets_per_octave') in (1, 2, 4, 8, 16, 32), 'buckets_per_octave',
       'choose 1, 2, 4, 8, 16 or 32 (the padded lengths per doubling)')
  need(field('queries_per_episode') >= 1, 'queries_per_episode', 'must be >= 1 (the paper: 1)')
  need(config.optim.accum_steps >= 1 and config.batch_size % config.optim.accum_steps == 0,
       'optim.accum_steps', f'must divide batch_size={config.batch_size}')
  need(config.pgm.design in pgm.DESIGNS, 'pgm.design', f'choose one of {pgm.DESIGNS}')
  need(config.dtype in ('float32', 'bfloat16'), 'dtype', 'float32 or bfloat16')
  need(isinstance(config.remat, bool) or config.remat in REMAT_POLICIES, 'remat',
       f'choose one of {list(REMAT_POLICIES)}')
  need(config.num_steps >= 0, 'num_steps', 'must be >= 0 (0: epochs decide)')
  need(config.epochs >= 0, 'epochs', 'must be >= 0')
  need(config.num_steps > 0 or config.epochs > 0, 'epochs', 'set epochs or num_steps')
  k = 16  # examples per test task (MetaICL's k): eval splits them into n_P + n_L
  need(config.n_prompt_examples + config.n_lm_examples <= k, 'n_prompt_examples',
       f'n_prompt_examples + n_lm_examples = '
       f'{config.n_prompt_examples + config.n_lm_examples}: eval.py splits the {k} examples of '
       f'each test task, so at most {k}')
  need(config.get('prefetch', 0) >= 0, 'prefetch', 'must be >= 0 (0: no thread)')


def config_get(config, dotted):
  x = config
  for part in dotted.split('.'):
    x = x[part]
  return x


def pgm_config(config) -> pgm.PGMConfig:
  targets = tuple(t.strip() for t in config.lora.targets.split(',') if t.strip())
  return pgm.PGMConfig(
      prompt_len=config.pgm.prompt_len, design=config.pgm.design,
      temperature=config.pgm.temperature, gumbel_tau=config.pgm.gumbel_tau,
      lstm_layers=config.pgm.lstm_layers,
      lora=lora.LoraConfig(rank=config.lora.rank, alpha=config.lora.alpha, targets=targets))


def optim_config(config) -> OptimConfig:
  return OptimConfig(**config.optim.to_dict())


def data_location(config, workdir: str) -> tuple[TaskLocator, dict]:
  """(locator, setting): where each task's files are, and the setting.

  --config.data_dir is one directory or several separated by commas (searched in order; a task
  in two of them is an error naming both); the setting's "dirs" map places single tasks. With
  data_dir '' the synthetic suite is written into the workdir, unless --config.setting has
  "dirs" (then those directories alone). A one-directory locator is os.PathLike for it.
  """
  dirs = split_data_dirs(config.data_dir)
  for d in dirs:
    if not os.path.isdir(d):
      what = '' if d == config.data_dir else f' {d!r}:'
      raise DataError(f'--config.data_dir={config.data_dir!r}:{what} no such directory')
  setting = load_setting(config.setting) if dirs or config.setting else {}
  if not dirs and not setting.get('dirs'):
    data_dir = os.path.join(workdir, 'data')
    setting = synthetic.write_suite(data_dir, **config.synthetic.to_dict())
    return TaskLocator(data_dir), setting
  for task, d in setting.get('dirs', {}).items():
    if not os.path.isdir(d):
      raise DataError(f'{config.setting}: "dirs" places task {task!r} in {d}: no such directory')
  locator = TaskLocator(dirs, setting.get('dirs'))
  for task in setting['train'] + setting['test']:  # a task in two directories, or none: now
    locator.dir(task)
  return locator, setting


def model_limit(config, lm_config) -> int:
  return min(config.max_len, lm_config.max_len) if config.max_len else lm_config.max_len


def episode_spec(config, lm_config, tokenizer=None) -> EpisodeSpec:
  """The run's episode layout; with the tokenizer, its BOS (if it adds one) starts every
  sequence the PGM and the LM read."""
  return EpisodeSpec(n_prompt_examples=config.n_prompt_examples,
                     n_lm_examples=config.n_lm_examples, prompt_len=config.pgm.prompt_len,
                     max_len=model_limit(config, lm_config),
                     prompt_chunks=training.config_field(config, 'prompt_chunks'),
                     queries=training.config_field(config, 'queries_per_episode'),
                     buckets_per_octave=training.config_field(config, 'buckets_per_octave'),
                     bos_id=None if tokenizer is None else bos_token(tokenizer))


def meta_train_tasks(config, data_dir, setting: dict, tokenizer, workdir: str):
  """The setting's meta-train tasks, tokenised; data_dir: a TaskLocator or one directory."""
  cache = os.path.join(workdir, 'cache', 'tokenized')
  locator = TaskLocator.of(data_dir)
  tasks = []
  for name in setting['train']:
    t = load_tokenized(locator.meta_train_file(name), tokenizer, cache, config.max_example_len)
    if config.max_examples_per_task and len(t) > config.max_examples_per_task:
      t.truncate(config.max_examples_per_task)
    tasks.append(t)
  return tasks


def model_source(config, workdir: str, tokenizer_for_builtin=None, tasks=None) -> str:
  """The checkpoint directory of the LM: a path / hub id, or the built-in tiny GPT-2."""
  if config.model != BUILTIN:
    return resolve(config.model)
  tok = tokenizer_for_builtin
  cfg = GPT2Config(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                   **config.tiny_model.to_dict())
  return pretrain(cfg, tasks, tok, PretrainConfig(**config.pretrain.to_dict()),
                  os.path.join(workdir, 'base_lm'), progress=config.get('progress', True))


def tokenizer_for(config, workdir):
  """The tokenizer, before the model is loaded (the built-in model is trained with it)."""
  if config.model == BUILTIN:
    return synthetic.build_tokenizer()
  tok = load_tokenizer(resolve(config.model))
  if tok is None:
    raise ValueError(f'--config.model={config.model!r}: the checkpoint has no tokenizer files')
  return tok


def compute_settings(config) -> dict:
  """The LM config's compute fields (dtype, param_dtype, scan_layers, remat) from the run config."""
  return dict(dtype=config.dtype, param_dtype=config.param_dtype or config.dtype,
              scan_layers=config.scan_layers, remat=config.remat)


def make_trainer(config, module, mesh, param_shardings, steps: int) -> training.Trainer:
  """training.make_trainer with the run config's optimizer, PGM, accumulation and
  skip_nonfinite_steps."""
  return training.make_trainer(optim_config(config), pgm_config(config), module, mesh,
                               param_shardings, steps, config.optim.accum_steps,
                               skip_nonfinite=bool(config.get('skip_nonfinite_steps', False)))


def load_model(config, ckpt_dir: str, mesh, tokenizer=None) -> tuple[LoadedLM, object]:
  """The frozen LM, each tensor placed on the mesh as it is read; and the param shardings.
  A vocabulary that is empty or smaller than the tokenizer's is refused before any weight."""
  compute = compute_settings(config)
  lm_cfg = config_from_hf(read_hf_config(ckpt_dir), **compute)
  if lm_cfg.vocab_size <= 0:
    raise CheckpointError(f'{os.path.join(ckpt_dir, "config.json")}: vocab_size '
                          f'{lm_cfg.vocab_size}; a model needs a vocabulary')
  if tokenizer is not None and len(tokenizer) > lm_cfg.vocab_size:
    raise CheckpointError(f'{os.path.join(ckpt_dir, "config.json")}: vocab_size '
                          f'{lm_cfg.vocab_size} is smaller than the tokenizer\'s {len(tokenizer)} '
                          'ids (a tokenizer and model that do not belong together)')
  shardings = sharding.param_shardings(module_for(lm_cfg), mesh)
  lm = load_lm(ckpt_dir, shardings=shardings, **compute)
  return lm, shardings


@dataclasses.dataclass
class Setup:
  """Everything a meta-training run (or a benchmark of its step) starts from."""
  data_dir: str
  setting: dict
  tokenizer: object
  tasks: list  # tokenised meta-train tasks
  lm_dir: str
  mesh: object
  lm: LoadedLM  # the frozen LM, sharded on the mesh
  param_shardings: object
  pgm_cfg: pgm.PGMConfig
  spec: EpisodeSpec


def setup(config, workdir: str) -> Setup:
  """Data, tokenizer, base LM (pretrained first if built in), mesh, sharded frozen params."""
  validate(config)

  def prepare():
    data_dir, setting = data_location(config, workdir)
    tokenizer = tokenizer_for(config, workdir)
    tasks = meta_train_tasks(config, data_dir, setting, tokenizer, workdir)
    return data_dir, setting, tokenizer, tasks, model_source(config, workdir, tokenizer, tasks)

  if jax.process_count() == 1:
    data_dir, setting, tokenizer, tasks, lm_dir = prepare()
  else:  # process 0 writes the shared files (suite, token cache, base LM); the others then read
    if jax.process_index() == 0:
      data_dir, setting, tokenizer, tasks, lm_dir = prepare()
    multihost_utils.sync_global_devices('metal_jax: data and base LM prepared')
    if jax.process_index() != 0:
      data_dir, setting, tokenizer, tasks, lm_dir = prepare()
  mesh = sharding.make_mesh(config.mesh.to_dict())
  lm, param_sh = load_model(config, lm_dir, mesh, tokenizer)
  return Setup(data_dir, setting, tokenizer, tasks, lm_dir, mesh, lm, param_sh,
               pgm_config(config), episode_spec(config, lm.config, tokenizer))


@dataclasses.dataclass
class Trained:
  """A trained run's checkpoint, ready to use: eval.py and serve.py start from it."""
  workdir: str
  step: int
  config: ml_collections.ConfigDict
  tokenizer: object
  mesh: object
  lm: LoadedLM
  pgm_cfg: pgm.PGMConfig
  spec: EpisodeSpec
  trainable: dict


def load_trained(workdir: str, step: int | None = None) -> Trained:
  """The run's config (from its checkpoint), tokenizer, frozen LM on the run's mesh, and the
  PGM's trainable pytree of the latest checkpoint (or `step`)."""
  cfg_json, step = training.restore_config(workdir, step)
  config = ml_collections.ConfigDict(cfg_json)
  tokenizer = tokenizer_for(config, workdir)
  ckpt = (os.path.join(workdir, 'base_lm') if config.model == BUILTIN
          else model_source(config, workdir))
  mesh = sharding.make_mesh(config.mesh.to_dict())  # the run's own mesh
  lm, _ = load_model(config, ckpt, mesh, tokenizer)
  cfg = pgm_config(config)
  trainable, _ = training.restore_trainable(workdir, lm.config, cfg, step)
  return Trained(workdir, step, config, tokenizer, mesh, lm, cfg,
                 episode_spec(config, lm.config, tokenizer), trainable)


def config_json(config) -> dict:
  return json.loads(config.to_json_best_effort())
