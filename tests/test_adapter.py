"""TextProj against a PyTorch transcription of the ProCLIP / LLM2CLIP adapter, through the
production converter (convert/proclip.py), for ProCLIP's 1x8 and LLM2CLIP's 4x2 layouts."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn as tnn

from proclip_jax.storage import load_model
from proclip_jax.convert.openclip_arch import Arch, TowerArch
from proclip_jax.convert.proclip import (adapter_config_from_state_dict, convert_adapter,
                                         convert_proclip)
from proclip_jax.errors import ProclipError
from proclip_jax.models.adapter import AdapterConfig, TextProj, l2_normalize


class LinearBlock(tnn.Module):
  """The reference block: ``x + fn(ln(x))``, fn = Linear, GELU, Dropout, Linear."""

  def __init__(self, dim, expansion):
    super().__init__()
    self.fn = tnn.Sequential(tnn.Linear(dim, expansion * dim), tnn.GELU(), tnn.Dropout(0.0),
                             tnn.Linear(expansion * dim, dim))
    self.ln = tnn.LayerNorm(dim, eps=1e-5)

  def forward(self, x):
    return x + self.fn(self.ln(x))


class TorchText(tnn.Module):
  """``text.text_adaptor`` = blocks, final LayerNorm, Linear(D, E); input L2-normalised."""

  def __init__(self, dim, out, expansion, n_blocks):
    super().__init__()
    self.text_adaptor = tnn.Sequential(
        *[LinearBlock(dim, expansion) for _ in range(n_blocks)],
        tnn.LayerNorm(dim, eps=1e-5), tnn.Linear(dim, out))

  def forward(self, t):
    return self.text_adaptor(torch.nn.functional.normalize(t, dim=-1))


def _torch_model(dim, out, expansion, n_blocks, seed):
  torch.manual_seed(seed)
  m = TorchText(dim, out, expansion, n_blocks).double()
  with torch.no_grad():  # non-trivial LayerNorm parameters
    for mod in m.modules():
      if isinstance(mod, tnn.LayerNorm):
        mod.weight.uniform_(0.5, 1.5)
        mod.bias.normal_(0, 0.1)
  return m.float()


@pytest.mark.parametrize("expansion,n_blocks", [(8, 1), (2, 4)])
def test_textproj_matches_torch_through_converter(expansion, n_blocks, rng, tmp_path):
  dim, out = 16, 12
  tm = _torch_model(dim, out, expansion, n_blocks, seed=n_blocks)
  sd = {"text." + k: v.numpy() for k, v in tm.state_dict().items()}
  sd["logit_scale"] = np.asarray(4.0, np.float32)
  path = os.path.join(tmp_path, "ckpt.pt")
  torch.save({"module": {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}}, path)

  convert_proclip(path, os.path.join(tmp_path, "out"))
  meta, params = load_model(os.path.join(tmp_path, "out"), kind="proclip")
  cfg = AdapterConfig.from_dict(meta["config"]["adapter"])
  assert (cfg.in_dim, cfg.out_dim, cfg.expansion, cfg.n_blocks) == (dim, out, expansion,
                                                                     n_blocks)
  assert float(params["logit_scale"]) == 4.0
  assert meta["config"]["vision"] is None

  x = rng.normal(size=(5, dim)).astype(np.float32) * 3.0
  with torch.no_grad():
    want = tm(torch.from_numpy(x)).numpy()
  got = np.asarray(TextProj(cfg).apply({"params": params["adapter"]}, jnp.asarray(x)))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  # The output is unnormalised; the normalised features agree too.
  np.testing.assert_allclose(np.asarray(l2_normalize(got)),
                             want / np.linalg.norm(want, axis=-1, keepdims=True), atol=1e-6)


def test_textproj_input_scale_invariant_and_exact_gelu(rng):
  """t is L2-normalised first, and GELU is the erf form (not tanh)."""
  cfg = AdapterConfig(in_dim=8, out_dim=4, expansion=2)
  m = TextProj(cfg)
  x = rng.normal(size=(3, 8)).astype(np.float32)
  params = nn_unbox(m.init(jax.random.key(1), x)["params"])
  a = m.apply({"params": params}, x)
  b = m.apply({"params": params}, 7.5 * x)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  # Hand computation with erf GELU.
  from scipy.special import erf  # pylint: disable=import-outside-toplevel
  p = jax.tree.map(lambda v: np.asarray(v, np.float64), params)

  def ln(v, q):
    mu = v.mean(-1, keepdims=True)
    var = ((v - mu) ** 2).mean(-1, keepdims=True)
    return (v - mu) / np.sqrt(var + 1e-5) * q["scale"] + q["bias"]
  t0 = x / np.linalg.norm(x, axis=-1, keepdims=True)
  b0 = p["block_0"]
  h = ln(t0, b0["ln"]) @ b0["fn_0"]["kernel"] + b0["fn_0"]["bias"]
  h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
  t1 = t0 + h @ b0["fn_3"]["kernel"] + b0["fn_3"]["bias"]
  want = ln(t1, p["ln_final"]) @ p["proj"]["kernel"] + p["proj"]["bias"]
  np.testing.assert_allclose(np.asarray(a), want, atol=1e-5)


def nn_unbox(tree):
  from flax.core import meta  # pylint: disable=import-outside-toplevel
  return meta.unbox(tree)


def test_adapter_logical_axes():
  cfg = AdapterConfig(in_dim=8, out_dim=4, expansion=2, n_blocks=2)
  boxed = jax.eval_shape(lambda: TextProj(cfg).init(jax.random.key(0),
                                                    jnp.zeros((1, 8)))["params"])
  assert boxed["block_1"]["fn_0"]["kernel"].names == ("embed", "mlp")
  assert boxed["block_1"]["fn_3"]["kernel"].names == ("mlp", "embed")
  assert boxed["proj"]["kernel"].names == ("embed", "joint")
  assert boxed["ln_final"]["scale"].names == ("embed",)


def test_converter_errors(tmp_path):
  sd = {"text.text_adaptor.0.ln.weight": np.ones(4), "text.text_adaptor.0.ln.bias": np.ones(4)}
  with pytest.raises(ProclipError, match="missing"):
    adapter_config_from_state_dict(sd, "text.text_adaptor.")
  tm = _torch_model(4, 3, 2, 1, seed=0)
  sd = {"text." + k: v.numpy() for k, v in tm.state_dict().items()}
  cfg = adapter_config_from_state_dict(sd, "text.text_adaptor.")
  sd["text.text_adaptor.0.fn.3.weight"] = np.zeros((4, 5), np.float32)  # wrong shape
  with pytest.raises(ProclipError, match="mis-shaped"):
    convert_adapter(sd, "text.text_adaptor.", cfg)
  path = os.path.join(tmp_path, "clip.pt")
  torch.save({"logit_scale": torch.tensor(1.0)}, path)
  with pytest.raises(ProclipError, match="no adapter"):
    convert_proclip(path, os.path.join(tmp_path, "out"))
  assert not os.path.exists(os.path.join(tmp_path, "out"))
  with pytest.raises(ProclipError):
    AdapterConfig(in_dim=0, out_dim=3)


def _openai_visual_sd(rng, w=32, layers=2, patch=8, grid=4, e=12):
  f = lambda *s: (rng.normal(size=s) * 0.1).astype(np.float32)  # noqa: E731
  sd = {"visual.conv1.weight": f(w, 3, patch, patch), "visual.class_embedding": f(w),
        "visual.positional_embedding": f(grid * grid + 1, w),
        "visual.ln_pre.weight": 1 + f(w), "visual.ln_pre.bias": f(w),
        "visual.ln_post.weight": 1 + f(w), "visual.ln_post.bias": f(w),
        "visual.proj": f(w, e)}
  for i in range(layers):
    b = f"visual.transformer.resblocks.{i}."
    sd.update({b + "ln_1.weight": 1 + f(w), b + "ln_1.bias": f(w),
               b + "attn.in_proj_weight": f(3 * w, w), b + "attn.in_proj_bias": f(3 * w),
               b + "attn.out_proj.weight": f(w, w), b + "attn.out_proj.bias": f(w),
               b + "ln_2.weight": 1 + f(w), b + "ln_2.bias": f(w),
               b + "mlp.c_fc.weight": f(4 * w, w), b + "mlp.c_fc.bias": f(4 * w),
               b + "mlp.c_proj.weight": f(w, 4 * w), b + "mlp.c_proj.bias": f(w)})
  return sd


def test_convert_full_checkpoint_with_image_tower(rng, tmp_path):
  from proclip_jax.models.proclip import ProCLIPConfig, ProCLIPModel
  tm = _torch_model(16, 12, 8, 1, seed=3)
  sd = {"text." + k: v.numpy() for k, v in tm.state_dict().items()}
  sd.update(_openai_visual_sd(rng))
  sd["logit_scale"] = np.asarray(np.log(50.0), np.float32)
  sd["text.model.embed_tokens.weight"] = np.zeros((3, 16), np.float32)  # LLM: ignored
  path = os.path.join(tmp_path, "ckpt.pt")
  torch.save({"state_dict": {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}}, path)
  feats = {}
  x = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
  t = rng.normal(size=(2, 16)).astype(np.float32)
  for scan in (False, True):
    out = os.path.join(tmp_path, f"out{scan}")
    convert_proclip(path, out, scan_layers=scan, arch=Arch(vision=TowerArch(heads=1)))
    meta, params = load_model(out, kind="proclip")
    cfg = ProCLIPConfig.from_dict(meta["config"])
    assert cfg.vision.scan_layers == scan and cfg.vision.layers == 2
    assert meta["n_ignored_source_keys"] == 1
    vis = params["visual"]
    np.testing.assert_array_equal(vis["proj"], sd["visual.proj"])
    np.testing.assert_array_equal(vis["conv1"]["kernel"],
                                  np.transpose(sd["visual.conv1.weight"], (2, 3, 1, 0)))
    model = ProCLIPModel(cfg)
    img = np.asarray(model.encode_images(params, x))
    np.testing.assert_allclose(np.linalg.norm(img, axis=-1), 1.0, atol=1e-6)
    txt = np.asarray(model.encode_texts(params, t))
    np.testing.assert_allclose(np.linalg.norm(txt, axis=-1), 1.0, atol=1e-6)
    feats[scan] = img
  np.testing.assert_allclose(feats[False], feats[True], atol=1e-6)
