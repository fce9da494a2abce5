"""experiment.py: a config -> the run's pieces, with start-up validation naming the --config
field at fault. (setup() end to end runs in the training and evaluation tests.)"""

from __future__ import annotations

import pytest

from configs import default
from metal_jax import experiment, pgm


@pytest.mark.parametrize('field, value, message', [
    ('batch_size', 0, 'must be positive'),
    ('n_prompt_examples', 0, 'must be >= 1'),
    ('n_lm_examples', -1, 'must be >= 0'),
    ('optim.accum_steps', 3, 'must divide batch_size=16'),
    ('pgm.design', 'nosuch', 'choose one of'),
    ('dtype', 'float16', 'float32 or bfloat16'),
    ('remat', 'some', 'choose one of'),
])
def test_validate_names_the_field(field, value, message):
  c = default.get_config()
  experiment.validate(c)
  parent, _, leaf = field.rpartition('.')
  (c[parent] if parent else c)[leaf] = value
  with pytest.raises(ValueError, match=f'--config.{field}={value!r}: {message}'):
    experiment.validate(c)


def test_no_steps_and_no_epochs_is_refused():
  c = default.get_config()
  c.num_steps, c.epochs = 0, 0
  with pytest.raises(ValueError, match='--config.epochs=0: set epochs or num_steps'):
    experiment.validate(c)


def test_pgm_and_optim_configs_come_from_the_config():
  c = default.get_config()
  c.lora.targets = ' q, v ,'
  c.pgm.design, c.pgm.prompt_len = 'hidden_state', 7
  p = experiment.pgm_config(c)
  assert isinstance(p, pgm.PGMConfig)
  assert (p.design, p.prompt_len, p.lora.targets, p.lora.rank) == ('hidden_state', 7, ('q', 'v'), 16)
  o = experiment.optim_config(c)
  assert (o.lr, o.clip_norm, o.accum_steps) == (c.optim.lr, c.optim.clip_norm, 1)
  assert experiment.config_json(c)['pgm']['prompt_len'] == 7
