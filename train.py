"""Meta-trains a prompt generation model (MetaL-Prompt, Equation 1).

  python train.py                                   # the built-in default (no downloads)
  python train.py --config=configs/gpt2_xl_cls2cls.py --config.data_dir=DATA \
      --config.model=/path/to/gpt2-xl --workdir=runs/xl_cls2cls

Resumes from the latest checkpoint in --workdir by itself.
"""

import logging

from absl import app, flags
from ml_collections import config_flags

from metal_jax import training

config_flags.DEFINE_config_file('config', 'configs/default.py', 'experiment config')
flags.DEFINE_string('workdir', 'runs/default', 'where checkpoints, metrics and data go')


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s')
  logging.getLogger('absl').setLevel(logging.WARNING)
  summary = training.train(flags.FLAGS.config, flags.FLAGS.workdir)
  logging.info('done: %d steps, last %s; checkpoints in %s', summary['steps'], summary['last'],
               summary['checkpoint_dir'])


if __name__ == '__main__':
  app.run(main)
