"""The training loop: data -> jitted step -> logging, evaluation, samples and checkpoints, with exact resume.

`train(config)` is what `python -m superlm_jax.train` runs, and what tests call directly.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from superlm_jax import checkpoint as ckpt_lib
from superlm_jax import sharding
from superlm_jax.config import validate
from superlm_jax.data import pipeline
from superlm_jax.data.prepare import prepare
from superlm_jax.data.tokenizer import TOKENIZER_FILES, Tokenizer, load_tokenizer
from superlm_jax.errors import UserError
from superlm_jax.generate.decode import Generator, SamplingParams
from superlm_jax.models import accounting
from superlm_jax.models.options import RuntimeOptions
from superlm_jax.models.spec import ModelSpec
from superlm_jax.models.transformer import RUNTIME_MODEL_KEYS, build_model
from superlm_jax.training import metrics as metrics_lib
from superlm_jax.training import nonfinite, preemption, profiling, rewind
from superlm_jax.training.evaluate import Average, make_nll_sums, pad_rows
from superlm_jax.training.moe_balancing import MoEBalancing
from superlm_jax.training.optim import current_lr, make_optimizer
from superlm_jax.training.step import create_train_state, make_train_step, merge_on_mesh


@dataclasses.dataclass
class TrainResult:
  state: dict  # The final train state (params, opt_state, model_state, step, rng).
  val_loss: float  # Validation NLL (nats/token) at the end.
  unigram_loss: float  # The validation unigram baseline from the prepared data.
  workdir: Path
  # "SIGTERM" / "SIGINT" when a signal stopped the run (after saving its step: see training/preemption.py), else None.
  interrupted_by: str | None = None


def evaluate(nll_sums, state, batches) -> float:
  """Mean validation NLL in nats/token over the fixed validation batches ((batch, row weights) pairs, every batch
  padded to the same rows: see `superlm_jax.training.evaluate`)."""
  average = Average()
  for batch, row_weights in batches:
    average.add_sums(*nll_sums(state["params"], state["model_state"], batch, row_weights))
  return average.mean


def _check_same_run(workdir: Path, data_dir: Path, config: ml_collections.ConfigDict) -> None:
  """Refuses to resume a run whose saved model differs from the requested one (it would fail deep inside Orbax,
  or worse, silently continue a different experiment), or whose data settings differ (checkpoint.DATA_IDENTITY_KEYS
  and the tokenizer: the saved iterator position would then point at other data) unless train.allow_data_change.
  Called before anything in `workdir` is written. The checkpoint's layer layout (model.scan_layers) is kept: a
  checkpoint restores in the layout it was saved in."""
  saved_config = ckpt_lib.load_run_config(workdir)
  saved = saved_config.model
  if saved.scan_layers != config.model.scan_layers:
    print(f"Resuming {workdir} in its saved {'scan' if saved.scan_layers else 'loop'} layout "
          f"(model.scan_layers={saved.scan_layers}); `python -m superlm_jax.convert --checkpoint={workdir} "
          f"--to=NEW_RUN --layout={'loop' if saved.scan_layers else 'scan'}` converts it.")
    config.model.scan_layers = saved.scan_layers
  for key, value in config.model.items():
    if key in saved and saved[key] != value and key not in RUNTIME_MODEL_KEYS:
      raise UserError(f"{workdir} holds a run with model.{key}={saved[key]!r}, not {value!r}; resume it with "
                      "its own config or choose a new --config.train.workdir")
  changes = ckpt_lib.data_identity_changes(saved_config, config, workdir, data_dir)
  if changes and not config.train.allow_data_change:
    raise UserError(f"resuming {workdir} with different data settings: {', '.join(changes)} (the saved iterator "
                    "position would mean other data); use the run's settings or --config.train.allow_data_change=true")
  if changes:
    print(f"Resuming {workdir} with different data settings ({', '.join(changes)}), as train.allow_data_change "
          "allows: the saved iterator position now points at other data.")


def adopt_warm_start(config: ml_collections.ConfigDict) -> None:
  """A warm start (train.init_from) continues the checkpoint's model: its architecture replaces config.model, and
  its tokenizer is used for the data unless data.tokenizer names another (the embedding rows belong to it)."""
  source = Path(config.train.init_from)
  saved = ckpt_lib.load_run_config(source)
  changed = [key for key in saved.model if config.model[key] != saved.model[key]]
  for key in saved.model:
    config.model[key] = saved.model[key]
  if changed:
    print(f"Warm start: the model architecture of {source} replaces the config's ({', '.join(changed[:8])}"
          f"{', ...' if len(changed) > 8 else ''} differed).")
  if not config.data.tokenizer and any((source / name).is_file() for name in TOKENIZER_FILES[:2]):
    config.data.tokenizer = str(source)
    print(f"Warm start: tokenizing the corpus with the tokenizer of {source}.")


def train(config: ml_collections.ConfigDict, *, progress: bool = True, stop_at: int | None = None,
          batch_hook: Callable[[int, dict], dict] | None = None) -> TrainResult:
  """Trains `config` in `config.train.workdir`, resuming from its latest checkpoint if there is one (or from
  train.resume_step: training/rewind.py).

  `stop_at` ends the run after that step (checkpointed) as if it had been interrupted: running again resumes it
  towards `config.train.steps` with the same schedule. SIGTERM / SIGINT do the same after the current step and set
  `TrainResult.interrupted_by` (training/preemption.py). A non-finite loss or gradient norm is handled by
  train.nonfinite (training/nonfinite.py): a one-line UserError when it says stop.

  `batch_hook(step, batch) -> batch` (tests) sees each step's host batch before it goes to the devices, e.g. to
  corrupt one with an out-of-vocabulary token id (whose embedding lookup is NaN).
  """
  with preemption.StopSignals() as signals:
    return _train(config, signals, progress=progress, stop_at=stop_at, batch_hook=batch_hook)


def _train(config: ml_collections.ConfigDict, signals: preemption.StopSignals, *, progress: bool,
           stop_at: int | None, batch_hook: Callable[[int, dict], dict] | None) -> TrainResult:
  if config.train.init_from:
    adopt_warm_start(config)
  validate(config)
  m_cfg, d_cfg, t_cfg = config.model, config.data, config.train
  workdir = Path(t_cfg.workdir)
  spec = ModelSpec.from_config(m_cfg, t_cfg.compute_dtype)
  mesh = sharding.make_mesh(config.mesh)  # All devices of all processes; one device = the plain program.
  sharding.check_fits(config, mesh)

  data_dir = sharding.process_zero_first(lambda: prepare(d_cfg, m_cfg.vocab_size), "prepare")
  meta = pipeline.load_meta(data_dir)
  tokenizer = load_tokenizer(data_dir)

  checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", keep=t_cfg.keep_checkpoints)
  resume_step = rewind.resume_step(checkpointer, t_cfg.resume_step)
  if resume_step is not None:  # Before anything in workdir is written (config.json, tokenizer, set-aside steps).
    _check_same_run(workdir, data_dir, config)

  make_model = lambda: build_model(spec, seed=t_cfg.seed, options=RuntimeOptions(remat=t_cfg.remat))
  counts = accounting.parameter_count(spec)
  tx = make_optimizer(t_cfg, nnx.eval_shape(make_model))
  # Created in its shards on the mesh: never whole on one device (see create_train_state).
  graphdef, state, state_shardings = create_train_state(make_model, tx, t_cfg.seed, mesh)
  iterator = pipeline.make_train_iterator(
      data_dir, d_cfg.max_length, d_cfg.stride, t_cfg.batch_size * t_cfg.grad_accum_steps, d_cfg.seed,
      worker_count=d_cfg.worker_count, packing=d_cfg.packing)

  if resume_step is not None:
    # Onto this run's mesh, whatever mesh saved it; the latest checkpoint unreadable: the newest readable one.
    abstract_state = jax.eval_shape(lambda: state)
    resume_step, (state, saved_meta) = rewind.restore(checkpointer, resume_step, t_cfg.resume_step, lambda s: (
        checkpointer.restore(s, abstract_state=abstract_state, shardings=state_shardings)))
    iterator.set_state(saved_meta["data_iterator"])
    print(f"Resuming {workdir} from step {resume_step}.")
  elif t_cfg.init_from:
    state["params"], state["model_state"] = ckpt_lib.Checkpointer(
        Path(t_cfg.init_from) / "checkpoints", keep=1, create=False).restore_weights(
            *jax.eval_shape(lambda: (state["params"], state["model_state"])), shardings=state_shardings)
    print(f"Warm start: parameters from {t_cfg.init_from}.")
  if resume_step is not None:  # Resumed from an older step (train.resume_step): the later checkpoints go aside.
    checkpointer = rewind.set_aside_later(checkpointer, resume_step, reopen=lambda: ckpt_lib.Checkpointer(
        workdir / "checkpoints", keep=t_cfg.keep_checkpoints))
  # The non-finite guard's counters (replicated), carried on from the checkpoint's meta on resume.
  state[nonfinite.GUARD_KEY] = sharding.put_global(
      nonfinite.initial_guard(saved_meta if resume_step is not None else None), sharding.replicated(mesh))
  if jax.process_index() == 0:
    ckpt_lib.save_tokenizer_and_config(workdir, data_dir, config)

  active = f", {counts['active']:,} active per token" if counts["active"] != counts["total"] else ""
  print(f"{config.name}: {counts['total']:,} parameters ({counts['non_embedding']:,} non-embedding{active}), "
        f"KV cache {accounting.kv_cache_bytes_per_token(spec):,} bytes/token in bf16; "
        f"{meta['train_tokens']:,} training tokens, {meta['val_tokens']:,} validation tokens; "
        f"unigram baseline {meta['unigram_val_loss']:.3f} nats/token; mesh: {sharding.describe(mesh)}.")

  train_step = make_train_step(graphdef, tx, label_smoothing=t_cfg.label_smoothing,
                               moe=MoEBalancing.from_config(t_cfg), mesh=mesh, state_shardings=state_shardings,
                               loss_chunk_size=t_cfg.loss_chunk_size, nonfinite=t_cfg.nonfinite,
                               max_skipped=t_cfg.max_skipped, mtp_loss_weight=t_cfg.mtp_loss_weight)
  batch_sharding = sharding.batch_sharding(mesh, ndim=3, batch_dim=1)
  nll_sums = make_nll_sums(graphdef, loss_chunk_size=t_cfg.loss_chunk_size,
                           merge=functools.partial(merge_on_mesh, mesh=mesh))
  # Every process reads the same validation batches, each padded to train.batch_size rows (weight 0), so that one
  # compiled shape serves them all and every batch splits by rows over the mesh (check_fits: batch_size does).
  eval_batches = [
      (sharding.put_global(padded, sharding.batch_sharding(mesh, ndim=2)),
       sharding.put_global({"w": row_weights}, sharding.batch_sharding(mesh, ndim=1))["w"])
      for padded, row_weights in (pad_rows(b, t_cfg.batch_size) for b in pipeline.eval_batches(
          data_dir, d_cfg.max_length, t_cfg.batch_size, t_cfg.eval_batches, packing=d_cfg.packing))]
  generator = (Generator(nnx.merge(graphdef, state["params"], state["model_state"]), absorb=config.decode.absorb,
                         decode_impl=config.decode.impl)
               if t_cfg.sample_every else None)
  # Records the interrupted run wrote after the checkpoint resumed from (all of them when there is none: the run
  # starts over) are dropped, so that no step is ever recorded twice and curves do not double back.
  logger = metrics_lib.MetricsLogger(workdir, purge_step=(resume_step or 0) + 1)
  tokens_per_step = t_cfg.batch_size * t_cfg.grad_accum_steps * d_cfg.max_length
  flops_per_token = accounting.flops_per_token(spec, d_cfg.max_length)
  peak_flops, peak_source = (t_cfg.peak_flops, "train.peak_flops") if t_cfg.peak_flops else \
      metrics_lib.peak_flops_total()
  print(step_time_estimate(config, flops_per_token * tokens_per_step, peak_flops, peak_source))
  throughput = metrics_lib.Throughput()

  def check_finite(counters: dict[str, int] | None = None) -> dict[str, int]:
    """The guard's counters (read now unless given); the one-line stop when the non-finite policy says so."""
    counters = nonfinite.read(state) if counters is None else counters
    nonfinite.check(counters, policy=t_cfg.nonfinite, max_skipped=t_cfg.max_skipped,
                    latest_checkpoint=checkpointer.latest_step())
    return counters

  def save(step: int, val_loss: float | None):
    counters = check_finite()  # Never a checkpoint of weights the policy stopped on.
    run_meta = {"data_iterator": iterator.get_state(), "step": step, "nonfinite": nonfinite.to_meta(counters)}
    checkpointer.save(step, nonfinite.without_guard(state), run_meta,
                      metrics=None if val_loss is None else {"val_loss": val_loss})

  start = int(state["step"])
  val_loss, interrupted_by = None, None
  # Redirected to a file or CI log, a bar refreshed 10x a second is a wall of text: refresh every 30 s there.
  interactive = sys.stderr.isatty()
  # "compiling" until the first step returns: XLA compiles the step on its first call, which can take minutes.
  bar = tqdm(total=t_cfg.steps, initial=start, desc="compiling", unit="step",
             disable=not progress or jax.process_index() != 0,  # one bar per run, not per host
             dynamic_ncols=True, mininterval=0.1 if interactive else 30.0)
  profiler = profiling.StepProfiler(t_cfg.profile_steps, workdir, log=bar.write)
  try:
    last_step = t_cfg.steps if stop_at is None else min(stop_at, t_cfg.steps)
    for step in range(start + 1, last_step + 1):
      profiler.before(step)
      # This process's rows [accum * batch / processes, seq] -> global [accum, batch, seq] split by rows.
      host_batch = next(iterator)
      if batch_hook is not None:
        host_batch = batch_hook(step, host_batch)
      batch = sharding.put_batch({k: np.asarray(v).reshape(t_cfg.grad_accum_steps, -1, v.shape[-1])
                                  for k, v in host_batch.items()}, batch_sharding)
      state, step_metrics = train_step(state, batch)
      profiler.after(step, state)
      checkpointer.check()  # A failed background save stops the run here, in one line (no step to lose after it).
      if step == start + 1:
        bar.set_description("train", refresh=True)
      throughput.step(tokens_per_step)

      if step % t_cfg.log_every == 0 or step == last_step:
        host, counters = jax.device_get(step_metrics), nonfinite.read(state)
        tokens_per_s = throughput.rate()
        record = train_record(host, lr=current_lr(t_cfg, step - 1), tokens_per_s=tokens_per_s,
                              mfu=metrics_lib.mfu(tokens_per_s, flops_per_token, peak_flops))
        if t_cfg.nonfinite == "skip":
          record["skipped_steps"] = counters["total"]
        logger.write(step, record, prefix="train")  # The bad step's record too (loss null), before stopping.
        check_finite(counters)
        bar.set_postfix_str(metrics_lib.format_for_console(
            {k: v for k, v in record.items() if k in ("loss", "lr", "tokens_per_s", "mfu", "moe_max_violation")}))

      # A signal: this step is saved now, whatever else was due at it (agreed by every process: see preemption.py).
      stop_signal = preemption.agreed_stop(signals.received, step, every=t_cfg.log_every)
      if stop_signal is not None:
        save(step, None)
        checkpointer.wait()  # Committed before the process exits.
        bar.write(f"Stopped by {stop_signal} at step {step}: checkpoint saved in {checkpointer.directory}; run the "
                  "same command to resume.")
        interrupted_by = stop_signal
        break

      is_last = step == last_step
      evaluated = False
      if (t_cfg.eval_every and step % t_cfg.eval_every == 0) or is_last:
        check_finite()  # An evaluation waits for the step anyway; no validation loss of weights the policy stopped on.
        val_loss = evaluate(nll_sums, state, eval_batches)
        logger.write(step, {"loss": val_loss, "perplexity": math.exp(min(val_loss, 50.0))}, prefix="val")
        bar.write(f"step {step}: validation loss {val_loss:.4f} (perplexity {math.exp(min(val_loss, 50)):.1f})")
        evaluated = True
        throughput.reset()

      if generator is not None and (step % t_cfg.sample_every == 0 or is_last):
        # The current weights (the step donated the ones the generator was built with).
        text = sample_text(generator, tokenizer, config.sample.prompt, sample_params(config, step),
                           weights=(state["params"], state["model_state"]))
        logger.write_text(step, "sample", text)
        bar.write(f"step {step} sample: {text!r}")
        throughput.reset()

      if step % t_cfg.ckpt_every == 0 or is_last:
        save(step, val_loss if evaluated else None)
        throughput.reset()
      bar.update(1)
  finally:
    profiler.stop()  # A run that ended inside the traced steps keeps the trace of those it ran.
    bar.close()
    checkpointer.wait()
    logger.close()

  check_finite()
  if interrupted_by is not None:  # Leave quickly (a preemption notice gives seconds): no final evaluation.
    val_loss = float("nan")
  elif val_loss is None:  # Nothing left to train: the run was already complete.
    val_loss = evaluate(nll_sums, state, eval_batches)
  return TrainResult(state=nonfinite.without_guard(state), val_loss=val_loss,
                     unigram_loss=float(meta["unigram_val_loss"]), workdir=workdir, interrupted_by=interrupted_by)


