"""The grain input pipeline: data source -> per-process shard -> batches of NumPy arrays.

::

  source = open_source(DATA_DIR, "train")            # tfds ArrayRecord data source
  pipe = Pipeline(source, PipelineOptions(batch_size=64, image_size=224,
                                          fields=("short", "long"), seed=0),
                  side_data={"llm_feature": cache})   # optional, see below
  it = iter(pipe)                                     # a grain DatasetIterator
  batch = next(it)                                    # dict of NumPy arrays (this process)
  gbatch = make_global_batch(batch, mesh)             # dict of sharded jax.Arrays
  dev = DevicePrefetch(it, lambda b: make_global_batch(b, mesh))  # 2 batches ahead
  state = it.get_state(); ...; it.set_state(state)    # exact resume

How it is built (all of it deterministic in ``seed`` alone, whatever the worker count):

1. **Sharding by JAX process**: the ``N`` records split into ``process_count`` contiguous
   ranges (``[N*k//c, N*(k+1)//c)``); process ``k`` reads only its range, so one epoch of all
   processes together covers every example exactly once.
2. **Order**: the stream is epoch after epoch of the shard; in train mode each epoch is a
   permutation of the shard drawn from ``(seed, epoch, process_index)``. Batch ``j`` is
   positions ``[j*B, (j+1)*B)`` of that stream (batches may straddle epochs). Train mode
   drops the incomplete tail and makes every process yield the same number of batches
   (``(N // c) * num_epochs // B``; ``num_epochs=None`` runs practically forever).
3. **Per example** (in grain read threads / worker processes; the examples of a batch are
   decoded in parallel on ``decode_threads`` threads, PIL releasing the GIL): read the
   record, decode the image (``transforms.decode_image``), apply the train transform (random crop drawn from a
   generator seeded by ``(seed, epoch, id)``) or the eval transform, and pick the caption
   field: one of ``fields`` with probabilities ``field_weights`` (equal by default), drawn
   from the same generator (``np.random.default_rng([seed, epoch, id])``: its first
   ``random()`` picks the field, the crop is drawn next), so the choice for an example
   changes per epoch but never with worker count or resumption.
4. **Batch** (a dict of NumPy arrays, ``B = batch_size`` per process):
   ``image`` uint8 [B, S, S, 3] (RGB pixels; the jitted step normalises them on the device
   with ``transforms.normalize_on_device``), ``id`` int64 [B], ``text`` object [B]
   (the chosen captions), ``field`` object [B] (the chosen field names), ``field_index``
   int32 [B] (index into ``fields``), ``mask`` bool [B] (False on eval padding), every name
   in ``extra_fields`` (int64 or object arrays), and ``text_fn(list_of_texts)``'s output
   (an array under ``tokens``, or a dict merged in) when ``text_fn`` is given.
5. **Side data** (in the main process, after the batch arrives): for each
   ``side_data={name: provider}``, ``batch[name] = provider.lookup(ids, fields)`` (or
   ``provider(ids, fields)`` for a plain function) where ``ids`` is the batch's int64 ``id``
   array and ``fields`` its ``field`` array of chosen field names; the result must be an
   array with leading dimension B. Embedding caches plug in here. Padding rows of eval
   batches repeat a real example (mask False), so their ids are always valid.
6. **Eval mode**: one pass over the shard, no shuffle, the eval transform, caption
   ``fields[0]``, the last batch padded and masked; every process yields
   ``ceil(ceil(N / c) / B)`` batches so a multi-host eval never waits on a short shard.

**State**: ``iter(pipe)`` is a ``grain.DatasetIterator``: ``get_state()`` returns a JSON-able
dict, ``set_state(dict)`` restores it (the same options, including ``worker_count``, are
required); ``get_state_bytes``/``set_state_bytes`` and ``save_state``/``restore_state``
(a JSON file) wrap it. For Orbax, put ``grain.checkpoint.CheckpointSave(it)`` /
``grain.checkpoint.CheckpointRestore(it)`` into a ``Composite`` (it writes one file per
process).
"""
import collections
import dataclasses
import json
import threading
from concurrent import futures
from typing import Any, Callable, Iterator, Mapping, Sequence

