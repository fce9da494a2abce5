"""metal_jax.serving.generate: greedy parity with transformers' generate (a prefix, no prefix,
an embeddings prompt), per-row prompts in one batch, sampling, EOS / length / stop strings,
and bounded compilations.

Tiny random HF models (GPT-2; Llama with GQA and llama3 RoPE scaling) are built from configs,
saved with `save_pretrained` and loaded with `load_lm`, as in tests/test_models.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

transformers.utils.logging.disable_progress_bar()

from metal_jax.models import KV, module_for
from metal_jax.models.hf import load_lm
from metal_jax.pgm import Prompt
from metal_jax.serving import generate as gen
from metal_jax.serving.generate import GenerationResult, SamplingParams

VOCAB = 100
LLAMA3 = {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
          'original_max_position_embeddings': 16}

CASES = {
    'gpt2': lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.1,
        bos_token_id=None, eos_token_id=None, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    # GQA (2 groups of 2), llama3 RoPE scaling, theta 500000
    'llama_gqa_llama3': lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-5, rope_parameters={**LLAMA3, 'rope_theta': 500000.0},
        initializer_range=0.1, bos_token_id=None, eos_token_id=None, pad_token_id=None),
}


class _Models:
  """Each HF model built (seeded, every weight perturbed), saved and loaded once a session."""

  def __init__(self, tmp_path_factory):
    self.tmp = tmp_path_factory
    self._built = {}

  def get(self, name):
    if name not in self._built:
      torch.manual_seed(sum(map(ord, name)))
      cfg = CASES[name]()
      cls = (transformers.GPT2LMHeadModel if isinstance(cfg, transformers.GPT2Config)
             else transformers.LlamaForCausalLM)
      model = cls._from_config(cfg, attn_implementation='eager', dtype=torch.float32).eval()
      with torch.no_grad():
        for p in model.parameters():
          p.add_(0.05 * torch.randn_like(p))
      path = self.tmp.mktemp(name)
      model.save_pretrained(path)
      self._built[name] = (model, load_lm(str(path)))
    return self._built[name]


@pytest.fixture(scope='session')
def models(tmp_path_factory):
  return _Models(tmp_path_factory)


def _random_kv(lm, b, p, seed):
  """A random prefix KV of [L, b, p, K, H] (float32 numpy)."""
  cfg = lm.config
  rng = np.random.default_rng(seed)
  shape = (cfg.n_layers, b, p, cfg.n_kv_heads, cfg.head_dim)
  return rng.normal(size=shape).astype(np.float32), rng.normal(size=shape).astype(np.float32)


def _torch_cache(k, v):
  """A DynamicCache from our prefix layout [L, B, P, K, H] -> per-layer [B, K, P, H]."""
  k = torch.as_tensor(k).permute(0, 1, 3, 2, 4)
  v = torch.as_tensor(v).permute(0, 1, 3, 2, 4)
  return transformers.DynamicCache([(k[i].contiguous(), v[i].contiguous())
                                    for i in range(k.shape[0])])


def _row_prompt(k, v, i):
  return Prompt(kv=KV(jnp.asarray(k[:, i:i + 1]), jnp.asarray(v[:, i:i + 1])))


def _ids(seed, *lengths):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, VOCAB, n).tolist() for n in lengths]


def _greedy(lm, prompts, inputs, n, module=None, **kw):
  return gen.generate(module or lm.module, lm.params, prompts, inputs,
                      SamplingParams(max_new_tokens=n), rng=jax.random.key(0), **kw)


class CharTokenizer:
  """A character per token (ten letters, so strings recur): enough for stop strings."""
  ALPHABET = 'abcdefghij'

  def decode(self, ids):
    return ''.join(self.ALPHABET[i % len(self.ALPHABET)] for i in ids)


# ---------------------------------------------------------------------------------------------
# Greedy parity with transformers' generate
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize('p', [5, 0], ids=['prefix', 'no_prefix'])
@pytest.mark.parametrize('name', list(CASES))
def test_greedy_equals_hf_generate(models, name, p):
  """transformers 5.23 continues a pre-filled cache when input_ids hold only the new tokens and
  attention_mask covers prefix + input (P + T): generate sees mask length != input length, so it
  does not slice the input, and infers positions P..P+T-1 from the mask's cumsum."""
  hf, lm = models.get(name)
  b, t, n = 2, 6, 10
  ids = np.asarray(_ids(1, t, t))
  kw = {}
  if p:
    k, v = _random_kv(lm, b, p, seed=2)
    kw['past_key_values'] = _torch_cache(k, v)
  with torch.no_grad():
    ref = hf.generate(torch.as_tensor(ids), attention_mask=torch.ones(b, p + t, dtype=torch.long),
                      max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                      pad_token_id=0, **kw)
  want = ref[:, t:].numpy()
  assert want.shape == (b, n)
  prompts = [_row_prompt(k, v, i) for i in range(b)] if p else [None] * b
  got = _greedy(lm, prompts, list(ids), n)
  for i, r in enumerate(got):
    assert r.tokens == want[i].tolist(), (i, r.tokens, want[i].tolist())
    assert r.finish_reason == 'length' and r.text is None


