"""Load benchmark of the HTTP service (serve.py), on loopback only, bounded in count and time.

What it measures (the issue's list):

1. classify queries/s and p50/p99 latency at 1, 8 and 32 concurrent clients spread over 1, 8 and
   64 distinct tasks (registered prompts), on the serving configuration (mixed-task batching:
   max_batch_rows=--max_batch_rows, max_wait_ms=--max_wait_ms, serve.py's defaults);
2. at the highest concurrency, in --rounds interleaved rounds (the order reversed every round, so
   a drift in the machine's load hits every configuration alike):
     single        the serving configuration, every request of ONE task
     mixed         the serving configuration, requests over 64 tasks
     per_task      64 tasks, a batch gathers only requests of one task (create_app's
                   batch_by_prompt: "one task per batch")
     one_at_a_time 64 tasks, one request an engine call (max_batch_rows=1, max_wait_ms=0)
3. the cost of registering a prompt (POST /v1/prompts with 16 examples never registered before:
   one PGM pass, created=true), against prefix-tuning the same 16 examples at the paper's budget
   (metal_jax.methods.REGISTRY['prefix_tuning'] with its default hyperparameters: 10 epochs of
   batch 16, lr 2e-4, 20 prefix positions), called as eval.py calls it; its first call includes
   compiling its training step, the second (unless --quick) is warm.

Targets (the issue's, on this machine): mixed >= 0.8x single; mixed >= 5x one_at_a_time;
registration >= 50x cheaper than prefix-tuning. Each is printed as met or not, twice: on the
wall clock (requests/s, seconds: the issue's figures) and per CPU-second this process got (the
server's CPU time a request, the registration's and prefix-tuning's CPU time), which a shared
machine's other jobs do not move; a target not met is printed with the measured reason.

Set-up. The servers run in this process (uvicorn threads on 127.0.0.1, free ports) over one
engine; the load generator runs in a separate process (multiprocessing, spawn) so that it does
not share the servers' GIL: --concurrency clients, each a connection, send --requests requests a
measurement (cut at --cell_seconds). A task has 4 labels; a request is --inputs inputs x 2, 3
or 4 of its task's labels as options (drawn per request, so that every configuration scores the
same mix of rows: 12 a request on average; rows/s are printed next to requests/s). The
run is --workdir, or one trained here first in a temporary directory (2 steps of train.py, the
built-in tokenizer) on a random GPT-2:

  --model=tiny   2 layers, d 32, 4 heads, 128 positions, P = 4 (tests/conftest.py's served_run):
                 the engine's compute is well under the HTTP path's cost
  --model=small  6 layers, d 384, 6 heads, 1024 positions, P = 20: device compute dominates a
                 request, the regime a real model serves in (default)

Untimed warm-ups compile the batch shapes first; compilations during the timed part are printed.
Every figure depends on what else runs on the cores: the load average is printed at the start and
the end. Prints each figure, the command line that reproduces it, and last a JSON line.

  python bench/serve.py                     # small model, the full measurement (< ~10 min)
  python bench/serve.py --quick             # fewer requests, one round, one prefix-tuning call
  python bench/serve.py --model=tiny
  python bench/serve.py --workdir=runs/default
"""

import asyncio
import json
import logging
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

from absl import app, flags  # noqa: E402

flags.DEFINE_enum('model', 'small', ['tiny', 'small'], 'the random GPT-2 of the run trained here')
flags.DEFINE_string('workdir', '', 'a train.py run to serve; empty: train one (--model) in a '
                    'temporary directory')
flags.DEFINE_bool('quick', False, 'fewer requests (64 a measurement, 8 s at most), one round, '
                  'fewer registrations, one prefix-tuning call')
flags.DEFINE_list('concurrency', ['1', '8', '32'], 'concurrent clients of the grid')
flags.DEFINE_list('tasks', ['1', '8', '64'], 'distinct tasks of the grid (the largest: the '
                  'comparison\'s)')
flags.DEFINE_integer('requests', 192, 'requests a measurement', lower_bound=1)
flags.DEFINE_float('cell_seconds', 15.0, 'a measurement stops sending after this long')
flags.DEFINE_integer('rounds', 2, 'interleaved rounds of the comparison', lower_bound=1)
flags.DEFINE_integer('inputs', 4, 'inputs a classify request', lower_bound=1)
flags.DEFINE_integer('max_batch_rows', 64, 'the serving configuration\'s rows a call',
                     lower_bound=1)
