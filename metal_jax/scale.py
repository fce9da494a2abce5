"""A paper-scale meta-training step by compilation alone: no weights, no accelerator.

From a run's config, the frozen LM's parameters, the train state and a batch at the
paper's shapes are built as abstract, sharded values (jax.eval_shape; nothing is
allocated), and the real training step (training.make_train_step, jitted as train.py
jits it) is lowered and compiled for a mesh of CPU devices (fake ones:
XLA_FLAGS=--xla_force_host_platform_device_count=N), or for a TPU slice by XLA's TPU
compiler (`topology`: libtpu, no TPU). What XLA reports about the compiled step
(memory per device, FLOPs, bytes accessed, collectives) is then projected onto named
accelerators. bench/scale.py is the command line.

What XLA's reports mean, as measured here (tests/test_scale.py):
* the compiled executable's reports are per device: the partitioned module is one
  device's program (one device's FLOPs fall ~8-fold from 1 to 8 devices sharing a
  batch); a lowered step's cost_analysis() is of the whole, unpartitioned program;
* XLA:CPU computes bfloat16 in float32: it gathers and multiplies float32 copies of
  bf16 weights, so its temporaries and bytes are upper bounds for a bf16 accelerator
  (Llama-2 7B on 8 devices: 14.45 GiB a device on CPU, 10.12 GiB for a TPU v5e-8);
* cost_analysis() counts a while loop's body once, whatever its trip count, so a
  scanned layer stack (config.scan_layers) is costed as one layer. `analyze` corrects
  FLOPs and bytes with the cost of one unrolled layer: cost(L) = cost_scanned +
  (L - 1) * (cost_unrolled(2 layers) - cost_unrolled(1 layer)). (The PGM's padding
  LSTM also runs as a loop over its P = 20 slots; its cost is small and not corrected.)
  Collectives inside loops are counted per execution from the trip counts XLA records.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from typing import Any

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import NamedSharding

from metal_jax import experiment, objective, sharding
from metal_jax.data import synthetic
from metal_jax.data.episodes import (EpisodeSpec, LMHalf, collate_lm, collate_pgm, lm_lengths,
                                     pgm_length)
from metal_jax.data.tasks import load_setting
from metal_jax.models import config_from_hf, module_for
from metal_jax.models.hf import param_shapes, read_hf_config

GiB = 2 ** 30

# The config.json of every model the paper configs name, as the hub serves it (fields our
# configs do not read, such as dropout rates, are left out). A shape is all `analyze` needs, so
# the gated Llama repositories need no download.
KNOWN_HF_CONFIGS: dict[str, dict] = {
    'gpt2-large': dict(
        model_type='gpt2', architectures=['GPT2LMHeadModel'], vocab_size=50257, n_positions=1024,
        n_ctx=1024, n_embd=1280, n_layer=36, n_head=20, activation_function='gelu_new',
        layer_norm_epsilon=1e-5, bos_token_id=50256, eos_token_id=50256),
    'gpt2-xl': dict(
        model_type='gpt2', architectures=['GPT2LMHeadModel'], vocab_size=50257, n_positions=1024,
        n_ctx=1024, n_embd=1600, n_layer=48, n_head=25, activation_function='gelu_new',
        layer_norm_epsilon=1e-5, bos_token_id=50256, eos_token_id=50256),
    'meta-llama/Llama-2-7b-hf': dict(
        model_type='llama', architectures=['LlamaForCausalLM'], vocab_size=32000,
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, hidden_act='silu', max_position_embeddings=4096,
        rms_norm_eps=1e-5, rope_scaling=None, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=2, torch_dtype='float16'),
    # Llama 3 (April 2024) has no rope scaling; the llama3 rope type came with Llama 3.1, below.
    'meta-llama/Meta-Llama-3-8B': dict(
        model_type='llama', architectures=['LlamaForCausalLM'], vocab_size=128256,
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, hidden_act='silu', max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=None, attention_bias=False,
        tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
        torch_dtype='bfloat16'),
    'meta-llama/Llama-3.1-8B': dict(
        model_type='llama', architectures=['LlamaForCausalLM'], vocab_size=128256,
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, hidden_act='silu', max_position_embeddings=131072,
        rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=dict(rope_type='llama3', factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=8192),
        attention_bias=False, mlp_bias=False, tie_word_embeddings=False, bos_token_id=128000,
        eos_token_id=128001, torch_dtype='bfloat16'),
}
LAYER_FIELD = {'gpt2': 'n_layer', 'llama': 'num_hidden_layers'}  # HF's name for the layer count


@dataclasses.dataclass(frozen=True)
class Accelerator:
  peak_flops: float  # dense bf16 FLOP/s per device (the datasheets' doubled figures are sparse)
  hbm_bandwidth: float  # bytes/s
  hbm_bytes: int  # memory per device (binary: an '80GB' H100 reports 81,559 MiB usable)


ACCELERATORS: dict[str, Accelerator] = {
    # NVIDIA A100 datasheet (SXM): BF16 Tensor Core 312 TFLOPS (624 with sparsity); 40GB HBM2 at
    # 1,555 GB/s, 80GB HBM2e at 2,039 GB/s. https://www.nvidia.com/content/dam/en-zz/Solutions/
    # Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf
    'A100-40GB': Accelerator(312e12, 1555e9, 40 * GiB),
    'A100-80GB': Accelerator(312e12, 2039e9, 80 * GiB),
    # NVIDIA H100 datasheet (SXM): BF16 Tensor Core 1,979 TFLOPS with sparsity, i.e. 989 dense;
    # 80GB HBM3 at 3.35 TB/s. https://www.nvidia.com/en-us/data-center/h100/
    'H100-80GB-SXM': Accelerator(989e12, 3.35e12, 80 * GiB),
    # NVIDIA H200 (SXM): the H100's compute (989 TFLOPS dense BF16); 141GB HBM3e at 4.8 TB/s.
    # https://www.nvidia.com/en-us/data-center/h200/
    'H200': Accelerator(989e12, 4.8e12, 141 * GiB),
    # Cloud TPU v5e, per chip: 197 TFLOP/s bf16, 16 GB HBM2 at 819 GB/s.
    # https://cloud.google.com/tpu/docs/v5e
    'TPU-v5e': Accelerator(197e12, 819e9, 16 * GiB),
    # Cloud TPU v5p, per chip: 459 TFLOP/s bf16, 95 GB HBM2e at 2,765 GB/s.
    # https://cloud.google.com/tpu/docs/v5p
    'TPU-v5p': Accelerator(459e12, 2765e9, 95 * GiB),
}
DEFAULT_MFU = 0.5  # MaxText reports ~51% MFU for Llama-class training on H100 / H200


# ----------------------------------------------------------------------------- the model's shape


class UnknownModel(ValueError):
  """--config.model names neither a local checkpoint, the built-in model nor a known shape."""


def hf_config(config) -> dict:
  """The HF config dict of config.model: a local checkpoint's config.json, the built-in tiny
  GPT-2's shape (config.tiny_model), or KNOWN_HF_CONFIGS for a hub id."""
  model = config.model
  if model == experiment.BUILTIN:
    tok = synthetic.build_tokenizer()
    return dict(model_type='gpt2', vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, **config.tiny_model.to_dict())
  if os.path.isdir(model):
    return read_hf_config(model)
  if model in KNOWN_HF_CONFIGS:
    return dict(KNOWN_HF_CONFIGS[model])
  raise UnknownModel(f'--config.model={model!r}: not a local checkpoint directory, and no known '
                     f'shape (known: {sorted(KNOWN_HF_CONFIGS)}); pass a directory holding its '
                     'config.json')


