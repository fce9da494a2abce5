"""Our jitted Equation 1 training step against what a PyTorch + transformers user writes for it.

Both sides run the same model on the same batch: a randomly initialised GPT-2 of the
chosen shape, frozen; the PGM is that LM with LoRA (rank 8, alpha 16) on q, k and v,
reading X^P and 20 trainable padding slots (P-tuning's embeddings -> 2-layer BiLSTM ->
2-layer MLP); its keys/values at the slots are the frozen LM's prefix; the loss is
the token-mean NLL of y; AdamW (constant lr, no weight decay, no clipping) updates the
trainable parameters only.

  JAX      metal_jax's own pieces: models.config_from_hf, pgm.init_trainable,
           training.make_trainer (train.py's optimizer, state and jitted step) on a
           1-device mesh: the step train.py runs.
  PyTorch  transformers.GPT2LMHeadModel (sdpa attention, dropout 0) loaded with the same
           weights (exported by metal_jax.save_lm). The PGM is a second module tree over
           the same tensors (deepcopy with every parameter memoised) whose c_attn adds the
           LoRA deltas; the prefix goes in as a DynamicCache; the LM head runs on y's
           positions only; fused AdamW. Timed eagerly and with torch.compile of the loss
           (forward, and the backward AOTAutograd derives from it).

Before timing, the first steps' losses and gradient norms are compared: the torch
trainables are copies of the JAX ones (LoRA A/B, padding, LSTM gates mapped from
flax's (i, f, g, o) kernels to torch's stacked layout, MLP), so at float32 the two
initial losses must agree to 1e-4 (relative) or the run stops.

  python bench/vs_pytorch.py                                   # tiny, float32
  python bench/vs_pytorch.py --shape=gpt2-small --rounds=2
  python bench/vs_pytorch.py --dtype=bfloat16                  # JAX bf16 compute, torch autocast

bfloat16: JAX computes in bf16 with float32 frozen weights (train.py's
--config.dtype=bfloat16 --config.param_dtype=float32); torch runs the loss under
torch.autocast('cpu', bfloat16) over its float32 weights.

Threads: both sides get the same cores (--threads, default all: XLA sizes its pool by the
cores the process may use; torch.set_num_threads to match). torch's OpenMP waits passively
unless OMP_WAIT_POLICY is set (why: the comment at the imports). Every figure depends on what
else runs on the cores: the load average is printed at the start and end.
"""

import copy
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# torch's OpenMP threads spin-wait between parallel regions by default. When another process
# shares the cores, that made torch's steps erratic and up to 10x slower here (2026-12-02, a
# tiny GPT-2 forward+backward on 2 busy cores: 150-1,500 ms spinning, a steady ~100 ms passive).
# Read when torch loads OpenMP, so set before the import; export OMP_WAIT_POLICY=ACTIVE for
# torch's default on a machine of your own.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jaxlib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from absl import app, flags  # noqa: E402

from metal_jax import lora, models, pgm, sharding, training  # noqa: E402
from metal_jax.data import episodes  # noqa: E402
from metal_jax.models import hf  # noqa: E402


@dataclasses.dataclass(frozen=True, kw_only=True)
class Shape:
  n_layer: int
  n_embd: int
  n_head: int
  vocab_size: int
  n_positions: int
  batch: int  # episodes a step
  xp_len: int  # X^P tokens a PGM row (the P slots follow)
  lm_len: int  # LM-half tokens a row (X^L, x, y)
  y_len: int  # y tokens a row
  rounds: int  # default --rounds