import grain
import numpy as np

from proclip_jax.data import transforms
from proclip_jax.errors import ProclipError

_FOREVER_EPOCHS = 1 << 20


# The feature classes tools/build_dataset.py writes. tfds imports the module named by every
# "pythonClassName" of a dataset's features.json (or dataset_info.json) while it reads the
# folder, so a dataset could run any installed module; anything else is refused first.
_FEATURE_CLASSES = frozenset(f"tensorflow_datasets.core.features.{c}" for c in (
    "features_dict.FeaturesDict", "text_feature.Text", "scalar.Scalar", "tensor_feature.Tensor"))
_CLASS_KEYS = ("pythonClassName", "python_class_name")


def _feature_classes(node) -> Iterator[str]:
  """Every feature class name in a JSON tree (values of ``pythonClassName`` keys)."""
  if isinstance(node, dict):
    for k, v in node.items():
      if k in _CLASS_KEYS:
        yield v if isinstance(v, str) else repr(v)
      else:
        yield from _feature_classes(v)
  elif isinstance(node, list):
    for v in node:
      yield from _feature_classes(v)


def check_dataset_files(path) -> None:
  """Refuses a dataset folder whose metadata tfds could not read safely: ``dataset_info.json``
  or ``features.json`` missing or not a JSON object, or a feature class (in either) other
  than those the builder writes."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  root = epath.Path(path)
  if not (root / "dataset_info.json").exists():
    raise ProclipError(f"No tfds dataset at {path} (no dataset_info.json). Build one with "
                       f"`python tools/build_dataset.py SRC {path}`.")
  trees = {}
  for name in ("dataset_info.json", "features.json"):
    f = root / name
    if not f.exists():
      continue
    try:
      trees[name] = json.loads(f.read_text())
      if not isinstance(trees[name], dict):
        raise ValueError(f"a JSON {type(trees[name]).__name__}, not an object")
    except (ValueError, UnicodeDecodeError) as e:
      raise ProclipError(f"{f} is not valid JSON ({e}); the dataset is damaged: build it "
                         "again with tools/build_dataset.py.") from None
  if "features.json" not in trees and "features" not in trees["dataset_info.json"]:
    raise ProclipError(f"The dataset {path} has no features.json; it is damaged or incomplete: "
                       "build it again with tools/build_dataset.py.")
  for name, tree in trees.items():
    f = root / name
    bad = sorted(set(_feature_classes(tree)) - _FEATURE_CLASSES)
    if bad:
      raise ProclipError(f"{f} names feature classes {bad}; a dataset built by "
                         "tools/build_dataset.py only has "
                         f"{sorted(c.rsplit('.', 1)[1] for c in _FEATURE_CLASSES)}. Refusing "
                         "to read it (tfds would import the modules it names); build the "
                         "dataset again with tools/build_dataset.py.")


def open_builder(path):
  """The tfds builder of the dataset folder ``path``, after :func:`check_dataset_files`."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  check_dataset_files(path)
  return tfds.builder_from_directory(path)


