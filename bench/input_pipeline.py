"""The input pipeline against an accelerator's step: host time per meta-training batch.

  python bench/input_pipeline.py                                # 43 tasks, in a temporary directory
  python bench/input_pipeline.py --data_dir=/tmp/pipeline_data  # kept: reruns skip data and tokens
  python bench/input_pipeline.py --tasks=4 --batches=100 --loop_s=4    # a quick look

1. Data shaped like the paper's cls2cls meta-training set: --tasks MetaICL-format classification
   tasks (cls2cls has 43) of 16,384 examples each, inputs of 20-200 words (uniform; pseudo-English
   words with Zipf frequencies, some followed by a comma or full stop), 2-4 options. They are read
   and tokenised through the run's own path (tasks.load_tokenized, cached, max_example_len 256) with
   a GPT-2-like tokenizer trained here: byte-level BPE, GPT-2's pre-tokenizer and 50,257-entry
   vocabulary, trained on --bpe_sample inputs (nothing downloaded); or, with
   --tokenizer=synthetic, the built-in word-level one (data/synthetic.py: one token a word).
2. Episodes as configs/paper.py makes them: n_P=16, n_L=0, P=20, max_len 1,024, batch 16, over the
   paper configs' mesh (fsdp over every device) on --devices host devices.
3. Timed per batch, over --batches steps: EpisodeSampler.batch(step), sharding.global_batch onto the
   mesh (until the arrays are ready), and both together, run_train.batch_loader: what the training
   loop's prefetch thread runs for a step. Median, p90, max.
4. Compared with the fastest projected step (--fastest_step_s): the ratio step / host time.
5. The loop with and without prefetch (depth --prefetch against 0), run_train's batch loader
   feeding a STAND-IN device step, not a training step: the loop waits for the batch's arrays, then
   sleeps the step's time (a sleeping thread releases the GIL, as a host waiting on an accelerator
   does). Every step waits for the last, so without prefetch host time and step add up: the case
   of a loop that syncs each step. (A real JAX loop dispatches asynchronously and syncs at log_every
   and checkpoints; prefetch makes the overlap independent of that.) Two step times: the projected
   step, and the measured host time per batch (break-even, where overlap matters most). Runs
   alternate with and without prefetch, --repeats times; medians of the time per step.

--fastest_step_s's default, 0.49 s: a GPT2-XL Equation 1 step at batch 16 x 1,024 tokens on one
H100 at 50% MFU. GPT2-XL's matmul parameters: N = 12 x 48 layers x 1600^2 = 1.47e9 (embeddings are
lookups, and Equation 1 evaluates the LM head at the answers' positions only). T = 16 x 1,024 =
16,384 tokens in each half.
  PGM forward + backward                        6 N T = 1.45e14 FLOPs  (its backward needs only
                                                activation and LoRA gradients: 6NT is generous)
  frozen LM forward + backward to the prefix    4 N T = 9.66e13 FLOPs  (activation gradients only)
  total 2.42e14 FLOPs / (0.5 x 989e12 FLOP/s bf16 dense) = 0.49 s.
Left out, each making the real step slower: attention's score and value matmuls (~10% more at 1,024
tokens) and the paper configs' full remat (one more forward pass of each half). With n_L = 0 the LM
half is x + y only; at the padded lengths of the measured batches (the printout) the same count
gives a shorter step, printed too. GPT2-large's step would be about half of GPT2-XL's.
"""

import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The mesh's host devices (--devices), in XLA_FLAGS before jax loads.
_DEVICES = next((a.split('=', 1)[1] for a in sys.argv if a.startswith('--devices=')), '8')
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           f' --xla_force_host_platform_device_count={_DEVICES}').strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import tokenizers  # noqa: E402
import transformers  # noqa: E402
from absl import app, flags  # noqa: E402
from tokenizers import decoders, models, pre_tokenizers, trainers  # noqa: E402