@pytest.mark.parametrize('name', list(CASES))
def test_embeds_prompt_equals_hf_generate_from_inputs_embeds(models, name):
  """A prompt of input embeddings [1, P, D] is served as the keys/values the LM makes of it:
  the same tokens as transformers generating from inputs_embeds = [prompt ; input's embeddings]."""
  hf, lm = models.get(name)
  p, t, n = 4, 5, 8
  ids = _ids(3, t)[0]
  e = np.random.default_rng(4).normal(size=(1, p, lm.config.d_model)).astype(np.float32) * 0.5
  with torch.no_grad():
    x = torch.cat([torch.as_tensor(e), hf.get_input_embeddings()(torch.as_tensor([ids]))], 1)
    ref = hf.generate(inputs_embeds=x, attention_mask=torch.ones(1, p + t, dtype=torch.long),
                      max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                      pad_token_id=0)
  got = _greedy(lm, [Prompt(embeds=jnp.asarray(e))], [ids], n)[0]
  assert got.tokens == ref[0, -n:].tolist()


# ---------------------------------------------------------------------------------------------
# Per-row prompts: a mixed batch gives each row what it gets alone
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize('name', list(CASES))
def test_mixed_batch_equals_each_row_alone(models, name):
  _, lm = models.get(name)
  k3, v3 = _random_kv(lm, 1, 3, seed=5)
  k9, v9 = _random_kv(lm, 1, 9, seed=6)
  e = np.random.default_rng(7).normal(size=(1, 5, lm.config.d_model)).astype(np.float32)
  prompts = [_row_prompt(k3, v3, 0), None, _row_prompt(k9, v9, 0), Prompt(embeds=jnp.asarray(e))]
  inputs = _ids(8, 4, 7, 2, 5)
  params = [SamplingParams(max_new_tokens=6),
            SamplingParams(max_new_tokens=9, temperature=1.0),
            SamplingParams(max_new_tokens=3, temperature=0.8, top_k=10),
            SamplingParams(max_new_tokens=7, temperature=1.2, top_p=0.9)]
  keys = jax.random.split(jax.random.key(11), len(inputs))  # one key per request
  batch = gen.generate(lm.module, lm.params, prompts, inputs, params, rng=keys)
  for i in range(len(inputs)):
    alone = gen.generate(lm.module, lm.params, [prompts[i]], [inputs[i]], [params[i]],
                         rng=keys[i:i + 1])[0]
    assert batch[i] == alone, i
    assert len(alone.tokens) == params[i].max_new_tokens and alone.finish_reason == 'length'
  # The prompts matter: row 0 without its prefix continues differently.
  plain = gen.generate(lm.module, lm.params, [None], [inputs[0]], [params[0]], rng=keys[:1])[0]
  assert plain.tokens != batch[0].tokens


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def _step_logits(lm, k, v, ids, new):
  """The logits each new token was drawn from: one forward over [prefix ; ids ; new]."""
  seq = jnp.asarray([list(ids) + list(new)])
  out = lm.module.apply({'params': lm.params}, seq, jnp.ones_like(seq),
                        KV(jnp.asarray(k), jnp.asarray(v)))
  return np.asarray(out.logits[0, len(ids) - 1:len(ids) - 1 + len(new)])  # [N, V]


