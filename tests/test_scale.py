"""metal_jax/scale.py: a meta-training step compiled from a config alone, on 8 fake CPU devices.

* the core compiles train.py's step for tiny models (a Llama from its config.json alone, no
  weights; the built-in GPT-2's shape) and reads positive memory and FLOPs from it; FSDP over
  8 devices cuts each device's parameter bytes, and XLA's costs of a sharded executable are
  per device (one device's FLOPs fall about 8-fold);
* a scanned layer stack is costed as one layer by XLA, and the loop correction restores the
  unrolled model's count (up to the scanned PGM's last layer, which cannot be pruned);
* the known shapes give transformers' parameter counts; the batch is the paper's worst case;
* projections are pure arithmetic, checked on hand-computed numbers; the collective parser on
  a hand-written HLO module.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from configs import default, llama2_7b_cls2cls, llama3_8b_cls2cls
from metal_jax import experiment, scale
from metal_jax.data import episodes
from metal_jax.models import config_from_hf
from metal_jax.models.hf import count_params
from conftest import TINY_LLAMA


def tiny_config(model: str, *, scan: bool = False):
  """The default config shrunk to a quick compile: 8 episodes, 4 examples, 4 prompt slots."""
  c = default.get_config()
  c.model = model
  c.tiny_model = dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)
  c.batch_size = 8
  c.n_prompt_examples = 4
  c.max_example_len = 16
  c.pgm.prompt_len = 4
  c.pgm.lstm_layers = 1
  c.lora.rank = 2
  c.scan_layers = scan
  c.remat = 'full'
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  return c


@pytest.fixture(scope='module')
def llama_ckpt(tmp_path_factory):
  """A Llama "checkpoint" that is only its config.json: the bench never reads a weight."""
  d = tmp_path_factory.mktemp('llama_config_only')
  (d / 'config.json').write_text(json.dumps({**TINY_LLAMA, 'model_type': 'llama'}))
  return str(d)


@pytest.fixture(scope='module')
def llama_reports(llama_ckpt):
  c = tiny_config(llama_ckpt)
  return {n: scale.analyze(c, n, with_model_flops=False, keep_hlo=True) for n in (1, 8)}


def test_core_compiles_a_tiny_llama_from_its_config_alone(llama_reports):
  r1, r8 = llama_reports[1], llama_reports[8]
  assert jax.device_count() == 8 and (r1.devices, r8.devices) == (1, 8)
  assert r8.mesh == {'data': 1, 'fsdp': 8, 'tensor': 1}
  for r in (r1, r8):
    assert r.memory['total'] > 0 and r.memory['argument'] > 0 and r.memory['temp'] > 0
    assert r.flops > 0 and r.bytes_accessed > 0
    assert r.memory['alias'] > 0  # the train state is donated
    assert r.model['frozen_params'] == count_params(config_from_hf(
        {**TINY_LLAMA, 'model_type': 'llama'}))
  # The batch is episodes.collate's: its keys, int32, the PGM half at the model's limit (64).
  assert set(r8.batch) == {'pgm_ids', 'pgm_mask', 'lm_ids', 'lm_mask', 'target_pos',
                           'target_ids', 'target_mask'}
  assert all(dtype == 'int32' and shape[0] == 8 for shape, dtype in r8.batch.values())
  assert r8.batch['pgm_ids'][0] == [8, 64]


def test_fsdp_cuts_parameter_bytes_and_costs_are_per_device(llama_reports):
  r1, r8 = llama_reports[1], llama_reports[8]
  assert r8.by_kind['frozen_params'] < r1.by_kind['frozen_params'] / 4
  assert r8.by_kind['trainable'] == r1.by_kind['trainable']  # replicated
  assert r8.by_kind['opt_state'] == r1.by_kind['opt_state']
  assert r8.memory['argument'] < r1.memory['argument']
  # cost_analysis() of the partitioned executable is one device's: 8 devices sharing the batch
  # each do about an eighth (more: the padding LSTM and the optimizer are replicated).
  assert r8.flops < r1.flops / 4
  assert r8.memory['total'] < r1.memory['total']


def test_fsdp_step_all_gathers_weights_and_one_device_has_no_collectives(llama_reports):
  r1, r8 = llama_reports[1], llama_reports[8]
  assert all(c['count'] == 0 for c in r1.collectives.values())
  ag = r8.collectives['all-gather']
  assert ag['count'] > 0 and ag['bytes'] > 0 and ag['executed'] >= ag['count']
  assert scale.collectives(llama_reports[8].hlo_text) == r8.collectives


def test_core_compiles_the_builtin_gpt2_with_scanned_layers_on_8_devices():
  c = tiny_config(experiment.BUILTIN, scan=True)
  r = scale.analyze(c, 8, with_model_flops=False)
  assert r.model['vocab_size'] == 327 and r.model['n_layers'] == 2 and r.model['scan_layers']
  assert r.memory['total'] > 0 and r.flops > 0
  # The scanned stack's loop is counted once by XLA; the correction adds the other trip.
  assert r.flops > r.flops_reported and r.bytes_accessed > r.bytes_reported
  # Collectives inside the layer loop run once per layer.
  assert sum(v['executed'] for v in r.collectives.values()) > sum(
      v['count'] for v in r.collectives.values())


def test_loop_correction_restores_the_unrolled_count(llama_ckpt):
  """XLA's cost of the lowered step (cheap: nothing compiled) shows the same loop-once count."""
  hf = {**TINY_LLAMA, 'model_type': 'llama', 'num_hidden_layers': 3}
  scanned_cfg, unrolled_cfg = tiny_config(llama_ckpt, scan=True), tiny_config(llama_ckpt)
  mesh = scale.make_mesh(scanned_cfg, 1)
  cost = lambda c, h: scale.cost(scale.lower_step(c, h, mesh).lowered)
  scanned = cost(scanned_cfg, hf)
  u1, u2, u3 = (cost(unrolled_cfg, scale.with_layers(hf, n)) for n in (1, 2, 3))
  layer = u3[0] - u2[0]
  assert scanned[0] < u3[0] - layer  # one trip of three counted
  corrected = scale.loop_corrected(scanned_cfg, hf, mesh, scanned, compiled=False)
  assert corrected[0] == pytest.approx(scanned[0] + 2 * (u2[0] - u1[0]))
  # The unrolled PGM prunes its last layer to the keys/values the prefix takes; the scanned one
  # computes it whole: at most one layer above the unrolled count.
  assert u3[0] <= corrected[0] <= u3[0] + layer
  assert scale.loop_corrected(unrolled_cfg, hf, mesh, u3, compiled=False) == u3  # no loop


