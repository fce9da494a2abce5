"""Shared fixtures: tiny random transformers checkpoints saved to a temporary directory (no downloads)."""

import os

# Fake CPU devices for the sharding tests; must be set before jax is imported anywhere.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

import pytest  # noqa: E402

TINY_GPT2 = dict(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                 bos_token_id=0, eos_token_id=0)
TINY_LLAMA = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  bos_token_id=0, eos_token_id=0, pad_token_id=None)


def perturb_(model, seed=0, scale=0.05):
  """Random noise on every parameter, so norms and biases are exercised too."""
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(scale * torch.randn(p.shape, generator=g))
  return model


def save_hf(kind, directory, seed=0, **overrides):
  """Builds a tiny random HF model of `kind` ('gpt2' | 'llama'), saves it, returns the torch model."""
  import torch
  import transformers
  torch.manual_seed(seed)
  if kind == 'gpt2':
    cfg = transformers.GPT2Config(**{**TINY_GPT2, **overrides})
    model = transformers.GPT2LMHeadModel(cfg)
  else:
    cfg = transformers.LlamaConfig(**{**TINY_LLAMA, **overrides})
    model = transformers.LlamaForCausalLM(cfg)
  model = perturb_(model, seed).eval()
  model.save_pretrained(directory)
  return model


@pytest.fixture(scope='session')
def gpt2_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp('gpt2')
  save_hf('gpt2', d)
  return d


@pytest.fixture(scope='session')
def llama_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp('llama')
  save_hf('llama', d)
  return d


def tiny_run_config(model_dir, **synthetic):
  """The default config shrunk to a tiny train.py run on model_dir (a saved random GPT-2 with the
  built-in tokenizer): a small synthetic suite, P = 4, one LSTM layer, LoRA rank 4, 2 steps."""
  from configs import default
  c = default.get_config()
  c.model = str(model_dir)
  c.data_dir = ''
  c.synthetic.update(n_train_tasks=4, n_test_tasks=2, n_train_examples=48, n_test_examples=8,
                     **synthetic)
  c.pgm.prompt_len = 4
  c.pgm.lstm_layers = 1
  c.lora.rank = 4
  c.num_steps = 2
  c.progress = False
  c.async_checkpoints = False
  return c


def tiny_run_model(directory):
  """A random GPT-2 of 128 positions with the built-in tokenizer, saved to directory."""
  from metal_jax.data import synthetic
  tok = synthetic.build_tokenizer()
  save_hf('gpt2', directory, vocab_size=len(tok), n_positions=128)
  tok.save_pretrained(str(directory))
  return directory


@pytest.fixture(scope='session')
def synthetic_lm_dir(tmp_path_factory):
  """tiny_run_model once a session: the random GPT-2 the evaluation and baseline tests score with
  (the built-in tokenizer's vocabulary, 128 positions)."""
  return tiny_run_model(tmp_path_factory.mktemp('synthetic_lm'))


@pytest.fixture(scope='session')
def served_run(tmp_path_factory):
  """A tiny train.py run (2 steps, prefix design, P = 4, data-parallel mesh) that serving tests
  serve. Returns the workdir."""
  from metal_jax import run_train
  c = tiny_run_config(tiny_run_model(tmp_path_factory.mktemp('served_model')))
  c.batch_size = 8  # one episode a fake device
  workdir = str(tmp_path_factory.mktemp('served_run'))
  run_train.train(c, workdir)
  return workdir
