"""Per-task prompt-tuning baselines of the paper, the LM frozen, under the paper's budget.

Each method is `run(module, params, task, idx, spec, hp, *, rng) -> common.TuneResult`
(metal_tune also takes the PGM's `init_prompt`), `hp` the module's frozen `Hparams`
dataclass (the paper's values as defaults): it tunes a batch-1 prompt on the examples idx of `task`
(the few-shot set; the paper uses 16) and reports the LM forward/backward
passes it spent (one pass = one batch through the LM).

  soft_prompt    SoftPrompt (Lester et al. 2021): input embeddings from sampled vocabulary rows
  p_tuning       P-tuning (Liu et al. 2021): input embeddings from an LSTM + MLP encoder
  prefix_tuning  Prefix-tuning (Li & Liang 2021): per-layer prefix KV from an MLP
  metal_tune     MetaL(+Tune): the PGM's prompt (init_prompt) tuned directly
  bbtv2          BBTv2 (Sun et al. 2022): CMA-ES over per-layer random subspaces, no gradients
  autoprompt     AutoPrompt (Shin et al. 2020): gradient-guided search over discrete triggers
  rlprompt       RLPrompt (Deng et al. 2022): a discrete prompt from a policy trained by soft
                 Q-learning (run() also takes the tokenizer: its prompt is text)
  metaprompting  MetaPrompting (Hou et al. 2022): a soft prompt's initialisation meta-trained with
                 first-order MAML (meta_train, once), adapted per task by its inner loop
                 (run() also takes the meta-learned `init_embeds`)

metal_jax/methods.py wraps each in the evaluation's one method interface and registry.
The returned prompt's length may differ from spec.prompt_len (BBTv2: 50): score
it with spec.with_prompt_len(prompt.length) so that sequences leave room for it.
"""

from __future__ import annotations

from metal_jax.baselines import (autoprompt, bbtv2, common, metal_tune, metaprompting, p_tuning,
                                 prefix_tuning, rlprompt, soft_prompt)
from metal_jax.baselines.common import TuneResult, train_batch, tune