from metal_jax import run_train, sharding  # noqa: E402
from metal_jax.data import synthetic  # noqa: E402
from metal_jax.data.episodes import EpisodeSampler, EpisodeSpec  # noqa: E402
from metal_jax.data.prefetch import Prefetcher  # noqa: E402
from metal_jax.data.tasks import load_tokenized, meta_train_file  # noqa: E402

flags.DEFINE_string('data_dir', '', 'where the tasks and their token cache go; kept and reused if '
                    'given (else a temporary directory, removed)')
flags.DEFINE_integer('tasks', 43, 'meta-training tasks (cls2cls: 43)')
flags.DEFINE_integer('examples', 16384, 'examples per task (the paper caps tasks at 16,384)')
flags.DEFINE_enum('tokenizer', 'bpe', ['bpe', 'synthetic'], 'bpe: GPT-2-like byte-level BPE '
                  'trained here; synthetic: the built-in word-level tokenizer')
flags.DEFINE_integer('bpe_sample', 20000, 'inputs the BPE is trained on')
flags.DEFINE_integer('batches', 300, 'timed batches (distinct steps), after 10 untimed')
flags.DEFINE_integer('devices', 8, 'host devices of the mesh (read before jax loads)')
flags.DEFINE_float('fastest_step_s', 0.49, 'the fastest projected accelerator step, seconds '
                   '(default: GPT2-XL, batch 16 x 1,024, H100 at 50% MFU; derived above)')
flags.DEFINE_integer('prefetch', 2, 'prefetch depth of the loop comparison (the config default)')
flags.DEFINE_float('loop_s', 12.0, 'seconds a loop run (steps = loop_s / step time, >= 20)')
flags.DEFINE_integer('repeats', 3, 'loop runs per setting, alternating with and without prefetch')
flags.DEFINE_integer('seed', 0, 'data and episode seed')
FLAGS = flags.FLAGS

GPT2_XL_MATMUL_PARAMS = 12 * 48 * 1600 ** 2
H100_BF16_DENSE = 989e12
MFU = 0.5
N_P, P, MAX_LEN, MAX_EXAMPLE_LEN, BATCH = 16, 20, 1024, 256, 16
WORDS_PER_INPUT = (20, 200)
LABELS = ('positive negative neutral entailment contradiction yes no true false sports business '
          'world science technology joy anger sadness fear surprise love offensive hateful normal '
          'spam ham relevant irrelevant correct incorrect agree disagree support refute').split()
DATA_VERSION = 1  # bump when the generated content changes


def step_seconds(pgm_tokens: int, lm_tokens: int, n: float = GPT2_XL_MATMUL_PARAMS) -> float:
  """6NT for the PGM half, 4NT for the frozen LM's, at MFU of an H100's bf16 dense peak."""
  return (6 * n * pgm_tokens + 4 * n * lm_tokens) / (MFU * H100_BF16_DENSE)


# ----------------------------------------------------------------------------- data


def pseudo_words(rng, n: int) -> list[str]:
  """n distinct lowercase pseudo-English words of 1-4 syllables."""
  onsets = ('b c d f g h j k l m n p r s t v w y z bl br ch cl cr dr fl fr gl gr pl pr sh sl sp '
            'st str th tr wh').split() + ['']
  vowels = 'a e i o u ai ea ee oo ou io'.split()
  codas = [''] * 6 + 'n r s t l m nd nt st ng rk ck'.split()
  out, seen = [], set()
  while len(out) < n:
    w = ''.join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                for _ in range(rng.choice([1, 2, 2, 3, 3, 4])))
    if w not in seen:
      seen.add(w)
      out.append(w)
  return out


class TextSource:
  """Inputs of WORDS_PER_INPUT words (uniform): Zipf-distributed words, 10% followed by a comma or
  a full stop (punctuate=True)."""

  def __init__(self, words: list[str], punctuate: bool):
    self.vocab = len(words)
    marks = (',', '.') if punctuate else ('', '')
    self.words = np.array([w + m for m in ('',) + marks for w in words], object)
    p = 1.0 / (np.arange(self.vocab) + 2.7)
    self.cdf = np.cumsum(p / p.sum())

  def inputs(self, rng, n: int) -> list[str]:
    lengths = rng.integers(WORDS_PER_INPUT[0], WORDS_PER_INPUT[1] + 1, n)
    ids = np.minimum(np.searchsorted(self.cdf, rng.random(int(lengths.sum()))), self.vocab - 1)
    u = rng.random(len(ids))
    ids = ids + self.vocab * ((u < 0.05) + 2 * ((u >= 0.05) & (u < 0.10)))
    words, ends = self.words[ids], np.cumsum(lengths)
    return [' '.join(words[e - k:e]) for e, k in zip(ends, lengths)]


