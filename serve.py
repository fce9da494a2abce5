"""Serves a meta-trained run over HTTP: register a task's examples once (one PGM pass), then
classify and generate with its prompt (metal_jax/serving/server.py describes the API).

  python serve.py --workdir=runs/default                      # http://127.0.0.1:8000
  python serve.py --workdir=runs/xl_cls2cls --api_keys=keys.txt --port=8080

  curl -s localhost:8000/v1/prompts -H 'content-type: application/json' \\
      -d '{"examples": [{"input": "great film", "output": "positive"}], "task": "sst2"}'
  curl -s localhost:8000/v1/classify -H 'content-type: application/json' \\
      -d '{"prompt_id": "ID", "inputs": ["dull"], "options": ["positive", "negative"]}'

--api_keys names a file of one key a line, `KEY` or `KEY OWNER` (blank lines and lines starting
with # are skipped): requests then need "Authorization: Bearer KEY", and each owner sees and uses
only its own prompts. A key listed without an owner is a tenant of its own, stored as
'key-' + sha256(KEY)[:16] (raw keys are never written to the prompt store). Prompts are stored
under WORKDIR/prompts unless --store_dir says otherwise, and survive restarts.

Limits (413 naming the field beyond them; no request can stop the server): --max_body_bytes of
request body, --max_examples examples a prompt, --max_input_tokens tokens an input (0: the run's
max_example_len, which eval.py cuts inputs to; longer inputs are refused unless --truncate_inputs
cuts them from the left as eval.py does), --max_inputs inputs and --max_options options a classify
request, --max_new_tokens new tokens a generate request; --queue_size requests queued (429 beyond)
and --timeout_s to start one (504 beyond).
"""

import logging
import os
import sys

from absl import app, flags

flags.DEFINE_string('workdir', 'runs/default', 'the train.py run to serve')
flags.DEFINE_integer('step', None, 'checkpoint step to serve; default: the latest')
flags.DEFINE_string('host', '127.0.0.1', 'address to listen on (0.0.0.0: every interface)')
flags.DEFINE_integer('port', 8000, 'port to listen on', lower_bound=1, upper_bound=65535)
flags.DEFINE_string('api_keys', '', 'file of one key a line: "KEY" or "KEY OWNER" (# comments); '
                    'empty: no authentication')
flags.DEFINE_string('store_dir', '', 'prompt store directory; default WORKDIR/prompts')
flags.DEFINE_integer('slots', 64, 'device slots of active prompts (LRU)', lower_bound=1)
flags.DEFINE_integer('host_budget_mb', 256, 'host cache of stored prompts, MiB', lower_bound=0)
flags.DEFINE_integer('device_budget_mb', 1024, 'device memory for the slots, MiB', lower_bound=1)
flags.DEFINE_integer('max_batch_rows', 64, 'rows (inputs x options) gathered into one engine call',
                     lower_bound=1)
flags.DEFINE_float('max_wait_ms', 5.0, 'how long a batch waits for more requests', lower_bound=0)
flags.DEFINE_integer('queue_size', 256, 'requests queued before 429', lower_bound=1)
flags.DEFINE_float('timeout_s', 30.0, 'a request not started within this is answered 504',
                   lower_bound=0)
flags.DEFINE_integer('max_inputs', 256, 'inputs a classify request', lower_bound=1)
flags.DEFINE_integer('max_options', 64, 'options a classify request', lower_bound=1)
flags.DEFINE_integer('max_new_tokens', 256, 'new tokens a generate request', lower_bound=1)
flags.DEFINE_integer('max_examples', 64, 'examples a prompt registration', lower_bound=1)
flags.DEFINE_integer('max_input_tokens', 0, 'tokens an input; 0 (or more): the run\'s '
                     'max_example_len', lower_bound=0)
flags.DEFINE_bool('truncate_inputs', False, 'cut inputs over --max_input_tokens from the left (as '
                  'eval.py does) instead of refusing them (413)')
flags.DEFINE_integer('max_body_bytes', 8 << 20, 'bytes of a request body (413 beyond)',
                     lower_bound=1)


def build(f):
  """(app, engine) from the flags; user mistakes raise server.ConfigError (or the loaders')."""
  from metal_jax.serving import engine as engine_lib
  from metal_jax.serving import server

  if not os.path.isdir(f.workdir):
    raise server.ConfigError(f'--workdir={f.workdir}: no such directory (train a run with '
                             f'python train.py --workdir={f.workdir} first)')
  keys = server.load_api_keys(f.api_keys) if f.api_keys else None  # before the slow load
  if f.step is not None:
    steps = _steps(f.workdir)
    if f.step not in steps:
      raise server.ConfigError(f'--step={f.step}: {f.workdir} has checkpoints at steps '
                               f'{sorted(steps) or "(none)"}')
  engine = engine_lib.Engine(f.workdir, step=f.step, store_dir=f.store_dir,
                             host_budget_bytes=f.host_budget_mb << 20, slots=f.slots,
                             device_budget_bytes=f.device_budget_mb << 20,
                             max_rows=f.max_batch_rows, max_examples=f.max_examples,
                             max_input_tokens=f.max_input_tokens,
                             truncate_inputs=f.truncate_inputs)
  for path, problem in engine.store.problems:
    logging.warning('prompt store: %s: %s (not served)', path, problem)
  application = server.create_app(
      engine, api_keys=keys, max_batch_rows=f.max_batch_rows, max_wait_ms=f.max_wait_ms,
      queue_size=f.queue_size, timeout_s=f.timeout_s, max_inputs=f.max_inputs,
      max_options=f.max_options, max_new_tokens=f.max_new_tokens,
      max_body_bytes=f.max_body_bytes)
  return application, engine


def _steps(workdir: str) -> set[int]:
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    return set()
  return {int(n) for n in os.listdir(directory) if n.isdigit()}


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s')
  logging.getLogger('absl').setLevel(logging.WARNING)
  f = flags.FLAGS
  from metal_jax import training
  from metal_jax.models.hf import CheckpointError
  from metal_jax.serving.server import ConfigError
  try:
    application, engine = build(f)
  except (ConfigError, training.ResumeError, CheckpointError) as e:  # a user's mistake
    sys.exit(f'serve.py: {e}')
  except FileNotFoundError as e:  # no checkpoints in the workdir, a missing model directory
    sys.exit(f'serve.py: --workdir={f.workdir}: {e}')
  import uvicorn
  logging.info('serving %s (step %d, %d device slots) on http://%s:%d%s', f.workdir,
               engine.identity['step'], engine.slots.n_slots, f.host, f.port,
               ', API keys required' if f.api_keys else '')
  uvicorn.run(application, host=f.host, port=f.port, log_level='info')


if __name__ == '__main__':
  app.run(main)
