"""GPT-2 and Llama as Flax Linen modules over explicit param pytrees."""

from metal_jax.models.base import CausalLM, ComputeConfig, LMOutput
from metal_jax.models.gpt2 import GPT2Config, GPT2LM
from metal_jax.models.layers import KV
from metal_jax.models.llama import LlamaConfig, LlamaLM

# model_type (as in HF's config.json) -> (config class, module class)
REGISTRY = {'gpt2': (GPT2Config, GPT2LM), 'llama': (LlamaConfig, LlamaLM)}


def module_for(config) -> CausalLM:
  """The Linen module for a config."""
  return REGISTRY[config.model_type][1](config)


def config_from_hf(d: dict, **compute):
  """Our config from an HF config.json dict; `compute` sets dtype, param_dtype, scan_layers, remat."""
  model_type = d.get('model_type')
  if model_type not in REGISTRY:
    raise ValueError(f'unknown model_type {model_type!r} (supported: {sorted(REGISTRY)})')
  return REGISTRY[model_type][0].from_hf(d, **compute)
