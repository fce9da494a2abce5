"""The paper's meta-training settings (MetaL-Prompt, Section 4), shared by the per-experiment configs.

Each configs/{gpt2_large,gpt2_xl,llama2_7b,llama3_8b}_{setting}.py is one call of `paper_config`,
which starts from configs/default.py and names the setting's JSON file by path.
A config file takes an optional argument, the (n_P, n_L) split:
  --config=configs/gpt2_xl_cls2cls.py        # (16, 0), the paper's default
  --config=configs/gpt2_xl_cls2cls.py:12,4   # the (12, 4) variant
Set the data and the model on the command line:
  --config.data_dir=/path/to/metaicl/data --config.model=/path/to/gpt2-xl (or a hub id)
"""

from configs import default, setting_path

# Learning rate and epochs per setting (the paper: AdamW, linear decay, no warmup).
SETTINGS = {
    'cls2cls': dict(lr=2e-4, epochs=10),
    'hr2lr': dict(lr=1e-4, epochs=6),
    'qa2qa': dict(lr=2e-4, epochs=8),
}
MODELS = {'gpt2_large': 'gpt2-large', 'gpt2_xl': 'gpt2-xl', 'llama2_7b': 'meta-llama/Llama-2-7b-hf',
          'llama3_8b': 'meta-llama/Llama-3.1-8B'}  # Llama 3's shape with llama3 rope scaling


def paper_config(model: str, setting: str, split: str | None = None):
  c = default.get_config()
  c.model = MODELS[model]
  c.setting = setting_path(setting)
  c.data_dir = '/path/to/metaicl/data'  # override: --config.data_dir=...
  n_p, n_l = (int(x) for x in (split or '16,0').split(','))
  c.n_prompt_examples, c.n_lm_examples = n_p, n_l
  c.max_examples_per_task = 16384
  c.max_example_len = 256
  c.max_len = 1024
  c.pgm.prompt_len = 20
  c.pgm.design = 'prefix'
  c.num_steps = 0
  c.epochs = SETTINGS[setting]['epochs']
  c.optim.lr = SETTINGS[setting]['lr']
  c.optim.warmup_steps = 0
  c.optim.clip_norm = 0.0
  c.batch_size = 16
  c.eval.bbt_budget = 0  # BBTv2: the paper's 3,840 forward passes per task
  c.save_every = 1000
  c.log_every = 50
  # Large models: bf16 compute over float32 trainables, scanned + rematerialised layers,
  # the frozen LM sharded FSDP over every device (set --config.mesh.* for tensor parallelism).
  c.dtype = 'bfloat16'
  c.param_dtype = 'bfloat16'
  c.scan_layers = True
  c.remat = 'full'
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  return c
