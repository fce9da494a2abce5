"""The paper's cls2cls meta-training recipe on Llama-3.1-8B (GQA 32/8, a 128,256-token vocabulary,
llama3 rope scaling; not in the paper, which stops at Llama-2 7B);
`--config=configs/llama3_8b_cls2cls.py:12,4` for the (12, 4) split."""

from configs.paper import paper_config


def get_config(split=None):
  return paper_config('llama3_8b', 'cls2cls', split)
