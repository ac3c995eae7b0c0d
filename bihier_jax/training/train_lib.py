"""Training and evaluation loops (flax `examples/ogbg_molpcba` shape).

`train_and_evaluate(config, workdir)` is what `python -m bihier_jax.train` runs:
data (the demo set is built on first use), model, optimizer, Orbax checkpoints (resumed
automatically), a data-parallel `train_step` (see `parallel` for the design), periodic
evaluation with host-side metrics, TensorBoard summaries, steps/s + ETA, and at the end
an evaluation of every split, a Markdown table and a PNG of the training curves.

Faults: the step skips the update in-graph when the loss or any gradient is not finite
and counts it; `train.max_consecutive_nonfinite` bad steps in a row raise
`NonFiniteLossError` without saving (the last good checkpoint stays the latest one).
SIGTERM (preemptible TPUs) makes the loop save a checkpoint and return cleanly; a
restarted run resumes from the latest checkpoint, input position included, and
reproduces the uninterrupted run's losses (the per-step RNG is fold_in(seed key, step)).

Files under workdir: checkpoints/, metrics.jsonl (every logged scalar), TensorBoard
events, eval/<split>.json + eval/metrics.md, train_curves.png, config.json.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
import functools
import json
import os
import signal
import time
from typing import Any

from absl import logging
from clu import metric_writers
from clu import parameter_overview
from clu import periodic_actions
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from bihier_jax.common import flops
from bihier_jax.data.batch import Batch
from bihier_jax.training import checkpointing
from bihier_jax.training import metrics as metrics_lib
from bihier_jax.training import optim
from bihier_jax.training import parallel
from bihier_jax.training import plots

# (data_dir, split, config, *, training, seed, process_index, process_count,
#  skip_batches) -> iterable of (Batch of numpy arrays, meta {'ids', 'groups'}).
DatasetFn = Callable[..., Iterable[tuple[Batch, dict]]]


class NonFiniteLossError(RuntimeError):
  """Too many consecutive steps with a non-finite loss or gradient."""


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint must hold to continue a run exactly."""
  step: Any  # int32 [] updates attempted (skipped non-finite ones included)
  params: Any
  opt_state: Any
  rng: Any  # uint32 [2] raw key data of the run's base key
  nonfinite_streak: Any  # int32 [] consecutive skipped steps
  nonfinite_total: Any  # int32 [] skipped steps so far


# --- data ------------------------------------------------------------------------------

def data_dir(config: ml_collections.ConfigDict) -> str:
  return os.path.abspath(os.path.expanduser(config.data.dir))


def has_records(directory: str) -> bool:
  return os.path.exists(os.path.join(directory, "metadata.json"))


def ensure_demo_data(config: ml_collections.ConfigDict) -> None:
  """Builds the demo dataset into config.data.dir if it is not there (task 'demo')."""
  directory = data_dir(config)
  if config.task.name != "demo" or has_records(directory):
    return
  if jax.process_index() == 0:
    logging.warning("demo dataset not found in %s: building it now (about a minute)",
                    directory)
    from data_pipelines import preprocess  # pylint: disable=g-import-not-at-top
    preprocess.main(["demo", "--out", directory, "--workers", "1", "--no-progress"])
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("demo data built")


def default_dataset_fn() -> DatasetFn:
  from bihier_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  return input_pipeline.make_dataset


def per_device_config(config: ml_collections.ConfigDict, num_devices: int
                      ) -> ml_collections.ConfigDict:
  """The config the input pipeline sees: train.batch_size = proteins per sub-batch."""
  if config.train.batch_size % num_devices:
    raise ValueError(f"train.batch_size={config.train.batch_size} must be a multiple of "
                     f"the {num_devices} devices (one padded sub-batch each)")
  sub = ml_collections.ConfigDict(config.to_dict())
  sub.train.batch_size = config.train.batch_size // num_devices
  return sub


