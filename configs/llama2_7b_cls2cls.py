"""The paper's llama2_7b cls2cls meta-training run; `--config=configs/llama2_7b_cls2cls.py:12,4` for the (12, 4) split."""

from configs.paper import paper_config


def get_config(split=None):
  return paper_config('llama2_7b', 'cls2cls', split)