SHAPES = {
    'tiny': Shape(n_layer=2, n_embd=128, n_head=4, vocab_size=1000, n_positions=256, batch=8,
                  xp_len=128, lm_len=32, y_len=4, rounds=7),
    'gpt2-small': Shape(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024,
                        batch=4, xp_len=256, lm_len=64, y_len=4, rounds=3),
}
PROMPT_LEN = 20
LORA = lora.LoraConfig(rank=8, alpha=16.0, targets=('q', 'k', 'v'))
LSTM_LAYERS = 2
F32_TOL = 1e-4  # relative difference of the initial losses, float32
BF16_TOL = 3e-2  # bf16 compute (as tests/test_models.py: within 3%)
SIDES = ('jax', 'torch_eager', 'torch_compile')

flags.DEFINE_enum('shape', 'tiny', list(SHAPES), 'model and batch shape preset')
flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'compute dtype of both sides')
flags.DEFINE_integer('rounds', None, 'interleaved rounds (default: 7 tiny, 3 gpt2-small)')
flags.DEFINE_integer('steps_per_round', 5, 'timed steps per side per round')
flags.DEFINE_float('lr', 2e-4, 'AdamW learning rate (constant)')
flags.DEFINE_integer('threads', None, 'CPU cores both sides use (default: all this process may '
                     'use); pins the process to that many cores and sets torch.set_num_threads')
flags.DEFINE_integer('seed', 0, 'seed of the weights, trainables and batch')
flags.DEFINE_string('inductor_cache', '', "torch.compile's on-disk cache directory; '' = a fresh "
                    'one for this run (a cold compile, as JAX without a persistent cache)')
FLAGS = flags.FLAGS


# ----------------------------------------------------------------------------- shared inputs


def hf_config(shape: Shape) -> transformers.GPT2Config:
  return transformers.GPT2Config(
      vocab_size=shape.vocab_size, n_positions=shape.n_positions, n_embd=shape.n_embd,
      n_layer=shape.n_layer, n_head=shape.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
      attn_pdrop=0.0, bos_token_id=shape.vocab_size - 1, eos_token_id=shape.vocab_size - 1)


