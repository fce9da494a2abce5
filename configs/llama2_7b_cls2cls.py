"""The paper's llama2_7b cls2cls meta-training run; `--config=configs/llama2_7b_cls2cls.py:12,4` for the (12, 4) split."""

from metal_jax.paper_configs import paper_config


def get_config(split=None):
  return paper_config('llama2_7b', 'cls2cls', split)
