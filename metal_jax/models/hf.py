"""Import and export of HF checkpoints (GPT-2, Llama).

A declarative table maps each of our parameter paths to an HF key, with one of a
few transforms (GPT-2's Conv1D weights are stored [in, out]; torch Linear weights
[out, in]; heads are split out of the flat width). Loading checks every tensor:
a missing, extra or mis-shaped tensor, or an unknown model_type, raises one
CheckpointError naming the file and the key; nothing is ever partially loaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import flax.linen as nn
import numpy as np
from flax import traverse_util

from metal_jax.errors import UserError
from metal_jax.models import REGISTRY, config_from_hf, module_for
from metal_jax.models.base import CausalLM

CONFIG_FILE = 'config.json'
SAFETENSORS_FILE = 'model.safetensors'
SAFETENSORS_INDEX = 'model.safetensors.index.json'
TORCH_FILE = 'pytorch_model.bin'
TORCH_INDEX = 'pytorch_model.bin.index.json'


class CheckpointError(UserError):
  """A checkpoint that cannot be loaded as asked; the message names the file and the key."""


@dataclasses.dataclass(frozen=True)
class Rule:
  """Our path (`/`-joined, `{i}` = layer) <-> HF key, and how the tensor is laid out there.

  layout: 'same' (identical up to a reshape of the trailing dims: GPT-2 Conv1D
  and embeddings) or 'linear' (a torch Linear weight [out, in]: transpose).
  """
  ours: str
  hf: str
  layout: str = 'same'
  optional: bool = False  # only present when the config asks for it (biases, untied head)


def _gpt2_rules(cfg) -> list[Rule]:
  p = 'transformer.'
  r = [Rule('wte', p + 'wte.weight'), Rule('wpe', p + 'wpe.weight'),
       Rule('ln_f/scale', p + 'ln_f.weight'), Rule('ln_f/bias', p + 'ln_f.bias')]
  for ours, hf in [('ln_1/scale', 'ln_1.weight'), ('ln_1/bias', 'ln_1.bias'),
                   ('ln_2/scale', 'ln_2.weight'), ('ln_2/bias', 'ln_2.bias'),
                   ('attn/c_attn/kernel', 'attn.c_attn.weight'),
                   ('attn/c_attn/bias', 'attn.c_attn.bias'),
                   ('attn/c_proj/kernel', 'attn.c_proj.weight'),
                   ('attn/c_proj/bias', 'attn.c_proj.bias'),
                   ('mlp/c_fc/kernel', 'mlp.c_fc.weight'), ('mlp/c_fc/bias', 'mlp.c_fc.bias'),
                   ('mlp/c_proj/kernel', 'mlp.c_proj.weight'),
                   ('mlp/c_proj/bias', 'mlp.c_proj.bias')]:
    r.append(Rule(f'layers_{{i}}/{ours}', f'{p}h.{{i}}.{hf}'))
  return r


def _llama_rules(cfg) -> list[Rule]:
  p = 'model.layers.{i}.'
  r = [Rule('embed_tokens', 'model.embed_tokens.weight'), Rule('norm/scale', 'model.norm.weight')]
  if not cfg.tie_word_embeddings:
    r.append(Rule('lm_head', 'lm_head.weight', 'linear'))
  r += [Rule('layers_{i}/input_layernorm/scale', p + 'input_layernorm.weight'),
        Rule('layers_{i}/post_attention_layernorm/scale', p + 'post_attention_layernorm.weight')]
  for proj in ('q_proj', 'k_proj', 'v_proj', 'o_proj'):
    r.append(Rule(f'layers_{{i}}/attn/{proj}/kernel', f'{p}self_attn.{proj}.weight', 'linear'))
    if cfg.attention_bias:
      r.append(Rule(f'layers_{{i}}/attn/{proj}/bias', f'{p}self_attn.{proj}.bias'))
  for proj in ('gate_proj', 'up_proj', 'down_proj'):
    r.append(Rule(f'layers_{{i}}/mlp/{proj}/kernel', f'{p}mlp.{proj}.weight', 'linear'))
    if cfg.mlp_bias:
      r.append(Rule(f'layers_{{i}}/mlp/{proj}/bias', f'{p}mlp.{proj}.bias'))
  return r


RULES: dict[str, Callable[[Any], list[Rule]]] = {'gpt2': _gpt2_rules, 'llama': _llama_rules}

# HF keys that carry no parameters of ours: buffers and tied copies.
IGNORED = {
    'gpt2': [r'(transformer\.)?h\.\d+\.attn\.(masked_)?bias$', r'lm_head\.weight$'],
    'llama': [r'model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$'],
}
# Checkpoints saved from the bare model (GPT2Model: the original `gpt2` hub files) omit the prefix.
OPTIONAL_PREFIX = {'gpt2': 'transformer.', 'llama': ''}


def expand_rules(cfg) -> dict[str, Rule]:
  """{our flat path: rule} for every parameter of the loop layout."""
  out = {}
  for rule in RULES[cfg.model_type](cfg):
    if '{i}' in rule.ours:
      for i in range(cfg.n_layers):
        out[rule.ours.format(i=i)] = dataclasses.replace(
            rule, ours=rule.ours.format(i=i), hf=rule.hf.format(i=i))
    else:
      out[rule.ours] = rule
  return out


def to_ours(x: np.ndarray, rule: Rule, shape: tuple[int, ...]) -> np.ndarray:
  return (x.T if rule.layout == 'linear' else x).reshape(shape)


def to_hf(x: np.ndarray, rule: Rule, hf_shape: tuple[int, ...]) -> np.ndarray:
  if rule.layout == 'linear':
    return x.reshape(hf_shape[::-1]).T
  return x.reshape(hf_shape)


def _hf_shape(ours: tuple[int, ...], rule: Rule) -> tuple[int, ...]:
  """The HF tensor's shape for one of ours."""
  name = rule.ours
  if rule.layout == 'linear':
    if name.endswith('o_proj/kernel'):  # [N, H, D] -> [D, N*H]
      return (ours[-1], int(np.prod(ours[:-1])))
    return (int(np.prod(ours[1:])), ours[0])  # [D, heads..] -> [out, in]
  if name.endswith('c_attn/kernel'):
    return (ours[0], int(np.prod(ours[1:])))
  if name.endswith('c_proj/kernel') and len(ours) == 3:  # attn c_proj [N, H, D] -> [D, D]
    return (int(np.prod(ours[:-1])), ours[-1])
  if len(ours) > 1 and not name.endswith(('wte', 'wpe', 'embed_tokens')) and 'kernel' not in name:
    return (int(np.prod(ours)),)  # a per-head bias -> flat
  return tuple(ours)