flags.DEFINE_float('max_wait_ms', 5.0, 'the serving configuration\'s wait for more requests',
                   lower_bound=0)
flags.DEFINE_integer('registrations', 8, 'timed registrations of new 16-example sets',
                     lower_bound=1)
flags.DEFINE_integer('prefix_calls', 2, 'timed prefix-tuning calls (the first compiles)',
                     lower_bound=0)
flags.DEFINE_float('max_seconds', 900.0, 'measurements not started by then are skipped')
flags.DEFINE_integer('seed', 0, 'seed of the tasks and the request mix')
FLAGS = flags.FLAGS

WORDS = ('the cat dog river table red blue green horse a of is on in big small runs sleeps '
         'quickly bird tree house mountain field lamp rice piano desert city shirt meadow drum '
         'wallet cow deer donkey necklace about would by to are you').split()
LABELS = ('red', 'blue', 'green', 'yellow', 'purple', 'orange', 'pink', 'brown', 'black',
          'white', 'gray', 'gold')
MODELS = {
    'tiny': dict(gpt2=dict(n_embd=32, n_layer=2, n_head=4, n_positions=128), prompt_len=4,
                 lstm_layers=1, lora_rank=4),
    'small': dict(gpt2=dict(n_embd=384, n_layer=6, n_head=6, n_positions=1024), prompt_len=20,
                  lstm_layers=1, lora_rank=8),
}
TARGETS = {'mixed_vs_single': 0.8, 'mixed_vs_one_at_a_time': 5.0, 'registration_vs_prefix': 50.0}


# ----------------------------------------------------------------------------- the load generator
# (runs in the client process: no jax there)


def client_load(url: str, bodies: list, concurrency: int, max_seconds: float) -> dict:
  """POSTs the bodies to url/v1/classify from `concurrency` clients, each a keep-alive HTTP/1.1
  connection sending its next body once its last was answered: latencies, statuses, wall and
  this process's CPU seconds. A minimal client on asyncio streams (what wrk-like load generators
  do): a few tens of microseconds a request, so the figures are the server's, not the client's."""
  host, port = url.removeprefix('http://').split(':')
  payloads = [json.dumps(b).encode() for b in bodies]

  async def request(reader, writer, payload: bytes) -> int:
    writer.write(b'POST /v1/classify HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n'
                 b'Content-Length: %d\r\n\r\n%s' % (host.encode(), len(payload), payload))
    head = await reader.readuntil(b'\r\n\r\n')
    status = int(head.split(b' ', 2)[1])
    length = 0
    for line in head.split(b'\r\n')[1:]:
      name, _, value = line.partition(b':')
      if name.strip().lower() == b'content-length':
        length = int(value)
      elif name.strip().lower() == b'transfer-encoding':
        raise RuntimeError('chunked responses are not expected from the server')
    await reader.readexactly(length)
    return status

  async def main():
    latencies, statuses, next_i = [], [], 0
    deadline = time.monotonic() + max_seconds
    conns = [await asyncio.open_connection(host, int(port)) for _ in range(concurrency)]

    async def worker(reader, writer):
      nonlocal next_i
      while next_i < len(payloads) and time.monotonic() < deadline:
        payload = payloads[next_i]
        next_i += 1
        t0 = time.perf_counter()
        statuses.append(await request(reader, writer, payload))
        latencies.append(time.perf_counter() - t0)

    cpu0, start = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(r, w) for r, w in conns))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    for _, w in conns:
      w.close()
    return {'latencies': latencies, 'statuses': statuses, 'wall': wall, 'cpu': cpu}

  return asyncio.run(main())


# ----------------------------------------------------------------------------- set-up