# --- model, optimizer, state -----------------------------------------------------------

def build_model(config: ml_collections.ConfigDict):
  from bihier_jax import models  # pylint: disable=g-import-not-at-top
  return models.build_model(config)


def create_train_state(config: ml_collections.ConfigDict, model, sample_batch: Batch,
                       mesh: jax.sharding.Mesh, *, load_esm: bool = True
                       ) -> tuple[TrainState, optax.GradientTransformation]:
  """Fresh parameters (pretrained ESM if configured), optimizer state, replicated."""
  from bihier_jax import models  # pylint: disable=g-import-not-at-top
  replicated = parallel.replicated(mesh)
  key = jax.random.key(config.seed)
  init_key = jax.random.fold_in(key, 0x1217)
  params = jax.jit(lambda k, b: model.init(k, b, deterministic=True)["params"],
                   out_shardings=replicated)(init_key, sample_batch)
  if "esm" in params and load_esm:
    if config.model.esm.checkpoint:
      params = models.load_pretrained_esm(jax.device_get(params),
                                          config.model.esm.checkpoint)
      params = jax.device_put(params, replicated)
      logging.info("ESM weights loaded from %s", config.model.esm.checkpoint)
    else:
      message = ("model.esm.checkpoint is empty: the ESM-2 branch starts from RANDOM "
                 "weights (preset %r), so it is no pretrained language model. Set "
                 "--config.model.esm.checkpoint=PATH for real runs.")
      logging.warning("!" * 80)
      logging.warning(message, config.model.esm.preset)
      logging.warning("!" * 80)
      if jax.process_index() == 0:
        print("WARNING: " + message % config.model.esm.preset, flush=True)
  tx = optim.make_optimizer(config, params)
  opt_state = jax.jit(tx.init, out_shardings=replicated)(params)
  state = TrainState(
      step=jnp.zeros([], jnp.int32), params=params, opt_state=opt_state,
      rng=jax.random.key_data(key), nonfinite_streak=jnp.zeros([], jnp.int32),
      nonfinite_total=jnp.zeros([], jnp.int32))
  return jax.device_put(state, replicated), tx


def abstract_train_state(config, model, sample_batch, mesh):
  """ShapeDtypeStructs (with shardings) of the TrainState, without computing it."""
  tx_holder = {}

  def make():
    state, tx = create_train_state(config, model, sample_batch, mesh, load_esm=False)
    tx_holder["tx"] = tx
    return state

  shapes = jax.eval_shape(make)
  replicated = parallel.replicated(mesh)
  return jax.tree_util.tree_map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), shapes)


# --- steps ---------------------------------------------------------------------------------

def _sub_batch_keys(step_key, num):
  return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(jnp.arange(num))


def _each_sub_batch(fn, block):
  """fn on every sub-batch of a [d, ...] block, without vmap.

  vmap would turn the models' on-device layout choices (`lax.cond`, e.g. GlobalFusion's
  per-graph layout vs its dense fallback) into selects that compute both branches;
  one sub-batch is squeezed and run as is, several run one after another (lax.map).
  """
  count = jax.tree_util.tree_leaves(block)[0].shape[0]
  if count == 1:
    out = fn(jax.tree_util.tree_map(lambda x: x[0], block))
    return jax.tree_util.tree_map(lambda x: x[None], out)
  return jax.lax.map(fn, block)


def _data_parallel(body, mesh, out_specs):
  """body(params, *stacked) as one program per device of `mesh` (shard_map over
  'data': params replicated, stacked arrays split on their leading device axis), or
  as is on the whole stack when there is no mesh."""
  if mesh is None:
    return functools.partial(body, axis_name=None)
  spec = jax.sharding.PartitionSpec
  return lambda params, *stacked: jax.shard_map(
      functools.partial(body, axis_name=parallel.DATA_AXIS), mesh=mesh,
      in_specs=(spec(),) + (spec(parallel.DATA_AXIS),) * len(stacked),
      out_specs=out_specs, check_vma=True)(params, *stacked)


