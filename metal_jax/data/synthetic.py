"""A synthetic multi-task suite in MetaICL's file format, written on the fly.

It is the built-in default data: no downloads, a vocabulary of a few hundred
words, short examples, and tasks that can only be solved by reading their
examples. Every task draws its own hidden mapping (label words and the words
that select each label) from fixed word pools, so the same word means
different labels in different tasks and nothing carries over from one task to
another except the *kind* of rule. A meta-learned prompt generator can learn
the kind of rule from the meta-training tasks and read the mapping from the
16 examples of an unseen task; zero-shot, an unseen task is at chance.

Task families:

* ``kw_cls_NNN`` (keyword classification): C in {2, 3, 4} classes, each with
  one trigger word (content words, distinct across classes). The input is 1-3
  filler words, then the trigger; the output is the trigger's class label word.
* ``last_word_NNN`` (last-word mapping): C classes, each with one cue word. The
  input is 2-3 words from the content and filler pools, among them (as
  distractors) cues of this task's other classes, then the cue; the output is
  the last word's class label word.

The word that decides the label is the last input word, so the answer is
predicted at its own position, and the tokenizer makes MetaICL's newline and a
following label word one token ("\nred"): an example's answer then directly
follows the word it depends on, the pattern an LM's previous-token and
induction heads read (see metal_jax/pretrain.py).

Files (MetaICL's contract): meta-train task T is ``T/T_16384_100_train.jsonl``;
test task T has, for each seed s in SEEDS, ``T/T_16_{s}_train.jsonl`` (16
examples that differ per seed and contain every trigger/cue of the task at
least once) and ``T/T_16_{s}_test.jsonl`` (the same class-balanced evaluation
examples for every seed), and ``T/T_64_{s}_train.jsonl`` (those 16, then 48 more, for
iterative generation over more examples than one PGM pass reads). Each line is {"task",
"input", "output", "options"}; options are the task's label words in a fixed per-task order.

Test tasks are numbered first within each family (``kw_cls_000``...), then the
meta-train tasks, and each task's randomness comes from (seed, family, number)
alone, so the test tasks do not change with ``n_train_tasks``.
"""

from __future__ import annotations

import json
import os

import numpy as np

from metal_jax import atomic
from metal_jax.data.tasks import meta_train_file, task_file

SEEDS = (100, 13, 21, 42, 87)  # MetaICL's few-shot seeds
K = 16  # examples per few-shot train file
K_MORE = 64  # test tasks also get K_MORE-example train files (iterative generation's analysis)
FORMAT_VERSION = 2  # bump when the generated content changes

EOS = '<|endoftext|>'
UNK = '[UNK]'
NEWLINE = '\n'

# Label words: neutral colour names, no prior meaning as labels.
LABEL_WORDS = tuple('''
red blue green yellow purple orange pink brown black white gray gold silver violet
amber crimson teal olive ivory cyan magenta maroon navy beige coral indigo lime
scarlet tan azure jade ruby bronze copper pearl plum rust sand slate mint
'''.split())

# Content words (nouns): triggers and cues are drawn from these.
CONTENT_WORDS = tuple('''
cat dog horse cow sheep goat pig mouse rabbit fox wolf bear lion tiger zebra monkey
eagle owl duck goose swan frog snake turtle whale shark dolphin salmon crab spider
bee ant moth beetle deer camel donkey llama otter seal
apple banana cherry grape lemon melon peach pear mango bread cheese butter rice pasta
soup salad cake cookie honey sugar salt pepper onion garlic carrot potato tomato bean corn
table chair lamp clock window door bottle cup plate spoon fork knife book pencil paper
phone radio camera hammer ladder bucket basket candle mirror pillow blanket wallet
ticket key coin
river mountain forest desert island valley ocean lake beach village city castle bridge
tower garden farm market school church station harbor airport museum library cave
meadow hill field road
car truck bus train boat ship plane bicycle rocket wagon
piano guitar violin drum flute trumpet harp
hat shoe shirt coat glove scarf ring necklace helmet umbrella
'''.split())