def open_source(path, split: str):
  """The tfds ArrayRecord data source of ``split`` in the dataset folder ``path``."""
  builder = open_builder(path)
  if split not in builder.info.splits:
    raise ProclipError(f"The dataset {path} has no split {split!r}; it has "
                       f"{sorted(builder.info.splits)}.")
  return builder.as_data_source(split)


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
  """What the pipeline produces.

  Attributes:
    batch_size: examples per batch on this process (the global batch is this times the
      process count).
    image_size: output side of the square images.
    mode: ``train`` (shuffle, random crops, random caption field, drop remainder, repeat) or
      ``eval`` (one pass in order, centre crops, ``fields[0]``, padded + masked last batch).
    fields: caption fields to choose from per example.
    field_weights: probabilities of ``fields`` (default equal).
    seed: the pipeline's only source of randomness.
    num_epochs: train epochs (None: practically forever). Eval is always one pass.
    shuffle: train order shuffled per epoch (False: shard order).
    extra_fields: record fields copied into the batch (e.g. ``label``, ``short``, ``long``).
    worker_count: grain worker processes (0: in the main process, as tests use).
    worker_buffer_size: batches buffered per worker.
    read_threads: threads reading/decoding per process (grain ReadOptions.num_threads).
    decode_threads: threads decoding + transforming the examples of one batch in parallel
      (per worker / read thread; 1: one after another).
    prefetch_batches: batches prefetched by those threads.
    process_index, process_count: this process's shard; None: ``jax.process_index()`` /
      ``jax.process_count()``.
    scale, ratio: RandomResizedCrop ranges of area fraction and aspect ratio.
    images: decode and transform the images (False: the batch has no ``image`` and the
      records need none; text-only uses such as stage 1 read only ids and captions).
  """
  batch_size: int
  image_size: int = 224
  mode: str = "train"
  fields: tuple = ("caption",)
  field_weights: tuple | None = None
  seed: int = 0
  num_epochs: int | None = None
  shuffle: bool = True
  extra_fields: tuple = ()
  worker_count: int = 0
  worker_buffer_size: int = 2
  read_threads: int = 4
  decode_threads: int = 8
  prefetch_batches: int = 4
  process_index: int | None = None
  process_count: int | None = None
  scale: tuple = transforms.TRAIN_SCALE
  ratio: tuple = transforms.TRAIN_RATIO
  images: bool = True


def _shard_range(n: int, index: int, count: int) -> tuple[int, int]:
  return n * index // count, n * (index + 1) // count


class _BatchIndex:
  """Random access ``j -> (epoch, record, valid)`` arrays of batch ``j`` of this shard."""

  def __init__(self, *, start: int, length: int, batch_size: int, num_batches: int,
               shuffle: bool, seed: int, shard_index: int, pad_record: int):
    self.start, self.length, self.batch_size = start, length, batch_size
    self.num_batches = num_batches
    self.shuffle, self.seed, self.shard_index = shuffle, seed, shard_index
    self.pad_record = pad_record
    self._lock = threading.Lock()
    self._perms = {}

  def __getstate__(self):
    d = dict(self.__dict__)
    d.pop("_lock")
    d["_perms"] = {}
    return d

  def __setstate__(self, d):
    self.__dict__.update(d)
    self._lock = threading.Lock()

  def __len__(self):
    return self.num_batches

  def _perm(self, epoch: int) -> np.ndarray:
    with self._lock:
      p = self._perms.get(epoch)
      if p is None:
        rng = np.random.default_rng([self.seed, epoch, self.shard_index, 0x5EED])
        p = rng.permutation(self.length)
        if len(self._perms) >= 2:
          self._perms.pop(min(self._perms))
        self._perms[epoch] = p
      return p

  def __getitem__(self, j: int):
    pos = np.arange(j * self.batch_size, (j + 1) * self.batch_size, dtype=np.int64)
    epoch, offset = np.divmod(pos, self.length)  # length > 0: train shards are never empty
    if self.shuffle:
      offset = np.array([self._perm(int(e))[o] for e, o in zip(epoch, offset)], np.int64)
    return epoch, self.start + offset, np.ones(pos.shape, bool)


class _EvalBatchIndex(_BatchIndex):
  """One pass in shard order; positions past the shard are padding (valid False)."""

  def __getitem__(self, j: int):
    pos = np.arange(j * self.batch_size, (j + 1) * self.batch_size, dtype=np.int64)
    valid = pos < self.length
    record = np.where(valid, self.start + pos, self.pad_record)
    return np.zeros_like(pos), record, valid


def _text(value) -> str:
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray) and value.dtype == object:
    value = value.item()
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
  return str(value)


def _example_rng(seed: int, epoch: int, ex_id: int) -> np.random.Generator:
  return np.random.default_rng([seed & 0xFFFFFFFF, int(epoch), int(ex_id) & ((1 << 63) - 1)])