def train_record(host: dict, *, lr: float, tokens_per_s: float, mfu: float) -> dict:
  """The train record of one log step from the step's metrics on the host (NaN/inf are written as null)."""
  record = {"loss": float(host["loss"]), "perplexity": math.exp(min(float(host["nll"]), 50.0)), "lr": lr,
            "grad_norm": float(host["grad_norm"])}
  if math.isfinite(tokens_per_s):  # Not at the first log, which has no timed interval behind it.
    record.update(tokens_per_s=tokens_per_s, mfu=mfu)
  if "moe_load" in host:  # MoE: balancing losses apart from cross-entropy, load and MaxVio per layer
    record.update({k: host[k] for k in ("moe_aux_loss", "moe_z_loss", "moe_entropy", "moe_dropped")})
    record["moe_max_violation"] = float(host["moe_max_violation"].mean())
    record.update({f"moe_max_violation/layer{i}": v for i, v in enumerate(host["moe_max_violation"])})
    record["moe_load"] = host["moe_load"]
  if "mtp_nll" in host:  # multi-token prediction: each module's NLL (depth k predicts the token k + 1 ahead)
    record.update({f"mtp_nll/depth{k}": float(v) for k, v in enumerate(host["mtp_nll"], start=1)})
  return record


# A step estimated above this many seconds on a CPU means the config is sized for an accelerator.
_SLOW_CPU_STEP_S = 10.0