# Filler words (function words and adverbs): the neutral background of inputs.
FILLER_WORDS = tuple('''
the a an of to and in on at by for with from into over under about after before
during while as is was are were be been being has have had do does did will would
can could should may might must this that these those it its they them their he she
his her we our you your my me very quite just also then there here when where which
who what some any every each all most more less only still even again often never always
'''.split())

VOCAB = ((EOS, UNK, NEWLINE) + LABEL_WORDS + CONTENT_WORDS + FILLER_WORDS
         + tuple(NEWLINE + w for w in LABEL_WORDS))

FAMILIES = ('kw_cls', 'last_word')
N_CLASSES = (2, 3, 4)
KEYS_PER_CLASS = (1,)  # triggers (kw_cls) or cues (last_word) per class
KW_FILLER_LEN = (1, 3)  # inclusive range of filler words before the trigger
FW_REST_LEN = (2, 3)  # inclusive range of words before the cue
FW_DISTRACTOR_P = 0.25  # chance that a word before the cue is another class's cue


def _check_pools():
  pools = (LABEL_WORDS, CONTENT_WORDS, FILLER_WORDS)
  words = [w for p in pools for w in p]
  dup = sorted({w for w in words if words.count(w) > 1})
  if dup:
    raise AssertionError(f'word pools overlap or repeat: {dup}')
  bad = [w for w in words if not (w.isascii() and w.isalpha() and w.islower())]
  if bad:
    raise AssertionError(f'pool words must be lowercase ascii letters: {bad}')


_check_pools()


def build_tokenizer():
  """A word-level tokenizer over VOCAB, built in code (nothing from a hub).

  Ids: 0 is "<|endoftext|>" (bos/eos/pad), 1 "[UNK]", 2 "\\n", then the label,
  content and filler words in their fixed order, then "\\n" + each label word.
  Spaces and tabs separate words; a "\\n" directly followed by a label word is
  one token with it, any other "\\n" is its own token. Like GPT-2's, it adds no
  special tokens.
  """
  import tokenizers
  from tokenizers import Regex, decoders, models, pre_tokenizers
  import transformers

  tok = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token=UNK))
  labels = '|'.join(LABEL_WORDS)
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(r'[ \t]+'), behavior='removed'),
      pre_tokenizers.Split(Regex(rf'\n(?:{labels})(?![a-z])|\n'), behavior='isolated'),
  ])
  tok.decoder = decoders.WordPiece(prefix='##', cleanup=False)  # joins words with single spaces
  tok.add_special_tokens([EOS, UNK])
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS, unk_token=UNK,
      model_max_length=1024, clean_up_tokenization_spaces=False)


# ----------------------------------------------------------------------------- tasks


def _rng(seed: int, family: str, number: int, *stream: int) -> np.random.Generator:
  return np.random.default_rng([seed, FAMILIES.index(family), number, *stream])


def _task_spec(seed: int, family: str, number: int) -> dict:
  """The task's hidden mapping: label words and, per class, its key words."""
  rng = _rng(seed, family, number, 0)
  c = int(rng.choice(N_CLASSES))
  labels = [LABEL_WORDS[i] for i in rng.choice(len(LABEL_WORDS), c, replace=False)]
  sizes = [int(rng.choice(KEYS_PER_CLASS)) for _ in range(c)]
  drawn = [CONTENT_WORDS[i] for i in rng.choice(len(CONTENT_WORDS), sum(sizes), replace=False)]
  keys, start = [], 0
  for n in sizes:
    keys.append(drawn[start:start + n])
    start += n
  return {'family': family, 'labels': labels, 'keys': keys}