def with_layers(hf: dict, n_layers: int) -> dict:
  return {**hf, LAYER_FIELD[hf['model_type']]: n_layers}


# ----------------------------------------------------------------------------- the batch


def worst_case_lengths(spec: EpisodeSpec, max_example_len: int, lm_len: int = 0
                       ) -> tuple[int, int, int]:
  """(pgm_len, lm_len, target_len) of the largest batch `spec` produces.

  X^P fills the PGM's budget (pgm_len = max_len); the LM half takes the largest bucket the
  spec allows (lm_len = 0) or the bucket of `lm_len` tokens; y is at most one example
  (max_example_len tokens), its length bucketed likewise. The lengths come from the
  episodes module's own bucketing, applied to episodes of those sizes.
  """
  pgm = pgm_length([np.zeros(spec.pgm_budget, np.int32)], spec)
  lm_tokens = spec.lm_budget if lm_len <= 0 else min(lm_len, spec.lm_budget)
  y = max(1, min(max_example_len, lm_tokens - 1))
  half = LMHalf(np.zeros(lm_tokens - y, np.int32), np.zeros(y, np.int32))
  return (pgm, *lm_lengths([half], spec))


def abstract_batch(spec: EpisodeSpec, batch_size: int, lengths: tuple[int, int, int],
                   mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """The batch's keys, shapes and dtypes as episodes.collate_pgm / collate_lm produce them
  (collated from one row), with train.py's batch sharding."""
  pgm_len, lm_len, target_len = lengths
  one = {**collate_pgm([np.zeros(0, np.int32)], spec, pgm_len),
         **collate_lm([LMHalf(np.zeros(0, np.int32), np.zeros(1, np.int32))], lm_len,
                      target_len)}
  sh = sharding.batch_sharding(mesh)
  q = lambda k: (spec.queries,) if spec.queries > 1 and k in objective.LM_KEYS else ()
  return {k: jax.ShapeDtypeStruct((batch_size, *q(k), *v.shape[1:]), v.dtype, sharding=sh)
          for k, v in one.items()}


# ----------------------------------------------------------------------------- the step


@dataclasses.dataclass
class LoweredStep:
  """The train step lowered on abstract, sharded arguments."""
  lowered: Any  # jax.stages.Lowered
  lm_config: Any
  mesh: Any
  params: dict  # ShapeDtypeStructs with their shardings
  state: dict  # {'step', 'trainable', 'opt_state'}, ShapeDtypeStructs, replicated
  batch: dict
  lower_s: float


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


def lower_step(config, hf: dict, mesh, *, lm_len: int = 0, steps: int = 1) -> LoweredStep:
  """Lowers train.py's step (experiment.make_trainer's; the state abstract) on `mesh`."""
  t0 = time.perf_counter()
  lm_cfg = config_from_hf(hf, **experiment.compute_settings(config))
  module = module_for(lm_cfg)
  param_sh = sharding.param_shardings(module, mesh)
  flat = param_shapes(module)
  params = _abstract(traverse_util.unflatten_dict(flat, sep='/'), param_sh)
  trainer = experiment.make_trainer(config, module, mesh, param_sh, steps)
  state = _abstract(trainer.abstract_state,
                    jax.tree.map(lambda _: sharding.replicated(mesh), trainer.abstract_state))
  spec = experiment.episode_spec(config, lm_cfg)
  batch = abstract_batch(spec, config.batch_size,
                         worst_case_lengths(spec, config.max_example_len, lm_len), mesh)
  step_fn = trainer.step_fn
  rng = jax.eval_shape(jax.random.key, config.seed + 1)
  rng = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=sharding.replicated(mesh))
  lowered = step_fn.lower(state, params, batch, rng)
  return LoweredStep(lowered, lm_cfg, mesh, params, state, batch, time.perf_counter() - t0)


