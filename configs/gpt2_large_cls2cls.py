"""The paper's gpt2_large cls2cls meta-training run; `--config=configs/gpt2_large_cls2cls.py:12,4` for the (12, 4) split."""

from configs.paper import paper_config


def get_config(split=None):
  return paper_config('gpt2_large', 'cls2cls', split)