def test_sampling(models):
  _, lm = models.get('llama_gqa_llama3')
  k, v = _random_kv(lm, 1, 4, seed=9)
  prompt, ids, n = _row_prompt(k, v, 0), _ids(10, 6)[0], 16

  def run(seed=0, **sp):
    return gen.generate(lm.module, lm.params, [prompt], [ids],
                        SamplingParams(max_new_tokens=n, **sp), rng=jax.random.key(seed))[0]

  greedy = run()
  hot = dict(temperature=2.0)
  assert run(seed=1, **hot) == run(seed=1, **hot)  # same key, same tokens
  assert run(seed=1, **hot).tokens != run(seed=2, **hot).tokens
  assert run(seed=1, **hot).tokens != greedy.tokens
  # top_k=1 and a tiny nucleus keep only the most likely token: greedy at any temperature.
  assert run(seed=3, temperature=1.5, top_k=1) == greedy
  assert run(seed=3, temperature=1.5, top_p=1e-4) == greedy
  # temperature 0 is greedy whatever top_k / top_p say.
  assert run(seed=4, temperature=0.0, top_k=7, top_p=0.5) == greedy
  # top_k=5: every token is among the 5 most likely of its step (and not always the first).
  kk = 5
  sampled = run(seed=5, temperature=3.0, top_k=kk).tokens
  logits = _step_logits(lm, k, v, ids, sampled)
  ranks = [(logits[j] > logits[j, tok]).sum() for j, tok in enumerate(sampled)]
  assert max(ranks) < kk and max(ranks) > 0, ranks
  # top_p: every token lies in the nucleus of its step (the most likely tokens of mass < top_p
  # before it).
  top_p = 0.6
  sampled = run(seed=6, temperature=1.0, top_p=top_p).tokens
  logits = _step_logits(lm, k, v, ids, sampled)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  for j, tok in enumerate(sampled):
    assert probs[j][probs[j] > probs[j, tok]].sum() < top_p + 1e-6, j


def test_sample_restricts_to_top_k_and_top_p():
  """sample() on fixed logits: the support is exactly the top-k / nucleus set."""
  rows = 400
  logits = jnp.log(jnp.asarray([[0.05, 0.4, 0.1, 0.3, 0.15]] * rows, jnp.float32))
  keys = jax.random.key_data(jax.random.split(jax.random.key(0), rows))
  run = jax.jit(gen.sample)
  draws = lambda t=1.0, k=0, p=1.0: set(np.asarray(run(
      logits, keys, jnp.zeros(rows, jnp.int32), jnp.full(rows, t, jnp.float32),
      jnp.full(rows, k, jnp.int32), jnp.full(rows, p, jnp.float32))).tolist())
  assert draws() == {0, 1, 2, 3, 4}
  assert draws(k=2) == {1, 3}
  assert draws(p=0.75) == {1, 3, 4}  # 0.4 + 0.3 < 0.75: the third most likely is needed
  assert draws(p=0.65) == {1, 3}
  assert draws(k=3, p=0.9) == {1, 3, 4}
  assert draws(t=0.0, k=3) == {1}


@pytest.mark.parametrize('kw, msg', [
    (dict(max_new_tokens=0), 'max_new_tokens: must be an int >= 1'),
    (dict(max_new_tokens=2.5), 'max_new_tokens: must be an int >= 1'),
    (dict(temperature=-0.1), 'temperature: must be >= 0'),
    (dict(temperature=float('nan')), 'temperature: must be a finite number'),
    (dict(top_k=-1), 'top_k: must be an int >= 0'),
    (dict(top_p=0.0), r'top_p: must be in \(0, 1\]'),
    (dict(top_p=1.5), r'top_p: must be in \(0, 1\]'),
    (dict(stop='abc'), 'stop: must be a tuple of strings'),
    (dict(stop=('a', '')), 'stop: must hold non-empty strings'),
])
def test_sampling_params_validation_names_the_field(kw, msg):
  with pytest.raises(ValueError, match=msg):
    SamplingParams(**kw)


def test_sampling_params_stop_list_becomes_a_tuple():
  assert SamplingParams(stop=['x', 'y']).stop == ('x', 'y')


# ---------------------------------------------------------------------------------------------
# Finishing: EOS, length, stop strings
# ---------------------------------------------------------------------------------------------


def test_eos_stops_a_row_while_others_continue(models):
  _, lm = models.get('gpt2')
  inputs = _ids(12, 5, 3)
  n = 10
  free = _greedy(lm, [None, None], inputs, n)
  # An EOS id row 0 produces (not first) and row 1 never does; a tuple, as config.json allows.
  candidates = [tok for tok in free[0].tokens[1:] if tok not in free[1].tokens]
  assert candidates, (free[0].tokens, free[1].tokens)
  eos = candidates[0]
  cut = free[0].tokens.index(eos) + 1
  module = module_for(lm.config.replace(eos_token_id=(eos, VOCAB + 1)))
  got = _greedy(lm, [None, None], inputs, n, module=module)
  assert got[0] == GenerationResult(free[0].tokens[:cut], None, 'eos')
  assert got[1] == free[1] and got[1].finish_reason == 'length'
  # With a tokenizer the EOS token is in the tokens but not in the text.
  tok = CharTokenizer()
  with_text = _greedy(lm, [None, None], inputs, n, module=module, tokenizer=tok)
  assert with_text[0].text == tok.decode(free[0].tokens[:cut - 1])
  assert with_text[1].text == tok.decode(free[1].tokens)


