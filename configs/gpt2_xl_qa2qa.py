"""The paper's gpt2_xl qa2qa meta-training run; `--config=configs/gpt2_xl_qa2qa.py:12,4` for the (12, 4) split."""

from configs.paper import paper_config


def get_config(split=None):
  return paper_config('gpt2_xl', 'qa2qa', split)
