"""Turns an HF or TFDS classification dataset into one task's MetaICL files (a data directory).

  python prepare_data.py --source=hf --path=/data/sst2_saved --input=sentence \
      --task=sst2 --out=data/mine
  python prepare_data.py --source=hf --path=train=mnli_train.jsonl,test=mnli_dev.jsonl \
      --input=premise,hypothesis --template="{premise} question: {hypothesis}" \
      --label_map=0:yes,1:maybe,2:no --task=mnli --out=data/mine
  python prepare_data.py --source=tfds --path=imdb_reviews/plain_text:1.0.0 \
      --tfds_data_dir=~/tensorflow_datasets --input=text --task=imdb --out=data/mine

Writes DATA/TASK/TASK_16384_100_train.jsonl (meta-training) and TASK_16_{seed}_{train,test}.jsonl
for seeds 100, 13, 21, 42, 87; the body is metal_jax/data/sources.py (`convert`).
"""

import logging
import os

from absl import app, flags

from metal_jax import errors
from metal_jax.data import sources

flags.DEFINE_enum('source', 'hf', ['hf', 'tfds'], 'the kind of dataset')
flags.DEFINE_string('path', '', 'hf: a save_to_disk directory, data files (a.jsonl, a.csv, '
                    'a.parquet; SPLIT=FILE,...) or a hub id ID[:CONFIG]; '
                    'tfds: NAME[/CONFIG][:VERSION]')
flags.DEFINE_string('tfds_data_dir', '', 'tfds: the directory holding the prepared dataset')
flags.DEFINE_string('split_train', 'train', 'the split of the meta-train and k-shot train examples')
flags.DEFINE_string('split_test', 'test',
                    'the split of the test examples; "" = the meta-train file only')
flags.DEFINE_string('input', '', 'the column(s) that make the input: col or col1,col2')
flags.DEFINE_string('template', '', 'a Python format string over the input columns, e.g. '
                    '"{premise} question: {hypothesis}"; "" = the columns joined by spaces')
flags.DEFINE_string('label', 'label', 'the label column')
flags.DEFINE_string('label_map', '', 'label -> word, e.g. 0:negative,1:positive (a value or a '
                    'ClassLabel name on the left); "" = the ClassLabel names')
flags.DEFINE_string('task', '', 'the task name (its directory and file names)')
flags.DEFINE_string('out', '', 'the data directory to write into (DATA/TASK/...)')
flags.DEFINE_integer('k', sources.K, 'examples per few-shot train file')
flags.DEFINE_string('seeds', ','.join(map(str, sources.SEEDS)), 'the few-shot seeds')
flags.DEFINE_integer('max_meta_train', 16384, 'examples in the meta-train file at most')
flags.DEFINE_integer('max_test', 0, 'test examples at most (a seeded sample); 0 = the whole split')
flags.DEFINE_bool('debug', False, 'show the traceback of a user\'s mistake too')
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  # datasets' INFO lines ("JAX version ... available") and TFDS's absl warnings about folders it
  # looks into are noise here: a mistake is one line (its DataError).
  logging.getLogger('datasets').setLevel(logging.WARNING)
  logging.getLogger('absl').setLevel(logging.ERROR)
  summary = errors.run_cli(
      'prepare_data.py', sources.convert, source=FLAGS.source, path=FLAGS.path,
      tfds_data_dir=os.path.expanduser(FLAGS.tfds_data_dir), split_train=FLAGS.split_train,
      split_test=FLAGS.split_test, input=FLAGS.input, template=FLAGS.template, label=FLAGS.label,
      label_map=FLAGS.label_map, task=FLAGS.task, out=os.path.expanduser(FLAGS.out), k=FLAGS.k,
      seeds=FLAGS.seeds, max_meta_train=FLAGS.max_meta_train, max_test=FLAGS.max_test)
  print(f'{summary["task"]}: options {summary["options"]} -> {summary["dir"]}')
  for name, n in summary['files'].items():
    print(f'  {name}: {n} examples')
  if any(summary['overlap_removed'].values()):
    print(f'  test examples dropped for overlapping a seed\'s train inputs: '
          f'{summary["overlap_removed"]}')
  if summary['empty_inputs_skipped']:
    print(f'  examples skipped for an empty input: {summary["empty_inputs_skipped"]}')


if __name__ == '__main__':
  app.run(main)