def _context_mesh(mesh):
  """`mesh`, else the mesh set with jax.set_mesh if it has the 'data' axis, else None."""
  if mesh is not None:
    return mesh
  context = jax.sharding.get_abstract_mesh()
  if not context.empty and parallel.DATA_AXIS in context.axis_names:
    return context
  return None


def loss_and_grads(params, batch: Batch, rng, step, *, model, task, mesh=None):
  """Global-batch loss and its gradients for a device-stacked batch [D, ...].

  loss = Σ_d loss_d·W_d / Σ_d W_d, W_d = label weight of sub-batch d: the weighted mean
  over the whole global batch, as `heads.loss` defines it for one batch. Sub-batch d
  draws dropout/augmentation keys from fold_in(fold_in(key(rng), step), d), so the
  result does not depend on how the device axis is sharded.

  With `mesh` (or a context mesh with a 'data' axis) each device runs the unbatched
  model on its own sub-batches (`jax.shard_map`) and the sums are `psum`med over
  'data'; without one the sub-batches run one after another on the whole stack.

  Returns:
    ((loss, aux), grads) with aux = {accuracy (weighted, softmax tasks), label_weight}.
  """
  from bihier_jax.models import heads  # pylint: disable=g-import-not-at-top
  num_sub = batch.node_mask.shape[0]
  step_key = jax.random.fold_in(jax.random.wrap_key_data(rng), step)
  key_data = jax.random.key_data(_sub_batch_keys(step_key, num_sub))

  def body(params, block, key_block, *, axis_name):
    def one(args):
      sub_batch, key = args
      dropout_key, augment_key = jax.random.split(jax.random.wrap_key_data(key))
      out = model.apply({"params": params}, sub_batch, deterministic=False,
                        rngs={"dropout": dropout_key, "augment": augment_key})
      loss, aux = heads.loss(task, out.logits, sub_batch)
      return loss, aux["weight_sum"], aux.get("accuracy", jnp.zeros([]))
    losses, weight_sums, accuracies = _each_sub_batch(one, (block, key_block))
    used = weight_sums > 0  # unlabelled sub-batches' 0/0 losses must not leak in
    sums = (jnp.sum(jnp.where(used, losses, 0.0) * weight_sums),
            jnp.sum(jnp.where(used, accuracies, 0.0) * weight_sums),
            jnp.sum(weight_sums))
    if axis_name is not None:
      sums = jax.lax.psum(sums, axis_name)
    loss_sum, accuracy_sum, total = sums
    scale = jnp.where(total > 0, 1.0 / jnp.maximum(total, 1e-12), 0.0)
    return loss_sum * scale, accuracy_sum * scale, total

  global_sums = _data_parallel(body, _context_mesh(mesh),
                               out_specs=jax.sharding.PartitionSpec())

  def loss_fn(params):
    loss, accuracy, total = global_sums(params, batch, key_data)
    return loss, {"accuracy": accuracy, "label_weight": total}

  return jax.value_and_grad(loss_fn, has_aux=True)(params)


def train_step(state: TrainState, batch: Batch, *, model, tx, task, mesh=None
               ) -> tuple[TrainState, dict[str, jnp.ndarray]]:
  """One data-parallel update on a device-stacked batch [D, ...] (see loss_and_grads).

  A non-finite loss or gradient leaves parameters and optimizer state unchanged
  (in-graph select) and is counted in nonfinite_streak / nonfinite_total.
  """
  (loss, aux), grads = loss_and_grads(state.params, batch, state.rng, state.step,
                                      model=model, task=task, mesh=mesh)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  # Zero bad gradients so the optimizer's arithmetic stays finite; the result is
  # discarded anyway when not finite.
  safe_grads = jax.tree_util.tree_map(lambda g: jnp.where(finite, g, 0.0), grads)
  updates, new_opt_state = tx.update(safe_grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree_util.tree_map(
      lambda a, b: jnp.where(finite, a, b), new, old)
  new_state = state.replace(
      step=state.step + 1,
      params=keep(new_params, state.params),
      opt_state=keep(new_opt_state, state.opt_state),
      nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
      nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32))
  step_metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite,
                  "nonfinite_streak": new_state.nonfinite_streak,
                  "nonfinite_total": new_state.nonfinite_total, **aux}
  return new_state, step_metrics