# ----------------------------------------------------------------------------- layouts


def stack_layers(flat: dict[str, Any], n_layers: int) -> dict[str, Any]:
  """Loop layout (`layers_{i}/...`) -> scan layout (`layers/...`, leading L axis)."""
  out = {k: v for k, v in flat.items() if not k.startswith('layers_')}
  sub = sorted({k.split('/', 1)[1] for k in flat if k.startswith('layers_')})
  for s in sub:
    out[f'layers/{s}'] = np.stack([np.asarray(flat[f'layers_{i}/{s}']) for i in range(n_layers)])
  return out


def unstack_layers(flat: dict[str, Any], n_layers: int) -> dict[str, Any]:
  out = {k: v for k, v in flat.items() if not k.startswith('layers/')}
  for k, v in flat.items():
    if k.startswith('layers/'):
      for i in range(n_layers):
        out[f'layers_{i}/{k[len("layers/"):]}'] = v[i]
  return out


def param_shapes(module: CausalLM) -> dict[str, jax.ShapeDtypeStruct]:
  """Flat {path: ShapeDtypeStruct} of the module's params, allocating nothing."""
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
  return traverse_util.flatten_dict(nn.unbox(shapes['params']), sep='/')


def count_params(config) -> int:
  """Parameters as transformers counts them (tied embeddings once), via jax.eval_shape."""
  return sum(int(np.prod(s.shape)) for s in param_shapes(module_for(config)).values())


# ----------------------------------------------------------------------------- reading


class _Tensors:
  """Lazy access to the tensors of a checkpoint directory, by HF key, remembering each key's file."""

  def __init__(self, directory: str):
    self.dir = directory
    self.file_of: dict[str, str] = {}
    self._torch_cache: dict[str, dict] = {}
    st, st_idx = (os.path.join(directory, f) for f in (SAFETENSORS_FILE, SAFETENSORS_INDEX))
    pt, pt_idx = (os.path.join(directory, f) for f in (TORCH_FILE, TORCH_INDEX))
    if os.path.exists(st_idx) or os.path.exists(pt_idx):
      idx = st_idx if os.path.exists(st_idx) else pt_idx
      try:
        with open(idx) as f:
          weight_map = json.load(f)['weight_map']
      except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f'{idx}: not a valid index file (needs "weight_map"): {e}') from e
      for key, fname in weight_map.items():
        self.file_of[key] = os.path.join(directory, fname)
      for path in sorted(set(self.file_of.values())):
        if not os.path.exists(path):
          raise CheckpointError(f'{idx}: lists shard {os.path.basename(path)}, which is missing')
    elif os.path.exists(st):
      self.file_of = {k: st for k in self._safetensors_keys(st)}
    elif os.path.exists(pt):
      self.file_of = {k: pt for k in self._torch_file(pt)}
    else:
      raise CheckpointError(
          f'{directory}: no weights found (looked for {SAFETENSORS_FILE}, {SAFETENSORS_INDEX}, '
          f'{TORCH_FILE}, {TORCH_INDEX})')

  @staticmethod
  def _safetensors_keys(path):
    from safetensors import safe_open
    try:
      with safe_open(path, framework='flax') as f:
        return list(f.keys())
    except Exception as e:  # safetensors raises its own error types
      raise CheckpointError(f'{path}: cannot read safetensors file: {e}') from e

  def _torch_file(self, path):
    if path not in self._torch_cache:
      try:
        import torch
      except ImportError as e:
        raise CheckpointError(f'{path}: reading pytorch_model.bin needs torch installed') from e
      self._torch_cache[path] = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    return self._torch_cache[path]

  def get(self, key: str) -> np.ndarray:
    path = self.file_of[key]
    if path.endswith('.safetensors'):
      from safetensors import safe_open
      # This process's own CPU device: jax.devices() lists every process's devices, and under
      # jax.distributed the first is process 0's, which another process cannot read back.
      with jax.default_device(jax.local_devices(backend='cpu')[0]), \
          safe_open(path, framework='flax') as f:
        return np.asarray(f.get_tensor(key))
    t = self._torch_file(path)[key]
    import torch
    if t.dtype == torch.bfloat16:
      return t.float().numpy().astype(ml_dtypes.bfloat16)
    return t.numpy()