def per_device_bytes(tree) -> int:
  """Bytes one device holds of a pytree of sharded ShapeDtypeStructs (its largest shard)."""
  return sum(sharding.shard_bytes(x.shape, x.dtype, x.sharding)
             if isinstance(x.sharding, NamedSharding) else
             int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def count(tree) -> int:
  return sum(int(np.prod(x.shape, dtype=np.int64)) for x in jax.tree.leaves(tree))


def memory_stats(compiled) -> dict[str, int]:
  """Per-device bytes from compiled.memory_analysis(); total = argument + output - alias +
  temporary + generated code (the peak XLA plans for the step)."""
  m = compiled.memory_analysis()
  out = {k: int(getattr(m, f'{k}_size_in_bytes', 0) or 0)
         for k in ('argument', 'output', 'alias', 'temp', 'generated_code')}
  out['total'] = (out['argument'] + out['output'] - out['alias'] + out['temp'] +
                  out['generated_code'])
  return out


def cost(stage) -> tuple[float, float]:
  """(flops, bytes accessed) from a Lowered's or Compiled's cost_analysis()."""
  c = stage.cost_analysis()
  c = c[0] if isinstance(c, (list, tuple)) else c
  c = c or {}
  return float(c.get('flops', 0.0)), float(c.get('bytes accessed', 0.0))


# ----------------------------------------------------------------------------- collectives

COLLECTIVES = ('all-gather', 'all-reduce', 'reduce-scatter', 'all-to-all', 'collective-permute')
DTYPE_BYTES = {'pred': 1, 's4': 0.5, 'u4': 0.5, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2,
               'bf16': 2, 's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8,
               'c128': 16}
_ARRAY = re.compile(r'\b([a-z]+[0-9]*(?:e[0-9]+m[0-9]+[a-z]*)?)\[([0-9,]*)\]')
_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*')
_HEADER = re.compile(r'^(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*)?\{\s*$')
_CALLEES = re.compile(r'\b(condition|body|calls|to_apply|branch_computations|true_computation|'
                      r'false_computation)=(\{[^}]*\}|%?[\w.\-]+)')
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _array_bytes(shape_text: str) -> list[float]:
  """Bytes of each array in an HLO shape (an array, or a tuple of them)."""
  out = []
  for dtype, dims in _ARRAY.findall(shape_text):
    if dtype == 'token':
      continue
    size = DTYPE_BYTES.get(dtype, 1 if dtype.startswith('f8') else 4)
    out.append(size * int(np.prod([int(d) for d in dims.split(',') if d], dtype=np.int64)))
  return out


def _split_shape(rest: str) -> tuple[str, str]:
  """'<shape> opcode(...)...' -> (shape, 'opcode(...)...'); a tuple shape has nested parens."""
  if not rest.startswith('('):
    shape, _, tail = rest.partition(' ')
    return shape, tail
  depth = 0
  for i, ch in enumerate(rest):
    depth += ch == '('
    depth -= ch == ')'
    if depth == 0:
      return rest[:i + 1], rest[i + 1:].lstrip()
  return rest, ''


def parse_hlo(text: str) -> tuple[dict[str, list[tuple[str, str, str]]], str | None]:
  """{computation: [(opcode, shape, line)]} of an HLO module's text, and the ENTRY's name."""
  comps: dict[str, list] = {}
  entry, current = None, None
  for line in text.splitlines():
    if current is None:
      m = _HEADER.match(line)
      if m and not line.startswith(' '):
        current = m.group(2)
        comps[current] = []
        if m.group(1):
          entry = current
      continue
    if line.startswith('}'):
      current = None
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    shape, tail = _split_shape(line[m.end():])
    opcode = tail.split('(', 1)[0].strip()
    comps[current].append((opcode, shape, line))
  return comps, entry


def executions(comps: dict, entry: str | None) -> dict[str, int]:
  """How many times each computation runs per call of the entry: while bodies (and their
  conditions) multiply by XLA's known trip count; an unknown trip count counts once."""
  calls: dict[str, list[tuple[str, int]]] = {c: [] for c in comps}
  for name, instrs in comps.items():
    for opcode, _, line in instrs:
      trip = _TRIP.search(line)
      n = int(trip.group(1)) if opcode == 'while' and trip else 1
      for kind, target in _CALLEES.findall(line):
        for callee in re.findall(r'%?([\w.\-]+)', target):
          if callee in comps:
            calls[name].append((callee, n if kind in ('body', 'condition') else 1))
  runs = {c: 0 for c in comps}
  if entry is None:
    return {c: 1 for c in comps}
  runs[entry] = 1
  for name in _topological(calls, entry):  # callers before callees (the call graph is a DAG)
    for callee, n in calls[name]:
      runs[callee] += runs[name] * n
  return runs


def in_unknown_loops(comps: dict, entry: str | None) -> set[str]:
  """Computations that run inside a while loop of no known trip count (XLA:TPU's windowed
  einsums, for one), whose executions `executions` counts once per entry into the loop."""
  bodies, callees = set(), {c: set() for c in comps}
  for name, instrs in comps.items():
    for opcode, _, line in instrs:
      for kind, target in _CALLEES.findall(line):
        names = {c for c in re.findall(r'%?([\w.\-]+)', target) if c in comps}
        callees[name] |= names
        if opcode == 'while' and kind == 'body' and not _TRIP.search(line):
          bodies |= names
  out, todo = set(), list(bodies)
  while todo:
    c = todo.pop()
    if c not in out:
      out.add(c)
      todo.extend(callees[c])
  return out


def _topological(calls, entry):
  order, seen = [], set()

  def visit(c):
    if c in seen:
      return
    seen.add(c)
    for callee, _ in calls[c]:
      visit(callee)
    order.append(c)
  visit(entry)
  return order[::-1]


def collectives(hlo_text: str) -> dict[str, dict[str, float]]:
  """Collectives of a compiled HLO module: per kind, {'count': instructions in the text,
  'bytes': their result bytes, 'executed': executions per step (loop trip counts applied),
  'executed_bytes': result bytes moved per step, 'unknown_trips': how many of the instructions
  sit in loops of unknown trip count (counted once a loop entry: a lower bound)}. Async pairs
  count at their -start; an all-gather-start's / collective-permute-start's result holds
  (operands, results), of which the results count."""
  comps, entry = parse_hlo(hlo_text)
  runs = executions(comps, entry)
  unknown = in_unknown_loops(comps, entry)
  out = {k: {'count': 0, 'bytes': 0.0, 'executed': 0, 'executed_bytes': 0.0, 'unknown_trips': 0}
         for k in COLLECTIVES}
  for name, instrs in comps.items():
    for opcode, shape, _ in instrs:
      kind = opcode[:-len('-start')] if opcode.endswith('-start') else opcode
      if kind not in COLLECTIVES:
        continue
      sizes = _array_bytes(shape)
      if opcode.endswith('-start') and kind in ('all-gather', 'collective-permute'):
        inner = _split_tuple(shape)
        sizes = _array_bytes(inner[len(inner) // 2] if len(inner) >= 2 else shape)
      b = float(sum(sizes))
      o = out[kind]
      o['count'] += 1
      o['bytes'] += b
      o['executed'] += runs.get(name, 1)
      o['executed_bytes'] += b * runs.get(name, 1)
      o['unknown_trips'] += name in unknown
  return out


def _split_tuple(shape: str) -> list[str]:
  """Top-level elements of a tuple shape '(a, (b, c), u32[])', context scalars dropped."""
  if not shape.startswith('('):
    return [shape]
  parts, depth, cur = [], 0, ''
  for ch in shape[1:-1]:
    if ch == ',' and depth == 0:
      parts.append(cur.strip())
      cur = ''
      continue
    depth += ch in '({['
    depth -= ch in ')}]'
    cur += ch
  parts.append(cur.strip())
  return [p for p in parts if not re.fullmatch(r'[us]32\[\]', p.split('{')[0])]


# ----------------------------------------------------------------------------- projections


def roofline_s(flops: float, bytes_accessed: float, acc: Accelerator) -> float:
  """The roofline bound on one device's step: max(compute time at peak, memory time at full
  bandwidth)."""
  return max(flops / acc.peak_flops, bytes_accessed / acc.hbm_bandwidth)


def step_s_at_mfu(flops: float, acc: Accelerator, mfu: float = DEFAULT_MFU) -> float:
  """One device's step time when its FLOPs run at `mfu` of peak."""
  return flops / (mfu * acc.peak_flops)


def fits(per_device_total: int, acc: Accelerator) -> bool:
  return per_device_total <= acc.hbm_bytes


def run_steps(epochs: int, train_examples: int, examples_per_episode: int, batch_size: int
              ) -> int:
  """train.py's run length (run_train.num_steps): an epoch draws the meta-train examples as
  disjoint episodes of examples_per_episode = n_P + n_L + 1."""
  return max(epochs * (train_examples // examples_per_episode) // batch_size, 1)


def default_train_examples(config) -> tuple[int, int]:
  """(max_examples_per_task x number of meta-train tasks in the setting, number of tasks):
  the paper's upper bound (a task may have fewer examples)."""
  n_tasks = len(load_setting(config.setting)['train']) if config.setting else 0
  return config.max_examples_per_task * n_tasks, n_tasks


# ----------------------------------------------------------------------------- the analysis


@dataclasses.dataclass
class StepReport:
  """What compilation tells about one device's share of a meta-training step."""
  devices: int
  platform: str  # 'cpu' (fake devices) or 'tpu' (a compile-only TPU slice)
  mesh: dict
  model: dict  # name, model_type, d_model, n_layers, heads, vocab, parameter counts
  batch: dict  # key -> [shape, dtype]
  memory: dict  # memory_stats(): argument, output, alias, temp, generated_code, total
  by_kind: dict  # per-device bytes: frozen_params, trainable, opt_state, batch
  flops: float  # per device, per step, loop-corrected
  bytes_accessed: float  # likewise
  model_flops: float  # per device, per step, without rematerialisation (0: not computed)
  flops_reported: float  # cost_analysis() as it stands (a scanned stack counted once)
  bytes_reported: float
  collectives: dict
  lower_s: float
  compile_s: float
  correction_s: float  # the loop correction's and model FLOPs' lowerings and compiles
  hlo_text: str = dataclasses.field(default='', repr=False)

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    d.pop('hlo_text')
    return d


def topology_devices(name: str) -> list:
  """The chips of a TPU slice (e.g. 'v5e:2x4', a v5e-8) as compile-only devices: XLA's TPU
  compiler (libtpu, importable; jax[tpu] pins its version) runs here, no TPU needed."""
  from jax.experimental import topologies
  return list(topologies.get_topology_desc(name, 'tpu').devices)


def make_mesh(config, devices: int | None = None, topology: str = ''):
  """config.mesh over a TPU slice's chips, or the first `devices` local devices (all if None)."""
  devs = (topology_devices(topology) if topology else
          jax.devices()[:devices] if devices else jax.devices())
  return sharding.make_mesh(config.mesh.to_dict(), devices=devs)


# The step is compiled, never run: LLVM's optimisations of the generated code only cost time.
# They change neither memory_analysis() nor cost_analysis(), which describe the HLO (checked
# equal on the tiny Llama; compilation 13 s -> 8 s).
FAST_COMPILE = {'xla_backend_optimization_level': 0}


def _variant(config, **fields):
  c = config.copy_and_resolve_references()
  for k, v in fields.items():
    setattr(c, k, v)
  return c


def loop_corrected(config, hf: dict, mesh, scanned: tuple[float, float], *, lm_len: int = 0,
                   compiled: bool = True, compiler_options=FAST_COMPILE) -> tuple[float, float]:
  """(flops, bytes) of `config`'s step with every trip of the scanned layer stack counted:
  `scanned` (the step's own cost_analysis) + (L - 1) x one unrolled layer's cost, the
  difference between the unrolled model at 2 and at 1 layers (compiled, or only lowered).
  Unscanned configs have no loop to correct: `scanned` is returned as is."""
  n_layers = hf[LAYER_FIELD[hf['model_type']]]
  if not config.scan_layers or n_layers < 2:
    return scanned
  unrolled = _variant(config, scan_layers=False)

  def unrolled_cost(n: int) -> tuple[float, float]:
    low = lower_step(unrolled, with_layers(hf, n), mesh, lm_len=lm_len).lowered
    return cost(low.compile(compiler_options) if compiled else low)

  one, two = unrolled_cost(1), unrolled_cost(2)
  return tuple(s + (n_layers - 1) * (b - a) for s, a, b in zip(scanned, one, two))


def model_flops(config, hf: dict, mesh, *, lm_len: int = 0) -> float:
  """One device's share of the step's FLOPs without rematerialisation (what MFU counts), from
  the lowered step: XLA's cost of the HLO before optimisation (within a few % of the compiled
  one's) and before partitioning, i.e. the whole step's whatever the mesh, hence lowered on
  one CPU device (a TPU slice's compile-only devices cost no lowered step) and divided by
  `mesh`'s size."""
  plain = _variant(config, remat='none')
  one = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, devices=jax.devices('cpu')[:1])
  low = lower_step(plain, hf, one, lm_len=lm_len).lowered
  return loop_corrected(plain, hf, one, cost(low), lm_len=lm_len, compiled=False)[0] / mesh.size


def analyze(config, devices: int | None = None, *, topology: str = '', lm_len: int = 0,
            correct_loops: bool = True, with_model_flops: bool = True,
            keep_hlo: bool = False) -> StepReport:
  """Compiles `config`'s meta-training step on the first `devices` devices (all if None), or
  for the TPU slice `topology` (topology_devices).

  `lm_len` = 0 takes the LM half at the largest bucket the spec allows; `correct_loops`
  adds the cost of the scanned layers' other L - 1 trips (two small unrolled compiles);
  `with_model_flops` also lowers the step without rematerialisation (model_flops).
  """
  experiment.validate(config)
  hf = hf_config(config)
  mesh = make_mesh(config, devices, topology)
  compiler_options = FAST_COMPILE if mesh.devices.flat[0].platform == 'cpu' else {}
  low = lower_step(config, hf, mesh, lm_len=lm_len)
  t0 = time.perf_counter()
  compiled = low.lowered.compile(compiler_options)
  compile_s = time.perf_counter() - t0
  reported = cost(compiled)
  t0 = time.perf_counter()
  flops, bytes_ = (loop_corrected(config, hf, mesh, reported, lm_len=lm_len,
                                  compiler_options=compiler_options)
                   if correct_loops else reported)
  mflops = model_flops(config, hf, mesh, lm_len=lm_len) if with_model_flops else 0.0
  correction_s = time.perf_counter() - t0
  hlo = compiled.as_text()
  cfg = low.lm_config
  model = dict(name=config.model, model_type=cfg.model_type, d_model=cfg.d_model,
               n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
               vocab_size=cfg.vocab_size, max_len=cfg.max_len, dtype=cfg.dtype,
               param_dtype=cfg.param_dtype, scan_layers=cfg.scan_layers, remat=str(cfg.remat),
               frozen_params=count(low.params), trainable_params=count(low.state['trainable']))
  by_kind = dict(frozen_params=per_device_bytes(low.params),
                 trainable=per_device_bytes(low.state['trainable']),
                 opt_state=per_device_bytes(low.state['opt_state']),
                 batch=per_device_bytes(low.batch))
  return StepReport(
      devices=mesh.size, platform=mesh.devices.flat[0].platform, mesh=dict(mesh.shape),
      model=model,
      batch={k: [list(v.shape), str(v.dtype)] for k, v in low.batch.items()},
      memory=memory_stats(compiled), by_kind=by_kind, flops=flops, bytes_accessed=bytes_,
      model_flops=mflops, flops_reported=reported[0], bytes_reported=reported[1],
      collectives=collectives(hlo), lower_s=low.lower_s, compile_s=compile_s,
      correction_s=correction_s, hlo_text=hlo if keep_hlo else '')


def project(report: StepReport, steps: int, mfu: float = DEFAULT_MFU,
            accelerators: dict[str, Accelerator] = ACCELERATORS) -> dict[str, dict]:
  """Per accelerator: the roofline bound on the step as compiled (its FLOPs and bytes, remat's
  recomputation included), the step time at `mfu` (of the model FLOPs, as MFU counts them),
  whether the step fits (per-device total <= capacity), and the run's hours at `mfu`."""
  out = {}
  for name, acc in accelerators.items():
    at_mfu = step_s_at_mfu(report.model_flops or report.flops, acc, mfu)
    out[name] = dict(roofline_s=roofline_s(report.flops, report.bytes_accessed, acc),
                     step_s=at_mfu, fits=fits(report.memory['total'], acc),
                     run_hours=steps * at_mfu / 3600)
  return out


def summary_json(report: StepReport, projection: dict, **extra) -> str:
  return json.dumps({
      'per_device_bytes': report.memory['total'], 'flops_per_step': report.flops,
      'model_flops_per_step': report.model_flops,
      'fits': {k: v['fits'] for k, v in projection.items()},
      'projected_step_s': {k: v['step_s'] for k, v in projection.items()},
      'roofline_step_s': {k: v['roofline_s'] for k, v in projection.items()},
      'run_hours': {k: v['run_hours'] for k, v in projection.items()},
      'memory': report.memory, 'by_kind': report.by_kind, 'bytes_accessed': report.bytes_accessed,
      'collectives': {k: v for k, v in report.collectives.items() if v['count']},
      'devices': report.devices, 'platform': report.platform, 'mesh': report.mesh,
      'model': report.model,
      'compile_s': report.compile_s, **extra})
