"""SigLIP image tower: parity with transformers' SigLIP through both production converters.

Reference: a tiny transformers ``SiglipModel`` with random weights (LayerNorms and biases
perturbed too); its vision tower's ``pooler_output``. The Hugging Face path converts the
``save_pretrained`` folders (the whole SiglipModel, and its vision tower alone); the
big_vision path converts an ``.npz`` written from the same weights by a mapping written here
(:func:`hf_to_big_vision`), independently of the converter's tables.
"""
import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import SiglipConfig as HFSiglipConfig, SiglipModel

from proclip_jax.convert.api import convert, detect, summary
from proclip_jax.tree import flatten
from proclip_jax.convert.siglip import load_siglip_tower
from proclip_jax.data.transforms import CLIP_MEAN, CLIP_STD
from proclip_jax.errors import ProclipError
from proclip_jax.models.siglip import SiglipConfig, SiglipVisionTransformer

TOL = 1e-5
# 26 px with 8 px patches: a 3 x 3 grid, the last 2 pixel rows and columns unseen (as in
# So400m/14 at 384 px).
WIDTH, HEADS, LAYERS, MLP, SIZE, PATCH = 32, 4, 2, 40, 26, 8


def hf_to_big_vision(sd, heads, prefix="vision_model.", scan=False):
  """A transformers SigLIP vision state dict -> big_vision ``img/...`` arrays (flat keys)."""
  sd = {k[len(prefix):]: v.numpy() for k, v in sd.items() if k.startswith(prefix)}
  w = sd["post_layernorm.weight"].shape[0]
  hd = w // heads
  out = {"embedding/kernel": sd["embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0),
         "embedding/bias": sd["embeddings.patch_embedding.bias"],
         "pos_embedding": sd["embeddings.position_embedding.weight"][None]}

  def ln(dst, src):
    out[dst + "/scale"], out[dst + "/bias"] = sd[src + ".weight"], sd[src + ".bias"]

  def dense(dst, src):
    out[dst + "/kernel"], out[dst + "/bias"] = sd[src + ".weight"].T, sd[src + ".bias"]

  def attention(dst, qkv_weights, qkv_biases, out_src):
    for name, wt, b in zip(("query", "key", "value"), qkv_weights, qkv_biases):
      out[f"{dst}/{name}/kernel"] = wt.T.reshape(w, heads, hd)
      out[f"{dst}/{name}/bias"] = b.reshape(heads, hd)
    out[dst + "/out/kernel"] = sd[out_src + ".weight"].T.reshape(heads, hd, w)
    out[dst + "/out/bias"] = sd[out_src + ".bias"]

  layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))
  for i in range(layers):
    s, d = f"encoder.layers.{i}.", f"Transformer/encoderblock_{i}/"
    ln(d + "LayerNorm_0", s + "layer_norm1")
    ln(d + "LayerNorm_1", s + "layer_norm2")
    attention(d + "MultiHeadDotProductAttention_0",
              [sd[f"{s}self_attn.{p}_proj.weight"] for p in "qkv"],
              [sd[f"{s}self_attn.{p}_proj.bias"] for p in "qkv"], s + "self_attn.out_proj")
    dense(d + "MlpBlock_0/Dense_0", s + "mlp.fc1")
    dense(d + "MlpBlock_0/Dense_1", s + "mlp.fc2")
  ln("Transformer/encoder_norm", "post_layernorm")
  out["MAPHead_0/probe"] = sd["head.probe"]
  attention("MAPHead_0/MultiHeadDotProductAttention_0",
            np.split(sd["head.attention.in_proj_weight"], 3),
            np.split(sd["head.attention.in_proj_bias"], 3), "head.attention.out_proj")
  ln("MAPHead_0/LayerNorm_0", "head.layernorm")
  dense("MAPHead_0/MlpBlock_0/Dense_0", "head.mlp.fc1")
  dense("MAPHead_0/MlpBlock_0/Dense_1", "head.mlp.fc2")
  if scan:
    blocks = [k for k in out if k.startswith("Transformer/encoderblock_0/")]
    for k in blocks:
      rest = k[len("Transformer/encoderblock_0/"):]
      out["Transformer/encoderblock/" + rest] = np.stack(
          [out.pop(f"Transformer/encoderblock_{i}/{rest}") for i in range(layers)])
  return out


