"""Export round trips of the EVA02 and SigLIP image towers (CLIP, SigLIP and ProCLIP models).

References: timm's ``Eva`` (built from the exported ``open_clip_config.json`` as open_clip's
``TimmModel`` builds it, or from the EVA-CLIP names mapped back to timm's by this file's own
renames) and transformers' ``SiglipVisionModel.from_pretrained`` on the exported folder, loaded
strictly; their features against the JAX model that was exported. Every export is converted back
with the production converter (``proclip_jax.convert.api.convert``) to the same parameters.
Sizes are tiny: EVA02 128 wide (two 64-wide heads, as every EVA02), SigLIP 32 wide.
"""
import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import timm
import torch
from flax.core import meta as meta_lib
from safetensors.numpy import load_file
from transformers import SiglipVisionConfig, SiglipVisionModel

from proclip_jax.convert.api import convert
from proclip_jax.convert.clip import clip_to_openai
from proclip_jax.convert.export import export
from proclip_jax.data.transforms import CLIP_MEAN, CLIP_STD
from proclip_jax.errors import ProclipError
from proclip_jax.models.adapter import AdapterConfig, TextProj
from proclip_jax.models.clip import CLIPConfig, abstract_params
from proclip_jax.models.clip_text import TextConfig
from proclip_jax.models.eva import EvaTower, EvaVisionConfig
from proclip_jax.models.proclip import ProCLIPConfig
from proclip_jax.models.siglip import SiglipConfig, SiglipVisionTransformer
from proclip_jax.models.vit import unstack_layers
from proclip_jax.storage import load_model, read_model_json, save_model
from tests.test_eva import LAYERS, eva_clip_layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5
EMBED = 8
# timm's EVA-CLIP names -> BAAI EVA-CLIP's (the inverse of what test_eva.eva_clip_layout does).
_EVA_TO_TIMM = (("attn.q_bias", "attn.q_proj.bias"), ("attn.v_bias", "attn.v_proj.bias"),
                ("attn.inner_attn_ln.", "attn.norm."), ("mlp.w1.", "mlp.fc1_g."),
                ("mlp.w2.", "mlp.fc1_x."), ("mlp.w3.", "mlp.fc2."), ("mlp.ffn_ln.", "mlp.norm."))


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np(sd):
  return {k: v.detach().numpy().copy() for k, v in sd.items()}


def _same_params(a, b):
  a, b = unstack_layers(dict(a)), unstack_layers(dict(b))
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def _timm_eva(**kwargs):
  return timm.create_model("eva02_large_patch14_clip_224", pretrained=False, **kwargs).eval()


def _timm_features(model, pixels):
  with torch.no_grad():
    return model(torch.tensor(pixels.transpose(0, 3, 1, 2))).numpy()


def _adapter(d, e, seed):
  """Random release-layout adapter tensors (1 block, expansion 8)."""
  rng = np.random.default_rng(seed)
  a = "text.text_adaptor."
  shapes = {a + "0.ln.weight": (d,), a + "0.ln.bias": (d,), a + "0.fn.0.weight": (8 * d, d),
            a + "0.fn.0.bias": (8 * d,), a + "0.fn.3.weight": (d, 8 * d), a + "0.fn.3.bias": (d,),
            a + "1.weight": (d,), a + "1.bias": (d,), a + "2.weight": (e, d), a + "2.bias": (e,)}
  return {k: ((k.endswith(("ln.weight", "1.weight"))) + 0.2 * rng.normal(size=s)).astype(
      np.float32) for k, s in shapes.items()}


# ----------------------------------------------------------------------------- EVA02

