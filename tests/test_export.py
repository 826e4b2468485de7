"""Export round trips: JAX model -> tools/export.py layouts -> the PyTorch models that load them.

References: the OpenAI-layout PyTorch CLIP of ``tests/torch_openai_clip.py`` (``load_state_dict``
strict) for the openai / open_clip layouts, transformers' ``CLIPModel`` /
``CLIPVisionModelWithProjection.from_pretrained`` for the hf layout, and the production
converter for the ProCLIP release layout (re-converted, features compared with the JAX
model that was exported). Sizes are tiny and non-standard (2 and 1 heads), so the exports'
configs must carry the head counts.
"""
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import CLIPModel, CLIPVisionModelWithProjection

from proclip_jax.convert.api import convert
from proclip_jax.convert.export import export
from proclip_jax.convert.openclip_arch import Arch, TowerArch
from proclip_jax.convert.proclip import adapter_rename_table, convert_proclip
from proclip_jax.errors import ProclipError
from proclip_jax.models.clip import load_clip
from proclip_jax.models.proclip import ProCLIPConfig, ProCLIPModel
from proclip_jax.storage import load_model
from tests.torch_openai_clip import OpenAICLIP, features, make_openai_clip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TOL = 1e-5
DIMS = dict(image=30, patch=6, vision_width=128, vision_layers=2, vision_heads=2,
            text_width=64, text_layers=2, text_heads=1, context=16, vocab=99, embed=24)


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  pixels = rng.normal(size=(3, 30, 30, 3)).astype(np.float32)
  ids = rng.integers(1, 90, size=(4, 16))
  ids[np.arange(4), [3, 7, 15, 9]] = 98  # argmax pooling: the eos id is the largest
  return pixels, ids


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
  """The OpenAI-layout PyTorch CLIP converted to a JAX CLIP folder."""
  tmp = tmp_path_factory.mktemp("export")
  model = make_openai_clip(seed=3, **DIMS)
  src = str(tmp / "clip.pt")
  torch.save(model.state_dict(), src)
  out = convert(src, str(tmp / "clip"), vision_heads=2, text_heads=1)
  return model, out, tmp


def _jax_features(folder, pixels, ids):
  clip = load_clip(folder)
  return clip.encode_image(pixels), clip.encode_text(ids)


def _torch_from(sd):
  model = OpenAICLIP(**DIMS).eval()
  model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in sd.items()}, strict=True)
  return model


def test_openai_and_open_clip_layouts(clip_folder):
  model, folder, tmp = clip_folder
  pixels, ids = _inputs()
  img, txt = _jax_features(folder, pixels, ids)
  ref_img, ref_txt = features(model, pixels, ids)
  assert np.abs(img - ref_img).max() <= TOL and np.abs(txt - ref_txt).max() <= TOL

  pt = str(tmp / "openai.pt")
  assert "exported clip as openai" in export(folder, pt, "openai")
  sd = torch.load(pt, weights_only=True)
  assert sorted(sd) == sorted(model.state_dict().keys() - {"input_resolution", "context_length",
                                                             "vocab_size"})
  back = _torch_from({**sd, **{k: model.state_dict()[k] for k in ("input_resolution",
                                                                   "context_length",
                                                                   "vocab_size")}})
  got_img, got_txt = features(back, pixels, ids)
  errs = (np.abs(got_img - img).max(), np.abs(got_txt - txt).max())
  print(f"openai export -> PyTorch: image {errs[0]:.2e} text {errs[1]:.2e}")
  assert max(errs) <= TOL
  assert sd["logit_scale"].shape == () and float(sd["logit_scale"]) == model.logit_scale.item()

  oc = str(tmp / "open_clip")
  export(folder, oc, "open_clip")
  assert sorted(os.listdir(oc)) == ["open_clip_config.json", "open_clip_model.safetensors"]
  st = load_file(os.path.join(oc, "open_clip_model.safetensors"))
  for k, v in sd.items():
    np.testing.assert_array_equal(st[k], v.numpy(), err_msg=k)
  # The folder converts back without any head count: open_clip_config.json gives them.
  again = convert(oc, str(tmp / "again"))
  a_img, a_txt = _jax_features(again, pixels, ids)
  assert np.abs(a_img - img).max() <= 1e-6 and np.abs(a_txt - txt).max() <= 1e-6
  with pytest.raises(ProclipError, match="already exists"):
    export(folder, oc, "open_clip")
  with pytest.raises(ProclipError, match="ProCLIP models"):
    export(folder, str(tmp / "x.pt"), "proclip")


def test_hf_clip_model_layout(clip_folder):
  _, folder, tmp = clip_folder
  pixels, ids = _inputs(1)
  img, txt = _jax_features(folder, pixels, ids)
  out = str(tmp / "hf")
  export(folder, out, "hf")
  hf = CLIPModel.from_pretrained(out).eval()
  with torch.no_grad():
    o = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)))
  errs = (np.abs(o.image_embeds.numpy() - img).max(), np.abs(o.text_embeds.numpy() - txt).max())
  print(f"hf export -> transformers CLIPModel: image {errs[0]:.2e} text {errs[1]:.2e}")
  assert max(errs) <= TOL