def test_model_flops_are_per_device_and_exclude_recomputation(llama_ckpt):
  c = tiny_config(llama_ckpt)
  hf = scale.hf_config(c)
  mesh1, mesh8 = scale.make_mesh(c, 1), scale.make_mesh(c, 8)
  # Before partitioning, the step's cost is the whole step's, whatever the mesh.
  full1, full8 = (scale.cost(scale.lower_step(c, hf, m).lowered)[0] for m in (mesh1, mesh8))
  assert full8 == pytest.approx(full1)
  one, eight = scale.model_flops(c, hf, mesh1), scale.model_flops(c, hf, mesh8)
  assert eight == pytest.approx(one / 8)
  assert one < full1  # full remat recomputes the forward pass


# ----------------------------------------------------------------------------- shapes, batch


KNOWN_COUNTS = {  # transformers' num_parameters() of each model
    'gpt2-large': 774_030_080, 'gpt2-xl': 1_557_611_200,
    'meta-llama/Llama-2-7b-hf': 6_738_415_616, 'meta-llama/Meta-Llama-3-8B': 8_030_261_248,
    'meta-llama/Llama-3.1-8B': 8_030_261_248}


@pytest.mark.parametrize('name', sorted(KNOWN_COUNTS))
def test_known_shapes_have_the_models_parameter_counts(name):
  cfg = config_from_hf(scale.KNOWN_HF_CONFIGS[name], scan_layers=True)
  assert count_params(cfg) == KNOWN_COUNTS[name]