@pytest.fixture(scope="module")
def eva(tmp_path_factory):
  """A small timm EVA02-CLIP (its state dict, RoPE table, pixels, features) and two converted
  models built on it: an EVA02-CLIP with a text tower (from open_clip's layout) and a ProCLIP
  (from a release file with BAAI EVA-CLIP's visual.*, its blocks stacked for scan)."""
  tmp = tmp_path_factory.mktemp("export_eva")
  torch.manual_seed(4)
  model = _timm_eva(img_size=28, patch_size=7, embed_dim=128, num_heads=2, depth=LAYERS,
                    num_classes=EMBED)
  gen = torch.Generator().manual_seed(5)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=gen))
  sd, rope = _np(model.state_dict()), model.rope.pos_embed.numpy().copy()
  pixels = np.random.default_rng(6).normal(size=(3, 28, 28, 3)).astype(np.float32)
  feats = _timm_features(model, pixels)

  text_clip = CLIPConfig(vision=None, text=TextConfig(
      vocab_size=50, context_length=7, width=64, layers=1, heads=1, embed_dim=EMBED, act="gelu"))
  rng = np.random.default_rng(9)  # random weights from the abstract shapes (no compile)
  text_params = jax.tree.map(lambda x: (0.1 * rng.normal(size=x.shape)).astype(np.float32),
                             meta_lib.unbox(abstract_params(text_clip)))
  text = clip_to_openai(text_params, text_clip)
  clip_sd = {"visual.trunk." + k: v for k, v in sd.items()}
  clip_sd.update({"text." + k: v for k, v in text.items() if k != "logit_scale"})
  clip_sd["logit_scale"] = np.asarray(4.0, np.float32)
  torch.save({k: torch.tensor(v) for k, v in clip_sd.items()}, tmp / "eva_clip.pt")
  clip = convert(str(tmp / "eva_clip.pt"), str(tmp / "clip"), text_heads=1)

  release = {**eva_clip_layout(sd, rope), **_adapter(16, EMBED, 3),
             "logit_scale": np.asarray(4.5, np.float32)}
  torch.save({"state_dict": {k: torch.tensor(v) for k, v in release.items()}},
             tmp / "release.pt")
  proclip = convert(str(tmp / "release.pt"), str(tmp / "proclip"), scan_layers=True)
  return dict(sd=sd, pixels=pixels, feats=feats, clip=clip, clip_sd=clip_sd, proclip=proclip,
              release=release)


@functools.lru_cache(maxsize=None)
def _apply(vision):  # one compilation per tower config in this file
  tower = EvaTower(vision) if isinstance(vision, EvaVisionConfig) else SiglipVisionTransformer(
      vision)
  return jax.jit(lambda p, x: tower.apply({"params": p}, x))


def _tower_features(folder, pixels):
  """The JAX image tower's unnormalised features of a converted CLIP, SigLIP or ProCLIP folder
  (a ProCLIP's image features are these, normalised: models/proclip.py)."""
  meta, params = load_model(folder)
  config = meta["config"]
  if meta["kind"] == "siglip":
    vision = SiglipConfig.from_dict(config["vision"])
  else:
    vision = (CLIPConfig if meta["kind"] == "clip" else ProCLIPConfig).from_dict(config).vision
  return np.asarray(_apply(vision)(params["visual"], pixels))


def test_eva_clip_open_clip_layout(eva, tmp_path):
  """EVA02-CLIP -> open_clip folder: the open_clip-layout source back bit for bit; timm's Eva
  built from open_clip_config.json loads visual.trunk.* strictly and gives the JAX features;
  tools/convert.py reads the folder back (heads from the config) to the same parameters."""
  out = tmp_path / "oc"
  line = export(eva["clip"], str(out), "open_clip")
  assert "exported clip as open_clip" in line
  assert sorted(os.listdir(out)) == ["open_clip_config.json", "open_clip_model.safetensors"]
  got = load_file(str(out / "open_clip_model.safetensors"))
  assert sorted(got) == sorted(eva["clip_sd"])
  for k, v in eva["clip_sd"].items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)

  cfg = json.load(open(out / "open_clip_config.json"))["model_cfg"]
  vcfg = cfg["vision_cfg"]
  assert cfg["custom_text"] and cfg["text_cfg"]["heads"] == 1 and not cfg["quick_gelu"]
  assert vcfg["timm_pool"] == "token" and vcfg["timm_proj"] is None
  ref = timm.create_model(vcfg["timm_model_name"], pretrained=False, num_classes=cfg["embed_dim"],
                          global_pool=vcfg["timm_pool"], **vcfg["timm_model_kwargs"]).eval()
  trunk = {k[len("visual.trunk."):]: torch.tensor(v) for k, v in got.items()
           if k.startswith("visual.trunk.")}
  ref.load_state_dict(trunk, strict=True)
  want = _timm_features(ref, eva["pixels"])
  jax_raw = _tower_features(eva["clip"], eva["pixels"])
  err, err_raw = np.abs(_unit(want) - _unit(jax_raw)).max(), np.abs(want - jax_raw).max()
  print(f"EVA02 open_clip export -> timm Eva: normalised {err:.2e}, raw {err_raw:.2e} "
        f"(|features| up to {np.abs(want).max():.1f})")
  assert err <= TOL and err_raw <= TOL * max(1.0, np.abs(want).max())

  again = convert(str(out), str(tmp_path / "again"))
  _same_params(load_model(again)[1], load_model(eva["clip"])[1])
  assert read_model_json(again)["config"] == read_model_json(eva["clip"])["config"]