def random_batch(shape: Shape, seed: int) -> dict[str, np.ndarray]:
  """One batch in the step's layout (episodes.collate_pgm / collate_lm): random tokens, rows of
  different lengths (X^P left-padded, LM halves right-padded), row 0 full."""
  rng = np.random.default_rng(seed)
  b, v = shape.batch, shape.vocab_size
  xp = rng.integers(shape.xp_len // 2, shape.xp_len + 1, b)
  lm = rng.integers(max(shape.lm_len // 2, shape.y_len + 1), shape.lm_len + 1, b)
  xp[0], lm[0] = shape.xp_len, shape.lm_len
  spec = episodes.EpisodeSpec(prompt_len=PROMPT_LEN, max_len=shape.n_positions)
  pgm_half = episodes.collate_pgm(
      [rng.integers(1, v, n).astype(np.int32) for n in xp], spec, shape.xp_len + PROMPT_LEN)
  halves = [episodes.LMHalf(rng.integers(1, v, n - shape.y_len).astype(np.int32),
                            rng.integers(1, v, shape.y_len).astype(np.int32)) for n in lm]
  return {**pgm_half, **episodes.collate_lm(halves, shape.lm_len, shape.y_len)}


# ----------------------------------------------------------------------------- JAX


@dataclasses.dataclass
class JaxSide:
  config: models.GPT2Config
  params: dict  # the frozen LM, on the mesh
  state: dict  # the train state (donated by every step)
  step: object  # the compiled step
  batch: dict
  rng: jax.Array
  compile_s: float

  def run(self) -> dict:
    self.state, metrics = self.step(self.state, self.params, self.batch, self.rng)
    jax.block_until_ready((self.state, metrics))
    return metrics


def build_jax(shape: Shape, dtype: str, batch: dict, seed: int) -> JaxSide:
  """Random frozen GPT-2, fresh trainables, and the project's jitted step on one device."""
  lm_cfg = models.config_from_hf(hf_config(shape).to_dict(), dtype=dtype, param_dtype='float32')
  module = models.module_for(lm_cfg)
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, devices=jax.devices()[:1])
  param_sh = sharding.param_shardings(module, mesh)

  def init_params(key):
    params = nn.unbox(module.init(key, jnp.zeros((1, 1), jnp.int32))['params'])
    # Norm scales start at 1 and biases at 0: perturb them so the export of each is exercised.
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    return treedef.unflatten([
        x + 0.05 * jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
        if path[-1].key in ('scale', 'bias') else x for i, (path, x) in enumerate(leaves)])

  params = jax.jit(init_params, out_shardings=param_sh)(jax.random.key(seed))
  pgm_cfg = pgm.PGMConfig(prompt_len=PROMPT_LEN, design='prefix', lstm_layers=LSTM_LAYERS,
                          lora=LORA)
  optim = training.OptimConfig(lr=FLAGS.lr, end_lr=FLAGS.lr)  # constant lr, wd 0, no clipping
  trainer = training.make_trainer(optim, pgm_cfg, module, mesh, param_sh, steps=1)  # train.py's
  state, step_fn = trainer.init(jax.random.key(seed + 1)), trainer.step_fn
  batch = sharding.global_batch(batch, mesh)
  rng = jax.random.key(seed + 2)
  t = time.perf_counter()
  compiled = step_fn.lower(state, params, batch, rng).compile()
  return JaxSide(lm_cfg, params, state, compiled, batch, rng, time.perf_counter() - t)


# ----------------------------------------------------------------------------- PyTorch


class LoraQKV(torch.nn.Module):
  """GPT-2's fused c_attn (Conv1D: x @ W + b = [q | k | v]) plus LoRA deltas on q, k and v."""

  def __init__(self, base, rank: int, scale: float):
    super().__init__()
    d = base.weight.shape[0]
    self.base, self.rank, self.scale = base, rank, scale
    self.a = torch.nn.Parameter(torch.zeros(d, 3 * rank))  # [D, 3R]: A_q | A_k | A_v
    self.b = torch.nn.Parameter(torch.zeros(3, rank, d))  # [3, R, D]: B_q, B_k, B_v

  def forward(self, x):  # [B, T, D] -> [B, T, 3D]
    b, t, _ = x.shape
    u = (x @ self.a).view(b, t, 3, self.rank)  # [B, T, 3, R]
    delta = torch.einsum('btjr,jrd->btjd', u, self.b).reshape(b, t, -1)
    return self.base(x) + self.scale * delta


class PaddingEncoder(torch.nn.Module):
  """P-tuning's padding: embeddings -> bidirectional LSTM -> MLP, [P, D] (pgm.PaddingEncoder)."""

  def __init__(self, prompt_len: int, d: int, lstm_layers: int):
    super().__init__()
    self.embedding = torch.nn.Parameter(torch.zeros(prompt_len, d))
    self.lstm = torch.nn.LSTM(d, d // 2, num_layers=lstm_layers, bidirectional=True,
                              batch_first=True)
    # flax's LSTM cell has one bias per gate (torch: b_ih + b_hh): b_ih stays 0, frozen.
    for name, p in self.lstm.named_parameters():
      if name.startswith('bias_ih'):
        p.requires_grad_(False)
    self.mlp = torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.ReLU(), torch.nn.Linear(d, d))

  def forward(self):
    x, _ = self.lstm(self.embedding[None])  # [1, P, D]
    return self.mlp(x)[0]


class TorchMetaL(torch.nn.Module):
  """The frozen LM, the PGM over the same tensors, and Equation 1's loss."""

  def __init__(self, lm: transformers.GPT2LMHeadModel, prompt_len: int):
    super().__init__()
    self.lm, self.prompt_len = lm, prompt_len
    # The PGM: the LM's module tree again, every parameter and buffer shared (memoised), with
    # LoRA around c_attn. Two trees, so no flag switches LoRA off for the frozen pass.
    shared = {id(t): t for t in list(lm.parameters()) + list(lm.buffers())}
    self.pgm = copy.deepcopy(lm.transformer, shared)
    for block in self.pgm.h:
      block.attn.c_attn = LoraQKV(block.attn.c_attn, LORA.rank, LORA.scale)
    self.padding = PaddingEncoder(prompt_len, lm.config.n_embd, LSTM_LAYERS)

  def forward(self, batch: dict) -> torch.Tensor:
    ids, mask = batch['pgm_ids'], batch['pgm_mask']  # [B, Tp], X^P left-padded, slots last
    b, t = ids.shape
    p = self.prompt_len
    pad = self.padding()  # [P, D]
    embeds = torch.cat([self.pgm.wte(ids[:, :t - p]), pad.expand(b, p, -1).to(
        self.pgm.wte.weight.dtype)], dim=1)  # [B, Tp, D]
    positions = (mask.cumsum(1) - 1).clamp(min=0)  # left padding: real tokens from position 0
    out = self.pgm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                   use_cache=True)
    # The prefix: each layer's keys/values at the slots, [B, N, P, H].
    prefix = transformers.DynamicCache(
        [(layer.keys[:, :, t - p:], layer.values[:, :, t - p:])
         for layer in out.past_key_values.layers])
    lm_mask = torch.cat([torch.ones(b, p, dtype=batch['lm_mask'].dtype), batch['lm_mask']], 1)
    h = self.lm.transformer(input_ids=batch['lm_ids'], attention_mask=lm_mask,
                            past_key_values=prefix, use_cache=False).last_hidden_state
    pos = batch['target_pos'][..., None].expand(-1, -1, h.shape[-1])  # [B, Y, D]
    logits = self.lm.lm_head(torch.gather(h, 1, pos)).float()  # [B, Y, V]
    labels = torch.where(batch['target_mask'].bool(), batch['target_ids'], -100)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())  # token mean

  def load_trainable(self, trainable: dict) -> None:
    """Copies the JAX trainable pytree (numpy) in: LoRA, padding embeddings, LSTM, MLP."""
    f = lambda x: torch.from_numpy(np.array(x, np.float32))
    r, d = LORA.rank, self.lm.config.n_embd
    pad = trainable['padding']
    with torch.no_grad():
      for i, block in enumerate(self.pgm.h):
        ab = trainable['lora'][f'layers_{i}']['attn']
        block.attn.c_attn.a.copy_(f(np.concatenate([ab[t]['a'] for t in 'qkv'], axis=1)))
        block.attn.c_attn.b.copy_(f(np.stack([ab[t]['b'].reshape(r, d) for t in 'qkv'])))
      self.padding.embedding.copy_(f(pad['embedding']))
      # flax names the cells in creation order: layer l's forward cell is 2l, its backward 2l+1.
      for layer in range(LSTM_LAYERS):
        for direction, suffix in enumerate(('', '_reverse')):
          cell = pad[f'OptimizedLSTMCell_{2 * layer + direction}']
          gates = 'ifgo'  # torch stacks the gates' rows in this order too
          w_ih = np.concatenate([cell[f'i{g}']['kernel'] for g in gates], axis=1).T
          w_hh = np.concatenate([cell[f'h{g}']['kernel'] for g in gates], axis=1).T
          b_hh = np.concatenate([cell[f'h{g}']['bias'] for g in gates])
          getattr(self.padding.lstm, f'weight_ih_l{layer}{suffix}').copy_(f(w_ih))
          getattr(self.padding.lstm, f'weight_hh_l{layer}{suffix}').copy_(f(w_hh))
          getattr(self.padding.lstm, f'bias_hh_l{layer}{suffix}').copy_(f(b_hh))
          getattr(self.padding.lstm, f'bias_ih_l{layer}{suffix}').zero_()
      for j, lin in ((0, self.padding.mlp[0]), (1, self.padding.mlp[2])):
        lin.weight.copy_(f(pad[f'mlp_{j}']['kernel']).T)
        lin.bias.copy_(f(pad[f'mlp_{j}']['bias']))


