"""The LM service over HTTP: a FastAPI app around `serving.engine.Engine` and a dynamic batcher.

Endpoints (JSON in and out; errors are {"error": {"field", "message"}}, never a traceback):

  POST   /v1/prompts        {"examples": [{"input", "output"}, ...], "task"} -> {"prompt_id",
                            "created", "pgm_ms"}  (201 created, 200 already stored)
  GET    /v1/prompts        {"prompts": [meta, ...]} (the caller's own)
  GET    /v1/prompts/{id}   meta;  DELETE /v1/prompts/{id} -> 204
  POST   /v1/classify       {"prompt_id", "inputs", "options"} -> {"predictions", "scores"}
                            (scores: mean option NLL per input and option; the lowest wins)
  POST   /v1/generate       {"prompt_id", "input", "max_new_tokens", "temperature", "top_k",
                            "top_p", "stop", "seed"} -> {"text", "tokens", "finish_reason"}
  GET    /healthz, /metrics (Prometheus text; no API key needed for either)

Status codes: 422 a request's own mistake (the field named: `inputs[2]`, `temperature`), 413 a
request over one of the server's limits (the field named: a body over max_body_bytes `body`, more
than max_inputs `inputs`, max_options `options`, the engine's max_examples `examples`, an input of
more than the engine's max_input_tokens `inputs[i]` / `input` unless the engine truncates inputs,
more than max_new_tokens `max_new_tokens`, more than MAX_STOP stop strings `stop`), 400 a body
that cannot be parsed at all (invalid UTF-8, nested too deep), 401 a missing or wrong
`Authorization: Bearer KEY` (when API keys are configured), 404 an unknown prompt (or another
tenant's: indistinguishable), 409 a stored prompt that cannot be served as it is (its files fail
verification, or another PGM checkpoint / base LM made it: registering the examples again repairs
or replaces it), 429 a full queue (with Retry-After), 503 shutting down, 504 a request that could
not start within timeout_s, 500 anything else (logged with its traceback on the server, never
returned). No request can stop the server: every body is read within max_body_bytes before it
is parsed, every request is checked on its own before it joins a batch, and a batched call that
still fails is retried request by request.

API keys (load_api_keys): a file of one key a line, `KEY` or `KEY OWNER`; each owner (tenant) sees
and uses only its own prompts. A key without an owner name is its own tenant, named
'key-' + sha256(KEY)[:16], so raw keys are never written into the prompt store.

The batcher. The engine is synchronous and not thread-safe, so every engine call runs on one
worker thread. Handlers put a `Job` on a bounded FIFO (429 when it holds queue_size jobs) and
await an asyncio future that the worker resolves through loop.call_soon_threadsafe. The worker
takes the oldest job; a classify (or generate) job gathers every queued job of the same kind that
fits in max_batch_rows rows (classify: inputs x options; generate: 1), of any prompt (or, with
batch_by_prompt, only of the oldest job's prompt: a benchmark's baseline), waiting up to
max_wait_ms from the oldest one's arrival for more, and runs them as ONE engine call.
Registration and deletion run alone, in order. A job is *started* once the worker takes it off
the queue: one whose deadline (arrival + timeout_s) passes before that is answered 504 (by the
worker, or by the handler, which removes it from the queue), and a started job is always
answered. Each job's prompt is checked before the batched call, so one bad request fails alone;
if the batched call still raises, its jobs are retried one by one. The worker starts with the
first request (ASGI transports without lifespan work too) and stops with the app's lifespan, or
`app.state.batcher.stop()`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import hmac
import logging
import threading
import time
from typing import Any, Callable

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from metal_jax.serving import engine as engine_lib
from metal_jax.serving import generate as gen
from metal_jax.serving import scoring
from metal_jax.serving import store as store_lib

log = logging.getLogger(__name__)

OWNER_SCOPE_KEY = 'metal_jax.owner'
MAX_BODY_BYTES = 8 << 20  # create_app's default max_body_bytes (serve.py --max_body_bytes)
MAX_STOP = 16  # stop strings a generate request
RETRY_AFTER_S = 1
BATCHED = ('classify', 'generate')


# ----------------------------------------------------------------------------- errors


class ApiError(Exception):
  """An HTTP error answered as {"error": {"field", "message"}}."""

  def __init__(self, status: int, field: str | None, message: str,
               headers: dict[str, str] | None = None):
    super().__init__(message)
    self.status, self.field, self.message, self.headers = status, field, message, headers


class ConfigError(ValueError):
  """A server configuration mistake (serve.py prints it and exits)."""


def _split(message: str) -> tuple[str | None, str]:
  """'field: message' -> (field, message), as RequestError / SamplingParams / the store word it."""
  head, sep, rest = message.partition(': ')
  if sep and head and ' ' not in head:
    return head, rest
  return None, message


def api_error(e: BaseException) -> ApiError:
  """The HTTP answer to an exception raised while serving a request."""
  if isinstance(e, ApiError):
    return e
  if isinstance(e, engine_lib.RequestError):  # 422 a malformed field, 413 one over a limit
    return ApiError(e.status, e.field, _split(str(e))[1])
  if isinstance(e, store_lib.UnknownPrompt):
    return ApiError(404, 'prompt_id', str(e))
  if isinstance(e, store_lib.CorruptEntry):
    return ApiError(409, 'prompt_id', f'the stored prompt fails verification ({e.reason}); '
                    'register its examples again to repair it')
  if isinstance(e, store_lib.IdentityMismatch):
    return ApiError(409, 'prompt_id', 'the stored prompt was made by another PGM checkpoint or '
                    'base LM than this server serves; register its examples again')
  if isinstance(e, store_lib.StoreError):  # canonical_examples' checks: 'examples[0].input: ...'
    return ApiError(422, *_split(str(e)))
  log.error('internal error', exc_info=e)
  return ApiError(500, None, f'internal error ({type(e).__name__})')


def _error_response(e: ApiError) -> JSONResponse:
  return JSONResponse({'error': {'field': e.field, 'message': e.message}}, e.status,
                      headers=e.headers)


def _field_path(loc) -> str:
  """A pydantic error location ('body', 'inputs', 2) -> 'inputs[2]'."""
  parts = list(loc[1:]) if loc and loc[0] in ('body', 'path', 'query', 'header') else list(loc)
  out = ''
  for p in parts:
    out += f'[{p}]' if isinstance(p, int) else (f'.{p}' if out else str(p))
  return out or (str(loc[0]) if loc else 'body')


# ----------------------------------------------------------------------------- bodies


class _Body(BaseModel):
  model_config = ConfigDict(strict=True, extra='forbid')


class Example(_Body):
  input: str
  output: str


class RegisterBody(_Body):
  examples: list[Example] = Field(min_length=1)
  task: str = ''


class ClassifyBody(_Body):
  prompt_id: str
  inputs: list[str] = Field(min_length=1)
  options: list[str] = Field(min_length=1)


class GenerateBody(_Body):
  prompt_id: str
  input: str
  max_new_tokens: int = 32
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  stop: list[str] = []
  seed: int = Field(0, ge=0, lt=1 << 63)


# ----------------------------------------------------------------------------- batcher


class QueueFull(Exception):
  pass


class Closed(Exception):
  pass


class Timeout(Exception):
  pass


@dataclasses.dataclass(eq=False)  # identity equality: `job in queue` finds this very job
class Job:
  kind: str  # 'classify' | 'generate' | 'call' (anything else on the engine: run alone)
  payload: Any  # ClassifyRequest | GenerateRequest | a callable
  rows: int
  arrival: float  # time.monotonic()
  deadline: float
  loop: asyncio.AbstractEventLoop
  future: asyncio.Future

  def settle(self, value: Any = None, error: BaseException | None = None) -> None:
    """Resolves the future from any thread (a no-op if the client's loop is gone)."""
    def set_():
      if not self.future.done():
        if error is not None:
          self.future.set_exception(error)
        else:
          self.future.set_result(value)
    try:
      self.loop.call_soon_threadsafe(set_)
    except RuntimeError:  # the event loop has closed
      pass


class Batcher:
  """One worker thread running every engine call, batching queued classify / generate jobs."""

  def __init__(self, engine: engine_lib.Engine, *, max_batch_rows: int, max_wait_s: float,
               queue_size: int, metrics: 'Metrics | None' = None, batch_by_prompt: bool = False):
    self.engine = engine
    self.max_batch_rows, self.max_wait_s, self.queue_size = max_batch_rows, max_wait_s, queue_size
    self.batch_by_prompt = batch_by_prompt  # gather only the oldest job's prompt (a baseline)
    self.metrics = metrics
    self.calls: collections.Counter = collections.Counter()  # engine calls by kind
    self._queue: collections.deque[Job] = collections.deque()
    self._cond = threading.Condition()
    self._thread: threading.Thread | None = None
    self._closed = False

  @property
  def depth(self) -> int:
    return len(self._queue)

  @property
  def running(self) -> bool:
    return self._thread is not None and self._thread.is_alive()

  # ---- the handlers' side (event loop thread)

  def submit(self, job: Job) -> None:
    with self._cond:
      if self._closed:
        raise Closed()
      if len(self._queue) >= self.queue_size:
        raise QueueFull()
      self._queue.append(job)
      if self._thread is None:
        self._thread = threading.Thread(target=self._loop, name='engine-worker', daemon=True)
        self._thread.start()
      self._cond.notify()

  def cancel(self, job: Job) -> bool:
    """Removes a job that has not started; False if the worker already took it."""
    with self._cond:
      try:
        self._queue.remove(job)
        return True
      except ValueError:
        return False

  def stop(self, timeout: float | None = 60.0) -> None:
    """Answers queued jobs 503, lets the running call finish, joins the worker."""
    with self._cond:
      self._closed = True
      pending, self._queue = list(self._queue), collections.deque()
      self._cond.notify_all()
      thread = self._thread
    for job in pending:
      job.settle(error=Closed())
    if thread is not None and thread is not threading.current_thread():
      thread.join(timeout)

  # ---- the worker thread

  def _loop(self) -> None:
    while True:
      with self._cond:
        while not self._queue and not self._closed:
          self._cond.wait()
        if self._closed and not self._queue:
          return
        batch = self._take()
      if batch:
        try:
          self._run(batch)
        except BaseException as e:  # never leave a started job unanswered
          for job in batch:
            job.settle(error=e)
          if not isinstance(e, Exception):
            raise

  def _take(self) -> list[Job]:
    """Takes the next batch off the queue (the caller holds the lock): the oldest job, and for a
    batched kind every queued job of its kind that fits, once max_batch_rows are reached or the
    oldest job has waited max_wait_s (with batch_by_prompt: only jobs of the oldest's prompt)."""
    while self._queue:
      first = self._queue[0]
      if first.kind not in BATCHED:
        return [self._queue.popleft()]
      batch, rows = [], 0
      for job in self._queue:
        if self.batch_by_prompt and job.payload.prompt_id != first.payload.prompt_id:
          continue
        if job.kind == first.kind and (not batch or rows + job.rows <= self.max_batch_rows):
          batch.append(job)
          rows += job.rows
      wait = first.arrival + self.max_wait_s - time.monotonic()
      if rows >= self.max_batch_rows or wait <= 0 or self._closed:
        for job in batch:
          self._queue.remove(job)
        return batch
      self._cond.wait(wait)  # more may arrive (or `first` be cancelled): look again
    return []

  def _run(self, batch: list[Job]) -> None:
    now = time.monotonic()
    live = []
    for job in batch:
      if now > job.deadline:
        job.settle(error=Timeout())
      else:
        live.append(job)
    if not live:
      return
    kind = live[0].kind
    if kind not in BATCHED:
      for job in live:
        try:
          job.settle(job.payload())
        except Exception as e:
          job.settle(error=e)
      return
    ok = []
    for job in live:  # per-request checks first: one bad request must not fail the others
      try:
        self._check(job)
        ok.append(job)
      except Exception as e:
        job.settle(error=e)
    if ok:
      self._call(kind, ok)

  def _check(self, job: Job) -> None:
    self.engine.check(job.payload)  # unknown, corrupt, other identity, too long

  def _call(self, kind: str, jobs: list[Job]) -> None:
    """One engine call for the jobs; if it raises, each job again alone."""
    fn = self.engine.classify if kind == 'classify' else self.engine.generate
    self.calls[kind] += 1
    if self.metrics is not None:
      self.metrics.batch_rows.labels(kind).observe(sum(j.rows for j in jobs))
      self.metrics.batch_requests.labels(kind).observe(len(jobs))
      self.metrics.engine_calls.labels(kind).inc()
    try:
      results = fn([j.payload for j in jobs])
    except Exception as e:
      if len(jobs) == 1:
        jobs[0].settle(error=e)
      else:
        log.warning('a batched %s call of %d requests failed (%s); retrying them one by one',
                    kind, len(jobs), e)
        for job in jobs:
          self._call(kind, [job])
      return
    for job, result in zip(jobs, results):
      job.settle(result)


# ----------------------------------------------------------------------------- metrics


class Metrics:
  """The app's Prometheus metrics, in a registry of its own."""

  def __init__(self, engine: engine_lib.Engine, batcher_depth: Callable[[], int]):
    self.registry = r = CollectorRegistry()
    self.requests = Counter('metal_requests', 'HTTP requests by endpoint and status',
                            ['endpoint', 'status'], registry=r)
    self.errors = Counter('metal_errors', 'HTTP responses with status >= 400',
                          ['endpoint', 'status'], registry=r)
    self.latency = Histogram('metal_request_seconds', 'request latency by endpoint', ['endpoint'],
                             buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60),
                             registry=r)
    # Per engine call, retries of a failed batch included.
    self.batch_rows = Histogram('metal_batch_rows', 'rows per engine call (classify: inputs x '
                                'options; generate: requests)', ['kind'],
                                buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096), registry=r)
    self.batch_requests = Histogram('metal_batch_requests', 'requests per engine call', ['kind'],
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
    self.engine_calls = Counter('metal_engine_calls', 'batched engine calls', ['kind'],
                                registry=r)
    depth = Gauge('metal_queue_depth', 'jobs queued, not started', registry=r)
    depth.set_function(batcher_depth)
    r.register(_EngineCollector(engine))

  def observe(self, endpoint: str, status: int, seconds: float) -> None:
    self.requests.labels(endpoint, str(status)).inc()
    if status >= 400:
      self.errors.labels(endpoint, str(status)).inc()
    self.latency.labels(endpoint).observe(seconds)


def compilations() -> int:
  """Traces of the decoding jits plus compiled shapes of the scoring jits (and slot writes)."""
  n = sum(gen.TRACES.values())
  for module, name in ((scoring, '_score_blocks'), (scoring, '_encode'),
                       (engine_lib, '_set_slot')):
    size = getattr(getattr(module, name, None), '_cache_size', None)  # a jit's compiled shapes
    if size is not None:
      n += int(size())
  return n


class _EngineCollector:
  """The store's and slot table's counters, read at scrape time."""

  def __init__(self, engine: engine_lib.Engine):
    self.engine = engine

  def describe(self):
    return []  # collected lazily (the engine's counters change between scrapes)

  def collect(self):
    st, sl = self.engine.store, self.engine.slots
    for name, doc, value in (
        ('metal_store_hits', 'prompt store host cache hits', st.hits),
        ('metal_store_misses', 'prompt store loads from disk', st.misses),
        ('metal_store_evictions', 'prompt store host cache evictions', st.evictions),
        ('metal_slot_loads', 'prompts loaded into device slots', sl.loads),
        ('metal_slot_evictions', 'device slot evictions', sl.evictions)):
      yield CounterMetricFamily(name, doc, value=value)
    yield GaugeMetricFamily('metal_compilations', 'compiled shapes of the serving jits',
                            value=compilations())


# ----------------------------------------------------------------------------- app


def key_owner(key: str) -> str:
  """The tenant name of a key listed without one: never the key itself (owners are stored)."""
  return 'key-' + hashlib.sha256(key.encode('utf-8')).hexdigest()[:16]


def load_api_keys(path: str) -> dict[str, str]:
  """{key: owner} from a file of one key a line: `KEY` or `KEY OWNER` (whitespace-separated);
  blank lines and lines starting with '#' are skipped. A key without an owner name is its own
  tenant, key_owner(KEY). Keys are printable ASCII without spaces. ConfigError naming the file
  (and the line) for an unreadable file, a malformed line, a duplicate key or no key at all;
  messages never quote a key."""
  where = f'--api_keys={path}'
  try:
    with open(path, encoding='utf-8-sig') as f:
      lines = f.read().splitlines()
  except OSError as e:
    raise ConfigError(f'{where}: cannot read it ({e.strerror or e})') from None
  except UnicodeDecodeError as e:
    raise ConfigError(f'{where}: not UTF-8 text ({e.reason} at byte {e.start})') from None
  keys: dict[str, str] = {}
  first_line: dict[str, int] = {}
  for n, line in enumerate(lines, 1):
    text = line.strip()
    if not text or text.startswith('#'):
      continue
    fields = text.split()
    if len(fields) > 2:
      raise ConfigError(f'{where}, line {n}: {len(fields)} fields; expected "KEY" or "KEY OWNER"')
    key = fields[0]
    if not all(33 <= ord(ch) <= 126 for ch in key):
      raise ConfigError(f'{where}, line {n}: a key must be printable ASCII (an HTTP header '
                        'carries it)')
    if key in keys:
      raise ConfigError(f'{where}, line {n}: duplicate key (first on line {first_line[key]})')
    keys[key] = fields[1] if len(fields) == 2 else key_owner(key)
    first_line[key] = n
  if not keys:
    raise ConfigError(f'{where}: no keys (one a line: "KEY" or "KEY OWNER")')
  return keys


def _positive(name: str, value, minimum=1) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
    raise ConfigError(f'{name}: must be a number >= {minimum} (got {value!r})')


def _content_length(scope) -> int | None:
  for name, value in scope.get('headers', []):
    if name == b'content-length':
      try:
        return int(value)
      except ValueError:
        return None
  return None


class _BodyTooLarge(Exception):
  pass


async def _read_body(receive, limit: int) -> bytes:
  """The whole request body (Content-Length or chunked), or _BodyTooLarge once past `limit`."""
  chunks, size = [], 0
  while True:
    message = await receive()
    if message['type'] == 'http.disconnect':
      raise ConnectionResetError('the client went away')
    chunk = message.get('body', b'')
    size += len(chunk)
    if size > limit:
      raise _BodyTooLarge()
    chunks.append(chunk)
    if not message.get('more_body', False):
      return b''.join(chunks)


class _HttpMiddleware:
  """Authentication (before any parsing), the body limit (the body is read here, within
  max_body_bytes, and handed on whole), per-endpoint metrics; a 500 JSON for the unexpected."""

  def __init__(self, app, *, service: '_Service'):
    self.app, self.service = app, service

  def _endpoint(self, scope) -> str:
    for route in self.service.routes:
      if route.matches(scope)[0] != Match.NONE:
        return route.path
    return 'other'  # unknown paths share a label: bounded cardinality

  async def __call__(self, scope, receive, send):
    if scope['type'] != 'http':
      await self.app(scope, receive, send)
      return
    start = time.perf_counter()
    status = None
    endpoint = self._endpoint(scope)
    limit = self.service.max_body_bytes

    async def send_(message):
      nonlocal status
      if message['type'] == 'http.response.start':
        status = message['status']
      await send(message)

    try:
      size = _content_length(scope)
      if size is not None and size > limit:  # refused unread
        err = ApiError(413, 'body', f'{size} bytes; at most {limit}')
        await _error_response(err)(scope, receive, send_)
        return
      keys = self.service.api_keys
      if keys is not None and scope['path'].startswith('/v1/'):
        owner = self.service.authenticate(scope)
        if owner is None:
          err = ApiError(401, 'authorization', 'missing or unknown API key (send "Authorization: '
                         'Bearer KEY")', headers={'WWW-Authenticate': 'Bearer'})
          await _error_response(err)(scope, receive, send_)
          return
        scope[OWNER_SCOPE_KEY] = owner
      try:
        body = await _read_body(receive, limit)
      except _BodyTooLarge:
        err = ApiError(413, 'body', f'more than {limit} bytes')
        await _error_response(err)(scope, receive, send_)
        return
      except ConnectionResetError:
        status = 499  # nobody to answer (metrics only)
        return
      replayed = False

      async def receive_():  # the body once, then the transport's messages (a disconnect)
        nonlocal replayed
        if not replayed:
          replayed = True
          return {'type': 'http.request', 'body': body, 'more_body': False}
        return await receive()

      await self.app(scope, receive_, send_)
    except Exception as e:
      if status is not None:
        raise  # the response has started: nothing else can be sent
      await _error_response(api_error(e))(scope, receive, send_)
    finally:
      self.service.metrics.observe(endpoint, status or 500, time.perf_counter() - start)


class _Service:
  """What the middleware and the handlers share: keys, the batcher, the metrics."""

  def __init__(self, api_keys, batcher, metrics, timeout_s, max_body_bytes):
    self.api_keys, self.batcher, self.metrics = api_keys, batcher, metrics
    self.timeout_s, self.max_body_bytes = timeout_s, max_body_bytes
    self.routes: list = []
    self._keys = [(k.encode(), v) for k, v in (api_keys or {}).items()]

  def authenticate(self, scope) -> str | None:
    auth = ''
    for name, value in scope.get('headers', []):
      if name == b'authorization':
        auth = value.decode('latin-1')
    scheme, _, key = auth.partition(' ')
    if scheme.lower() != 'bearer' or not key.strip():
      return None
    given, owner = key.strip().encode(), None
    for k, v in self._keys:  # constant time per key
      if hmac.compare_digest(given, k):
        owner = v
    return owner

  async def run(self, kind: str, payload: Any, rows: int = 1) -> Any:
    """Queues the job and waits for its result; ApiError for every failure."""
    loop = asyncio.get_running_loop()
    now = time.monotonic()
    job = Job(kind, payload, rows, now, now + self.timeout_s, loop, loop.create_future())
    try:
      self.batcher.submit(job)
    except QueueFull:
      raise ApiError(429, None, f'the queue is full ({self.batcher.queue_size} requests); retry',
                     headers={'Retry-After': str(RETRY_AFTER_S)}) from None
    except Closed:
      raise ApiError(503, None, 'the server is shutting down') from None
    try:
      try:
        return await asyncio.wait_for(asyncio.shield(job.future), job.deadline - time.monotonic())
      except asyncio.TimeoutError:
        if self.batcher.cancel(job):
          raise Timeout() from None
        return await job.future  # started: it will be answered
    except asyncio.CancelledError:  # the client went away: free its queue place if not started
      self.batcher.cancel(job)
      raise
    except Timeout:
      raise ApiError(504, None, f'the request did not start within {self.timeout_s:g} s') from None
    except Closed:
      raise ApiError(503, None, 'the server is shutting down') from None
    except Exception as e:
      raise api_error(e) from None


def create_app(engine: engine_lib.Engine, *, api_keys: dict[str, str] | None = None,
               max_batch_rows: int = 64, max_wait_ms: float = 5.0, queue_size: int = 256,
               timeout_s: float = 30.0, max_inputs: int = 256, max_options: int = 64,
               max_new_tokens: int = 256, max_body_bytes: int = MAX_BODY_BYTES,
               batch_by_prompt: bool = False) -> FastAPI:
  """The service's app over `engine`; api_keys {key: owner} (None: no authentication, owner '').

  Limits a request (413 naming the field beyond them): max_body_bytes of body, max_inputs inputs
  and max_options options a classify request, max_new_tokens a generate request; the engine's own
  (Engine(max_examples, max_input_tokens, truncate_inputs)) examples a prompt and tokens an input.
  batch_by_prompt: gather only requests of one prompt into an engine call (bench/serve.py's
  "one task per batch" baseline; serving mixes prompts).
  """
  for name, value, minimum in (
      ('max_batch_rows', max_batch_rows, 1), ('max_wait_ms', max_wait_ms, 0),
      ('queue_size', queue_size, 1), ('timeout_s', timeout_s, 0), ('max_inputs', max_inputs, 1),
      ('max_options', max_options, 1), ('max_new_tokens', max_new_tokens, 1),
      ('max_body_bytes', max_body_bytes, 1)):
    _positive(name, value, minimum)
  if api_keys is not None and not api_keys:
    raise ConfigError('api_keys: empty (no one could call the API); pass None for no keys')

  batcher = Batcher(engine, max_batch_rows=max_batch_rows, max_wait_s=max_wait_ms / 1e3,
                    queue_size=queue_size, batch_by_prompt=batch_by_prompt)
  metrics = batcher.metrics = Metrics(engine, lambda: batcher.depth)
  service = _Service(api_keys, batcher, metrics, timeout_s, int(max_body_bytes))

  @contextlib.asynccontextmanager
  async def lifespan(app):
    yield
    await asyncio.to_thread(batcher.stop)

  app = FastAPI(title='metal-jax', lifespan=lifespan, docs_url=None, redoc_url=None,
                openapi_url=None)
  app.state.engine, app.state.batcher, app.state.metrics = engine, batcher, metrics
  app.add_middleware(_HttpMiddleware, service=service)

  @app.exception_handler(ApiError)
  async def _api_error(request, e: ApiError):
    return _error_response(e)

  @app.exception_handler(RequestValidationError)
  async def _invalid(request, e: RequestValidationError):
    err = e.errors()[0] if e.errors() else {'loc': ('body',), 'msg': 'invalid request'}
    loc, message = tuple(err.get('loc', ())), str(err.get('msg', 'invalid'))
    if err.get('type') == 'json_invalid':  # loc ('body', offset)
      reason = (err.get('ctx') or {}).get('error', 'not JSON')
      return _error_response(ApiError(422, 'body', f'invalid JSON at character {loc[-1]}: '
                                      f'{reason}'))
    if loc == ('body',) and isinstance(err.get('input'), (bytes, str)):  # not read as JSON
      message = 'expected a JSON object (and the header Content-Type: application/json)'
    return _error_response(ApiError(422, _field_path(loc), message.removeprefix('Value error, ')))

  @app.exception_handler(StarletteHTTPException)
  async def _http(request, e: StarletteHTTPException):
    field = 'body' if e.status_code == 400 else None  # FastAPI's: a body it cannot parse
    return _error_response(ApiError(e.status_code, field, str(e.detail),
                                    getattr(e, 'headers', None)))

  def caller(request: Request) -> str:
    """The authenticated owner (tenant) of the request; '' without API keys."""
    return request.scope.get(OWNER_SCOPE_KEY, '')

  # ---- prompts

  @app.post('/v1/prompts')
  async def register(body: RegisterBody, owner: str = Depends(caller)):
    if len(body.examples) > engine.max_examples:  # refused before it queues (the engine checks too)
      raise ApiError(413, 'examples', f'{len(body.examples)} examples; at most '
                     f'{engine.max_examples}')
    examples = [e.model_dump() for e in body.examples]
    pid, created, pgm_ms = await service.run(
        'call', lambda: engine.register(examples, task=body.task, owner=owner))
    return JSONResponse({'prompt_id': pid, 'created': created, 'pgm_ms': pgm_ms},
                        201 if created else 200)

  @app.get('/v1/prompts')
  async def list_prompts(owner: str = Depends(caller)):
    return {'prompts': engine.store.list(owner)}  # the store is thread-safe

  @app.get('/v1/prompts/{prompt_id}')
  async def get_prompt(prompt_id: str, owner: str = Depends(caller)):
    try:
      return engine.store.meta(prompt_id, owner)
    except store_lib.StoreError as e:
      raise api_error(e) from None

  @app.delete('/v1/prompts/{prompt_id}', status_code=204)
  async def delete_prompt(prompt_id: str, owner: str = Depends(caller)):
    await service.run('call', lambda: engine.delete(prompt_id, owner))
    return Response(status_code=204)

  # ---- inference

  @app.post('/v1/classify')
  async def classify(body: ClassifyBody, owner: str = Depends(caller)):
    if len(body.inputs) > max_inputs:
      raise ApiError(413, 'inputs', f'{len(body.inputs)} inputs; at most {max_inputs} a request')
    if len(body.options) > max_options:
      raise ApiError(413, 'options', f'{len(body.options)} options; at most {max_options}')
    seen: dict[str, int] = {}
    for i, o in enumerate(body.options):
      if not o.strip():
        raise ApiError(422, f'options[{i}]', 'an option must be a non-empty string')
      if o in seen:
        raise ApiError(422, f'options[{i}]', f'duplicate of options[{seen[o]}]')
      seen[o] = i
    req = engine_lib.ClassifyRequest(body.prompt_id, list(body.inputs), list(body.options), owner)
    scores = await service.run('classify', req, rows=len(body.inputs) * len(body.options))
    scores = np.asarray(scores, np.float32)
    if not np.isfinite(scores).all():
      raise ApiError(500, None, 'the model produced non-finite scores')
    return {'predictions': [body.options[int(i)] for i in np.argmin(scores, axis=1)],
            'scores': scores.tolist()}

  @app.post('/v1/generate')
  async def generate(body: GenerateBody, owner: str = Depends(caller)):
    n_new = body.max_new_tokens
    if 'max_new_tokens' not in body.model_fields_set:  # the default, within this server's limit
      n_new = min(n_new, max_new_tokens)
    if n_new > max_new_tokens:
      raise ApiError(413, 'max_new_tokens', f'{n_new}; at most {max_new_tokens}')
    if len(body.stop) > MAX_STOP:
      raise ApiError(413, 'stop', f'{len(body.stop)} stop strings; at most {MAX_STOP}')
    try:
      params = gen.SamplingParams(max_new_tokens=n_new,
                                  temperature=body.temperature, top_k=body.top_k,
                                  top_p=body.top_p, stop=tuple(body.stop))
    except ValueError as e:
      raise ApiError(422, *_split(str(e))) from None
    req = engine_lib.GenerateRequest(body.prompt_id, body.input, params, owner, body.seed)
    out: gen.GenerationResult = await service.run('generate', req)
    return {'text': out.text, 'tokens': out.tokens, 'finish_reason': out.finish_reason}

  # ---- operations

  @app.get('/healthz')
  async def healthz():
    ident = engine.identity
    return {'status': 'ok', 'step': ident['step'], 'workdir': ident['workdir'],
            'prompts': len(engine.store._index),  # every tenant's (the store has no public count)
            'queue': batcher.depth}

  @app.get('/metrics')
  async def metrics_text():
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

  service.routes = list(app.router.routes)
  return app


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = '127.0.0.1', timeout_s: float = 30.0):
  """Runs `app` with uvicorn on a free port of `host` in a background thread (lifespan included)
  and yields its base URL; stops it on exit. For tests and benchmarks."""
  import socket

  import uvicorn
  sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
  sock.bind((host, 0))
  port = sock.getsockname()[1]
  server = uvicorn.Server(uvicorn.Config(app, log_level='warning', lifespan='on'))
  thread = threading.Thread(target=server.run, kwargs={'sockets': [sock]}, name='uvicorn',
                            daemon=True)
  thread.start()
  try:
    deadline = time.monotonic() + timeout_s
    while not server.started:
      if not thread.is_alive() or time.monotonic() > deadline:
        raise RuntimeError(f'uvicorn did not start on {host}:{port} within {timeout_s:g} s')
      time.sleep(0.01)
    yield f'http://{host}:{port}'
  finally:
    server.should_exit = True
    thread.join(timeout_s)
    sock.close()