def _save_npz(path, tree):
  np.savez(path, **{k: np.ascontiguousarray(v) for k, v in tree.items()})
  return str(path)


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
  """The tiny SiglipModel, its folders, pixels and reference pooled outputs."""
  torch.manual_seed(0)
  config = HFSiglipConfig(
      text_config=dict(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=8, bos_token_id=1,
                       eos_token_id=2, pad_token_id=0),
      vision_config=dict(hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, image_size=SIZE, patch_size=PATCH))
  model = SiglipModel(config).eval()
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=g))
  root = tmp_path_factory.mktemp("siglip")
  model.save_pretrained(root / "hf_model")
  model.vision_model.save_pretrained(root / "hf_vision")
  # SigLIP pixels in [-1, 1], and the same images CLIP-normalised (the project's input).
  siglip_px = np.random.default_rng(0).uniform(-1, 1, size=(3, SIZE, SIZE, 3)).astype(np.float32)
  clip_px = ((siglip_px * 0.5 + 0.5 - CLIP_MEAN) / CLIP_STD).astype(np.float32)
  with torch.no_grad():
    pooled = model.vision_model(
        pixel_values=torch.tensor(siglip_px.transpose(0, 3, 1, 2))).pooler_output.numpy()
  return dict(model=model, root=root, sd=model.state_dict(), siglip_px=siglip_px,
              clip_px=clip_px, pooled=pooled)


@pytest.fixture(scope="module")
def converted_vision(ref):
  """The vision-only folder through the production converter (shared by several tests)."""
  return convert(str(ref["root"] / "hf_vision"), str(ref["root"] / "converted_vision"))


@functools.lru_cache(maxsize=None)
def _apply(cfg):  # one compilation per configuration in this file
  return jax.jit(lambda p, x: SiglipVisionTransformer(cfg).apply({"params": p}, x))


def _run(path, pixels, **overrides):
  cfg, params = load_siglip_tower(path, scan_layers=overrides.pop("scan_layers", None))
  cfg = dataclasses.replace(cfg, **overrides)
  return cfg, np.asarray(_apply(cfg)(params, pixels))


def _check(out, want, what):
  err = np.abs(out - want).max()
  unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
  err_n = np.abs(unit(out) - unit(want)).max()
  print(f"{what}: max abs err pooled {err:.2e}, normalised {err_n:.2e}")
  assert err <= TOL and err_n <= TOL, (what, err, err_n)


def test_hf_folder_parity(ref, converted_vision, tmp_path):
  """SiglipModel folder (``vision_model.`` keys, text tower skipped and said so) and the
  vision-only folder; CLIP-normalised input (the default) and [-1, 1] input."""
  src = ref["root"] / "hf_model"
  assert detect(str(src))[0] == "hf-siglip"
  out = convert(str(src), str(tmp_path / "out"))
  line = summary(out)
  assert "text tower (22 tensors)" in line and "sigmoid-loss temperature (1 tensors)" in line
  meta = json.load(open(os.path.join(out, "model.json")))
  assert meta["siglip_log_temperature"] == pytest.approx(
      float(ref["model"].logit_scale.detach()), abs=1e-6)
  assert "skipped" not in summary(converted_vision)
  cfg, pooled = _run(out, ref["clip_px"])
  assert (cfg.width, cfg.layers, cfg.heads, cfg.mlp_width, cfg.image_size, cfg.patch_size) == (
      WIDTH, LAYERS, HEADS, MLP, SIZE, PATCH)
  _check(pooled, ref["pooled"], "SiglipModel folder, CLIP-normalised input")
  _check(_run(converted_vision, ref["clip_px"])[1], ref["pooled"], "SiglipVisionModel folder")
  _check(_run(converted_vision, ref["siglip_px"], pixel_norm="siglip")[1], ref["pooled"],
         "SiglipVisionModel folder, [-1, 1] input")