def _make_input(spec: dict, key: str, cls: int, rng: np.random.Generator) -> str:
  if spec['family'] == 'kw_cls':
    n = int(rng.integers(KW_FILLER_LEN[0], KW_FILLER_LEN[1] + 1))
    words = [FILLER_WORDS[i] for i in rng.integers(0, len(FILLER_WORDS), n)]
    words.append(key)
  else:
    own = {w for ks in spec['keys'] for w in ks}
    others = [w for j, ks in enumerate(spec['keys']) if j != cls for w in ks]
    background = [w for w in CONTENT_WORDS + FILLER_WORDS if w not in own]
    n = int(rng.integers(FW_REST_LEN[0], FW_REST_LEN[1] + 1))
    words = []
    for _ in range(n):
      if rng.random() < FW_DISTRACTOR_P:
        words.append(others[int(rng.integers(0, len(others)))])
      else:
        words.append(background[int(rng.integers(0, len(background)))])
    words.append(key)
  return ' '.join(words)


def _example(name: str, spec: dict, cls: int, key: str, rng: np.random.Generator) -> dict:
  return {'task': name, 'input': _make_input(spec, key, cls, rng),
          'output': spec['labels'][cls], 'options': list(spec['labels'])}


def _random_key(spec: dict, cls: int, rng: np.random.Generator) -> str:
  ks = spec['keys'][cls]
  return ks[int(rng.integers(0, len(ks)))]


def _meta_train_examples(name, spec, n, rng):
  c = len(spec['labels'])
  out = []
  for _ in range(n):
    cls = int(rng.integers(0, c))
    out.append(_example(name, spec, cls, _random_key(spec, cls, rng), rng))
  return out


def _few_shot_examples(name, spec, rng):
  """K examples covering every key of the task at least once, then classes round-robin."""
  pairs = [(cls, k) for cls, ks in enumerate(spec['keys']) for k in ks]
  assert len(pairs) <= K, 'keys must fit in the few-shot examples'
  c = len(spec['labels'])
  offset = int(rng.integers(0, c))
  for i in range(K - len(pairs)):
    cls = (offset + i) % c
    pairs.append((cls, _random_key(spec, cls, rng)))
  order = rng.permutation(len(pairs))
  return [_example(name, spec, pairs[i][0], pairs[i][1], rng) for i in order]


def _test_examples(name, spec, n, rng):
  """n class-balanced examples (round-robin labels), shuffled."""
  c = len(spec['labels'])
  classes = [i % c for i in range(n)]
  classes = [classes[i] for i in rng.permutation(n)]
  return [_example(name, spec, cls, _random_key(spec, cls, rng), rng) for cls in classes]


# ----------------------------------------------------------------------------- files