def _timm_names(release_visual):
  """BAAI EVA-CLIP ``visual.*`` -> timm's names; the RoPE buffers (not timm parameters) out."""
  out = {}
  for k, v in release_visual.items():
    k = k[len("visual."):]
    if "rope." in k:
      continue
    for a, b in _EVA_TO_TIMM:
      k = k.replace(a, b)
    out[k] = torch.tensor(v)
  return out


def test_eva_proclip_release_layout(eva, tmp_path):
  """ProCLIP with an EVA02 tower -> release .pt: the release file back (RoPE tables recomputed);
  its visual.* loads into timm's Eva strictly with the JAX features; it converts back to the
  same parameters. The open_clip export of the same model holds the tower alone."""
  pt = tmp_path / "release.pt"
  assert "exported proclip as proclip" in export(eva["proclip"], str(pt), "proclip")
  obj = torch.load(pt, weights_only=True)
  assert list(obj) == ["state_dict"]
  sd = {k: v.numpy() for k, v in obj["state_dict"].items()}
  assert sorted(sd) == sorted(eva["release"])
  for k, v in eva["release"].items():
    if "rope." in k:  # the tower's own tables, computed in float32 (timm's float32 too)
      np.testing.assert_allclose(sd[k], v, atol=1e-6, err_msg=k)
    else:
      np.testing.assert_array_equal(sd[k], v, err_msg=k)

  ref = _timm_eva(img_size=28, patch_size=7, embed_dim=128, num_heads=2, depth=LAYERS,
                  num_classes=EMBED)
  ref.load_state_dict(_timm_names({k: v for k, v in sd.items() if k.startswith("visual.")}),
                      strict=True)
  want = _timm_features(ref, eva["pixels"])
  img = _tower_features(eva["proclip"], eva["pixels"])
  err = np.abs(_unit(want) - _unit(img)).max()
  print(f"EVA02 ProCLIP release export -> timm Eva: normalised {err:.2e}")
  assert err <= TOL

  again = convert(str(pt), str(tmp_path / "again"))
  _same_params(load_model(again)[1], load_model(eva["proclip"])[1])

  oc = tmp_path / "oc"
  assert "adapter is only in --format proclip" in export(eva["proclip"], str(oc), "open_clip")
  keys = sorted(load_file(str(oc / "open_clip_model.safetensors")))
  assert keys == sorted(["logit_scale"] + ["visual.trunk." + k for k in eva["sd"]])


def test_eva_refusals(eva, tmp_path):
  """openai / hf name the formats that work; a CLIP has no release layout; a tower whose RoPE
  reference grid or head count the layouts cannot record is refused; nothing is written."""
  for fmt, out, works in (("openai", "x.pt", "--format open_clip"),
                          ("hf", "hf", "--format open_clip")):
    with pytest.raises(ProclipError, match=works) as e:
      export(eva["clip"], str(tmp_path / out), fmt)
    assert "EVA02" in str(e.value)
    with pytest.raises(ProclipError, match="--format proclip"):
      export(eva["proclip"], str(tmp_path / out), fmt)
  with pytest.raises(ProclipError, match="ProCLIP models"):
    export(eva["clip"], str(tmp_path / "x.pt"), "proclip")
  meta, params = load_model(eva["proclip"])
  for change, match in (({"rope_ref_grid": 8}, "rope_ref_grid=8.*rope_ref_grid=16"),
                        ({"heads": 1}, "heads=1.*heads=2")):  # 128-wide heads: not EVA02's 64
    config = {**meta["config"], "vision": {**meta["config"]["vision"], **change}}
    odd = save_model(str(tmp_path / "odd"), "proclip", config, params, overwrite=True)
    for fmt, out in (("proclip", "o.pt"), ("open_clip", "o")):
      with pytest.raises(ProclipError, match=match):
        export(odd, str(tmp_path / out), fmt)
  assert sorted(os.listdir(tmp_path)) == ["odd"]


# ----------------------------------------------------------------------------- SigLIP