def test_llama3_config_takes_the_known_shape():
  c = llama3_8b_cls2cls.get_config()
  hf = scale.hf_config(c)
  cfg = config_from_hf(hf, **experiment.compute_settings(c))
  assert (cfg.n_heads, cfg.n_kv_heads, cfg.d_model, cfg.n_layers) == (32, 8, 4096, 32)
  assert (cfg.mlp_dim, cfg.vocab_size, cfg.rope_theta) == (14336, 128256, 5e5)
  assert cfg.rope_scaling.rope_type == 'llama3' and cfg.rope_scaling.factor == 8.0
  assert cfg.rope_scaling.original_max_position_embeddings == 8192


def test_unknown_model_is_named(tmp_path):
  c = default.get_config()
  c.model = 'someone/unknown-model'
  with pytest.raises(scale.UnknownModel, match='--config.model=.someone/unknown-model'):
    scale.hf_config(c)


def test_paper_batch_is_the_worst_case_episode():
  c = llama2_7b_cls2cls.get_config()
  lm_cfg = config_from_hf(scale.hf_config(c))
  spec = experiment.episode_spec(c, lm_cfg)
  assert scale.worst_case_lengths(spec, c.max_example_len) == (1024, 1004, 256)
  assert scale.worst_case_lengths(spec, c.max_example_len, lm_len=256) == (1024, 256, 256)
  mesh = scale.make_mesh(c, 8)
  batch = scale.abstract_batch(spec, c.batch_size, (1024, 1004, 256), mesh)
  # Exactly what episodes.collate produces for such episodes.
  ep = episodes.Episode(np.ones(spec.pgm_budget, np.int32),
                        episodes.LMHalf(np.ones(1004 - 256, np.int32), np.ones(256, np.int32)))
  real = episodes.collate([ep] * c.batch_size, spec, 1024, 1004, 256)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      k: (v.shape, v.dtype) for k, v in real.items()}
  assert episodes.batch_shapes([ep], spec) == (1024, 1004, 256)
  assert all(v.sharding.spec == jax.sharding.PartitionSpec(('data', 'fsdp'))
             for v in batch.values())


