"""The built-in default: meta-train a tiny GPT-2 on the synthetic suite, on a CPU, in minutes.

No downloads: the suite is written into the workdir, the tokenizer is built in
code, and the base LM is first pretrained briefly (an induction warm-up on repeated
random words, then the meta-train tasks' text; see metal_jax/pretrain.py), then frozen.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = 'builtin:tiny-gpt2'  # or a local HF checkpoint directory / hub id
  c.tiny_model = ml_collections.ConfigDict(dict(  # the built-in GPT-2's shape
      n_embd=128, n_layer=4, n_head=4, n_positions=256))
  c.pretrain = ml_collections.ConfigDict(dict(  # the built-in base LM's pretraining
      steps=850, batch_size=32, seq_len=128, lr=3e-3, warmup_steps=50, decay_steps=1000, seed=0,
      copy_steps=700, freeze_embeddings_after_copy=True))
  c.data_dir = ''  # '' = the synthetic suite, written to WORKDIR/data
  c.setting = ''  # a shipped setting's name (configs/settings/NAME.json) or a path; '' = synthetic
  c.synthetic = ml_collections.ConfigDict(dict(
      seed=0, n_train_tasks=512, n_test_tasks=8, n_train_examples=64, n_test_examples=64))

  c.n_prompt_examples = 16  # n_P: examples the PGM reads
  c.n_lm_examples = 0  # n_L: demonstrations the frozen LM sees
  # Iterative generation: PGM passes per episode, each reading n_P more examples and the previous
  # pass's prompt; the loss averages every pass's prompt (eval.py --analysis=iterative uses it).
  c.prompt_chunks = 1
  # Queries (x, y) per episode, scored under the episode's one prompt (the paper: 1). More
  # queries give each PGM pass more of Equation 1's signal at little cost: the LM half is short.
  c.queries_per_episode = 1
  c.max_example_len = 256  # tokens per example (input cut from the left)
  c.max_len = 0  # sequence limit; 0 = the model's (GPT-2: n_positions)
  c.max_examples_per_task = 16384
  # Sequences are padded to one of a few lengths (one compiled step each): from 32 up, this many
  # per doubling (1: powers of two). The default's X^P (about 140 tokens with the 20 slots) pads
  # to 160 with 4, to 256 with 1.
  c.buckets_per_octave = 4

  c.pgm = ml_collections.ConfigDict(dict(
      prompt_len=20, design='prefix', temperature=1.0, gumbel_tau=1.0, lstm_layers=2))
  c.lora = ml_collections.ConfigDict(dict(rank=16, alpha=16.0, targets='q,k,v,o'))

  c.batch_size = 16  # episodes per step (global)
  # A non-finite loss or gradient stops the run (no checkpoint of it is written); True: such a
  # step is skipped (not applied), counted in metrics.jsonl's skipped_steps and logged.
  c.skip_nonfinite_steps = False
  c.prefetch = 2  # batches built (and put on the mesh) ahead of the step in a thread; 0 = none
  c.epochs = 0  # passes over the meta-train examples; num_steps > 0 overrides
  # 1,200 steps: MetaL 80.28 and MetaL(+Tune) 85.41 on the unseen tasks, 400 steps 62.78 and
  # 73.87, 800 steps 74.86 and 82.60 (README, "Research targets"; measured 2026-12-07).
  c.num_steps = 1200
  c.stop_at = 0  # > 0: stop after this step (time-boxed jobs); rerun to resume, same schedule
  c.optim = ml_collections.ConfigDict(dict(
      lr=3e-3, end_lr=0.0, warmup_steps=0, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8,
      clip_norm=1.0, accum_steps=1))

  c.dtype = 'float32'  # compute dtype: float32 | bfloat16
  c.param_dtype = ''  # frozen params' storage dtype; '' = dtype
  c.scan_layers = False
  c.remat = 'none'  # what a block keeps for backward: none | full | dots | dots_no_batch
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1: the rest
  c.distributed = False  # jax.distributed.initialize() (multi-host TPU pods / GPU nodes)
  c.coordinator_address = ''  # '' = auto-detect; else 'host:port' with num_processes, process_id
  c.num_processes = 1
  c.process_id = 0

  # eval.py's defaults for this run (its flags override them). BBTv2's budget in LM forward
  # passes per task and seed; 0 = the paper's 3,840 (eight times the default's cost; the
  # README's evaluation section has the measured times).
  c.eval = ml_collections.ConfigDict(dict(bbt_budget=480))

  c.seed = 0
  c.save_every = 100
  c.keep_checkpoints = 3
  c.async_checkpoints = True
  c.log_every = 10
  c.progress = True
  return c
