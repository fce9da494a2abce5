"""The method registry (methods.py): every evaluation method behind one interface, each with a
frozen Hparams dataclass whose defaults are the paper's values, overridden by name."""

from __future__ import annotations

import dataclasses

import pytest

from metal_jax import methods
from metal_jax.baselines import soft_prompt


def test_registry():
  """One registry: every method, its Hparams dataclass with the paper's values as defaults."""
  assert list(methods.REGISTRY) == ['zero_shot', 'icl', 'metal', 'metal_shuffled', 'soft_prompt',
                                    'p_tuning', 'prefix_tuning', 'metal_tune', 'bbtv2',
                                    'autoprompt', 'rlprompt', 'metaprompting']
  with pytest.raises(TypeError, match='abstract'):
    methods.Method()  # the interface alone is not a method
  d = methods.hparams_from([])
  assert list(d) == list(methods.REGISTRY)
  assert (d['soft_prompt'].lr, d['p_tuning'].lr, d['prefix_tuning'].lr) == (4e-5, 1.6e-4, 2e-4)
  for m in ('soft_prompt', 'p_tuning', 'prefix_tuning'):
    assert (d[m].epochs, d[m].batch_size, d[m].prompt_len) == (10, 16, 20)
  assert (d['metal_tune'].lr, d['metal_tune'].epochs) == (0.02, 9)
  assert (d['bbtv2'].prompt_len, d['bbtv2'].popsize, d['bbtv2'].budget) == (50, 5, 3840)
  assert (d['rlprompt'].prompt_len, d['rlprompt'].top_k, d['rlprompt'].lr) == (5, 256, 5e-5)
  assert (d['rlprompt'].target_rate, d['rlprompt'].clip_norm) == (1e-3, 5.0)
  assert (d['autoprompt'].num_cand, d['autoprompt'].iters) == (10, 32)
  for m in ('zero_shot', 'icl', 'metal', 'metal_shuffled'):
    assert dataclasses.fields(d[m]) == ()
  with pytest.raises(dataclasses.FrozenInstanceError):
    d['bbtv2'].budget = 1


def test_hparams_override_by_name_and_unknown_is_an_error():
  d = methods.hparams_from(['soft_prompt.lr=0.5', 'bbtv2.budget=480'])
  assert d['soft_prompt'].lr == 0.5 and d['bbtv2'].budget == 480 and d['p_tuning'].lr == 1.6e-4
  with pytest.raises(ValueError, match="soft_prompt has no hyperparameter 'learning_rate'"):
    methods.hparams_from(['soft_prompt.learning_rate=1.0'])
  with pytest.raises(ValueError, match="unknown method 'nosuch'"):
    methods.hparams_from(['nosuch.lr=1'])
  with pytest.raises(ValueError, match='budget takes a int'):
    methods.hparams_from(['bbtv2.budget=many'])
  with pytest.raises(TypeError, match='learning_rate'):
    soft_prompt.Hparams(learning_rate=1.0)


def test_resolve_all_and_unknown():
  assert methods.resolve(['all']) == list(methods.REGISTRY)
  assert methods.resolve([' metal', 'icl ', '']) == ['metal', 'icl']
  with pytest.raises(ValueError, match='unknown'):
    methods.resolve(['metal', 'nonsense'])