@dataclasses.dataclass
class TorchSide:
  model: TorchMetaL
  loss_fn: object  # batch -> loss, eager or compiled
  opt: torch.optim.Optimizer
  batch: dict

  def run(self) -> dict:
    self.opt.zero_grad(set_to_none=True)
    loss = self.loss_fn(self.batch)
    loss.backward()
    self.opt.step()
    return {'loss': loss.detach()}

  def grad_norm(self) -> float:
    grads = [p.grad for p in self.trainable() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g)
                                                       for g in grads])))

  def trainable(self):
    return [p for p in self.model.parameters() if p.requires_grad]


def build_torch(lm, trainable: dict, batch: dict, dtype: str, compiled: bool) -> TorchSide:
  model = TorchMetaL(lm, PROMPT_LEN).eval()  # eval: no dropout anywhere (pdrop is 0 as well)
  model.load_trainable(trainable)
  bf16 = dtype == 'bfloat16'

  def loss_fn(b):
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
      return model(b)

  params = [p for p in model.parameters() if p.requires_grad]
  try:
    opt = torch.optim.AdamW(params, lr=FLAGS.lr, weight_decay=0.0, fused=True)
  except (RuntimeError, ValueError):  # no fused AdamW on this build's CPU
    opt = torch.optim.AdamW(params, lr=FLAGS.lr, weight_decay=0.0, foreach=True)
  tbatch = {k: torch.as_tensor(v, dtype=torch.long) for k, v in batch.items()}
  return TorchSide(model, torch.compile(loss_fn) if compiled else loss_fn, opt, tbatch)


