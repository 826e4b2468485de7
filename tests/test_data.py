"""Data: manifest/webdataset -> tfds ArrayRecord -> grain batches, transforms, bad inputs.

References are independent: images are decoded from the original files with PIL and
transformed with a NumPy/PIL transcription of torchvision's RandomResizedCrop and CLIP's
eval preprocessing written here; mode conversions are computed in NumPy.
"""
import importlib.util
import io
import itertools
import json
import math
import os
import struct
import tarfile
import zlib

import grain
import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image

from proclip_jax.data import builder, pipeline, transforms
from proclip_jax.errors import ProclipError

MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])
SIZES = [(40, 30), (25, 50), (32, 32), (60, 20), (33, 47), (64, 64), (31, 29), (45, 45),
         (50, 26), (28, 28), (36, 40), (44, 30)]  # (width, height)


def _noise(w, h, seed, mode="RGB"):
  rng = np.random.default_rng(seed)
  base = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
  im = Image.fromarray(base).resize((w, h), Image.BILINEAR)
  return im if mode == "RGB" else im.convert(mode)


def _encode(im, fmt, **kw):
  buf = io.BytesIO()
  im.save(buf, fmt, **kw)
  return buf.getvalue()


@pytest.fixture(scope="module")
def manifest_data(tmp_path_factory):
  """12 images (JPEG and PNG, assorted sizes); 10 train + 2 test rows; the built dataset."""
  root = tmp_path_factory.mktemp("manifest")
  (root / "img").mkdir()
  rows = []
  for i, (w, h) in enumerate(SIZES):
    ext = "jpg" if i % 2 == 0 else "png"
    (root / "img" / f"{i}.{ext}").write_bytes(
        _encode(_noise(w, h, i), "JPEG" if ext == "jpg" else "PNG"))
    rows.append({"image": f"img/{i}.{ext}", "short": f"short {i}", "long": f"long caption {i}",
                 "label": i % 3, "split": "test" if i >= 10 else "train", "source": "unit",
                 "score": 0.5})
  (root / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  out = root / "ds"
  result = builder.build_dataset(root / "m.jsonl", out, progress=False)
  return root, out, result


def _options(**kw):
  base = dict(batch_size=4, image_size=16, fields=("short", "long"), seed=3, process_index=0,
              process_count=1, read_threads=2, prefetch_batches=2)
  base.update(kw)
  return pipeline.PipelineOptions(**base)


_NORMALIZE = jax.jit(transforms.normalize_on_device)


def _on_device(images):
  """The CLIP normalisation the train step applies to the pipeline's uint8 images."""
  return np.asarray(_NORMALIZE(images))


def _ref_rrc_params(h, w, rng, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3)):
  """torchvision RandomResizedCrop.get_params, transcribed with a NumPy generator."""
  for _ in range(10):
    a = h * w * rng.uniform(*scale)
    r = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    cw, ch = int(round(math.sqrt(a * r))), int(round(math.sqrt(a / r)))
    if 0 < cw <= w and 0 < ch <= h:
      return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
  if w / h < ratio[0]:
    cw, ch = w, int(round(w / ratio[0]))
  elif w / h > ratio[1]:
    ch, cw = h, int(round(h * ratio[1]))
  else:
    cw, ch = w, h
  return (h - ch) // 2, (w - cw) // 2, ch, cw


def _ref_train(im, size, seed, epoch, ex_id, fields):
  rng = np.random.default_rng([seed, epoch, ex_id])
  k = min(int(rng.random() * len(fields)), len(fields) - 1)  # equal weights
  top, left, ch, cw = _ref_rrc_params(im.height, im.width, rng)
  crop = im.crop((left, top, left + cw, top + ch)).resize((size, size), Image.BICUBIC)
  return (np.asarray(crop, np.float64) / 255 - MEAN) / STD, fields[k]


def _ref_eval(im, size):
  w, h = im.size
  nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
  im = im.resize((nw, nh), Image.BICUBIC)
  t, l = int(round((nh - size) / 2)), int(round((nw - size) / 2))
  return (np.asarray(im.crop((l, t, l + size, t + size)), np.float64) / 255 - MEAN) / STD