class _LoadBatch:
  """Reads, decodes and transforms the examples of one batch (runs in grain workers)."""

  def __init__(self, source, options: PipelineOptions, text_fn):
    self.source = source
    self.o = options
    self.text_fn = text_fn
    w = np.ones(len(options.fields)) if options.field_weights is None else np.asarray(
        options.field_weights, np.float64)
    self.cum = np.cumsum(w / w.sum())
    self._pool = None                  # made on first use (in the worker that runs it)
    self._pool_lock = threading.Lock()

  def _read(self, records):
    keys = [int(r) for r in records]
    getitems = getattr(self.source, "__getitems__", None)
    if getitems is not None:
      return list(getitems(keys))
    return [self.source[k] for k in keys]

  def __getstate__(self):
    d = dict(self.__dict__)
    d["_pool"], d["_pool_lock"] = None, None
    return d

  def __setstate__(self, d):
    self.__dict__.update(d)
    self._pool_lock = threading.Lock()

  def _example(self, epoch, ex):
    """``(id, chosen field index, uint8 image or None)`` of one record."""
    o = self.o
    ex_id = int(ex["id"])
    pixels = transforms.decode_image(_bytes(ex["image"])) if o.images else None
    image = None
    if o.mode == "train":
      rng = _example_rng(o.seed, epoch, ex_id)
      k = int(np.searchsorted(self.cum, rng.random(), side="right"))
      k = min(k, len(o.fields) - 1)
      if o.images:
        image = transforms.train_crop(pixels, o.image_size, rng, scale=o.scale, ratio=o.ratio)
    else:
      k = 0
      if o.images:
        image = transforms.resize_center_crop(pixels, o.image_size)
    return ex_id, k, image

  def _map(self, epochs, examples):
    threads = self.o.decode_threads
    if not self.o.images or threads <= 1 or len(examples) <= 1:
      return [self._example(e, ex) for e, ex in zip(epochs, examples)]
    with self._pool_lock:
      if self._pool is None:
        self._pool = futures.ThreadPoolExecutor(threads, thread_name_prefix="proclip-decode")
    return list(self._pool.map(self._example, epochs, examples))

  def __call__(self, index):
    epochs, records, valid = index
    o = self.o
    examples = self._read(records)
    images, ids, texts, names, chosen = [], [], [], [], []
    extras = {k: [] for k in o.extra_fields}
    for ex, (ex_id, k, image) in zip(examples, self._map(epochs, examples)):
      if image is not None:
        images.append(image)
      ids.append(ex_id)
      chosen.append(k)
      names.append(o.fields[k])
      texts.append(_text(ex[o.fields[k]]))
      for name in o.extra_fields:
        v = ex[name]
        extras[name].append(_text(v) if isinstance(v, (bytes, str)) or (
            isinstance(v, np.ndarray) and v.dtype == object) else v)
    batch = {} if not o.images else {"image": np.stack(images).astype(np.uint8)}
    batch.update({
        "id": np.asarray(ids, np.int64),
        "text": np.asarray(texts, dtype=object),
        "field": np.asarray(names, dtype=object),
        "field_index": np.asarray(chosen, np.int32),
        "mask": np.asarray(valid, bool),
    })
    for name, values in extras.items():
      if values and isinstance(values[0], str):
        batch[name] = np.asarray(values, dtype=object)
      else:
        batch[name] = np.asarray(values)
    if self.text_fn is not None:
      out = self.text_fn(list(texts))
      if isinstance(out, Mapping):
        batch.update({k: np.asarray(v) for k, v in out.items()})
      else:
        batch["tokens"] = np.asarray(out)
    return batch


def _bytes(v) -> bytes:
  if isinstance(v, np.ndarray):
    v = v.item()
  return v


def _lookup(provider, ids, fields):
  if hasattr(provider, "lookup"):
    return provider.lookup(ids, fields)
  if callable(provider):
    return provider(ids, fields)
  raise ProclipError(f"side_data provider {provider!r} has neither .lookup(ids, fields) nor "
                     f"__call__(ids, fields).")