def step_time_estimate(config: ml_collections.ConfigDict, flops_per_step: float, peak_flops: float,
                       peak_source: str) -> str:
  """One line: the seconds an optimizer step takes at the backend's peak (a lower bound) and at 40% MFU, and, for
  a CPU run of an accelerator-sized config, the tiny preset to try instead."""
  at_peak = flops_per_step / peak_flops if peak_flops > 0 else float("nan")
  line = (f"Expect a step to take at least {at_peak:,.2f} s here and about {at_peak / 0.4:,.1f} s at 40% MFU "
          f"({flops_per_step / 1e12:,.2f} TFLOP per step; peak {peak_flops / 1e12:,.2f} TFLOP/s, {peak_source}), "
          "after the first step compiles.")
  if jax.default_backend() == "cpu" and at_peak / 0.4 > _SLOW_CPU_STEP_S:
    family_file = Path("configs") / f"{config.name.split(':')[0]}.py"
    tiny = f"--config={family_file}:tiny" if family_file.is_file() else "--config=configs/<family>.py:tiny"
    hours = config.train.steps * at_peak / 0.4 / 3600
    line += (f" This config is sized for a GPU/TPU: {config.train.steps} steps would take about {hours:,.0f} h on "
             f"this CPU. To try the same architecture here, use its tiny preset: {tiny}.")
  return line


def sample_params(config: ml_collections.ConfigDict, step: int) -> SamplingParams:
  """The knobs of the samples printed during training: config.sample's (all of them), shorter, seeded by the step."""
  return SamplingParams.from_config(config.sample, max_new_tokens=min(64, config.sample.max_new_tokens), seed=step)


def sample_text(generator: Generator, tokenizer: Tokenizer, prompt: str, params: SamplingParams,
                weights: tuple | None = None) -> str:
  ids = generator.generate([tokenizer.encode(prompt)], params, eos_ids=tokenizer.eos_ids, weights=weights)[0]
  return prompt + tokenizer.decode(ids)