def test_manifest_round_trip_train(manifest_data):
  root, out, result = manifest_data
  assert result.num_examples == {"train": 10, "test": 2} and result.num_skipped == 0
  assert "score" in result.report["ignored_columns"]
  source = pipeline.open_source(out, "train")
  assert [int(source[i]["id"]) for i in range(len(source))] == list(range(10))
  ex = source[2]
  assert ex["image"] == (root / "img" / "2.jpg").read_bytes()  # RGB JPEG kept as is
  assert ex["long"].decode() == "long caption 2" and ex["source"].decode() == "unit"
  assert int(ex["label"]) == 2 and ex["lang"].decode() == "en"

  pipe = pipeline.Pipeline(source, _options(extra_fields=("label",)))
  assert len(pipe) == 10 * pipeline._FOREVER_EPOCHS // 4
  it = iter(pipe)
  seen = []
  for _ in range(2):
    b = next(it)
    assert b["image"].shape == (4, 16, 16, 3) and b["image"].dtype == np.uint8
    pixels = _on_device(b["image"])      # what the jitted step feeds the model
    assert b["id"].dtype == np.int64 and b["mask"].all() and b["label"].dtype == np.int64
    for j, i in enumerate(b["id"]):
      im = Image.open(root / "img" / f"{i}.{'jpg' if i % 2 == 0 else 'png'}").convert("RGB")
      ref, field = _ref_train(im, 16, 3, 0, int(i), ("short", "long"))
      np.testing.assert_allclose(pixels[j], ref, atol=1e-5, rtol=0)
      assert b["field"][j] == field and b["text"][j] == f"{'short' if field == 'short' else 'long caption'} {i}"
      assert b["field_index"][j] == ("short", "long").index(field)
      assert b["label"][j] == i % 3
    seen += list(b["id"])
  assert len(set(seen)) == 8  # first epoch: no repeats