class PipelineIterator(grain.DatasetIterator):
  """The pipeline's iterator: grain state plus the side-data join in the main process."""

  def __init__(self, inner: grain.DatasetIterator, side_data: Mapping[str, Any]):
    super().__init__(inner)
    self._side_data = dict(side_data)

  def __next__(self) -> dict:
    batch = next(self._parent)
    for name, provider in self._side_data.items():
      value = np.asarray(_lookup(provider, batch["id"], batch["field"]))
      if value.shape[:1] != batch["id"].shape:
        raise ProclipError(f"side_data {name!r} returned shape {value.shape} for a batch of "
                           f"{batch['id'].shape[0]} ids; it must return one row per id.")
      batch[name] = value
    return batch

  def get_state(self) -> dict:
    return self._parent.get_state()

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state)

  def get_state_bytes(self) -> bytes:
    return json.dumps(self.get_state()).encode()

  def set_state_bytes(self, state: bytes) -> None:
    self.set_state(json.loads(state))

  def save_state(self, path) -> None:
    """Writes the state as JSON to ``path`` (one file per process is the caller's choice)."""
    from etils import epath  # pylint: disable=g-import-not-at-top
    epath.Path(path).write_text(json.dumps(self.get_state()))

  def restore_state(self, path) -> None:
    from etils import epath  # pylint: disable=g-import-not-at-top
    p = epath.Path(path)
    if not p.exists():
      raise ProclipError(f"No data-iterator state at {path}.")
    self.set_state(json.loads(p.read_text()))


class Pipeline:
  """A grain pipeline over a random-access source of tfds-style example dicts.

  Args:
    source: ``len()`` + ``source[i] -> {"id", "image", caption fields, ...}`` (e.g.
      ``open_source(path, split)``); must be picklable when ``worker_count > 0``.
    options: ``PipelineOptions``.
    side_data: ``{name: provider}``; ``provider.lookup(ids: int64 [B], fields: object [B] of
      field names) -> array [B, ...]`` or a function with that signature.
    text_fn: optional ``fn(list[str]) -> array | dict of arrays`` applied to the chosen
      captions of each batch in the workers (e.g. a tokenizer); picklable if workers > 0.
  """

  def __init__(self, source, options: PipelineOptions, *,
               side_data: Mapping[str, Any] | None = None,
               text_fn: Callable[[list], Any] | None = None):
    o = options
    if o.mode not in ("train", "eval"):
      raise ProclipError(f"PipelineOptions.mode={o.mode!r}: use 'train' or 'eval'.")
    if o.batch_size <= 0 or o.image_size <= 0:
      raise ProclipError(f"PipelineOptions batch_size={o.batch_size}, image_size="
                         f"{o.image_size}: both must be positive.")
    if not o.fields:
      raise ProclipError("PipelineOptions.fields is empty: name the caption field(s).")
    if o.field_weights is not None and (len(o.field_weights) != len(o.fields) or
                                        min(o.field_weights) < 0 or sum(o.field_weights) <= 0):
      raise ProclipError(f"PipelineOptions.field_weights={o.field_weights} must be "
                         f"{len(o.fields)} non-negative numbers with a positive sum.")
    n = len(source)
    if n == 0:
      raise ProclipError("The data source is empty.")
    if o.process_index is None or o.process_count is None:
      import jax  # pylint: disable=g-import-not-at-top
      index, count = jax.process_index(), jax.process_count()
    else:
      index, count = o.process_index, o.process_count
    if not 0 <= index < count:
      raise ProclipError(f"process_index={index} is not in [0, process_count={count}).")
    start, end = _shard_range(n, index, count)
    length = end - start
    # The field check reads this process's first record (each process opens only its shard).
    first = source[start if length else 0]
    needed = (*o.fields, *o.extra_fields, "id", *(("image",) if o.images else ()))
    missing = [f for f in needed if f not in first]
    if missing:
      raise ProclipError(f"The data source has no field {missing}; its examples have "
                           f"{sorted(first)}. Fix PipelineOptions.fields / extra_fields.")
    self.options = o
    self.source = source
    self.process_index, self.process_count = index, count
    self.shard = (start, end)
    pad_record = start if length else 0
    if o.mode == "train":
      epochs = _FOREVER_EPOCHS if o.num_epochs is None else o.num_epochs
      num_batches = (n // count) * epochs // o.batch_size
      if num_batches == 0:
        raise ProclipError(f"The dataset of {n} examples over {count} process(es) gives no "
                           f"full batch of {o.batch_size}; lower batch_size.")
      index_ds = _BatchIndex(start=start, length=length, batch_size=o.batch_size,
                             num_batches=num_batches, shuffle=o.shuffle, seed=o.seed,
                             shard_index=index, pad_record=pad_record)
    else:
      per_process = -(-n // count)
      num_batches = -(-per_process // o.batch_size)
      index_ds = _EvalBatchIndex(start=start, length=length, batch_size=o.batch_size,
                                 num_batches=num_batches, shuffle=False, seed=o.seed,
                                 shard_index=index, pad_record=pad_record)
    self.num_batches = num_batches
    ds = grain.MapDataset.source(index_ds).map(_LoadBatch(source, o, text_fn))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(o.read_threads, 1),
                                              prefetch_buffer_size=max(o.prefetch_batches, 1)))
    if o.worker_count > 0:
      from absl import flags  # pylint: disable=g-import-not-at-top
      if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (defaults suffice)
        flags.FLAGS.mark_as_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=o.worker_count, per_worker_buffer_size=o.worker_buffer_size))
    self._dataset = ds
    self._side_data = dict(side_data or {})

  def __len__(self) -> int:
    """Batches this process yields (the same on every process)."""
    return self.num_batches

  def __iter__(self) -> PipelineIterator:
    return PipelineIterator(iter(self._dataset), self._side_data)