# ----------------------------------------------------------------------------- public API


@dataclasses.dataclass
class LoadedLM:
  config: Any  # GPT2Config | LlamaConfig
  module: CausalLM  # the Linen module: module.apply({'params': params}, input_ids, ...)
  params: dict  # the frozen pytree (plain arrays)
  tokenizer: Any = None  # transformers AutoTokenizer, or None when the directory holds none


def read_hf_config(directory: str) -> dict:
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.exists(path):
    raise CheckpointError(f'{path}: missing (a checkpoint directory needs config.json)')
  try:
    with open(path) as f:
      d = json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f'{path}: invalid JSON: {e}') from e
  if d.get('model_type') not in REGISTRY:
    raise CheckpointError(f'{path}: unknown model_type {d.get("model_type")!r} '
                          f'(supported: {sorted(REGISTRY)})')
  return d


def resolve(path_or_hub_id: str) -> str:
  """A local directory as is; anything else is a hub id, fetched through huggingface_hub."""
  if os.path.isdir(path_or_hub_id):
    return path_or_hub_id
  if os.path.exists(path_or_hub_id) or path_or_hub_id.startswith(('/', './', '../', '~')):
    raise CheckpointError(f'{path_or_hub_id}: not a checkpoint directory')
  head = path_or_hub_id.split('/')[0]
  if path_or_hub_id.count('/') > 1 or (head != path_or_hub_id and os.path.isdir(head)):
    # A hub id is NAME or OWNER/NAME: this is a relative path that does not exist.
    raise CheckpointError(f'{path_or_hub_id}: no such directory')
  from huggingface_hub import snapshot_download
  try:
    return snapshot_download(
        path_or_hub_id,
        allow_patterns=['*.json', '*.safetensors', '*.model', '*.txt', 'tokenizer*'])
  except Exception as e:  # offline, unknown repository, gated: one line, not the network stack
    first = (str(e).strip().splitlines() or [''])[0][:200]
    raise CheckpointError(f'{path_or_hub_id}: not a local directory, and fetching it as a hub '
                          f'id failed ({type(e).__name__}: {first})') from e


def load_params(directory: str, config, shardings=None) -> dict:
  """The frozen params of `config`'s module from the HF tensors in `directory`.

  `shardings`: optional pytree of jax.sharding.Sharding matching the params;
  each tensor is placed as it is read.
  """
  module = module_for(config.replace(scan_layers=False, remat=False))
  expected = param_shapes(module)
  rules = expand_rules(config)
  assert set(rules) == set(expected), sorted(set(rules) ^ set(expected))
  tensors = _Tensors(directory)
  prefix = OPTIONAL_PREFIX[config.model_type]
  if prefix:  # accept keys with or without the bare-model prefix
    available = {(k if k.startswith(prefix) or k.startswith('lm_head') else prefix + k): k
                 for k in tensors.file_of}
  else:
    available = {k: k for k in tensors.file_of}
  where = (os.path.join(directory, SAFETENSORS_INDEX)
           if os.path.exists(os.path.join(directory, SAFETENSORS_INDEX)) else
           sorted(set(tensors.file_of.values()))[0])
  missing = [r.hf for r in rules.values() if r.hf not in available]
  if missing:
    raise CheckpointError(f'{where}: missing tensor {missing[0]!r}'
                          + (f' (and {len(missing) - 1} more: {missing[1:4]})' if len(missing) > 1
                             else ''))
  used = {r.hf for r in rules.values()}
  ignored = [re.compile(p) for p in IGNORED[config.model_type]]
  extra = [available[k] for k in available if k not in used
           and not any(p.match(available[k]) for p in ignored)]
  if extra:
    raise CheckpointError(f'{tensors.file_of[extra[0]]}: unexpected tensor {extra[0]!r} '
                          f'for this config' + (f' (and {len(extra) - 1} more)' if len(extra) > 1
                                                else ''))
  np_dtype = np.dtype(config.jnp_param_dtype)
  flat = {}
  for ours, rule in rules.items():
    shape = tuple(expected[ours].shape)
    hf_key = available[rule.hf]
    x = tensors.get(hf_key)
    want = _hf_shape(shape, rule)
    if tuple(x.shape) != want:
      raise CheckpointError(f'{tensors.file_of[hf_key]}: tensor {hf_key!r} has shape '
                            f'{tuple(x.shape)}, expected {want} for this config')
    flat[ours] = to_ours(x, rule, shape).astype(np_dtype)
  if config.scan_layers:
    flat = stack_layers(flat, config.n_layers)
  params = traverse_util.unflatten_dict(flat, sep='/')
  if shardings is None:
    return jax.tree.map(jnp.asarray, params)
  return jax.tree.map(jax.device_put, params, shardings)