def train_run(directory: str, model: str) -> str:
  """A 2-step train.py run over a random GPT-2 of `model`'s shape with the built-in tokenizer."""
  import torch
  import transformers

  from configs import default
  from metal_jax import run_train
  from metal_jax.data import synthetic
  shape = MODELS[model]
  tok = synthetic.build_tokenizer()
  model_dir = os.path.join(directory, 'model')
  torch.manual_seed(0)
  cfg = transformers.GPT2Config(vocab_size=len(tok), bos_token_id=0, eos_token_id=0,
                                **shape['gpt2'])
  transformers.GPT2LMHeadModel(cfg).eval().save_pretrained(model_dir)
  tok.save_pretrained(model_dir)
  c = default.get_config()
  c.model = model_dir
  c.data_dir = ''
  c.synthetic.update(n_train_tasks=4, n_test_tasks=2, n_train_examples=48, n_test_examples=8)
  c.pgm.prompt_len = shape['prompt_len']
  c.pgm.lstm_layers = shape['lstm_layers']
  c.lora.rank = shape['lora_rank']
  c.batch_size = 2
  c.num_steps = 2
  c.progress = False
  c.async_checkpoints = False
  workdir = os.path.join(directory, 'run')
  run_train.train(c, workdir)
  return workdir


def sentence(rng: random.Random) -> str:
  return ' '.join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))


def make_tasks(rng: random.Random, n: int) -> list[dict]:
  """n tasks: 16 examples each (outputs among the task's 4 labels), distinct examples."""
  tasks = []
  for i in range(n):
    options = rng.sample(LABELS, 4)
    examples = [{'input': f'{sentence(rng)} {i}', 'output': rng.choice(options)}
                for _ in range(16)]
    tasks.append({'examples': examples, 'options': options})
  return tasks


def pct(xs: list[float], q: float) -> float:
  xs = sorted(xs)
  return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float('nan')


def fill(application) -> tuple[float, float]:
  """(engine calls, requests) of classify so far, from the app's metrics."""
  reg = application.state.metrics.registry
  get = lambda name: reg.get_sample_value(name, {'kind': 'classify'}) or 0.0
  return get('metal_batch_requests_count'), get('metal_batch_requests_sum')


# ----------------------------------------------------------------------------- main