def test_run_length_counts_the_settings_tasks():
  c = llama2_7b_cls2cls.get_config()
  n, tasks = scale.default_train_examples(c)
  assert (n, tasks) == (16384 * 43, 43)
  # 10 epochs of 704,512 examples as disjoint episodes of 17, 16 a step.
  assert scale.run_steps(10, n, 17, 16) == 10 * (704_512 // 17) // 16 == 25_900


# ----------------------------------------------------------------------------- projections


def test_step_time_at_mfu_and_roofline_by_hand():
  acc = scale.Accelerator(peak_flops=1e15, hbm_bandwidth=1e12, hbm_bytes=16 * scale.GiB)
  assert scale.step_s_at_mfu(1e15, acc, 0.5) == pytest.approx(2.0)
  assert scale.step_s_at_mfu(1e15, acc, 1.0) == pytest.approx(1.0)
  assert scale.roofline_s(1e15, 1e11, acc) == pytest.approx(1.0)  # compute-bound: 1 s vs 0.1 s
  assert scale.roofline_s(1e12, 3e12, acc) == pytest.approx(3.0)  # bandwidth-bound: 1 ms vs 3 s
  assert scale.fits(16 * scale.GiB, acc) and not scale.fits(16 * scale.GiB + 1, acc)


def test_project_uses_model_flops_for_mfu_and_the_compiled_step_for_the_roofline():
  acc = {'x': scale.Accelerator(peak_flops=1e15, hbm_bandwidth=1e12, hbm_bytes=10 * scale.GiB)}
  r = scale.StepReport(
      devices=8, platform='cpu', mesh={}, model={}, batch={}, memory={'total': 11 * scale.GiB},
      by_kind={}, flops=3e15, bytes_accessed=4e12, model_flops=2e15, flops_reported=0, bytes_reported=0,
      collectives={}, lower_s=0, compile_s=0, correction_s=0)
  p = scale.project(r, steps=3600, mfu=0.5, accelerators=acc)['x']
  assert p['step_s'] == pytest.approx(4.0)  # 2e15 / (0.5 * 1e15)
  assert p['roofline_s'] == pytest.approx(4.0)  # max(3e15 / 1e15, 4e12 / 1e12)
  assert p['run_hours'] == pytest.approx(4.0)  # 3600 steps of 4 s
  assert p['fits'] is False  # 11 GiB > 10 GiB
  line = json.loads(scale.summary_json(r, {'x': p}))
  assert line['projected_step_s'] == {'x': pytest.approx(4.0)} and line['fits'] == {'x': False}
  assert line['per_device_bytes'] == 11 * scale.GiB and line['flops_per_step'] == 3e15


def test_accelerator_table_is_plausible():
  assert {'A100-40GB', 'A100-80GB', 'H100-80GB-SXM', 'H200', 'TPU-v5e', 'TPU-v5p'} <= set(
      scale.ACCELERATORS)
  for acc in scale.ACCELERATORS.values():
    assert 1e14 < acc.peak_flops < 2e15 and 5e11 < acc.hbm_bandwidth < 1e13
  assert scale.ACCELERATORS['TPU-v5e'].hbm_bytes == 16 * scale.GiB


# ----------------------------------------------------------------------------- collectives

HLO = """\
HloModule jit_step, is_scheduled=true, entry_computation_layout={(f32[8]{0})->f32[8]{0}}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%body (p: (s32[], bf16[4,1024])) -> (s32[], bf16[4,1024]) {
  %p = (s32[], bf16[4,1024]{1,0}) parameter(0)
  %w = bf16[4,128]{1,0} get-tuple-element(%p), index=1
  %all-gather.1 = bf16[4,1024]{1,0} all-gather(%w), channel_id=1, replica_groups=[1,8]<=[8], dimensions={1}, use_global_device_ids=true
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], bf16[4,1024]{1,0}) tuple(%i, %all-gather.1)
}

%cond (p: (s32[], bf16[4,1024])) -> pred[] {
  %p = (s32[], bf16[4,1024]{1,0}) parameter(0)
  ROOT %lt = pred[] constant(true)
}

ENTRY %main.9 (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %init = (s32[], bf16[4,1024]{1,0}) tuple(%a, %a)
  %while.1 = (s32[], bf16[4,1024]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"32"}}
  %all-reduce.2 = (f32[1024]{0}, f32[256]{0}) all-reduce(%a, %a), channel_id=2, replica_groups=[1,8]<=[8], to_apply=%add
  %ags = (f32[16]{0}, f32[128]{0}) all-gather-start(%a), dimensions={0}
  %agd = f32[128]{0} all-gather-done(%ags)
  %cps = (f32[8]{0}, f32[8]{0}, u32[], u32[]) collective-permute-start(%a), source_target_pairs={{0,1}}
  %cpd = f32[8]{0} collective-permute-done(%cps)
  ROOT %rs = f32[8]{0} reduce-scatter(%a), dimensions={0}, to_apply=%add
}
"""


def test_collective_parser_counts_bytes_and_loop_trips():
  c = scale.collectives(HLO)
  ag = c['all-gather']
  assert ag['count'] == 2  # one in the loop body, one async start (its -done is not counted)
  assert ag['bytes'] == 4 * 1024 * 2 + 128 * 4  # bf16 result; the start's result half
  assert ag['executed'] == 32 + 1
  assert ag['executed_bytes'] == 32 * 4 * 1024 * 2 + 128 * 4
  assert c['all-reduce'] == {'count': 1, 'bytes': (1024 + 256) * 4, 'executed': 1,
                             'executed_bytes': (1024 + 256) * 4, 'unknown_trips': 0}
  assert c['collective-permute']['bytes'] == 8 * 4  # context scalars dropped, results half
  assert c['reduce-scatter']['count'] == 1 and c['reduce-scatter']['bytes'] == 32
  assert c['all-to-all']['count'] == 0
  assert all(v['unknown_trips'] == 0 for v in c.values())
  comps, entry = scale.parse_hlo(HLO)
  assert entry == 'main.9'
  assert scale.executions(comps, entry) == {'add': 2, 'body': 32, 'cond': 32, 'main.9': 1}
  # Without XLA's trip count, the loop's collective is counted once and flagged.
  unknown = scale.collectives(HLO.replace(', backend_config={"known_trip_count":{"n":"32"}}', ''))
  assert unknown['all-gather']['executed'] == 2 and unknown['all-gather']['unknown_trips'] == 1