@pytest.fixture(scope="module")
def proclip_folder(clip_folder):
  """A ProCLIP release file (the CLIP's image tower, a random 1x8 adapter), converted."""
  model, _, tmp = clip_folder
  rng = np.random.default_rng(5)
  d, e = 32, DIMS["embed"]
  sd = {k: v.numpy() for k, v in model.state_dict().items() if k.startswith("visual.")}
  a = "text.text_adaptor."
  shapes = {a + "0.ln.weight": (d,), a + "0.ln.bias": (d,), a + "0.fn.0.weight": (8 * d, d),
            a + "0.fn.0.bias": (8 * d,), a + "0.fn.3.weight": (d, 8 * d), a + "0.fn.3.bias": (d,),
            a + "1.weight": (d,), a + "1.bias": (d,), a + "2.weight": (e, d), a + "2.bias": (e,)}
  assert sorted(shapes) == sorted(adapter_rename_table(a, 1))
  for key, shape in shapes.items():
    scale = 1.0 if key.endswith(("ln.weight", "1.weight")) else 0.0  # LayerNorm gains near 1
    sd[key] = (scale + 0.2 * rng.normal(size=shape)).astype(np.float32)
  sd["logit_scale"] = np.asarray(np.log(30.0), np.float32)
  src = str(tmp / "proclip_release.pt")
  torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in sd.items()}}, src)
  out = convert_proclip(src, str(tmp / "proclip"), arch=Arch(vision=TowerArch(heads=2)))
  return model, out, sd


def _proclip_features(folder, pixels, llm):
  meta, params = load_model(folder, kind="proclip")
  m = ProCLIPModel(ProCLIPConfig.from_dict(meta["config"]))
  return (np.asarray(m.encode_images(params, jnp.asarray(pixels))),
          np.asarray(m.encode_texts(params, jnp.asarray(llm))), float(params["logit_scale"]))


def test_proclip_release_and_hf_vision_layouts(proclip_folder, tmp_path):
  model, folder, sd = proclip_folder
  pixels, _ = _inputs(2)
  llm = np.random.default_rng(4).normal(size=(5, 32)).astype(np.float32)
  img, txt, scale = _proclip_features(folder, pixels, llm)
  ref_img, _ = features(model, pixels, np.ones((1, 16), np.int64))
  assert np.abs(img - ref_img).max() <= TOL

  pt = str(tmp_path / "release.pt")
  export(folder, pt, "proclip")
  obj = torch.load(pt, weights_only=True)
  assert list(obj) == ["state_dict"] and sorted(obj["state_dict"]) == sorted(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(obj["state_dict"][k].numpy(), v, err_msg=k)
  again = convert(pt, str(tmp_path / "again"), vision_heads=2)
  a_img, a_txt, a_scale = _proclip_features(again, pixels, llm)
  assert np.abs(a_img - img).max() <= 1e-6 and np.abs(a_txt - txt).max() <= 1e-6
  assert a_scale == scale

  # The OpenAI layout holds the image tower and the logit scale.
  export(folder, str(tmp_path / "visual.pt"), "openai")
  vis_sd = torch.load(str(tmp_path / "visual.pt"), weights_only=True)
  assert sorted(vis_sd) == sorted(k for k in sd if not k.startswith("text."))
  for k, v in vis_sd.items():
    np.testing.assert_array_equal(v.numpy(), sd[k], err_msg=k)
  hf = str(tmp_path / "hf")
  assert "adapter is only in --format proclip" in export(folder, hf, "hf")
  vis = CLIPVisionModelWithProjection.from_pretrained(hf).eval()
  with torch.no_grad():
    emb = vis(pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2))).image_embeds.numpy()
  emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
  err = np.abs(emb - img).max()
  print(f"ProCLIP hf export -> CLIPVisionModelWithProjection: image {err:.2e}")
  assert err <= TOL


def test_cli(clip_folder, tmp_path):
  _, folder, _ = clip_folder
  tool = os.path.join(ROOT, "tools", "export.py")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, tool, str(tmp_path / "none"), str(tmp_path / "o.pt"),
                         "--format", "openai"], capture_output=True, text=True, env=env,
                        check=False)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
  assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
  proc = subprocess.run([sys.executable, tool, folder, str(tmp_path / "o.safetensors"),
                         "--format", "openai"], capture_output=True, text=True, env=env,
                        check=False)
  assert proc.returncode == 2 and ".pt name" in proc.stderr
  assert not os.listdir(tmp_path)


def test_training_workdir_source(proclip_folder, tmp_path):
  """A run's --workdir (its checkpoint: trained params + frozen params, config in the
  metadata) exports as the model folder with the same weights does."""
  from proclip_jax.storage import Checkpoints  # pylint: disable=import-outside-toplevel
  _, folder, _ = proclip_folder
  meta, params = load_model(folder, kind="proclip")
  workdir = tmp_path / "run"
  ckpts = Checkpoints(str(workdir), async_save=False)
  state = {"params": {"adapter": params["adapter"], "logit_scale": params["logit_scale"]},
           "frozen": {"visual": params["visual"]}}
  ckpts.save(8, state, metadata={"config": {"model": meta["config"], "stage": 2}})
  ckpts.close()
  a, b = str(tmp_path / "from_run.pt"), str(tmp_path / "from_folder.pt")
  export(str(workdir), a, "proclip")
  export(folder, b, "proclip")
  sa, sb = (torch.load(p, weights_only=True)["state_dict"] for p in (a, b))
  assert sorted(sa) == sorted(sb)
  for k, v in sb.items():
    np.testing.assert_array_equal(sa[k].numpy(), v.numpy(), err_msg=k)
  with pytest.raises(ProclipError, match="no checkpoint of step 3"):
    export(str(workdir), str(tmp_path / "x.pt"), "proclip", step=3)