def write_tasks(data_dir: str, text: TextSource) -> None:
  for t in range(FLAGS.tasks):
    name = f'cls_task_{t:02d}'
    rng = np.random.default_rng([FLAGS.seed, 2, t])
    options = [str(o) for o in rng.choice(LABELS, rng.integers(2, 5), replace=False)]
    labels = rng.integers(len(options), size=FLAGS.examples)
    path = meta_train_file(data_dir, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
      for x, y in zip(text.inputs(rng, FLAGS.examples), labels):
        f.write(json.dumps({'task': name, 'input': x, 'output': options[y], 'options': options})
                + '\n')
    os.replace(path + '.tmp', path)


def train_bpe(texts: list[str]):
  """A GPT-2-like tokenizer: byte-level BPE with GPT-2's pre-tokenizer and vocabulary size."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=50257, special_tokens=['<|endoftext|>'], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  eos = '<|endoftext|>'
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eos, eos_token=eos,
                                              pad_token=eos, model_max_length=1024)


def prepare(data_dir: str) -> tuple[list, dict]:
  """The tokenised tasks and facts about them; written (and the BPE trained) once per data_dir
  and parameters, tokenised once per tokenizer (load_tokenized's cache)."""
  params = {'version': DATA_VERSION, 'tasks': FLAGS.tasks, 'examples': FLAGS.examples,
            'tokenizer': FLAGS.tokenizer, 'bpe_sample': FLAGS.bpe_sample, 'seed': FLAGS.seed}
  marker, tok_dir = os.path.join(data_dir, 'bench_data.json'), os.path.join(data_dir, 'tokenizer')
  fresh = True
  if os.path.exists(marker):
    with open(marker) as f:
      fresh = json.load(f) != params
  t0 = time.perf_counter()
  if FLAGS.tokenizer == 'synthetic':  # it knows its own words only
    text = TextSource(list(synthetic.CONTENT_WORDS + synthetic.FILLER_WORDS), punctuate=False)
    tokenizer = synthetic.build_tokenizer()
  else:
    text = TextSource(pseudo_words(np.random.default_rng([FLAGS.seed, 1]), 40000), punctuate=True)
    if fresh:
      tokenizer = train_bpe(text.inputs(np.random.default_rng([FLAGS.seed, 3]), FLAGS.bpe_sample))
      tokenizer.save_pretrained(tok_dir)
    else:
      tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(tok_dir)
  if fresh:
    write_tasks(data_dir, text)
    with open(marker, 'w') as f:
      json.dump(params, f)
  write_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  cache = os.path.join(data_dir, 'cache', FLAGS.tokenizer)
  tasks = [load_tokenized(meta_train_file(data_dir, f'cls_task_{t:02d}'), tokenizer, cache,
                          MAX_EXAMPLE_LEN) for t in range(FLAGS.tasks)]
  tokenise_s = time.perf_counter() - t0
  raw = tasks[0].raw['input'][:2000]
  words = sum(len(x.split()) for x in raw)
  tokens = sum(len(ids) for ids in tokenizer(raw, add_special_tokens=False)['input_ids'])
  t = tasks[0]
  lengths = np.array([len(x) for x in t.input_rest])
  cut = np.mean([len(x) + len(y) == MAX_EXAMPLE_LEN for x, y in zip(t.input_rest, t.output_ids)])
  return tasks, {'write_s': write_s, 'tokenise_s': tokenise_s, 'vocab': len(tokenizer),
                 'tokens_per_word': tokens / words, 'input_median': float(np.median(lengths)),
                 'input_p90': float(np.percentile(lengths, 90)), 'cut': float(cut)}


# ----------------------------------------------------------------------------- timing


def stats_ms(seconds) -> dict:
  ms = np.asarray(seconds) * 1e3
  return {'median': float(np.median(ms)), 'p90': float(np.percentile(ms, 90)),
          'max': float(ms.max())}


def fmt(s: dict) -> str:
  return f'median {s["median"]:.2f} ms, p90 {s["p90"]:.2f} ms, max {s["max"]:.2f} ms'


def time_calls(fn, steps) -> list[float]:
  out = []
  for s in steps:
    t = time.perf_counter()
    fn(s)
    out.append(time.perf_counter() - t)
  return out


def loop_seconds_per_step(load, depth: int, device_s: float, steps: int) -> float:
  """The loop's steady-state time a step: take the batch, wait for its arrays, the stand-in step."""
  with Prefetcher(load, 0, steps + 1, depth) as batches:
    jax.block_until_ready(next(batches)[1])  # the first batch is never overlapped: left out
    time.sleep(device_s)
    t = time.perf_counter()
    for _ in range(steps):
      jax.block_until_ready(next(batches)[1])  # the step cannot start before its input arrives
      time.sleep(device_s)  # the stand-in device step
    return (time.perf_counter() - t) / steps


def main(argv):
  del argv
  flag_names = ('data_dir', 'tasks', 'examples', 'tokenizer', 'bpe_sample', 'batches', 'devices',
                'fastest_step_s', 'prefetch', 'loop_s', 'repeats', 'seed')
  command = 'python bench/input_pipeline.py ' + ' '.join(
      f'--{k}={getattr(FLAGS, k)}' for k in flag_names)
  print(f'command: {command}')
  print(f'load average at start: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)', flush=True)
  tmp = None if FLAGS.data_dir else tempfile.TemporaryDirectory(prefix='input_pipeline_')
  data_dir = FLAGS.data_dir or tmp.name
  os.makedirs(data_dir, exist_ok=True)
  tasks, facts = prepare(data_dir)
  print(f'data: {len(tasks)} tasks x {len(tasks[0]):,} examples in {data_dir} (written in '
        f'{facts["write_s"]:.0f} s, read and tokenised in {facts["tokenise_s"]:.0f} s)')
  print(f'tokenizer: {FLAGS.tokenizer}, {facts["vocab"]:,} entries, {facts["tokens_per_word"]:.2f} '
        f'tokens a word; an input (with its separator) has median {facts["input_median"]:.0f}, '
        f'p90 {facts["input_p90"]:.0f} tokens; {100 * facts["cut"]:.1f}% are cut so that input + '
        f'output fit {MAX_EXAMPLE_LEN}', flush=True)

  spec = EpisodeSpec(n_prompt_examples=N_P, n_lm_examples=0, prompt_len=P, max_len=MAX_LEN)
  sampler = EpisodeSampler(tasks, spec, BATCH, FLAGS.seed)
  mesh = sharding.make_mesh({'data': 1, 'fsdp': -1, 'tensor': 1})  # the paper configs' mesh
  load = run_train.batch_loader(sampler, mesh)
  steps = range(10, 10 + FLAGS.batches)
  for s in range(10):  # untimed: first calls
    jax.block_until_ready(load(s))
  host = time_calls(sampler.batch, steps)
  local = {s: sampler.batch(s) for s in steps}
  put = time_calls(lambda s: jax.block_until_ready(sharding.global_batch(local[s], mesh)), steps)
  both = time_calls(lambda s: jax.block_until_ready(load(s)), steps)
  pgm_len = max(b['pgm_ids'].shape[1] for b in local.values())
  lm_len = int(np.median([b['lm_ids'].shape[1] for b in local.values()]))
  real = float(np.mean([b['pgm_mask'].sum() + b['lm_mask'].sum() for b in local.values()]))
  del local
  hs, ps, bs = stats_ms(host), stats_ms(put), stats_ms(both)
  load_s = bs['median'] / 1e3
  step_s = FLAGS.fastest_step_s
  shaped_s = step_seconds(BATCH * pgm_len, BATCH * lm_len)
  ratio, ratio_p90, ratio_shaped = step_s / load_s, step_s / (bs['p90'] / 1e3), shaped_s / load_s
  print(f'mesh: {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices')
  print(f'batch: {BATCH} episodes, n_P={N_P}, n_L=0, P={P}: PGM rows of {pgm_len} tokens, LM rows '
        f'of {lm_len} (median); {real:,.0f} real tokens a batch')
  print(f'host, EpisodeSampler.batch ({FLAGS.batches} batches): {fmt(hs)}')
  print(f'sharding.global_batch onto the mesh, until ready: {fmt(ps)}')
  print(f'both, run_train.batch_loader (what the prefetch thread runs a step): {fmt(bs)}')
  print(f'fastest projected step (--fastest_step_s): {step_s * 1e3:.0f} ms = {ratio:.0f}x the '
        f'host time a batch (median; {ratio_p90:.0f}x its p90)')
  print(f"the same count at these batches' padded lengths ({BATCH} x {pgm_len} PGM + {BATCH} x "
        f'{lm_len} LM tokens): {shaped_s * 1e3:.0f} ms = {ratio_shaped:.0f}x')
  worst = min(ratio, ratio_shaped, ratio_p90)
  print(f'verdict: the host builds a batch at least {worst:.0f}x faster than the fastest step: '
        + ('>= 5x, one host thread keeps the accelerator fed; prefetch overlaps the two'
           if worst >= 5 else '< 5x: a single host thread would starve the accelerator'),
        flush=True)

  loops = {}
  for name, device_s in (('projected step', step_s), ('break-even step', load_s)):
    n = max(20, int(FLAGS.loop_s / device_s))
    runs = {0: [], FLAGS.prefetch: []}
    for r in range(FLAGS.repeats):  # alternating, so both see the same background load
      for depth in ((0, FLAGS.prefetch) if r % 2 == 0 else (FLAGS.prefetch, 0)):
        runs[depth].append(loop_seconds_per_step(load, depth, device_s, n))
    off, on = float(np.median(runs[0])), float(np.median(runs[FLAGS.prefetch]))
    loops[name] = {'device_step_ms': device_s * 1e3, 'steps': n, 'off_ms': off * 1e3,
                   'on_ms': on * 1e3, 'speedup': off / on, 'exposed_off_ms': (off - device_s) * 1e3,
                   'exposed_on_ms': (on - device_s) * 1e3,
                   'off_runs_ms': [x * 1e3 for x in runs[0]],
                   'on_runs_ms': [x * 1e3 for x in runs[FLAGS.prefetch]]}
    print(f'loop, stand-in step of {device_s * 1e3:.2f} ms ({name}), {n} steps, {FLAGS.repeats} '
          f'runs each: without prefetch {off * 1e3:.2f} ms a step, with prefetch={FLAGS.prefetch} '
          f'{on * 1e3:.2f} ms -> {off / on:.2f}x; time a step beyond the stand-in step: '
          f'{(off - device_s) * 1e3:.2f} ms without, {(on - device_s) * 1e3:.2f} ms with',
          flush=True)
  print(f'load average at end: {os.getloadavg()[0]:.2f}')
  if tmp is not None:
    tmp.cleanup()
  print(json.dumps({
      'command': command, 'tasks': len(tasks), 'examples_per_task': len(tasks[0]),
      'tokenizer': FLAGS.tokenizer, 'tokens_per_word': facts['tokens_per_word'],
      'devices': jax.device_count(), 'batch': BATCH, 'pgm_len': pgm_len, 'lm_len': lm_len,
      'host_batch_ms': hs, 'global_batch_ms': ps, 'load_ms': bs, 'fastest_step_s': step_s,
      'step_over_host': ratio, 'step_over_host_p90': ratio_p90,
      'step_at_batch_lengths_s': shaped_s, 'step_at_batch_lengths_over_host': ratio_shaped,
      'loop': loops}))


if __name__ == '__main__':
  app.run(main)