def eval_step(params, batch: Batch, *, model, task, mesh=None
              ) -> dict[str, jnp.ndarray]:
  """Deterministic forward on [D, ...]: predictions, embeddings, per-sub-batch loss
  (each device runs its own sub-batches unbatched when there is a mesh, as in
  loss_and_grads)."""
  from bihier_jax.models import heads  # pylint: disable=g-import-not-at-top

  def body(params, block, *, axis_name):
    del axis_name  # per-device outputs stay on their device

    def one(sub_batch):
      out = model.apply({"params": params}, sub_batch, deterministic=True)
      loss, aux = heads.loss(task, out.logits, sub_batch)
      return {"predictions": heads.predictions(task, out.logits), "loss": loss,
              "weight_sum": aux["weight_sum"], "node_embeddings": out.node_embeddings,
              "graph_embeddings": out.graph_embeddings}
    return _each_sub_batch(one, block)

  return _data_parallel(body, _context_mesh(mesh),
                        out_specs=jax.sharding.PartitionSpec(parallel.DATA_AXIS))(
                            params, batch)


def jit_train_step(model, tx, task, mesh):
  replicated = parallel.replicated(mesh)
  return jax.jit(functools.partial(train_step, model=model, tx=tx, task=task,
                                   mesh=mesh),
                 in_shardings=(replicated, parallel.batch_sharding(mesh)),
                 out_shardings=(replicated, replicated), donate_argnums=0)


def jit_eval_step(model, task, mesh):
  return jax.jit(functools.partial(eval_step, model=model, task=task, mesh=mesh),
                 in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
                 out_shardings=parallel.batch_sharding(mesh))


# --- evaluation --------------------------------------------------------------------------

def local_rows(x: jax.Array) -> np.ndarray:
  """This host's rows of a global array sharded on axis 0, in global order."""
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  seen, rows = set(), []
  for s in shards:
    start = s.index[0].start or 0
    if start in seen:  # replicas of the same rows
      continue
    seen.add(start)
    rows.append(np.asarray(s.data))
  return np.concatenate(rows, axis=0)