def load_torch_lm(config, params, shape: Shape) -> transformers.GPT2LMHeadModel:
  """transformers' GPT-2 with our weights: written by metal_jax.save_lm, read by from_pretrained."""
  transformers.utils.logging.disable_progress_bar()
  with tempfile.TemporaryDirectory() as tmp:
    hf.save_lm(tmp, config, params)
    lm = transformers.GPT2LMHeadModel.from_pretrained(
        tmp, config=hf_config(shape), attn_implementation='sdpa', dtype=torch.float32)
  assert lm.lm_head.weight is lm.transformer.wte.weight
  lm.requires_grad_(False)
  return lm.eval()


# ----------------------------------------------------------------------------- driver


def timed(fn) -> tuple[float, dict]:
  t = time.perf_counter()
  out = fn()
  return time.perf_counter() - t, out


def rel(a: float, b: float) -> float:
  return abs(a - b) / max(abs(a), 1e-12)


def main(argv):
  del argv
  # A cold torch.compile, as JAX compiles here without a persistent cache: inductor's on-disk
  # caches (compiled graphs, C++ kernels) go to a fresh directory unless --inductor_cache names
  # one (a warm cache took the tiny step's torch.compile from ~50 s to ~9 s). Read at each use.
  cache = FLAGS.inductor_cache or tempfile.mkdtemp(prefix='vs_pytorch_inductor_')
  os.environ['TORCHINDUCTOR_CACHE_DIR'] = cache
  try:
    run(inductor_cache=FLAGS.inductor_cache or 'fresh')
  finally:
    if not FLAGS.inductor_cache:
      shutil.rmtree(cache, ignore_errors=True)