def test_eval_mode_padding_and_reference(manifest_data):
  root, out, _ = manifest_data
  source = pipeline.open_source(out, "train")
  pipe = pipeline.Pipeline(source, _options(mode="eval", batch_size=4,
                                            extra_fields=("short", "long")))
  batches = list(pipe)
  assert len(pipe) == len(batches) == 3
  ids = np.concatenate([b["id"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  assert list(ids[mask]) == list(range(10)) and mask.sum() == 10 and not mask[10:].any()
  for b in batches:
    assert list(b["text"]) == list(b["short"])  # eval uses fields[0]
    for j, i in enumerate(b["id"]):
      im = Image.open(root / "img" / f"{i}.{'jpg' if i % 2 == 0 else 'png'}").convert("RGB")
      np.testing.assert_allclose(_on_device(b["image"])[j], _ref_eval(im, 16), atol=1e-5,
                                 rtol=0)


def test_transform_helpers_against_reference():
  im = _noise(37, 23, 7)
  rng_a, rng_b = np.random.default_rng(11), np.random.default_rng(11)
  for _ in range(20):
    assert transforms.random_resized_crop_params(23, 37, rng_a) == _ref_rrc_params(23, 37, rng_b)
  # Extreme aspect: all tries fail -> centre-crop fallback with the ratio clamped.
  assert transforms.random_resized_crop_params(10, 200, np.random.default_rng(0)) == \
      _ref_rrc_params(10, 200, np.random.default_rng(0))
  np.testing.assert_allclose(transforms.eval_transform(np.asarray(im), 19), _ref_eval(im, 19),
                             atol=1e-5, rtol=0)
  assert transforms.decode_image(_encode(im, "PNG")).dtype == np.uint8


def test_same_seed_same_batches(manifest_data):
  _, out, _ = manifest_data
  source = pipeline.open_source(out, "train")

  def first(seed, n=3):
    it = iter(pipeline.Pipeline(source, _options(seed=seed)))
    return [next(it) for _ in range(n)]

  a, b, c = first(5), first(5), first(6)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["id"], y["id"])
    assert list(x["text"]) == list(y["text"])
  assert any(not np.array_equal(x["id"], z["id"]) for x, z in zip(a, c))


def test_sharding_covers_each_example_once_per_epoch(manifest_data):
  _, out, _ = manifest_data
  source = pipeline.open_source(out, "train")
  count, epochs = 3, 3
  shards = []
  for index in range(count):
    pipe = pipeline.Pipeline(source, _options(batch_size=1, num_epochs=epochs,
                                              process_index=index, process_count=count))
    assert len(pipe) == (10 // count) * epochs  # the same on every process
    stream = [int(b["id"][0]) for b in pipe]
    start, end = pipe.shard
    length = end - start
    full = len(stream) // length
    assert full >= 2
    for e in range(full):
      assert sorted(stream[e * length:(e + 1) * length]) == list(range(start, end))
    shards.append(set(stream))
  assert sorted(i for s in shards for i in s) == list(range(10))
  # Eval: every example exactly once over all processes, same batch count everywhere.
  got = []
  for index in range(count):
    pipe = pipeline.Pipeline(source, _options(mode="eval", batch_size=2, process_index=index,
                                              process_count=count))
    batches = list(pipe)
    assert len(batches) == 2
    got += [int(i) for b in batches for i in b["id"][b["mask"]]]
  assert sorted(got) == list(range(10))


def test_resume_mid_epoch(manifest_data, tmp_path):
  _, out, _ = manifest_data
  source = pipeline.open_source(out, "train")
  it = iter(pipeline.Pipeline(source, _options()))
  for _ in range(2):
    next(it)
  state = it.get_state()
  it.save_state(tmp_path / "state.json")
  handler = grain.checkpoint.CheckpointHandler()
  (tmp_path / "orbax").mkdir()
  handler.save(tmp_path / "orbax", args=grain.checkpoint.CheckpointSave(it))
  expected = [next(it) for _ in range(3)]  # crosses the epoch boundary (10 examples)

  def check(it2):
    for e in expected:
      g = next(it2)
      np.testing.assert_array_equal(g["image"], e["image"])
      np.testing.assert_array_equal(g["id"], e["id"])
      assert list(g["text"]) == list(e["text"])

  it2 = iter(pipeline.Pipeline(source, _options()))
  it2.set_state(state)
  check(it2)
  it3 = iter(pipeline.Pipeline(source, _options()))
  it3.restore_state(tmp_path / "state.json")
  check(it3)
  it4 = iter(pipeline.Pipeline(source, _options()))
  handler.restore(tmp_path / "orbax", args=grain.checkpoint.CheckpointRestore(it4))
  check(it4)
  it5 = iter(pipeline.Pipeline(source, _options()))
  it5.set_state_bytes(json.dumps(state).encode())
  check(it5)


def test_side_data_and_text_fn(manifest_data):
  _, out, _ = manifest_data
  source = pipeline.open_source(out, "train")
  calls = []

  class Cache:
    def lookup(self, ids, fields):
      calls.append((ids.copy(), list(fields)))
      return np.array([ids[j] * 10.0 + (fields[j] == "long") for j in range(len(ids))])

  pipe = pipeline.Pipeline(
      source, _options(), side_data={"llm": Cache(), "fn": lambda ids, f: ids[:, None] * 2},
      text_fn=lambda texts: np.array([len(t) for t in texts], np.int32))
  b = next(iter(pipe))
  expected = b["id"] * 10.0 + (b["field"] == "long")
  np.testing.assert_array_equal(b["llm"], expected)
  np.testing.assert_array_equal(b["fn"], b["id"][:, None] * 2)
  np.testing.assert_array_equal(b["tokens"], [len(t) for t in b["text"]])
  assert len(calls) == 1 and calls[0][0].dtype == np.int64
  bad = pipeline.Pipeline(source, _options(), side_data={"x": lambda ids, f: ids[:1]})
  with pytest.raises(ProclipError, match="one row per id"):
    next(iter(bad))


def test_field_weights_respected(manifest_data):
  _, out, _ = manifest_data
  source = pipeline.open_source(out, "train")
  it = iter(pipeline.Pipeline(source, _options(field_weights=(0.0, 1.0))))
  assert all(f == "long" for _ in range(3) for f in next(it)["field"])
  with pytest.raises(ProclipError, match="field_weights"):
    pipeline.Pipeline(source, _options(field_weights=(1.0,)))
  with pytest.raises(ProclipError, match="no field"):
    pipeline.Pipeline(source, _options(fields=("nope",)))


def test_images_off_skips_decoding(manifest_data):
  """``images=False``: the same ids, captions and fields; no image key, nothing decoded
  (the records have no image to decode: reading one would fail)."""
  _, out, _ = manifest_data
  source = pipeline.open_source(out, "train")
  with_images = iter(pipeline.Pipeline(source, _options(seed=2)))
  expected = [next(with_images) for _ in range(2)]

  class NoImages:             # records without an image field at all
    def __len__(self):
      return len(source)

    def __getitem__(self, i):
      return {k: v for k, v in source[i].items() if k != "image"}

  it = iter(pipeline.Pipeline(NoImages(), _options(seed=2, images=False)))
  for want in expected:
    got = next(it)
    assert "image" not in got
    assert sorted(got) == sorted(k for k in want if k != "image")
    for k in got:
      np.testing.assert_array_equal(got[k], want[k])
  with pytest.raises(ProclipError, match="no field"):
    pipeline.Pipeline(NoImages(), _options())


def test_make_global_batch():
  devices = np.array(jax.devices()[:8]).reshape(4, 2)
  mesh = Mesh(devices, ("data", "fsdp"))
  local = {"image": np.arange(8 * 2 * 2 * 3, dtype=np.float32).reshape(8, 2, 2, 3),
           "id": np.arange(8, dtype=np.int64), "text": np.array(["a"] * 8, dtype=object)}
  g = pipeline.make_global_batch(local, mesh)
  assert isinstance(g["image"], jax.Array) and g["image"].shape == (8, 2, 2, 3)
  assert g["image"].sharding == NamedSharding(mesh, P(("data", "fsdp")))
  np.testing.assert_array_equal(np.asarray(g["image"]), local["image"])
  assert len(g["image"].addressable_shards) == 8
  assert g["image"].addressable_shards[0].data.shape == (1, 2, 2, 3)
  assert g["text"] is local["text"]
  g2 = pipeline.make_global_batch(local, mesh, batch_axes="data")
  assert g2["id"].addressable_shards[0].data.shape == (2,)
  with pytest.raises(ProclipError, match="does not divide"):
    pipeline.make_global_batch({"id": np.arange(6)}, mesh)


def _write_tar(path, members):
  with tarfile.open(path, "w") as tf:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tf.addfile(info, io.BytesIO(data))


def test_webdataset_ingestion(tmp_path):
  shards = tmp_path / "shards"
  shards.mkdir()
  jpg = [_encode(_noise(20 + i, 16, i), "JPEG") for i in range(5)]
  meta = lambda i, cap: json.dumps({"caption": cap, "url": f"http://x/{i}", "key": f"{i:09d}",
                                    "width": 20 + i, "status": "success"}).encode()
  _write_tar(shards / "00001.tar", [  # sorted second
      ("000000003.jpg", jpg[3]), ("000000003.txt", b"txt three"),
      ("000000003.json", meta(3, "json three")),
      ("000000004.json", meta(4, "no image")),  # skipped: no image member
  ])
  _write_tar(shards / "00000.tar", [
      ("000000000.jpg", jpg[0]), ("000000000.txt", b"cap zero"),
      ("000000001.jpg", jpg[1]), ("000000001.json", meta(1, "json one")),
      ("000000002.png", _encode(_noise(18, 18, 2, "L"), "PNG")), ("000000002.txt", b"grey"),
  ])
  out = tmp_path / "ds"
  r = builder.build_dataset(shards, out, progress=False)
  assert r.num_examples == {"train": 4} and r.num_skipped == 1
  assert r.report["skipped_examples"][0]["id"] == 4
  assert r.report["skipped_examples"][0]["reason"] == "missing file"
  assert "width" in r.report["ignored_columns"]
  src = pipeline.open_source(out, "train")
  got = [src[i] for i in range(len(src))]
  assert [int(g["id"]) for g in got] == [0, 1, 2, 3]
  assert [g["caption"].decode() for g in got] == ["cap zero", "json one", "grey", "txt three"]
  assert got[1]["url"].decode() == "http://x/1" and got[1]["status"].decode() == "success"
  assert got[0]["key"].decode() == "000000000" and got[0]["url"].decode() == ""
  assert got[0]["image"] == jpg[0]
  grey = np.asarray(_noise(18, 18, 2, "L"))
  np.testing.assert_array_equal(transforms.decode_image(got[2]["image"]),
                                np.repeat(grey[..., None], 3, -1))


def _png_header_only(width, height):
  """A PNG whose IHDR claims width x height (no pixel data): a decompression bomb."""
  def chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data +
            struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
  ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _truncated_jpeg():
  data = _encode(_noise(64, 64, 5), "JPEG", quality=95)
  return data[:len(data) // 2]


def test_bad_inputs_skipped_and_reported(tmp_path):
  img = tmp_path / "img"
  img.mkdir()
  good = _noise(24, 20, 0)
  rgba = np.dstack([np.asarray(_noise(16, 12, 1)), np.linspace(0, 255, 16 * 12).astype(
      np.uint8).reshape(12, 16)])
  la = np.dstack([np.asarray(_noise(10, 10, 2, "L")), np.full((10, 10), 128, np.uint8)])
  i16 = (np.arange(14 * 9, dtype=np.uint16).reshape(9, 14) * 521)
  pal = _noise(12, 12, 3).convert("P", palette=Image.ADAPTIVE, colors=8)
  pal_t = pal.copy()
  pal_t.info["transparency"] = 0
  files = {
      "good.jpg": _encode(good, "JPEG"),
      "corrupt.jpg": np.random.default_rng(0).integers(0, 256, 500, np.uint8).tobytes(),
      "truncated.jpg": _truncated_jpeg(),
      "big.png": _encode(_noise(80, 80, 6), "PNG"),  # 6400 px > max_pixels 5000
      "bomb.png": _png_header_only(20000, 10000),
      "l.png": _encode(_noise(10, 8, 7, "L"), "PNG"),
      "la.png": _encode(Image.fromarray(la, "LA"), "PNG"),
      "p.png": _encode(pal, "PNG"),
      "pt.png": _encode(pal_t, "PNG"),
      "rgba.png": _encode(Image.fromarray(rgba, "RGBA"), "PNG"),
      "cmyk.jpg": _encode(_noise(12, 10, 8).convert("CMYK"), "JPEG"),
      "i16.png": _encode(Image.fromarray(i16), "PNG"),
      "bits.png": _encode(_noise(9, 9, 9, "L").convert("1"), "PNG"),
      "rgb.gif": _encode(_noise(11, 11, 10), "GIF"),
  }
  for name, data in files.items():
    (img / name).write_bytes(data)
  lines = [json.dumps({"image": f"img/{n}", "short": f"cap {n}"}) for n in files]
  lines += [
      json.dumps({"image": "img/missing.jpg", "short": "no file"}),
      json.dumps({"image": "img/good.jpg", "short": ""}),
      json.dumps({"image": "img/good.jpg", "short": "   "}),
      json.dumps({"image": "img/good.jpg"}),
      json.dumps({"image": "img/good.jpg", "short": "bad escape \udcff"}),
  ]
  raw = ("\n".join(lines) + "\n").encode()
  raw += b'{"image": "img/good.jpg", "short": "caf\xe9"}\n'
  raw += b'{"image": "img/good.jpg", "short": "x", "label": "seven"}\n'
  raw += b"not json\n"
  (tmp_path / "m.jsonl").write_bytes(raw)
  r = builder.build_dataset(tmp_path / "m.jsonl", tmp_path / "ds", max_pixels=5000,
                            progress=False)
  rep = builder.load_report(tmp_path / "ds")
  assert rep == json.loads(json.dumps(r.report))
  assert rep["by_reason"] == {"unreadable image": 1, "corrupt image": 1, "too many pixels": 2,
                              "missing file": 1, "empty caption": 2, "missing caption": 1,
                              "caption not UTF-8": 2, "bad int field": 1,
                              "bad manifest row": 1}
  skipped_ids = {s["id"]: s["reason"] for s in rep["skipped_examples"]}
  names = list(files)
  assert skipped_ids[names.index("corrupt.jpg")] == "unreadable image"
  assert skipped_ids[names.index("truncated.jpg")] == "corrupt image"
  assert skipped_ids[names.index("big.png")] == "too many pixels"
  assert skipped_ids[names.index("bomb.png")] == "too many pixels"
  assert rep["written"] == len(files) - 4 and rep["skipped"] == 12
  assert all("location" in s and "detail" in s for s in rep["skipped_examples"])

  src = pipeline.open_source(tmp_path / "ds", "train")
  by_name = {src[i]["short"].decode()[4:]: transforms.decode_image(src[i]["image"])
             for i in range(len(src))}
  for name in ("l.png", "la.png", "p.png", "pt.png", "rgba.png", "cmyk.jpg", "i16.png",
               "bits.png", "rgb.gif", "good.jpg"):
    assert by_name[name].dtype == np.uint8 and by_name[name].shape[2] == 3, name
  l = np.asarray(Image.open(img / "l.png"))
  np.testing.assert_array_equal(by_name["l.png"], np.repeat(l[..., None], 3, -1))
  a = rgba[..., 3:].astype(np.float64) / 255  # composited over white
  ref = np.rint(rgba[..., :3] * a + 255 * (1 - a))
  assert np.abs(by_name["rgba.png"].astype(np.float64) - ref).max() <= 1
  ref_la = np.rint(la[..., :1] * (128 / 255) + 255 * (1 - 128 / 255))
  assert np.abs(by_name["la.png"].astype(np.float64) - ref_la).max() <= 1
  ref16 = np.clip(np.rint(i16 / 257.0), 0, 255)
  np.testing.assert_array_equal(by_name["i16.png"], np.repeat(ref16[..., None], 3, -1))
  pal_rgb = np.asarray(pal.convert("RGB"))
  np.testing.assert_array_equal(by_name["p.png"], pal_rgb)
  transparent = np.asarray(pal) == 0
  np.testing.assert_array_equal(by_name["pt.png"][transparent], 255)
  np.testing.assert_array_equal(by_name["pt.png"][~transparent], pal_rgb[~transparent])


def test_csv_manifest_and_split_mapping(tmp_path):
  (tmp_path / "a.png").write_bytes(_encode(_noise(12, 12, 0), "PNG"))
  (tmp_path / "train.csv").write_text(
      "image,caption,label,lang,note\na.png,first,4,de,hello\na.png,second,,,\n")
  (tmp_path / "val.jsonl").write_text(json.dumps({"image": "a.png", "caption": "third"}) + "\n")
  r = builder.build_dataset({"train": tmp_path / "train.csv", "val": tmp_path / "val.jsonl"},
                            tmp_path / "ds", progress=False)
  assert r.num_examples == {"train": 2, "val": 1}
  tr = pipeline.open_source(tmp_path / "ds", "train")
  assert [(int(x["id"]), x["caption"].decode(), int(x["label"]), x["lang"].decode(),
           x["note"].decode()) for x in (tr[0], tr[1])] == [
               (0, "first", 4, "de", "hello"), (1, "second", -1, "en", "")]
  va = pipeline.open_source(tmp_path / "ds", "val")
  assert int(va[0]["id"]) == 2 and va[0]["caption"].decode() == "third"
  with pytest.raises(ProclipError, match="already exists"):
    builder.build_dataset(tmp_path / "train.csv", tmp_path / "ds", progress=False)
  with pytest.raises(ProclipError, match="no split"):
    pipeline.open_source(tmp_path / "ds", "test")


def test_killed_build_leaves_nothing_complete(tmp_path, monkeypatch):
  (tmp_path / "a.png").write_bytes(_encode(_noise(12, 12, 0), "PNG"))
  (tmp_path / "m.jsonl").write_text(
      "".join(json.dumps({"image": "a.png", "caption": f"c{i}"}) + "\n" for i in range(5)))
  real = builder._process
  n = {"calls": 0}

  def dying(raw, max_pixels):
    n["calls"] += 1
    if n["calls"] == 3:
      raise KeyboardInterrupt
    return real(raw, max_pixels)

  monkeypatch.setattr(builder, "_process", dying)
  with pytest.raises(KeyboardInterrupt):
    builder.build_dataset(tmp_path / "m.jsonl", tmp_path / "ds", progress=False)
  assert not (tmp_path / "ds").exists()
  assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []
  monkeypatch.setattr(builder, "_process", real)
  r = builder.build_dataset(tmp_path / "m.jsonl", tmp_path / "ds", progress=False)
  assert r.num_examples == {"train": 5}


def test_cli_errors_and_builds(tmp_path, capsys):
  spec = importlib.util.spec_from_file_location(
      "build_dataset_cli", os.path.join(os.path.dirname(__file__), "..", "tools",
                                        "build_dataset.py"))
  cli = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cli)
  assert cli.main([str(tmp_path / "nope.jsonl"), str(tmp_path / "out")]) == 2
  assert "does not exist" in capsys.readouterr().err
  (tmp_path / "a.png").write_bytes(_encode(_noise(12, 12, 0), "PNG"))
  (tmp_path / "m.jsonl").write_text(json.dumps({"image": "a.png", "text": "t"}) + "\n")
  assert cli.main([str(tmp_path / "m.jsonl"), str(tmp_path / "out"), "--split", "val",
                   "--no-progress"]) == 0
  assert json.loads(capsys.readouterr().out)["splits"] == {"val": 1}
  assert cli.main([str(tmp_path / "m.jsonl"), str(tmp_path / "out"), "--fields", "short"]) == 2


def test_split_without_a_valid_example_is_an_error(tmp_path):
  (tmp_path / "a.png").write_bytes(_encode(_noise(12, 12, 0), "PNG"))
  (tmp_path / "m.jsonl").write_text(
      json.dumps({"image": "missing.png", "caption": "x", "split": "a"}) + "\n" +
      json.dumps({"image": "a.png", "caption": "y", "split": "b"}) + "\n")
  with pytest.raises(ProclipError, match=r"No valid example in split\(s\) \['a'\].*'missing "
                                         r"file': 1"):
    builder.build_dataset(tmp_path / "m.jsonl", tmp_path / "ds", progress=False)
  assert sorted(os.listdir(tmp_path)) == ["a.png", "m.jsonl"]  # no output, no temporary


def test_device_normalisation_equals_host_normalisation():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
  x[0, 0, 0] = (0, 0, 0)
  x[0, 0, 1] = (255, 255, 255)
  ref = (x.astype(np.float64) / 255.0 - transforms.CLIP_MEAN.astype(np.float64)) / \
      transforms.CLIP_STD.astype(np.float64)
  got = _on_device(x)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, ref, atol=2e-6, rtol=0)
  np.testing.assert_allclose(got, transforms.normalize(x), atol=1e-6, rtol=0)
  host = transforms.normalize(x)                 # already normalised: passes through
  np.testing.assert_array_equal(_on_device(host), host)
  batch = {"image": x, "id": np.arange(3)}
  out = jax.jit(transforms.normalize_batch)(batch)
  np.testing.assert_array_equal(np.asarray(out["image"]), got)
  assert transforms.normalize_batch({"id": 1}) == {"id": 1}


def test_parallel_decode_equals_serial(manifest_data):
  _, out, _ = manifest_data
  source = pipeline.open_source(out, "train")
  for mode in ("train", "eval"):
    a = list(itertools.islice(iter(pipeline.Pipeline(
        source, _options(mode=mode, decode_threads=1))), 3))
    b = list(itertools.islice(iter(pipeline.Pipeline(
        source, _options(mode=mode, decode_threads=4))), 3))
    for x, y in zip(a, b):
      np.testing.assert_array_equal(x["image"], y["image"])
      np.testing.assert_array_equal(x["id"], y["id"])
      assert list(x["text"]) == list(y["text"])


def test_device_prefetch_state_is_that_of_the_batches_handed_out(manifest_data):
  _, out, _ = manifest_data
  source = pipeline.open_source(out, "train")
  pipe = pipeline.Pipeline(source, _options())
  put_calls = []

  def put(b):
    put_calls.append(int(b["id"][0]))
    return {"id": jax.device_put(b["id"])}

  ref = [next(it)["id"] for it in [iter(pipe)] for _ in range(6)]
  dev = pipeline.DevicePrefetch(iter(pipe), put, depth=2)
  first = [np.asarray(next(dev)["id"]) for _ in range(3)]
  assert len(put_calls) == 5                     # 3 handed out + 2 on their way
  state = dev.get_state()
  rest = [np.asarray(next(dev)["id"]) for _ in range(3)]
  for got, want in zip(first + rest, ref):
    np.testing.assert_array_equal(got, want)
  resumed = pipeline.DevicePrefetch(iter(pipe), put, depth=2)
  resumed.set_state(state)                       # resumes at batch 4, not 6
  np.testing.assert_array_equal(np.asarray(next(resumed)["id"]), ref[3])
  short = pipeline.Pipeline(source, _options(num_epochs=1))   # 10 // 4 = 2 batches
  assert len(list(pipeline.DevicePrefetch(iter(short), put))) == 2
  with pytest.raises(ProclipError, match="depth"):
    pipeline.DevicePrefetch(iter(pipe), put, depth=0)
