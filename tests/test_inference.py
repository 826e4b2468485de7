"""The inference API (proclip_jax.inference) and the two CLIs.

A tiny random ProCLIP with a tiny random BERT embedder (built by test_eval's helpers):
PIL / uint8 / pre-normalised inputs agree, ``encode_texts`` equals the adapter applied to
``embedder.embed`` (a separate Flax apply), save/load keeps everything (also from a training
workdir written through proclip_jax.storage.Checkpoints), a converted CLIP runs behind the same
interface, and the CLIs work end to end.
"""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import proclip_jax
from proclip_jax.data import transforms
from proclip_jax.errors import ProclipError
from proclip_jax.inference import CLIPModelAdapter, ProCLIP
from proclip_jax.models.adapter import TextProj
from test_eval import l2n, make_tiny_embedder, make_tiny_proclip, random_params

TOL = 1e-5
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["a red circle", "ein blauer Stern oben links", "a large green triangle in the center, "
         "on a striped background", "x"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("inf")
  emb_dir = make_tiny_embedder(tmp)
  model = make_tiny_proclip(emb_dir, seed=1)
  saved = model.save(str(tmp / "saved"))
  rng = np.random.default_rng(0)
  imgs = [rng.integers(0, 256, (40 + 9 * i, 33 + 5 * i, 3), dtype=np.uint8) for i in range(5)]
  return {"tmp": tmp, "emb_dir": emb_dir, "model": model, "saved": saved, "imgs": imgs}


def test_package_export():
  assert proclip_jax.ProCLIP is ProCLIP


def test_encode_images_pil_uint8_and_normalised_agree(setup):
  model, imgs = setup["model"], setup["imgs"]
  a = model.encode_images(imgs)
  b = model.encode_images([Image.fromarray(x) for x in imgs])
  pix = np.stack([transforms.eval_transform(x, 32) for x in imgs])
  c = model.encode_images(pix)
  ref = np.asarray(jax.jit(model.model.image_features)(model.params["visual"], pix))
  assert a.shape == (5, 16) and np.allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
  for x in (b, c):
    assert np.abs(a - x).max() < TOL
  assert np.abs(c - ref).max() < TOL
  for one in (imgs[0], Image.fromarray(imgs[0])):   # one image: a batch of one
    assert np.abs(model.encode_images(one) - a[:1]).max() < TOL
  with pytest.raises(ProclipError, match=r"\[N, 32, 32, 3\]"):
    model.encode_images(np.zeros((2, 16, 16, 3), np.float32))


def test_encode_texts_is_adapter_of_embedder(setup):
  model = setup["model"]
  feats = model.embedder.embed(TEXTS)
  out = TextProj(model.config.adapter).apply({"params": model.params["adapter"]}, feats)
  want = l2n(np.asarray(out))
  got = model.encode_texts(TEXTS)
  err = np.abs(got - want).max()
  print(f"encode_texts vs adapter(embed): {err:.2e}")
  assert err < TOL
  with pytest.raises(ProclipError, match="list of strings"):
    model.encode_texts("a red circle")


def test_classifier_similarity_rank(setup):
  model = setup["model"]
  names, templates = ["red circle", "blue star", "cat"], ["a {}", "a photo of the {}."]
  w = model.zero_shot_classifier(names, templates)
  hand = []
  for c in names:
    e = [model.encode_texts([t.format(c)])[0] for t in templates]
    m = np.mean([x / np.linalg.norm(x) for x in e], axis=0)
    hand.append(m / np.linalg.norm(m))
  assert np.abs(w - np.stack(hand)).max() < TOL
  img = model.encode_images(setup["imgs"])
  sim = model.similarity(img, w)
  assert np.abs(sim - img @ w.T).max() < TOL
  idx, scores = model.rank("red circle", img, k=3)
  q = model.encode_texts(["red circle"])[0]
  full = img @ q
  assert list(idx) == list(np.argsort(-full, kind="stable")[:3])
  assert np.abs(scores - full[idx]).max() < TOL


def test_mesh_encoding_equals_single_device(setup):
  from proclip_jax.mesh import make_mesh  # pylint: disable=import-outside-toplevel
  model = setup["model"]
  mesh = make_mesh({"data": 4, "fsdp": 2})
  assert np.abs(model.encode_images(setup["imgs"], mesh=mesh)
                - model.encode_images(setup["imgs"])).max() < TOL
  assert np.abs(model.encode_texts(TEXTS, mesh=mesh) - model.encode_texts(TEXTS)).max() < TOL


def test_model_trained_with_cudnn_attention_runs_without_a_gpu(setup):
  """A config with attention="cudnn" (GPU training) encodes here with the dense attention."""
  model, imgs = setup["model"], setup["imgs"]
  vision = dataclasses.replace(model.config.vision, dtype="bfloat16", attention="cudnn")
  moved = ProCLIP(dataclasses.replace(model.config, vision=vision), model.params, model.embedder)
  assert moved.config.vision.attention == ("cudnn" if jax.default_backend() == "gpu" else "dense")
  bf16 = dataclasses.replace(vision, attention="dense")
  ref = ProCLIP(dataclasses.replace(model.config, vision=bf16), model.params, model.embedder)
  out = moved.encode_images(imgs)
  assert np.abs(out - ref.encode_images(imgs)).max() <= TOL
  assert 0 < np.abs(out - model.encode_images(imgs)).max() < 3e-2  # bf16 against float32


def test_save_load_round_trip_and_errors(setup):
  model, saved = setup["model"], setup["saved"]
  meta = json.load(open(os.path.join(saved, "model.json")))
  assert meta["kind"] == "proclip" and meta["embedder"] == os.path.abspath(setup["emb_dir"])
  back = ProCLIP.load(saved)  # embedder from model.json
  assert np.abs(back.encode_texts(TEXTS) - model.encode_texts(TEXTS)).max() < TOL
  assert np.abs(back.encode_images(setup["imgs"]) - model.encode_images(setup["imgs"])).max() < TOL
  no_text = ProCLIP.load(saved, embedder=back.embedder)
  assert no_text.embedder is back.embedder
  with pytest.raises(ProclipError, match="does not exist"):
    ProCLIP.load(str(setup["tmp"] / "nowhere"))
  with pytest.raises(ProclipError, match="does not exist"):
    ProCLIP.load(saved, embedder=str(setup["tmp"] / "no_embedder"))
  with pytest.raises(ProclipError, match="not a ProCLIP"):
    ProCLIP.load(setup["emb_dir"])
  with pytest.raises(ProclipError, match="training workdir"):
    ProCLIP.load(str(setup["tmp"]))


def test_load_training_workdir(setup):
  """A workdir saved through storage.Checkpoints (params + frozen merged, latest step)."""
  from proclip_jax.storage import Checkpoints  # pylint: disable=import-outside-toplevel
  model = setup["model"]
  wd = setup["tmp"] / "workdir"
  ck = Checkpoints(str(wd), async_save=False)
  cfg = {"stage": 2, "model": model.config.to_dict(), "embedder_path": str(setup["emb_dir"])}
  for step, scale in ((1, 0.5), (2, 1.0)):
    state = {"step": np.int32(step), "params": {"adapter": model.params["adapter"],
                                                "logit_scale": model.params["logit_scale"]},
             "frozen": {"visual": jax.tree.map(lambda x, s=scale: x * s, model.params["visual"])},
             "opt_state": {}, "ema": {}, "nonfinite_steps": np.int32(0)}
    ck.save(step, state, metadata={"config": cfg, "stage": 2, "step": step})
  ck.close()
  got = ProCLIP.load(str(wd))
  assert got.meta["step"] == 2
  assert np.abs(got.encode_images(setup["imgs"]) - model.encode_images(setup["imgs"])).max() < TOL
  assert np.abs(got.encode_texts(TEXTS) - model.encode_texts(TEXTS)).max() < TOL
  first = ProCLIP.load(str(wd), step=1)
  assert np.abs(first.params["visual"]["conv1"]["kernel"]
                - 0.5 * model.params["visual"]["conv1"]["kernel"]).max() < TOL


def test_clip_adapter_interface(setup):
  from proclip_jax.models.clip import CLIPConfig, LoadedCLIP, abstract_params  # pylint: disable=import-outside-toplevel
  from proclip_jax.models.clip_text import TextConfig  # pylint: disable=import-outside-toplevel
  from proclip_jax.models.vit import VisionConfig  # pylint: disable=import-outside-toplevel
  cfg = CLIPConfig(vision=VisionConfig(image_size=32, patch_size=16, width=32, layers=1, heads=2,
                                       embed_dim=16),
                   text=TextConfig(width=32, layers=1, heads=2, embed_dim=16, context_length=16))
  clip = LoadedCLIP(cfg, random_params(abstract_params(cfg)))
  wrap = CLIPModelAdapter(clip)
  assert np.abs(wrap.encode_texts(TEXTS) - clip.encode_text(clip.tokenize(TEXTS))).max() < TOL
  pix = np.stack([transforms.eval_transform(x, 32) for x in setup["imgs"]])
  assert np.abs(wrap.encode_images(setup["imgs"]) - clip.encode_image(pix)).max() < TOL
  assert wrap.zero_shot_classifier(["a", "b"], ["{}"]).shape == (2, 16)


def test_clis(setup):
  imgs = setup["tmp"] / "imgs"
  imgs.mkdir()
  for i, x in enumerate(setup["imgs"]):
    Image.fromarray(x).save(imgs / f"{i}.png")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "rank_images.py"),
                      "--checkpoint", setup["saved"], "--images", str(imgs),
                      "--query", "a red circle", "--top", "3"],
                     capture_output=True, text=True, env=env, timeout=300)
  assert r.returncode == 0, r.stderr
  model = setup["model"]
  emb = model.encode_images([np.asarray(Image.open(imgs / f"{i}.png")) for i in range(5)])
  idx, _ = model.rank("a red circle", emb, 3)
  lines = r.stdout.strip().splitlines()
  assert [os.path.basename(l.split()[-1]) for l in lines] == [f"{i}.png" for i in idx]
  from tools import evaluate  # pylint: disable=import-outside-toplevel
  assert evaluate.main(["--checkpoint", setup["saved"], "--eval", "flickr30k",
                        "--data-root", str(setup["tmp"])]) == 2
  assert evaluate.main(["--checkpoint", setup["saved"], "--eval", "nope"]) == 2
  from proclip_jax.data.demo_world import generate_demo_world  # pylint: disable=import-outside-toplevel
  from proclip_jax.eval.evaluators import run_evals  # pylint: disable=import-outside-toplevel
  demo = generate_demo_world(setup["tmp"] / "demo", n_train=1, n_test=6, image_size=32)
  out = setup["tmp"] / "results.json"
  assert evaluate.main(["--checkpoint", setup["saved"], "--eval", "demo_zero_shot",
                        "--demo", demo.path, "--out", str(out), "--batch-size", "4"]) == 0
  got = json.load(open(out))["results"]
  want = run_evals("demo_zero_shot", model, {"demo": demo.path, "batch_size": 4})
  for name in want:
    for k in want[name]:
      if k != "seconds":
        assert abs(got[name][k] - want[name][k]) < 1e-9, (name, k)
