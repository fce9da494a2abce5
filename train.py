"""Meta-trains a prompt generation model (MetaL-Prompt, Equation 1).

  python train.py                                   # the built-in default (no downloads)
  python train.py --config=configs/gpt2_xl_cls2cls.py --config.data_dir=DATA \
      --config.model=/path/to/gpt2-xl --workdir=runs/xl_cls2cls

Resumes from the latest checkpoint in --workdir by itself.
"""

import logging
import os
import sys

from absl import app, flags

import configs
from metal_jax import errors, run_train, training

errors.define_config_flag('train.py', 'configs/default.py')
flags.DEFINE_string('workdir', 'runs/default', 'where checkpoints, metrics and data go')
flags.DEFINE_bool('debug', False, 'show the traceback of a user\'s mistake too')


def run(config, workdir: str) -> dict:
  """run_train.train(); in a multi-process job, a process that fails exits at once.

  Raising normally would run JAX's atexit handler, which waits at the coordination service's
  shutdown barrier for the other processes; they are blocked in a collective waiting for this
  one, so every process would hang for shutdown_timeout (5 minutes) and then abort with
  "Shutdown barrier has failed", far from the real error. os._exit skips the barrier: the
  coordination service sees this process's heartbeats stop (within heartbeat_timeout, 100 s)
  and stops the others ("tasks have crashed"); if this is process 0, which hosts the service,
  the others stop at once.
  """
  try:
    return run_train.train(config, workdir)
  except BaseException:
    import jax
    if not (config.distributed and jax.distributed.is_initialized()):
      raise
    logging.exception('this process (process_id %s) failed; exiting without the shutdown '
                      'barrier', config.process_id if config.coordinator_address else 'auto')
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s')
  logging.getLogger('absl').setLevel(logging.WARNING)
  config = flags.FLAGS.config

  def start():
    config.setting = configs.setting_path(config.setting)  # the library reads paths only
    return run(config, flags.FLAGS.workdir)

  # A user's mistake (data, config, flag, checkpoint): its message alone, no traceback.
  summary = errors.run_cli('train.py', start, extra=(training.ResumeError,))
  if summary['preempted_at'] is None:  # (a preempted run has logged where it stopped)
    logging.info('done: %d steps, last %s; checkpoints in %s', summary['steps'], summary['last'],
                 summary['checkpoint_dir'])


if __name__ == '__main__':
  app.run(main)