def run(inductor_cache: str):
  available = sorted(os.sched_getaffinity(0))
  threads = FLAGS.threads or len(available)
  if threads < len(available):  # before JAX's CPU client sizes its thread pool
    os.sched_setaffinity(0, available[:threads])
  torch.set_num_threads(threads)
  shape = SHAPES[FLAGS.shape]
  dtype = FLAGS.dtype
  rounds = FLAGS.rounds or shape.rounds
  command = f'python bench/vs_pytorch.py {" ".join(sys.argv[1:])}'.rstrip()
  load_start = os.getloadavg()  # 1, 5, 15 min: other processes on the cores skew every figure
  batch = random_batch(shape, FLAGS.seed)

  js = build_jax(shape, dtype, batch, FLAGS.seed)
  trainable0 = jax.device_get(js.state['trainable'])  # before any step donates the state
  lm = load_torch_lm(js.config, js.params, shape)
  sides = {'jax': js,
           'torch_eager': build_torch(lm, trainable0, batch, dtype, compiled=False),
           'torch_compile': build_torch(lm, trainable0, batch, dtype, compiled=True)}
  frozen = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(js.params))
  n_train = {'jax': sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable0)),
             'torch': sum(p.numel() for p in sides['torch_eager'].trainable())}

  tokens = int(batch['pgm_mask'].sum() + batch['lm_mask'].sum())
  padded = int(batch['pgm_ids'].size + batch['lm_ids'].size)
  print(f'command: {command}')
  print(f'shape {FLAGS.shape}: GPT-2 L={shape.n_layer} d={shape.n_embd} heads={shape.n_head} '
        f'vocab={shape.vocab_size}; batch {shape.batch}, PGM row {shape.xp_len} + '
        f'{PROMPT_LEN} slots, LM row {shape.lm_len} (y {shape.y_len}); {tokens} real / '
        f'{padded} padded tokens a step; dtype {dtype}')
  print(f'parameters: frozen {frozen:,}; trainable {n_train["jax"]:,} (JAX), '
        f'{n_train["torch"]:,} (torch: LSTM b_hh only, b_ih frozen at 0)')
  print(f'threads: {threads} (cores {available[:threads]}); torch.get_num_threads() = '
        f'{torch.get_num_threads()}; OMP_WAIT_POLICY={os.environ["OMP_WAIT_POLICY"]}; '
        f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}; load average {load_start[0]:.2f}')
  print(f'optimizer: torch {type(sides["torch_eager"].opt).__name__} '
        f'fused={sides["torch_eager"].opt.defaults.get("fused")}; JAX optax.adamw')

  # Warm-up: two steps a side, the first compiling. Their losses and gradient norms are the
  # numerics check (step 1: the shared initial state; step 2: after one identical update).
  compile_s = {'jax': js.compile_s}
  losses, gnorms = {}, {}
  for name, side in sides.items():
    t1, m1 = timed(side.run)
    g1 = float(m1['grad_norm']) if name == 'jax' else side.grad_norm()
    t2, m2 = timed(side.run)
    g2 = float(m2['grad_norm']) if name == 'jax' else side.grad_norm()
    losses[name] = [float(m1['loss']), float(m2['loss'])]
    gnorms[name] = [g1, g2]
    if name != 'jax':
      compile_s[name] = t1  # the first step: torch.compile's tracing and codegen, or eager's
      dead = [n for n, p in side.model.named_parameters() if p.requires_grad and (
          p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.abs().max() > 0)]
      if dead:  # after step 2 (B != 0) every trainable tensor must receive a gradient
        sys.exit(f'{name}: no gradient reaches {dead}: the prefix does not backpropagate')
    print(f'warm-up {name}: first step {t1 * 1e3:,.0f} ms, second {t2 * 1e3:,.0f} ms; '
          f'loss {losses[name][0]:.6f} -> {losses[name][1]:.6f}; grad norm {g1:.4e} -> {g2:.4e}')
  print(f'compile: JAX lower+compile {compile_s["jax"]:.1f} s; torch.compile first step '
        f'{compile_s["torch_compile"]:.1f} s (inductor cache: {inductor_cache}); eager first step '
        f'{compile_s["torch_eager"]:.2f} s')
  tol = F32_TOL if dtype == 'float32' else BF16_TOL
  numerics = {'tolerance': tol, 'loss': losses, 'grad_norm': gnorms}
  for name in ('torch_eager', 'torch_compile'):
    numerics[f'{name}_initial_loss_rel_diff'] = rel(losses['jax'][0], losses[name][0])
    numerics[f'{name}_initial_grad_norm_rel_diff'] = rel(gnorms['jax'][0], gnorms[name][0])
    numerics[f'{name}_loss_after_1_step_rel_diff'] = rel(losses['jax'][1], losses[name][1])
    print(f'numerics {name} vs JAX: initial loss rel diff '
          f'{numerics[f"{name}_initial_loss_rel_diff"]:.2e} (tol {tol:.0e}), initial grad norm '
          f'{numerics[f"{name}_initial_grad_norm_rel_diff"]:.2e}, loss after one step '
          f'{numerics[f"{name}_loss_after_1_step_rel_diff"]:.2e}')
  bad = [n for n in ('torch_eager', 'torch_compile')
         if not numerics[f'{n}_initial_loss_rel_diff'] < tol]
  if bad:
    sys.exit(f'numerics check failed: the initial loss of {bad} differs from JAX\'s '
             f'({losses["jax"][0]:.6f}) by more than {tol:.0e} relative; the two sides do not '
             f'compute the same step, so their timings are not comparable')

  per_round = {name: [] for name in SIDES}
  for r in range(rounds):
    for name in SIDES:
      times = [timed(sides[name].run)[0] for _ in range(FLAGS.steps_per_round)]
      per_round[name].append(float(np.median(times)) * 1e3)
    print(f'round {r + 1}/{rounds}: ' + ', '.join(f'{n} {per_round[n][-1]:,.1f} ms'
                                                   for n in SIDES))
  median = {n: float(np.median(v)) for n, v in per_round.items()}
  speedup = {'jax_speedup_vs_torch_eager': median['torch_eager'] / median['jax'],
             'jax_speedup_vs_torch_compile': median['torch_compile'] / median['jax']}
  print(f'step time, median of {rounds} round medians ({FLAGS.steps_per_round} steps each): ' +
        ', '.join(f'{n} {median[n]:,.1f} ms' for n in SIDES))
  print('tokens/s (real): ' + ', '.join(f'{n} {tokens / median[n] * 1e3:,.0f}' for n in SIDES))
  print(f'jax speedup vs torch eager: {speedup["jax_speedup_vs_torch_eager"]:.2f}x; '
        f'vs torch.compile: {speedup["jax_speedup_vs_torch_compile"]:.2f}x (> 1: JAX faster)')
  versions = {'jax': jax.__version__, 'jaxlib': jaxlib.__version__, 'torch': torch.__version__,
              'transformers': transformers.__version__}
  print('versions: ' + ', '.join(f'{k} {v}' for k, v in versions.items()))
  load_end = os.getloadavg()
  print(f'load average (1 min) at start {load_start[0]:.2f}, at end {load_end[0]:.2f} '
        f'({len(available)} cores)')
  print(json.dumps({
      'command': command, 'shape': FLAGS.shape,
      'dims': {k: v for k, v in dataclasses.asdict(shape).items() if k != 'rounds'},
      'dtype': dtype,
      'prompt_len': PROMPT_LEN, 'lora': dataclasses.asdict(LORA), 'rounds': rounds,
      'steps_per_round': FLAGS.steps_per_round, 'tokens_real': tokens, 'tokens_padded': padded,
      'params_frozen': frozen, 'params_trainable': n_train, 'median_step_ms': median,
      'round_median_step_ms': per_round, **speedup, 'compile_s': compile_s,
      'numerics': numerics, 'versions': versions, 'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'torch_num_threads': torch.get_num_threads(), 'cores': available[:threads],
      'omp_wait_policy': os.environ['OMP_WAIT_POLICY'], 'inductor_cache': inductor_cache,
      'load_average_1min': {'start': load_start[0], 'end': load_end[0]},
      'devices': f'{jax.device_count()} x {jax.devices()[0].platform}'}))


if __name__ == '__main__':
  app.run(main)