def _task_names(n_train_tasks: int, n_test_tasks: int):
  """Test tasks take the low numbers of each family, meta-train tasks the following ones."""
  n_fam = len(FAMILIES)
  test_counts = [len(range(f, n_test_tasks, n_fam)) for f in range(n_fam)]
  test = [(FAMILIES[j % n_fam], j // n_fam) for j in range(n_test_tasks)]
  train = [(FAMILIES[i % n_fam], test_counts[i % n_fam] + i // n_fam) for i in range(n_train_tasks)]
  return train, test


def _name(family: str, number: int) -> str:
  return f'{family}_{number:03d}'


def _write_jsonl(path: str, rows) -> None:
  atomic.write(path, ''.join(json.dumps(r) + '\n' for r in rows))


def few_shot_path(data_dir: str, task: str, seed: int, split: str, k: int = K) -> str:
  return task_file(data_dir, task, k, seed, split)


def _expected_files(data_dir: str, setting: dict):
  for t in setting['train']:
    yield meta_train_file(data_dir, t)
  for t in setting['test']:
    for s in SEEDS:
      yield few_shot_path(data_dir, t, s, 'train')
      yield few_shot_path(data_dir, t, s, 'test')
      yield few_shot_path(data_dir, t, s, 'train', K_MORE)


def _shape() -> dict:
  """The generator's constants: a suite written under other constants is regenerated."""
  return {'n_classes': list(N_CLASSES), 'keys_per_class': list(KEYS_PER_CLASS),
          'kw_filler_len': list(KW_FILLER_LEN), 'fw_rest_len': list(FW_REST_LEN),
          'fw_distractor_p': FW_DISTRACTOR_P}


def _load_if_complete(data_dir: str, params: dict):
  try:
    with open(os.path.join(data_dir, 'suite.json'), encoding='utf-8') as f:
      stored = json.load(f)
    with open(os.path.join(data_dir, 'setting.json'), encoding='utf-8') as f:
      setting = json.load(f)
  except (OSError, ValueError):
    return None
  if stored != params or not isinstance(setting, dict):
    return None
  if not all(os.path.isfile(p) for p in _expected_files(data_dir, setting)):
    return None
  return setting


def write_suite(data_dir: str, *, seed: int = 0, n_train_tasks: int = 24, n_test_tasks: int = 8,
                n_train_examples: int = 2048, n_test_examples: int = 64) -> dict:
  """Writes the suite under data_dir; returns the setting {"train": [...], "test": [...]}.

  Idempotent: if data_dir/suite.json records the same generation parameters (and
  the files are there), the stored setting is returned and nothing is rewritten.
  Deterministic given the arguments. Files are written to a temporary name and
  renamed; suite.json is removed first and written last, so an interrupted run
  is regenerated next time.
  """
  for name, v, lo in (('n_train_tasks', n_train_tasks, 0), ('n_test_tasks', n_test_tasks, 0),
                      ('n_train_examples', n_train_examples, 1), ('n_test_examples', n_test_examples, 1)):
    if int(v) != v or v < lo:
      raise ValueError(f'{name}={v}: must be an integer >= {lo}')
  params = {'format_version': FORMAT_VERSION, 'shape': _shape(), 'seed': int(seed), 'n_train_tasks': int(n_train_tasks),
            'n_test_tasks': int(n_test_tasks), 'n_train_examples': int(n_train_examples),
            'n_test_examples': int(n_test_examples)}
  setting = _load_if_complete(data_dir, params)
  if setting is not None:
    return setting

  os.makedirs(data_dir, exist_ok=True)
  suite_path = os.path.join(data_dir, 'suite.json')
  if os.path.exists(suite_path):
    os.remove(suite_path)
  train, test = _task_names(n_train_tasks, n_test_tasks)

  for family, number in train:
    name = _name(family, number)
    spec = _task_spec(seed, family, number)
    os.makedirs(os.path.join(data_dir, name), exist_ok=True)
    rows = _meta_train_examples(name, spec, n_train_examples, _rng(seed, family, number, 1))
    _write_jsonl(meta_train_file(data_dir, name), rows)

  for family, number in test:
    name = _name(family, number)
    spec = _task_spec(seed, family, number)
    os.makedirs(os.path.join(data_dir, name), exist_ok=True)
    test_rows = _test_examples(name, spec, n_test_examples, _rng(seed, family, number, 2))
    for s in SEEDS:
      shots = _few_shot_examples(name, spec, _rng(seed, family, number, 3, s))
      _write_jsonl(few_shot_path(data_dir, name, s, 'train'), shots)
      _write_jsonl(few_shot_path(data_dir, name, s, 'test'), test_rows)
      # The same K examples first, then K_MORE - K more from a stream of their own (the K-example
      # files, and so every K-shot number, are unchanged by them).
      more = _test_examples(name, spec, K_MORE - K, _rng(seed, family, number, 4, s))
      _write_jsonl(few_shot_path(data_dir, name, s, 'train', K_MORE), shots + more)

  setting = {'train': [_name(*t) for t in train], 'test': [_name(*t) for t in test]}
  atomic.write(os.path.join(data_dir, 'setting.json'), json.dumps(setting, indent=2) + '\n')
  atomic.write(suite_path, json.dumps(params, indent=2) + '\n')
  return setting
