"""Evaluates a meta-trained PGM on the setting's unseen test tasks, with the paper's baselines.

  python eval.py                               # the default run of train.py (runs/default)
  python eval.py --workdir=runs/xl_cls2cls --split=12,4 --methods=metal,prefix_tuning

Reads the run's config from its checkpoint, so the model, data and PGM settings
are the ones it was trained with. Writes WORKDIR/eval/ (results.json, results.md,
predictions/, f1.png), replacing an earlier eval/ only when this one completes.
"""

import logging

from absl import app, flags

import configs
from metal_jax import errors, run_eval

flags.DEFINE_string('workdir', 'runs/default', 'the train.py run to evaluate')
flags.DEFINE_list('split', [], '(n_P, n_L) as "16,0", "12,4" or "8,8"; default: the training split')
flags.DEFINE_list('seeds', ['100', '13', '21', '42'], 'few-shot seeds (MetaICL: 100,13,21,42,87)')
flags.DEFINE_list('methods', ['all'], 'comma list, or "all" (every implemented method)')
flags.DEFINE_integer('bbt_budget', 0, 'BBTv2 forward passes per task; 0 = the run config\'s eval.bbt_budget '
                     '(the default config: 480), else the paper\'s 3,840')
flags.DEFINE_list('hparams', [], 'method hyperparameters, e.g. "soft_prompt.lr=1e-3,bbtv2.popsize=10" '
                  '(the fields of each method\'s Hparams; the paper\'s values by default)')
flags.DEFINE_string('out', '', 'output directory; default WORKDIR/eval')
flags.DEFINE_bool('progress', True, 'show a progress bar')
flags.DEFINE_string('setting', '', 'evaluate on this setting\'s test tasks (a shipped name such as '
                    'cls2cls, or a file); default: the run\'s')
flags.DEFINE_string('data_dir', '', 'task directories (comma-separated, searched in order); '
                    'default: the run\'s')
flags.DEFINE_integer('max_test_examples', 0, 'cap each test split at a seeded sample of this many '
                     '(quick looks); 0: every example, as the paper\'s protocol')
flags.DEFINE_bool('allow_overlap', False, 'evaluate test tasks the run meta-trained on (marked in '
                  'results.json)')
flags.DEFINE_string('analysis', '', 'instead of --methods: "iterative" (MetaL over 16, 32 and 64 '
                    'examples per test task, one PGM pass per n_P), "designs" (a PGM per prompt '
                    'design) or "splits" (PGMs trained at (16,0) and (12,4), each tested at '
                    '(16,0), (12,4), (8,8)); PGMs trained or reused; written to WORKDIR/eval_NAME')
flags.DEFINE_bool('debug', False, 'show the traceback of a user\'s mistake too')


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s')
  logging.getLogger('absl').setLevel(logging.WARNING)
  f = flags.FLAGS
  # A user's mistake (flag, data, checkpoint): its message alone, no traceback.
  def run():
    setting = configs.setting_path(f.setting) if f.setting else ''  # the library reads paths
    return run_eval.main(workdir=f.workdir, split=f.split, seeds=f.seeds, methods=f.methods,
                         hparams=f.hparams, bbt_budget=f.bbt_budget, out=f.out,
                         progress=f.progress, setting_path=setting, data_dir=f.data_dir,
                         max_test_examples=f.max_test_examples, allow_overlap=f.allow_overlap,
                         analysis=f.analysis)

  md = errors.run_cli('eval.py', run)
  print(md)


if __name__ == '__main__':
  app.run(main)