def test_big_vision_npz_parity_scan(ref, tmp_path):
  """A two-tower training checkpoint layout (``params/img``, ``params/txt``, ``t``, ``b``) with
  scanned blocks, converted to the scan layout."""
  img = hf_to_big_vision(ref["sd"], HEADS, scan=True)
  assert "Transformer/encoderblock/LayerNorm_0/scale" in img
  tree = {f"params/img/{k}": v for k, v in img.items()}
  tree.update({"params/txt/Embed_0/embedding": np.zeros((50, 16), np.float32),
               "params/t": np.array([2.3], np.float32), "params/b": np.array([-10.0], np.float32)})
  src = _save_npz(tmp_path / "siglip.npz", tree)
  assert detect(src)[0] == "big-vision-siglip"
  out = convert(src, str(tmp_path / "out"), scan_layers=True)
  line = summary(out)
  assert "text tower (1 tensors)" in line and "sigmoid-loss bias (1 tensors)" in line
  meta = json.load(open(os.path.join(out, "model.json")))
  assert meta["siglip_bias"] == -10.0 and meta["config"]["vision"]["scan_layers"]
  # An .npz does not record the input size: the converter takes grid * patch.
  assert meta["config"]["vision"]["image_size"] == (SIZE // PATCH) * PATCH
  _check(_run(out, ref["clip_px"], image_size=SIZE)[1], ref["pooled"],
         "npz, scanned blocks, scan layout")


def test_big_vision_npz_parity_head_bare_tower(ref, tmp_path):
  """A bare tower (no ``params/``, no ``img/``), per-layer blocks, with ``head`` (a Dense to
  E after pooling): the pooled reference through ``pooled @ kernel + bias`` in NumPy."""
  rng = np.random.default_rng(2)
  img = hf_to_big_vision(ref["sd"], HEADS)
  img["head/kernel"] = rng.normal(size=(WIDTH, 12)).astype(np.float32)
  img["head/bias"] = rng.normal(size=(12,)).astype(np.float32)
  out = convert(_save_npz(tmp_path / "bare.npz", img), str(tmp_path / "out"))
  cfg, projected = _run(out, ref["clip_px"], image_size=SIZE)
  assert cfg.embed_dim == 12 and cfg.output_dim == 12
  want = ref["pooled"].astype(np.float64) @ img["head/kernel"] + img["head/bias"]
  _check(projected, want, "npz with head")


def _npz_error(tmp_path, tree, match):
  src = _save_npz(tmp_path / "bad.npz", tree)
  with pytest.raises(ProclipError, match=match):
    convert(src, str(tmp_path / "bad_out"))
  assert not os.path.exists(tmp_path / "bad_out")
  assert not [p for p in os.listdir(tmp_path) if p.startswith("bad_out")]


def test_big_vision_bad_inputs(ref, tmp_path):
  img = {f"img/{k}": v for k, v in hf_to_big_vision(ref["sd"], HEADS).items()}
  _npz_error(tmp_path, {**img, "img/Transformer/encoderblock_0/extra": np.ones(3, np.float32)},
             r"unexpected \(1\):\n  \(source\) Transformer/encoderblock_0/extra")
  _npz_error(tmp_path, {**img, "opt/step": np.ones(1, np.float32)},
             r"\(source\) opt/step")  # not a known skip: refused, not dropped
  _npz_error(tmp_path, {**img, "img/embedding/kernel": np.ones((PATCH * PATCH * 3, WIDTH))},
             "NaFlex")
  _npz_error(tmp_path, {k: v for k, v in img.items() if "MAPHead_0" not in k}, "MAP head")
  _npz_error(tmp_path, {k: v for k, v in img.items() if k != "img/Transformer/encoder_norm/scale"},
             r"missing \(1\):\n  ln_post/scale")
  _npz_error(tmp_path, {"txt/x": np.ones(2, np.float32)}, "No image tower")
  (tmp_path / "broken.npz").write_bytes(b"not a zip")
  with pytest.raises(ProclipError, match="Cannot read"):
    convert(str(tmp_path / "broken.npz"), str(tmp_path / "out2"))


def test_hf_bad_inputs(ref, tmp_path):
  src = ref["root"] / "hf_vision"
  cfg = json.load(open(src / "config.json"))
  for change, match in (({"model_type": "siglip2_vision_model"}, "NaFlex"),
                        ({"vision_use_head": False}, "no MAP head"),
                        ({"intermediate_size": 48}, "mis-shaped")):
    bad = tmp_path / f"hf_{len(os.listdir(tmp_path))}"
    bad.mkdir()
    os.symlink(src / "model.safetensors", bad / "model.safetensors")
    json.dump({**cfg, **change}, open(bad / "config.json", "w"))
    with pytest.raises(ProclipError, match=match):
      convert(str(bad), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_proclip_hook_and_layer_decay(ref, converted_vision):
  """A ProCLIP model whose config dict names a SigLIP tower: unit-norm features equal the
  normalised reference; stage-2 init loads the converted tower; layer decay sees the blocks."""
  from proclip_jax.models.proclip import ProCLIPConfig, ProCLIPModel
  from proclip_jax.models.vit import VisionConfig
  from proclip_jax.train.checkpoints import load_clip_tower
  from proclip_jax.train.optimizer import layer_ids
  out = converted_vision
  cfg, params = load_siglip_tower(out)
  config = ProCLIPConfig.from_dict({"vision": cfg.to_dict(), "adapter": {
      "in_dim": 8, "out_dim": WIDTH, "expansion": 2, "n_blocks": 1}})
  assert isinstance(config.vision, SiglipConfig)
  model = ProCLIPModel(config)
  loaded = load_clip_tower(out, config.vision)
  jax.tree.map(np.testing.assert_array_equal, loaded["visual"], params)
  with pytest.raises(ProclipError, match="act: gelu_tanh there, quick_gelu here"):
    load_clip_tower(out, VisionConfig(image_size=3 * PATCH, patch_size=PATCH, width=WIDTH,
                                      layers=LAYERS, heads=HEADS, mlp_dim=MLP))
  feats = np.asarray(jax.jit(model.image_features)(loaded["visual"], ref["clip_px"]))
  want = ref["pooled"] / np.linalg.norm(ref["pooled"], axis=-1, keepdims=True)
  _check(feats, want, "ProCLIPModel.image_features")
  abstract = model.abstract(("visual",))["visual"]
  assert abstract["head"]["attn"]["query"]["kernel"].names == ("embed", "heads", "kv")
  ids, n = layer_ids({"visual": params})
  assert n == LAYERS
  assert ids["visual/conv1/bias"] == 0 and ids["visual/positional_embedding"] == 0
  assert ids["visual/transformer/blocks_1/mlp/c_fc/kernel"] == 2
  assert ids["visual/head/probe"] == ids["visual/ln_post/scale"] == LAYERS + 1


def test_bf16_and_named_variants(ref, converted_vision):
  """bfloat16 compute with remat, on blocks restacked for scan by load_siglip_tower."""
  cfg, got = _run(converted_vision, ref["clip_px"], scan_layers=True, dtype="bfloat16",
                  remat=True)
  assert cfg.scan_layers and got.dtype == np.float32
  err = np.abs(got - ref["pooled"]).max()
  assert 0 < err < 3e-2 * np.abs(ref["pooled"]).max()  # bf16 rounding, not another result
  so400m = SiglipConfig.named("So400m/14", image_size=384)
  assert (so400m.width, so400m.layers, so400m.mlp_width, so400m.heads, so400m.grid) == (
      1152, 27, 4304, 16, 27)
  with pytest.raises(ProclipError, match="Unknown SigLIP variant"):
    SiglipConfig.named("Q/16")
  with pytest.raises(ProclipError, match="pixel_norm"):
    SiglipConfig(pixel_norm="imagenet")


def test_scanned_layer_decay_and_gradients(ref, converted_vision):
  """Blocks stacked for scan: layer-wise lr decay finds them through the "layers" axis name
  (stem decay**(L+1), block i decay**(L-i), head 1), and every tower parameter gets a finite
  gradient through the ProCLIP image features (remat on)."""
  import flax.linen as nn
  from proclip_jax.models.adapter import AdapterConfig
  from proclip_jax.models.proclip import ProCLIPConfig, ProCLIPModel
  from proclip_jax.train.optimizer import lr_multipliers
  cfg, params = load_siglip_tower(converted_vision, scan_layers=True)
  model = ProCLIPModel(ProCLIPConfig(vision=dataclasses.replace(cfg, remat=True),
                                     adapter=AdapterConfig(in_dim=8, out_dim=WIDTH)))
  names = jax.tree.map(lambda b: b.names, model.abstract(("visual",)),
                       is_leaf=lambda x: isinstance(x, nn.Partitioned))
  mults = lr_multipliers({"visual": params}, names, layer_decay=0.5)["visual"]
  assert mults["conv1"]["kernel"] == mults["positional_embedding"] == 0.5 ** (LAYERS + 1)
  np.testing.assert_allclose(mults["transformer"]["blocks"]["attn"]["query"]["kernel"].ravel(),
                             [0.5 ** (LAYERS - i) for i in range(LAYERS)])
  assert mults["head"]["probe"] == mults["ln_post"]["scale"] == 1.0
  grads = jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(3 * model.image_features(
      p, ref["clip_px"])))))(params)
  for path, g in flatten(grads).items():
    g = np.asarray(g)
    assert np.isfinite(g).all() and np.abs(g).max() > 0, path


def test_read_npz_restores_bfloat16(tmp_path):
  """NumPy saves bfloat16 as 2-byte void; read_npz gives bfloat16 back, values unchanged."""
  import ml_dtypes
  from proclip_jax.convert.siglip import read_npz
  x = np.random.default_rng(0).normal(size=(3, 5)).astype(ml_dtypes.bfloat16)
  np.savez(tmp_path / "bf16.npz", **{"params/img/x": x})
  with np.load(tmp_path / "bf16.npz") as f:
    assert f["params/img/x"].dtype.kind == "V"  # what big_vision's checkpoints hold
  got = read_npz(str(tmp_path / "bf16.npz"))["params/img/x"]
  assert got.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(got.astype(np.float32), x.astype(np.float32))
