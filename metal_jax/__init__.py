"""metal-jax: MetaL-Prompt (meta-learned prompt generation) in JAX/Flax."""

from metal_jax.models.hf import CheckpointError, LoadedLM, load_lm, save_lm

__all__ = ['CheckpointError', 'LoadedLM', 'load_lm', 'save_lm']