def main(argv):
  del argv
  import httpx
  import jax

  from metal_jax import evaluation, experiment, methods
  from metal_jax.serving import engine as engine_lib
  from metal_jax.serving import server

  logging.getLogger('httpx').setLevel(logging.WARNING)
  logging.getLogger('absl').setLevel(logging.WARNING)
  f = FLAGS
  if f.quick:
    f.requests, f.cell_seconds, f.rounds = min(f.requests, 64), min(f.cell_seconds, 8.0), 1
    f.registrations, f.prefix_calls = min(f.registrations, 3), min(f.prefix_calls, 1)
  command = ('python bench/serve.py ' + ' '.join(sys.argv[1:])).rstrip()
  concurrencies = sorted({int(c) for c in f.concurrency})
  task_counts = sorted({int(t) for t in f.tasks})
  top_c, top_t = concurrencies[-1], task_counts[-1]
  started = time.monotonic()
  give_up = started + f.max_seconds
  load_start = os.getloadavg()
  print(f'command: {command}', flush=True)
  print(f'cores: {os.cpu_count()}, load average (1 min) at start: {load_start[0]:.2f}', flush=True)

  tmp = tempfile.TemporaryDirectory(prefix='bench_serve_')
  t0 = time.perf_counter()
  workdir = f.workdir or train_run(tmp.name, f.model)
  built_s = time.perf_counter() - t0
  engine = engine_lib.Engine(workdir, store_dir=os.path.join(tmp.name, 'prompts'),
                             max_rows=f.max_batch_rows)
  lmc = engine.lm.config
  model_desc = (f'{f.model if not f.workdir else workdir}: {lmc.n_layers} layers, d '
                f'{lmc.d_model}, {lmc.max_len} positions, P = {engine.trained.pgm_cfg.prompt_len}'
                f', {engine.slots.n_slots} device slots, jax {jax.default_backend()}')
  print(f'model {model_desc} (run {"given" if f.workdir else "trained"} in {built_s:.1f} s)',
        flush=True)

  common = dict(queue_size=4096, timeout_s=600, max_inputs=f.inputs, max_options=4)
  apps = {
      'serving': server.create_app(engine, max_batch_rows=f.max_batch_rows,
                                   max_wait_ms=f.max_wait_ms, **common),
      'per_task': server.create_app(engine, max_batch_rows=f.max_batch_rows,
                                    max_wait_ms=f.max_wait_ms, batch_by_prompt=True, **common),
      'one_at_a_time': server.create_app(engine, max_batch_rows=1, max_wait_ms=0, **common),
  }
  rng = random.Random(f.seed)
  tasks = make_tasks(rng, top_t)
  result = {'command': command, 'model': model_desc, 'inputs': f.inputs,
            'max_batch_rows': f.max_batch_rows, 'max_wait_ms': f.max_wait_ms,
            'requests': f.requests, 'cell_seconds': f.cell_seconds, 'grid': [],
            'comparison': {}, 'skipped': []}

  def bodies(n_tasks, pids, n):
    out = []
    for _ in range(n):
      k = rng.randrange(n_tasks)
      out.append({'prompt_id': pids[k], 'inputs': [sentence(rng) for _ in range(f.inputs)],
                  'options': tasks[k]['options'][:rng.choice((2, 3, 4))]})
    return out

  ctx = multiprocessing.get_context('spawn')
  with ProcessPoolExecutor(1, mp_context=ctx) as pool, \
       server.serve_in_thread(apps['serving']) as url_s, \
       server.serve_in_thread(apps['per_task']) as url_p, \
       server.serve_in_thread(apps['one_at_a_time']) as url_o:
    urls = {'serving': url_s, 'per_task': url_p, 'one_at_a_time': url_o}
    pool.submit(time.sleep, 0).result()  # the client process is up before anything is timed

    # ---- tasks
    t0 = time.perf_counter()
    with httpx.Client(base_url=url_s, timeout=300.0) as client:
      pids = []
      for t in tasks:
        r = client.post('/v1/prompts', json={'examples': t['examples']})
        r.raise_for_status()
        pids.append(r.json()['prompt_id'])
    print(f'registered {len(pids)} tasks in {time.perf_counter() - t0:.1f} s', flush=True)

    def measure(name, n_tasks, concurrency, n=None, seconds=None):
      application = apps[name]
      before = fill(application)
      cpu0 = time.process_time()
      sent = bodies(n_tasks, pids, n or f.requests)
      out = pool.submit(client_load, urls[name], sent, concurrency,
                        seconds or f.cell_seconds).result()
      after = fill(application)
      server_cpu = time.process_time() - cpu0
      lat = out['latencies']
      ok = sum(s == 200 for s in out['statuses'])
      rows = sum(len(b['inputs']) * len(b['options']) for b in sent[:len(lat)])
      return {'config': name, 'tasks': n_tasks, 'concurrency': concurrency, 'sent': len(lat),
              'errors': len(lat) - ok, 'qps': ok / out['wall'] if out['wall'] else 0.0,
              'rows_per_s': rows / out['wall'] if out['wall'] else 0.0,
              'p50_ms': pct(lat, .5) * 1e3, 'p99_ms': pct(lat, .99) * 1e3,
              'requests_per_call': (after[1] - before[1]) / max(1.0, after[0] - before[0]),
              'server_cpu': server_cpu / out['wall'], 'client_cpu': out['cpu'] / out['wall'],
              'server_cpu_ms_per_request': server_cpu * 1e3 / max(1, len(lat))}

    def show(label, m):
      print(f'{label:30s} {m["qps"]:7.1f} req/s ({m["rows_per_s"]:6.0f} rows/s)  p50 '
            f'{m["p50_ms"]:7.1f} ms  p99 {m["p99_ms"]:7.1f} ms  {m["requests_per_call"]:5.2f} '
            f'req/call  server: {m["server_cpu"]:.2f} cores, '
            f'{m["server_cpu_ms_per_request"]:.1f} ms CPU/req  client: {m["client_cpu"]:.2f} '
            f'cores  {m["sent"]} sent, {m["errors"]} errors', flush=True)

    # ---- warm-up: the batch shapes each configuration makes, compiled before any timing
    t0 = time.perf_counter()
    for name, c in (('serving', top_c), ('serving', 1), ('one_at_a_time', 1),
                    ('per_task', top_c)):
      measure(name, top_t, c, n=max(2 * c, 8), seconds=120)
    warm_s = time.perf_counter() - t0
    print(f'warm-up {warm_s:.1f} s', flush=True)

    # ---- the engine alone (no HTTP): what an engine call of k requests costs
    print(f'\n[engine] engine.classify of k requests ({top_t} tasks), no HTTP', flush=True)
    result['engine'] = {}
    sample = [engine_lib.ClassifyRequest(b['prompt_id'], b['inputs'], b['options'])
              for b in bodies(top_t, pids, 32)]
    for k in (1, 2, 4, 8, 16):
      engine.classify(sample[:k])  # compiles a shape the servers may not have made
      times = []
      for _ in range(3):
        t0 = time.perf_counter()
        engine.classify(sample[:k])
        times.append((time.perf_counter() - t0) * 1e3)
      ms = statistics.median(times)
      rows = sum(len(r.inputs) * len(r.options) for r in sample[:k])
      result['engine'][k] = {'ms_per_call': ms, 'ms_per_request': ms / k, 'rows': rows}
      print(f'k = {k:2d} ({rows:3d} rows): {ms:8.2f} ms a call, {ms / k:7.2f} ms a request',
            flush=True)
    compiled_before = server.compilations()

    # ---- the grid
    print(f'\n[grid] serving configuration (max_batch_rows={f.max_batch_rows}, max_wait_ms='
          f'{f.max_wait_ms:g}), {f.inputs} inputs x 2-4 options a request', flush=True)
    for n_tasks in task_counts:
      for c in concurrencies:
        if time.monotonic() > give_up:
          result['skipped'].append(f'grid tasks={n_tasks} clients={c}')
          continue
        m = measure('serving', n_tasks, c)
        result['grid'].append(m)
        show(f'{n_tasks:3d} tasks, {c:3d} clients', m)

    # ---- the comparison
    print(f'\n[comparison] {top_c} clients, {f.rounds} interleaved round(s)', flush=True)
    configs = [('single', 'serving', 1), ('mixed', 'serving', top_t),
               ('per_task', 'per_task', top_t), ('one_at_a_time', 'one_at_a_time', top_t)]
    runs = {label: [] for label, _, _ in configs}
    for rnd in range(f.rounds):
      for label, name, n_tasks in (configs if rnd % 2 == 0 else configs[::-1]):
        if time.monotonic() > give_up:
          result['skipped'].append(f'comparison round {rnd + 1} {label}')
          continue
        m = measure(name, n_tasks, top_c)
        runs[label].append(m)
        show(f'round {rnd + 1}: {label} ({n_tasks} tasks)', m)
    for label, ms in runs.items():
      if ms:
        result['comparison'][label] = {
            'qps': statistics.mean(m['qps'] for m in ms),
            'rows_per_s': statistics.mean(m['rows_per_s'] for m in ms),
            'p50_ms': statistics.mean(m['p50_ms'] for m in ms),
            'p99_ms': statistics.mean(m['p99_ms'] for m in ms),
            'requests_per_call': statistics.mean(m['requests_per_call'] for m in ms),
            'server_cpu_ms_per_request': statistics.mean(m['server_cpu_ms_per_request']
                                                         for m in ms),
            'errors': sum(m['errors'] for m in ms), 'rounds': len(ms)}
    compiled_during = server.compilations() - compiled_before

    # ---- registration against prefix-tuning
    print('\n[registration vs prefix-tuning] 16 examples', flush=True)
    config = engine.trained.config
    data_dir, setting = experiment.data_location(config, workdir)
    seeds = (100, 13, 21, 42, 87)
    sets = [(task, seed) for seed in seeds for task in setting['test']]
    task_seeds = evaluation.load_task_seeds(
        data_dir, [setting['test'][0]], [seeds[0]], engine.tokenizer,
        os.path.join(tmp.name, 'tokenized'), config.max_example_len)
    ts = task_seeds[0]
    reg_ms, pgm_ms, reg_cpu_ms = [], [], []
    with httpx.Client(base_url=url_s, timeout=300.0) as client:
      # New sets: the suite's test tasks x seeds (ts's first), then generated ones.
      new_sets = []
      for task, seed in sets[:f.registrations]:
        one, = evaluation.load_task_seeds(data_dir, [task], [seed], engine.tokenizer,
                                          os.path.join(tmp.name, 'tokenized'),
                                          config.max_example_len)
        new_sets.append([{'input': x, 'output': y}
                         for x, y in zip(one.train.raw['input'], one.train.raw['output'])])
      new_sets += [t['examples'] for t in make_tasks(rng, f.registrations - len(new_sets))]
      for examples in new_sets:
        t0, cpu0 = time.perf_counter(), time.process_time()
        r = client.post('/v1/prompts', json={'examples': examples})
        wall = (time.perf_counter() - t0) * 1e3
        reg_cpu_ms.append((time.process_time() - cpu0) * 1e3)  # server and client: this process
        r.raise_for_status()
        if not r.json()['created']:
          raise RuntimeError('a timed registration found its examples already stored')
        reg_ms.append(wall)
        pgm_ms.append(r.json()['pgm_ms'])
    reg, reg_cpu = statistics.median(reg_ms), statistics.median(reg_cpu_ms)
    print(f'registration (POST /v1/prompts, created=true): median {reg:.1f} ms, first '
          f'{reg_ms[0]:.1f} ms, max {max(reg_ms):.1f} ms over {len(reg_ms)}; the PGM pass '
          f'itself: median {statistics.median(pgm_ms):.1f} ms; CPU: median {reg_cpu:.1f} ms',
          flush=True)
    result['registration'] = {'median_ms': reg, 'first_ms': reg_ms[0], 'max_ms': max(reg_ms),
                              'n': len(reg_ms), 'pgm_median_ms': statistics.median(pgm_ms),
                              'cpu_median_ms': reg_cpu}
    method = methods.REGISTRY['prefix_tuning']
    hp = method.Hparams()
    tr = engine.trained
    ectx = evaluation.Context(tr.lm, tr.pgm_cfg, tr.trainable, tr.spec,
                              (int(config.n_prompt_examples), int(config.n_lm_examples)), {})
    prefix_s, prefix_cpu = [], []
    for i in range(f.prefix_calls):
      if i and time.monotonic() > give_up:
        result['skipped'].append(f'prefix-tuning call {i + 1}')
        break
      t0, cpu0 = time.perf_counter(), time.process_time()
      out = method.prompt(ectx, ts, hp, jax.random.key(i))
      jax.block_until_ready(out.prompt)
      prefix_s.append(time.perf_counter() - t0)
      prefix_cpu.append(time.process_time() - cpu0)
      print(f'prefix-tuning {ts.task} seed {ts.seed} ({hp}), call {i + 1}'
            f'{" (compiles its step)" if i == 0 else " (warm)"}: {prefix_s[-1]:.2f} s '
            f'({prefix_cpu[-1]:.2f} s CPU), {out.forward_passes} forward + '
            f'{out.backward_passes} backward passes', flush=True)
    result['prefix_tuning'] = {'calls_s': prefix_s, 'calls_cpu_s': prefix_cpu,
                               'hparams': str(hp)}
  load_end = os.getloadavg()
  tmp.cleanup()

  # ---- summary
  comp = result['comparison']
  print(f'\nsummary ({model_desc}); command: {command}')
  print(f'setup: run {built_s:.1f} s, warm-up {warm_s:.1f} s, compilations during the timed '
        f'classify measurements: {compiled_during}; load average (1 min) {load_start[0]:.2f} at '
        f'start, {load_end[0]:.2f} at the end; total {time.monotonic() - started:.0f} s')
  verdicts = {}
  print('targets: "wall" is the issue\'s figure (requests/s, seconds); "cpu" divides by the CPU '
        'seconds this process got (the machine is shared: its other jobs change how much we get '
        'from one measurement to the next, not what a request costs)')

  def verdict(key, wall, cpu, why):
    met = {'wall': wall >= TARGETS[key], 'cpu': cpu >= TARGETS[key]}
    verdicts[key] = {'wall': wall, 'cpu': cpu, 'target': TARGETS[key], 'met': met}
    word = lambda ok: 'MET' if ok else 'NOT MET'
    print(f'target {key} >= {TARGETS[key]:g}x: wall {wall:.2f}x {word(met["wall"])}, cpu '
          f'{cpu:.2f}x {word(met["cpu"])}' + ('' if all(met.values()) else f' -- {why}'))

  def engine_line():
    e = result['engine']
    k = max(e)
    return (f'1 request {e[1]["ms_per_call"]:.1f} ms a call, {k} requests '
            f'{e[k]["ms_per_call"]:.1f} ms ({e[k]["ms_per_request"]:.2f} ms a request): '
            f'gathering {k} requests into a call makes the engine\'s time a request '
            f'{e[1]["ms_per_call"] / e[k]["ms_per_request"]:.2f}x cheaper')

  cpu_qps = lambda m: 1e3 / m['server_cpu_ms_per_request']
  if 'mixed' in comp and 'single' in comp:
    mixed, single = comp['mixed'], comp['single']
    for label, m in comp.items():
      print(f'{label:14s} {m["qps"]:7.1f} req/s wall, {cpu_qps(m):7.1f} req per CPU-second, '
            f'p50 {m["p50_ms"]:.1f} ms, p99 {m["p99_ms"]:.1f} ms, {m["requests_per_call"]:.2f} '
            f'requests a call (mean of {m["rounds"]} round(s))')
    verdict('mixed_vs_single', mixed['qps'] / single['qps'], cpu_qps(mixed) / cpu_qps(single),
            f'{top_t} tasks: {mixed["server_cpu_ms_per_request"]:.1f} ms of CPU a request at '
            f'{mixed["requests_per_call"]:.2f} requests a call against 1 task: '
            f'{single["server_cpu_ms_per_request"]:.1f} ms at {single["requests_per_call"]:.2f}')
    if 'per_task' in comp:
      p = comp['per_task']
      result['mixed_vs_per_task'] = {'wall': mixed['qps'] / p['qps'],
                                     'cpu': cpu_qps(mixed) / cpu_qps(p)}
      print(f'mixed-task batching vs one task per batch ({top_t} tasks): wall '
            f'{mixed["qps"] / p["qps"]:.2f}x, cpu {cpu_qps(mixed) / cpu_qps(p):.2f}x (one task '
            f'per batch gathers {p["requests_per_call"]:.2f} requests a call)')
    if 'one_at_a_time' in comp:
      o = comp['one_at_a_time']
      verdict('mixed_vs_one_at_a_time', mixed['qps'] / o['qps'], cpu_qps(mixed) / cpu_qps(o),
              f'the server spends {mixed["server_cpu_ms_per_request"]:.1f} ms of CPU a request '
              f'batching {mixed["requests_per_call"]:.2f} requests a call against '
              f'{o["server_cpu_ms_per_request"]:.1f} ms one at a time; the engine alone: '
              f'{engine_line()}; the rest of a request\'s cost, the HTTP path (parsing, '
              'validation, JSON, the event loop), is paid per request however requests are '
              'batched')
  if prefix_s:
    warm, warm_cpu = prefix_s[-1], prefix_cpu[-1]
    wall_ratio, cpu_ratio = warm * 1e3 / reg, warm_cpu * 1e3 / reg_cpu
    result['registration_vs_prefix'] = {'wall': wall_ratio, 'cpu': cpu_ratio,
                                        'first_call_wall': prefix_s[0] * 1e3 / reg}
    which = 'warm' if len(prefix_s) > 1 else 'first'
    print(f'prefix-tuning ({which} call) / registration (median): wall {warm:.2f} s / '
          f'{reg:.1f} ms = {wall_ratio:.1f}x; cpu {warm_cpu:.2f} s / {reg_cpu:.1f} ms = '
          f'{cpu_ratio:.1f}x; the first prefix-tuning call (compiling) {prefix_s[0]:.2f} s = '
          f'{prefix_s[0] * 1e3 / reg:.1f}x')
    verdict('registration_vs_prefix', wall_ratio, cpu_ratio,
            f'prefix-tuning is {hp.epochs} optimizer steps of a forward and a backward pass over '
            f'the 16 examples ({warm:.2f} s); a registration is one PGM forward pass over them '
            f'({result["registration"]["pgm_median_ms"]:.1f} ms) plus the HTTP round trip and '
            f'the store\'s write ({reg:.1f} ms in all)')
  result['targets'] = verdicts
  result['compilations_during_timing'] = compiled_during
  result['load_average'] = [load_start[0], load_end[0]]
  if result['skipped']:
    print(f'skipped (--max_seconds={f.max_seconds:g}): {result["skipped"]}')
  print(json.dumps(result))


if __name__ == '__main__':
  app.run(main)