def _gather_hosts(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Concatenates each host's variable-length arrays on every host (process order)."""
  if jax.process_count() == 1:
    return arrays
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  n = next(iter(arrays.values())).shape[0]
  counts = multihost_utils.process_allgather(np.array([n]))
  longest = int(counts.max())
  out = {}
  for name, a in arrays.items():
    padded = np.zeros((longest,) + a.shape[1:], a.dtype)
    padded[:n] = a
    full = multihost_utils.process_allgather(padded)
    out[name] = np.concatenate([full[i, :int(counts[i])] for i in range(len(counts))])
  return out


def _gather_strings(values: np.ndarray) -> np.ndarray:
  if jax.process_count() == 1:
    return values
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  encoded = np.frombuffer(json.dumps(values.tolist()).encode(), np.uint8)
  n = multihost_utils.process_allgather(np.array([encoded.size]))
  padded = np.zeros([int(n.max())], np.uint8)
  padded[:encoded.size] = encoded
  full = multihost_utils.process_allgather(padded)
  parts = [json.loads(bytes(full[i, :int(n[i])]).decode()) for i in range(len(n))]
  return np.array([v for p in parts for v in p])


def collect_predictions(eval_fn, params, stream: Iterable[tuple[Batch, dict]], mesh,
                        task, *, with_embeddings: bool = False) -> dict[str, np.ndarray]:
  """Runs `eval_fn` over a finite stream; per-item arrays of the whole split.

  Items are residues with a label (task.level 'node') or real proteins ('graph').

  Returns:
    predictions [n, ...], labels [n], weights [n], groups [n] (str), ids [n] (str;
    the protein of each item), loss_sum, weight_sum (floats), and embeddings [n, D]
    if with_embeddings.
  """
  num_local = parallel.local_device_count(mesh)
  cols: dict[str, list] = {k: [] for k in ("predictions", "labels", "weights",
                                           "groups", "ids", "embeddings")}
  loss_sum = weight_sum = 0.0
  for stacked, metas in parallel.iterate_finite(stream, num_local):
    out = eval_fn(params, parallel.put_global(stacked, mesh))
    out = {k: local_rows(v) for k, v in out.items()}
    for d, meta in enumerate(metas):
      if meta is None:
        continue
      sub = parallel.tree_unstack(stacked, d)
      loss_sum += float(out["loss"][d]) * float(out["weight_sum"][d])
      weight_sum += float(out["weight_sum"][d])
      num_real = int(np.sum(sub.graph_mask))
      ids = np.asarray(list(meta.get("ids", [""] * num_real))[:num_real] or [""], str)
      groups = np.asarray(list(meta.get("groups", [""] * num_real))[:num_real]
                          or [""], str)
      if task.level == "node":
        mask = (sub.node_label_mask > 0) & sub.node_mask
        graph_of = np.minimum(sub.node_graph[mask], max(num_real - 1, 0))
        cols["labels"].append(sub.node_labels[mask])
        cols["weights"].append(sub.node_weights[mask])
        embed_key = "node_embeddings"
      else:
        mask = sub.graph_mask.astype(bool)
        graph_of = np.arange(int(mask.sum()))
        cols["labels"].append(sub.graph_labels[mask])
        cols["weights"].append(sub.graph_weights[mask])
        embed_key = "graph_embeddings"
      cols["predictions"].append(out["predictions"][d][mask])
      cols["groups"].append(groups[graph_of])
      cols["ids"].append(ids[graph_of])
      if with_embeddings:
        cols["embeddings"].append(out[embed_key][d][mask])
  result = {k: np.concatenate(v) for k, v in cols.items() if v}
  if "predictions" not in result:
    raise ValueError("the evaluation split has no labelled items")
  numeric = _gather_hosts({k: v for k, v in result.items()
                           if k not in ("groups", "ids")})
  numeric["groups"] = _gather_strings(result["groups"])
  numeric["ids"] = _gather_strings(result["ids"])
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    loss_sum, weight_sum = multihost_utils.process_allgather(
        np.array([loss_sum, weight_sum])).sum(0)
  numeric["loss"] = np.float64(loss_sum / max(weight_sum, 1e-12))
  return numeric


def split_metrics(config, collected: dict[str, np.ndarray]) -> dict[str, float]:
  """task.metrics of one split, plus its loss."""
  values = metrics_lib.compute_metrics(
      config.task.metrics, predictions=collected["predictions"],
      labels=collected["labels"], weights=collected["weights"],
      groups=collected["groups"],
      min_group_size=int(config.task.min_group_size))
  values["loss"] = float(collected["loss"])
  return values


def eval_stream(config, dataset_fn, split: str, sub_config):
  return dataset_fn(data_dir(config), split, sub_config, training=False,
                    seed=config.seed, process_index=jax.process_index(),
                    process_count=jax.process_count())


def evaluate_splits(config, dataset_fn, eval_fn, params, mesh, splits: Sequence[str]
                    ) -> dict[str, dict[str, float]]:
  """Metrics per split; `mesh` is this host's eval mesh (`parallel.local_mesh`), and
  `eval_fn` was jitted for it; results of all hosts are gathered before metrics."""
  sub_config = per_device_config(config, jax.device_count())
  params = parallel.localize(params, mesh)
  results = {}
  for split in splits:
    collected = collect_predictions(eval_fn, params,
                                    eval_stream(config, dataset_fn, split, sub_config),
                                    mesh, config.task)
    results[split] = split_metrics(config, collected)
  return results


def markdown_table(results: dict[str, dict[str, float]]) -> str:
  """Splits as columns, metrics as rows."""
  splits = list(results)
  names = []
  for split in splits:
    names += [n for n in results[split] if n not in names]
  lines = ["| metric | " + " | ".join(splits) + " |",
           "|---" * (len(splits) + 1) + "|"]
  for name in names:
    cells = []
    for split in splits:
      v = results[split].get(name)
      cells.append("" if v is None else (f"{v:.0f}" if name.startswith("num_")
                                         or name.endswith("groups") else f"{v:.4f}"))
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def write_eval_results(workdir: str, results: dict[str, dict[str, float]], *,
                       step: int, checkpoint: str) -> str:
  """DIR/eval/<split>.json per split and DIR/eval/metrics.md; returns the table."""
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  for split, values in results.items():
    with open(os.path.join(out_dir, f"{split}.json"), "w") as f:
      json.dump({k: (None if not np.isfinite(v) else float(v)) for k, v in
                 values.items()} | {"step": step, "checkpoint": checkpoint}, f,
                indent=1, sort_keys=True)
  table = markdown_table(results)
  with open(os.path.join(out_dir, "metrics.md"), "w") as f:
    f.write(f"Checkpoint {checkpoint} (step {step})\n\n{table}")
  return table


# --- logging -------------------------------------------------------------------------------

class JsonlWriter(metric_writers.MetricWriter):
  """Appends {"step": s, **scalars} lines to a file (the training-curve source)."""

  def __init__(self, path: str):
    self._path = path

  def write_scalars(self, step, scalars):
    row = {"step": int(step)}
    row.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    with open(self._path, "a") as f:
      f.write(json.dumps(row) + "\n")

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    pass

  def close(self):
    pass


class MatmulThroughput:
  """Achieved matmul TFLOP/s per device over the steps added since the last reading.

  The caller adds each timed step's matmul FLOPs (all devices; `common.flops` counts
  them once per program, i.e. per padding bucket). Time is host wall time between
  readings, which is real step time because the loop fetches each step's metrics.
  `pause()` restarts the clock without counting: after evaluation, checkpointing, and
  any step that compiled a new program.
  """

  def __init__(self, num_devices: int):
    self._num_devices = num_devices
    self.pause()

  def pause(self):
    self._start, self._flops = time.perf_counter(), 0.0

  def add(self, step_flops: float):
    self._flops += step_flops

  def read(self) -> float | None:
    """TFLOP/s per device since the last reading or pause (None if no step added)."""
    now = time.perf_counter()
    elapsed = now - self._start
    value = (self._flops / self._num_devices / elapsed / 1e12
             if self._flops > 0 and elapsed > 0 else None)
    self._start, self._flops = now, 0.0
    return value


def make_writer(workdir: str) -> metric_writers.MetricWriter:
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0, asynchronous=False)
  if jax.process_index() == 0:
    return metric_writers.MultiWriter([writer, JsonlWriter(
        os.path.join(workdir, "metrics.jsonl"))])
  return writer