WIDTH, HEADS, MLP, SIZE, PATCH = 32, 4, 40, 26, 8


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
  """A tiny transformers SiglipVisionModel (perturbed weights), its folder converted, and a
  ProCLIP folder built on the converted tower."""
  tmp = tmp_path_factory.mktemp("export_siglip")
  torch.manual_seed(0)
  model = SiglipVisionModel(SiglipVisionConfig(
      hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=2, num_attention_heads=HEADS,
      image_size=SIZE, patch_size=PATCH)).eval()
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=gen))
  model.save_pretrained(tmp / "hf")
  folder = convert(str(tmp / "hf"), str(tmp / "siglip"))
  meta, params = load_model(folder, kind="siglip")
  adapter = AdapterConfig(in_dim=8, out_dim=WIDTH)
  adapter_params = jax.tree.map(np.asarray, meta_lib.unbox(TextProj(adapter).init(
      jax.random.key(0), np.zeros((1, 8), np.float32))["params"]))
  pc = ProCLIPConfig.from_dict({"vision": meta["config"]["vision"], "adapter": adapter.to_dict()})
  proclip = save_model(str(tmp / "proclip"), "proclip", pc.to_dict(), {
      "visual": params["visual"], "adapter": adapter_params,
      "logit_scale": np.asarray(3.0, np.float32)})
  siglip_px = np.random.default_rng(0).uniform(-1, 1, size=(3, SIZE, SIZE, 3)).astype(np.float32)
  clip_px = ((siglip_px * 0.5 + 0.5 - CLIP_MEAN) / CLIP_STD).astype(np.float32)
  return dict(model=model, folder=folder, proclip=proclip, siglip_px=siglip_px, clip_px=clip_px)


def _hf_pooled(folder, pixels):
  hf, info = SiglipVisionModel.from_pretrained(folder, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  with torch.no_grad():
    return hf.eval()(pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2))).pooler_output.numpy()


def test_siglip_hf_layout(siglip, tmp_path):
  """SigLIP -> SiglipVisionModel folder: the source model's tensors back; from_pretrained loads
  it with no missing or unexpected key and gives the JAX tower's features; it converts back to
  the same parameters."""
  out = tmp_path / "hf"
  assert "SigLIP-normalised pixels" in export(siglip["folder"], str(out), "hf")
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
  got = load_file(str(out / "model.safetensors"))
  want_sd = _np(siglip["model"].state_dict())
  assert sorted(got) == sorted(want_sd)
  for k, v in want_sd.items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)

  meta, params = load_model(siglip["folder"], kind="siglip")
  jax_out = _tower_features(siglip["folder"], siglip["clip_px"])
  pooled = _hf_pooled(str(out), siglip["siglip_px"])
  err = np.abs(pooled - jax_out).max()
  print(f"SigLIP hf export -> SiglipVisionModel: pooled {err:.2e}")
  assert err <= TOL

  again = convert(str(out), str(tmp_path / "again"))
  _same_params(load_model(again)[1], params)
  assert read_model_json(again)["config"] == meta["config"]


def test_siglip_proclip_and_refusals(siglip, tmp_path):
  """A ProCLIP on a SigLIP tower exports its tower as SiglipVisionModel (normalised features
  equal the ProCLIP's image features); openai / open_clip / proclip are refused naming
  --format hf, as is a tower with a Dense after the MAP head; nothing is written."""
  out = tmp_path / "hf"
  line = export(siglip["proclip"], str(out), "hf")
  assert "adapter is only in --format proclip" in line
  img = _tower_features(siglip["proclip"], siglip["clip_px"])
  err = np.abs(_unit(_hf_pooled(str(out), siglip["siglip_px"])) - _unit(img)).max()
  print(f"SigLIP ProCLIP hf export -> SiglipVisionModel: normalised {err:.2e}")
  assert err <= TOL

  for src in (siglip["folder"], siglip["proclip"]):
    for fmt, name in (("openai", "x.pt"), ("open_clip", "oc"), ("proclip", "y.pt")):
      with pytest.raises(ProclipError, match="--format hf") as e:
        export(src, str(tmp_path / name), fmt)
      assert "SigLIP" in str(e.value) and "Nothing was written" in str(e.value)
  meta, params = load_model(siglip["folder"], kind="siglip")
  meta["config"]["vision"]["embed_dim"] = 5
  rng = np.random.default_rng(0)
  params["visual"]["proj"] = {"kernel": rng.normal(size=(WIDTH, 5)).astype(np.float32),
                              "bias": np.zeros(5, np.float32)}
  head = save_model(str(tmp_path / "head"), "siglip", meta["config"], params)
  with pytest.raises(ProclipError, match="SiglipVisionModel has no such layer"):
    export(head, str(tmp_path / "hf2"), "hf")
  assert sorted(os.listdir(tmp_path)) == ["head", "hf"]


def test_cli_refusal(eva, tmp_path):
  tool = os.path.join(ROOT, "tools", "export.py")
  proc = subprocess.run([sys.executable, tool, eva["clip"], str(tmp_path / "o.pt"), "--format",
                         "openai"], capture_output=True, text=True,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=False)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
  assert proc.stderr.startswith("error: ") and "--format open_clip" in proc.stderr
  assert not os.listdir(tmp_path)