class DevicePrefetch(grain.DatasetIterator):
  """Keeps the next ``depth`` batches on their way to the devices while a step runs.

  ``put(local_batch) -> device batch`` (e.g. :func:`make_global_batch`) starts the
  host-to-device copies (asynchronous in JAX), so the transfer of batch ``j + 1`` overlaps
  step ``j``. The state is that of the batches handed out so far, not of those read ahead:
  a checkpoint taken after step ``j`` resumes at batch ``j + 1``, as without prefetching.
  """

  def __init__(self, inner: grain.DatasetIterator, put: Callable[[dict], Any],
               depth: int = 2):
    super().__init__(inner)
    if depth < 1:
      raise ProclipError(f"DevicePrefetch depth={depth} must be >= 1.")
    self._put, self._depth = put, depth
    self._ahead = collections.deque()      # (state before the batch, device batch)
    self._done = False

  def _fill(self) -> None:
    while not self._done and len(self._ahead) < self._depth:
      state = self._parent.get_state()
      try:
        batch = next(self._parent)
      except StopIteration:
        self._done = True
        return
      self._ahead.append((state, self._put(batch)))

  def __next__(self):
    self._fill()
    if not self._ahead:
      raise StopIteration
    _, batch = self._ahead.popleft()
    self._fill()
    return batch

  def get_state(self) -> dict:
    return self._ahead[0][0] if self._ahead else self._parent.get_state()

  def set_state(self, state: dict) -> None:
    self._ahead.clear()
    self._done = False
    self._parent.set_state(state)


def make_global_batch(local_batch: Mapping[str, Any], mesh,
                      batch_axes: Sequence[str] | str = ("data", "fsdp")) -> dict:
  """Assembles each process's local batch into global ``jax.Array``s sharded over the mesh.

  Numeric arrays become ``jax.make_array_from_process_local_data(NamedSharding(mesh,
  P(batch_axes)), x)`` (leading dimension split over ``batch_axes``, the mesh axes among
  them; the rest replicated); string/object arrays (``text``, ``field``) stay local NumPy.

  Raises:
    ProclipError: the global batch does not divide over the batch axes.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
  axes = tuple(a for a in axes if a in mesh.axis_names)
  shards = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
  sharding = NamedSharding(mesh, P(axes if axes else None))
  out = {}
  for k, v in local_batch.items():
    v = np.asarray(v) if not isinstance(v, jax.Array) else v
    if isinstance(v, np.ndarray) and v.dtype == object:
      out[k] = v
      continue
    global_rows = v.shape[0] * jax.process_count()
    if global_rows % shards:
      raise ProclipError(f"The global batch of {global_rows} rows ({k!r}) does not divide over "
                         f"the {shards} devices of mesh axes {axes}; make the batch size a "
                         f"multiple of {shards // jax.process_count() or 1} per process.")
    out[k] = jax.make_array_from_process_local_data(sharding, v)
  return out