@pytest.mark.parametrize('every', [1, 3])
def test_stop_string_cuts_the_text(models, every):
  _, lm = models.get('llama_gqa_llama3')
  tok = CharTokenizer()
  inputs, n = _ids(13, 4, 6), 12
  free = _greedy(lm, [None, None], inputs, n)
  text = tok.decode(free[0].tokens)
  stop = text[4:6]
  at = text.find(stop)
  params = [SamplingParams(max_new_tokens=n, stop=('never-matches', stop)),
            SamplingParams(max_new_tokens=n)]
  got = gen.generate(lm.module, lm.params, [None, None], inputs, params, rng=jax.random.key(0),
                     tokenizer=tok, stop_check_every=every)
  assert got[0] == GenerationResult(free[0].tokens[:at + len(stop)], text[:at], 'stop')
  assert got[1] == GenerationResult(free[1].tokens, tok.decode(free[1].tokens), 'length')
  with pytest.raises(ValueError, match='stop: stop strings need a tokenizer'):
    gen.generate(lm.module, lm.params, [None], inputs[:1], params[0], rng=jax.random.key(0))


def test_max_new_tokens_one_and_input_errors(models):
  _, lm = models.get('gpt2')
  r = _greedy(lm, [None], _ids(14, 3), 1)[0]
  assert len(r.tokens) == 1 and r.finish_reason == 'length'
  with pytest.raises(ValueError, match=r'inputs\[0\]: empty'):
    _greedy(lm, [None], [[]], 4)
  with pytest.raises(ValueError, match=r'inputs\[0\]: token ids outside'):
    _greedy(lm, [None], [[VOCAB]], 4)
  # GPT-2's learned positions end at n_positions = 64.
  with pytest.raises(ValueError, match=r"inputs\[0\]: .* exceed the model's 64 positions"):
    _greedy(lm, [None], [[1] * 60], 8)
  with pytest.raises(ValueError, match=r'prompts\[0\]: a row'):
    k, v = _random_kv(lm, 2, 3, seed=0)
    _greedy(lm, [Prompt(kv=KV(jnp.asarray(k), jnp.asarray(v)))], [[1, 2]], 4)


# ---------------------------------------------------------------------------------------------
# Compilations
# ---------------------------------------------------------------------------------------------


def test_compilations_are_bounded_by_the_buckets(models):
  """Input lengths, prompt lengths and max_new_tokens within one bucket reuse the compilations."""
  _, lm = models.get('llama_gqa_llama3')
  k, v = _random_kv(lm, 1, 8, seed=15)

  def run(t, p, n):
    prompt = Prompt(kv=KV(jnp.asarray(k[:, :, :p]), jnp.asarray(v[:, :, :p])))
    return gen.generate(lm.module, lm.params, [prompt, None], _ids(t, t, t - 1),
                        SamplingParams(max_new_tokens=n, temperature=1.0),
                        rng=jax.random.key(t))

  run(3, 2, 5)
  before = dict(gen.TRACES)
  sizes = gen.prefill._cache_size(), gen.decode._cache_size()
  for t, p, n in [(5, 7, 8), (7, 4, 6), (8, 1, 2)]:
    assert all(len(r.tokens) == n for r in run(t, p, n))
  assert dict(gen.TRACES) == before
  assert (gen.prefill._cache_size(), gen.decode._cache_size()) == sizes
  # A longer input moves to the next bucket: one more prefill and decode, then reuse again.
  run(9, 2, 5)
  run(12, 3, 4)
  assert gen.TRACES['prefill'] == before['prefill'] + 1
  assert gen.TRACES['decode'] == before['decode'] + 1


def test_bucket():
  assert [gen.bucket(x) for x in (1, 8, 9, 16, 17)] == [8, 8, 16, 16, 32]
  assert [gen.bucket(x, 1) for x in (1, 2, 3, 5)] == [1, 2, 4, 8]
