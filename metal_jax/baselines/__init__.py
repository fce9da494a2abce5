"""Per-task prompt-tuning baselines of the paper, the LM frozen, under the paper's budget.

Each method is `run(module, params, task, idx, spec, *, rng, init_prompt=None, **hparams)
-> common.TuneResult`: it tunes a batch-1 prompt on the examples idx of `task`
(the few-shot set; the paper uses 16) and reports the LM forward/backward
passes it spent (one pass = one batch through the LM).

  soft_prompt    SoftPrompt (Lester et al. 2021): input embeddings from sampled vocabulary rows
  p_tuning       P-tuning (Liu et al. 2021): input embeddings from an LSTM + MLP encoder
  prefix_tuning  Prefix-tuning (Li & Liang 2021): per-layer prefix KV from an MLP
  metal_tune     MetaL(+Tune): the PGM's prompt (init_prompt) tuned directly
  bbtv2          BBTv2 (Sun et al. 2022): CMA-ES over per-layer random subspaces, no gradients

DEFAULTS holds the paper's hyperparameters (hparams override them by name).
The returned prompt's length may differ from spec.prompt_len (BBTv2: 50): score
it with spec.with_prompt_len(prompt.length) so that sequences leave room for it.
"""

from __future__ import annotations

from typing import Callable

from metal_jax.baselines import bbtv2, common, metal_tune, p_tuning, prefix_tuning, soft_prompt
from metal_jax.baselines.common import TuneResult, train_batch, tune

METHODS: dict[str, Callable[..., TuneResult]] = {
    'soft_prompt': soft_prompt.run,
    'p_tuning': p_tuning.run,
    'prefix_tuning': prefix_tuning.run,
    'metal_tune': metal_tune.run,
    'bbtv2': bbtv2.run,
}

DEFAULTS: dict[str, dict] = {
    'soft_prompt': soft_prompt.DEFAULTS,
    'p_tuning': p_tuning.DEFAULTS,
    'prefix_tuning': prefix_tuning.DEFAULTS,
    'metal_tune': metal_tune.DEFAULTS,
    'bbtv2': bbtv2.DEFAULTS,
}

NOT_IMPLEMENTED: dict[str, str] = {
    'rlprompt': 'RLPrompt (Deng et al. 2022) is not implemented yet',
}


def get(name: str) -> Callable[..., TuneResult]:
  """The method's run function; a clear error for unknown or not-implemented methods."""
  if name in NOT_IMPLEMENTED:
    raise NotImplementedError(NOT_IMPLEMENTED[name])
  if name not in METHODS:
    raise KeyError(f'unknown baseline {name!r} (known: {sorted(METHODS)}; '
                   f'not implemented: {sorted(NOT_IMPLEMENTED)})')
  return METHODS[name]