class _StopSignal:
  """Sets a flag on SIGTERM (restores the previous handler on exit)."""

  def __init__(self):
    self.received = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no handler, no flag
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and stopping")
    self.received = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


# --- the loop --------------------------------------------------------------------------------

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       dataset_fn: DatasetFn | None = None) -> dict[str, dict[str, float]]:
  """Trains (resuming from workdir's latest checkpoint), evaluates, writes results.

  Args:
    config: the full config (configs/default.py fields).
    workdir: run directory; created if needed.
    dataset_fn: defaults to `bihier_jax.data.input_pipeline.make_dataset`.

  Returns:
    Final metrics per evaluation split ({} when stopped early by SIGTERM).
  """
  workdir = os.path.abspath(os.path.expanduser(workdir))
  parallel.initialize_distributed(bool(config.train.multi_host))
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=1))
  ensure_demo_data(config)
  dataset_fn = dataset_fn or default_dataset_fn()
  mesh = parallel.make_mesh()
  num_local = parallel.local_device_count(mesh)
  sub_config = per_device_config(config, jax.device_count())
  writer = make_writer(workdir)

  def train_stream(skip):
    return dataset_fn(data_dir(config), config.data.train_split, sub_config,
                      training=True, seed=config.seed,
                      process_index=jax.process_index(),
                      process_count=jax.process_count(), skip_batches=skip)

  sample_batch, _ = next(iter(train_stream(0)))
  model = build_model(config)
  ckpt = checkpointing.Checkpointer(workdir, keep=config.train.keep_checkpoints,
                                    select_metric=config.task.select_metric,
                                    select_mode=config.task.select_mode)
  position = parallel.InputPosition()
  if ckpt.latest_step() is not None:
    abstract = abstract_train_state(config, model, sample_batch, mesh)
    state, extra, step = ckpt.restore("latest", abstract)
    tx = optim.make_optimizer(config, state.params)
    position = parallel.InputPosition.from_json(extra.get("input_position", {}))
    logging.info("resumed from checkpoint %d (input position %s)", step, position)
  else:
    state, tx = create_train_state(config, model, sample_batch, mesh)
    parameter_overview.log_parameter_overview(jax.device_get(state.params))
    writer.write_hparams({k: v for k, v in _flatten(config.to_dict()).items()})

  train_fn = jit_train_step(model, tx, config.task, mesh)
  eval_mesh = parallel.local_mesh()
  eval_fn = jit_eval_step(model, config.task, eval_mesh)
  batcher = parallel.DeviceBatcher(train_stream(position.resume_from), num_local,
                                   position)
  num_steps = int(config.train.num_steps)
  initial_step = int(jax.device_get(state.step))
  report = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer,
                                           every_steps=config.train.log_every)
  eval_splits = tuple(config.data.eval_splits)
  select_split = config.data.select_split
  max_bad = int(config.train.max_consecutive_nonfinite)
  lr_schedule = optim.learning_rate_schedule(config)
  logging.info("training steps %d..%d on %d devices (%d on this host), global batch %d",
               initial_step, num_steps, jax.device_count(), num_local,
               config.train.batch_size)

  def evaluate_and_save(step):
    results = evaluate_splits(config, dataset_fn, eval_fn, state.params, eval_mesh,
                              eval_splits)
    for split, values in results.items():
      writer.write_scalars(step, {f"{split}/{k}": v for k, v in values.items()
                                  if np.isfinite(v)})
    selected = dict(results.get(select_split, {}))
    for split, values in results.items():
      if split != select_split:
        selected.update({f"{split}/{k}": v for k, v in values.items()})
    ckpt.save(step, state, batcher.position.to_json(), selected, force=True)
    return results

  results: dict[str, dict[str, float]] = {}
  stopped = False
  log_sums: dict[str, float] = {}
  log_count = 0
  throughput = MatmulThroughput(jax.device_count())
  step_flops: dict[Any, int] = {}  # per program (padding bucket)
  with _StopSignal() as stop:
    step = initial_step
    while step < num_steps:
      stacked, _ = next(batcher)
      global_batch = parallel.put_global(stacked, mesh)
      program = tuple((x.shape, x.dtype) for x in jax.tree_util.tree_leaves(global_batch))
      compiles = program not in step_flops
      if compiles:
        step_flops[program] = flops.matmul_flops(train_fn, state, global_batch)
        logging.info("new step program (%d so far): %.4g matmul TFLOP per step, summed "
                     "over %d device(s)", len(step_flops), step_flops[program] / 1e12,
                     jax.device_count())
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, step_metrics = train_fn(state, global_batch)
      step += 1
      step_metrics = jax.device_get(step_metrics)
      if compiles:
        throughput.pause()
      else:
        throughput.add(step_flops[program])
      if int(step_metrics["nonfinite_streak"]) >= max_bad:
        ckpt.wait()
        raise NonFiniteLossError(
            f"step {step}: loss or gradients not finite for {max_bad} consecutive steps "
            f"(train.max_consecutive_nonfinite); updates were skipped, the last "
            f"checkpoint in {ckpt.directory} (step {ckpt.latest_step()}) holds the last "
            f"good parameters")
      if bool(step_metrics["finite"]):
        for k in ("loss", "accuracy", "grad_norm"):
          log_sums[k] = log_sums.get(k, 0.0) + float(step_metrics[k])
        log_count += 1
      report(step)
      if step % config.train.log_every == 0 or step == num_steps:
        scalars = {f"train/{k}": v / max(log_count, 1) for k, v in log_sums.items()}
        scalars["train/learning_rate"] = float(lr_schedule(step - 1))
        scalars["train/nonfinite_steps"] = float(step_metrics["nonfinite_total"])
        tflops = throughput.read()
        if tflops is not None:
          scalars["train/matmul_tflops_per_device"] = tflops
        writer.write_scalars(step, scalars)
        log_sums, log_count = {}, 0
      if step % config.train.eval_every == 0 and step < num_steps:
        evaluate_and_save(step)
        throughput.pause()
      elif step % config.train.checkpoint_every == 0 and step < num_steps:
        ckpt.save(step, state, batcher.position.to_json())
        throughput.pause()
      if stop.received or ckpt.reached_preemption(step):
        ckpt.save(step, state, batcher.position.to_json(), force=True)
        stopped = True
        break
    if not stopped:
      if ckpt.latest_step() == step:  # restarted after the end: evaluate again
        results = evaluate_splits(config, dataset_fn, eval_fn, state.params, eval_mesh,
                                  eval_splits)
      else:
        results = evaluate_and_save(step)
  ckpt.wait()
  ckpt.close()
  writer.close()
  del batcher  # releases the endless training input pipeline
  if stopped:
    logging.warning("stopped at step %d by SIGTERM; checkpoint saved", step)
    return {}
  if jax.process_index() == 0:
    table = write_eval_results(workdir, results, step=step, checkpoint=str(step))
    png = plots.plot_training_curves(
        os.path.join(workdir, "metrics.jsonl"),
        os.path.join(workdir, "train_curves.png"),
        eval_metric=config.task.select_metric)
    print(f"\nFinal metrics (step {step}):\n\n{table}\nTraining curves: {png}",
          flush=True)
  return results


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
  return out


# --- inference from a run directory -------------------------------------------------------

def restore_params(config: ml_collections.ConfigDict, workdir: str, which: str,
                   sample_batch: Batch, mesh: jax.sharding.Mesh):
  """(model, params, step) of a run's checkpoint.

  Args:
    which: 'best' | 'latest' | a step number | '' (best if any checkpoint has
      validation metrics, else latest).

  Raises:
    checkpointing.CheckpointError: no such checkpoint, or it cannot be read.
  """
  model = build_model(config)
  ckpt = checkpointing.Checkpointer(workdir, read_only=True,
                                    select_metric=config.task.select_metric,
                                    select_mode=config.task.select_mode)
  if not which:
    which = "best" if ckpt.best_step() is not None else "latest"
  abstract = abstract_train_state(config, model, sample_batch, mesh)
  state, _, step = ckpt.restore(which, abstract)
  ckpt.close()
  return model, state.params, step