def load_lm(path_or_hub_id: str, *, dtype: str = 'float32', param_dtype: str | None = None,
            scan_layers: bool = False, remat: bool = False, shardings=None) -> LoadedLM:
  """Loads an HF GPT-2 or Llama checkpoint (local directory or hub id) as a frozen pytree.

  Weights: model.safetensors, sharded safetensors (model.safetensors.index.json),
  or pytorch_model.bin (torch.load with weights_only=True; needs torch).
  `param_dtype` defaults to `dtype`.
  """
  directory = resolve(path_or_hub_id)
  hf_cfg = read_hf_config(directory)
  try:
    config = config_from_hf(hf_cfg, dtype=dtype, param_dtype=param_dtype or dtype,
                            scan_layers=scan_layers, remat=remat)
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f'{os.path.join(directory, CONFIG_FILE)}: {e}') from e
  params = load_params(directory, config, shardings)
  return LoadedLM(config=config, module=module_for(config), params=params,
                  tokenizer=load_tokenizer(directory))


def load_tokenizer(directory: str):
  """The checkpoint's tokenizer (AutoTokenizer), or None if it has no tokenizer files.

  A Llama checkpoint whose only tokenizer file is a bare sentencepiece `tokenizer.model` (as
  Meta's original downloads ship it) gets LlamaTokenizer with Llama's BOS added, which
  AutoTokenizer would not choose without a tokenizer_config.json (converting the model needs
  `sentencepiece`)."""
  names = ('tokenizer.json', 'tokenizer_config.json', 'vocab.json', 'tokenizer.model')
  present = [n for n in names if os.path.exists(os.path.join(directory, n))]
  if not present:
    return None
  if present == ['tokenizer.model'] and _model_type(directory) == 'llama':
    from transformers import LlamaTokenizer
    return LlamaTokenizer.from_pretrained(directory, add_bos_token=True)
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(directory)


def _model_type(directory: str) -> str | None:
  try:
    with open(os.path.join(directory, CONFIG_FILE)) as f:
      return json.load(f).get('model_type')
  except (OSError, ValueError):
    return None  # read_hf_config names the problem when the model loads


def save_lm(directory: str, config, params: dict, tokenizer=None) -> None:
  """Exports params and config to `directory` as an HF checkpoint (config.json + model.safetensors)."""
  from safetensors.numpy import save_file
  os.makedirs(directory, exist_ok=True)
  flat = traverse_util.flatten_dict(jax.device_get(params), sep='/')
  if config.scan_layers:
    flat = unstack_layers(flat, config.n_layers)
  rules = expand_rules(config)
  if set(rules) != set(flat):
    raise ValueError(f'params do not match the config: differing paths '
                     f'{sorted(set(rules) ^ set(flat))[:5]}')
  hf_cfg = config.to_hf()
  hf_cfg['torch_dtype'] = config.param_dtype
  tensors = {}
  for ours, rule in rules.items():
    x = np.asarray(flat[ours])
    tensors[rule.hf] = np.ascontiguousarray(to_hf(x, rule, _hf_shape(x.shape, rule)))
  save_file(tensors, os.path.join(directory, SAFETENSORS_FILE), metadata={'format': 'pt'})
  with open(os.path.join(directory, CONFIG_FILE), 'w') as f:
    json.dump(hf_cfg, f, indent=2)
  if tokenizer is not None:
    tokenizer.save_pretrained(directory)


__all__ = ['CheckpointError', 'LoadedLM', 'load_lm', 'save_lm', 'load_params', 'count_params',
           'param_shapes', 'stack_layers', 'unstack_layers']
