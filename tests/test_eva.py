"""EVA02-CLIP image tower: parity with timm's ``eva02_large_patch14_clip_224`` at the real L/14
width, heads, SwiGLU size and RoPE (two blocks), through the production converters from the
three source layouts (timm, open_clip, BAAI EVA-CLIP), the conversion CLI path, a ProCLIP
release file, gradients against PyTorch autograd, and the layouts / configs around the tower.
"""
import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from flax.core import meta
from timm.layers import RotaryEmbeddingCat

from proclip_jax.convert.api import convert, detect
from proclip_jax.convert.clip import clip_to_openai
from proclip_jax.convert.eva import convert_eva_visual, find_eva
from proclip_jax.errors import ProclipError
from proclip_jax.models.clip import CLIPConfig, init_clip, load_clip
from proclip_jax.models.clip_text import TextConfig
from proclip_jax.models.eva import EvaTower, EvaVisionConfig, rope_tables
from proclip_jax.models.proclip import ProCLIPConfig
from proclip_jax.models.vit import VisionConfig, stack_layers, unstack_layers
from proclip_jax import mesh as mesh_lib
from tests.config_helpers import make_config
from proclip_jax.train.optimizer import layer_ids

LAYERS = 2
REAL = EvaVisionConfig.named("EVA02-L/14", layers=LAYERS)
TINY = EvaVisionConfig(image_size=28, patch_size=7, width=64, layers=2, heads=4, mlp_dim=96,
                       embed_dim=16, rope_ref_grid=3)


def _torch_sd(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def eva_clip_layout(sd, rope_pos_embed, prefix="visual."):
  """timm's EVA02 keys -> BAAI EVA-CLIP's (``EVAVisionTransformer`` with subln, naiveswiglu,
  rope), with the RoPE buffers EVA-CLIP saves (model-level and in every attention)."""
  renames = (("attn.q_proj.bias", "attn.q_bias"), ("attn.v_proj.bias", "attn.v_bias"),
             ("attn.norm.", "attn.inner_attn_ln."), ("mlp.fc1_g.", "mlp.w1."),
             ("mlp.fc1_x.", "mlp.w2."), ("mlp.fc2.", "mlp.w3."), ("mlp.norm.", "mlp.ffn_ln."))
  out = {}
  for k, v in sd.items():
    for a, b in renames:
      k = k.replace(a, b)
    out[prefix + k] = v
  half = rope_pos_embed.shape[-1] // 2  # timm's table: [sin | cos]
  sin, cos = rope_pos_embed[:, :half], rope_pos_embed[:, half:]
  tables = {"rope.freqs_sin": sin, "rope.freqs_cos": cos}
  for i in range(LAYERS):
    tables.update({f"blocks.{i}.attn.rope.freqs_sin": sin, f"blocks.{i}.attn.rope.freqs_cos": cos})
  out.update({prefix + k: v.copy() for k, v in tables.items()})
  return out


@pytest.fixture(scope="module")
def ref():
  """timm's EVA02-CLIP-L/14 (2 blocks) with perturbed weights, its features and inputs."""
  torch.manual_seed(0)
  model = timm.create_model("eva02_large_patch14_clip_224", pretrained=False, depth=LAYERS,
                            num_classes=768).eval()
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():  # non-trivial norms, biases and head (timm's head init is x0.001)
    for p in model.parameters():
      p.add_(0.02 * torch.randn(p.shape, generator=gen))
  pixels = np.random.default_rng(0).normal(size=(2, 224, 224, 3)).astype(np.float32)
  with torch.no_grad():
    feats = model(torch.tensor(pixels.transpose(0, 3, 1, 2))).numpy()
  rope = model.rope.pos_embed.numpy().copy()
  return model, _torch_sd(model), rope, pixels, feats


@pytest.fixture(scope="module")
def small():
  """A small timm EVA02-CLIP (64-wide heads as every EVA02, 4x4 grid, RoPE reference grid 16)
  for the file-level paths (conversion CLI, load_clip, a ProCLIP release, the inference API)."""
  torch.manual_seed(4)
  model = timm.create_model("eva02_large_patch14_clip_224", pretrained=False, img_size=28,
                            patch_size=7, embed_dim=128, num_heads=2, depth=LAYERS,
                            num_classes=8).eval()
  gen = torch.Generator().manual_seed(5)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=gen))
  pixels = np.random.default_rng(6).normal(size=(3, 28, 28, 3)).astype(np.float32)
  with torch.no_grad():
    feats = model(torch.tensor(pixels.transpose(0, 3, 1, 2))).numpy()
  return _torch_sd(model), model.rope.pos_embed.numpy().copy(), pixels, feats


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def converted(ref):
  _, sd, rope, _, _ = ref
  cfg, params, _ = convert_eva_visual(sd)
  return cfg, params


@pytest.fixture(scope="module")
def tower_fn():
  return jax.jit(lambda p, x: EvaTower(REAL).apply({"params": p}, x))


def test_layouts_convert_to_the_same_tree(ref, converted):
  _, sd, rope, _, _ = ref
  cfg, params = converted
  assert cfg == REAL
  sources = {"timm": sd, "open_clip": {"visual.trunk." + k: v for k, v in sd.items()},
             "eva": eva_clip_layout(sd, rope)}
  for name, source in sources.items():
    got_cfg, got, used = convert_eva_visual(source)
    assert got_cfg == REAL, name
    assert used == set(source), name  # every tensor consumed, the RoPE buffers included
    jax.tree.map(np.testing.assert_array_equal, got, params)
  assert find_eva(sources["open_clip"]) == ("timm", "visual.trunk.")
  assert find_eva(sources["eva"]) == ("eva", "visual.")


def test_forward_matches_timm(ref, converted, tower_fn):
  _, _, _, pixels, feats = ref
  _, params = converted
  got = np.asarray(tower_fn(params, pixels))
  err = np.abs(_unit(got) - _unit(feats)).max()
  print(f"EVA02-L/14 forward parity: max abs error of normalised features {err:.2e}")
  assert err <= 1e-5
  assert np.abs(got - feats).max() <= 1e-4 * np.abs(feats).max()


def test_gradients_match_pytorch(ref, converted):
  """Float32 parameter gradients of a scalar loss on the projected features, against PyTorch
  autograd (in float64); PyTorch's gradients are mapped to the JAX layout by the production
  converter."""
  model, _, _, pixels, _ = ref
  _, params = converted
  model64 = copy.deepcopy(model).double()  # the reference's own rounding well below float32's
  loss = torch.sin(3 * model64(torch.tensor(pixels.transpose(0, 3, 1, 2), dtype=torch.float64)))
  loss = loss.sum()
  loss.backward()
  grads = {k: v.grad.numpy().copy() for k, v in model64.named_parameters()}
  _, want, _ = convert_eva_visual(grads, layout="timm", prefix="")

  def f(p):
    return jnp.sum(jnp.sin(3 * EvaTower(REAL).apply({"params": p}, pixels)))

  value, got = jax.jit(jax.value_and_grad(f))(params)
  assert abs(float(value) - loss.item()) <= 1e-5 * abs(loss.item())
  assert jax.tree.structure(got) == jax.tree.structure(want)
  errors = {}
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
    assert np.abs(b).max() > 0
    errors["/".join(k.key for k in path)] = (float(np.abs(np.asarray(a) - b).max())
                                             / float(np.abs(b).max()))  # vs the leaf's largest
  worst = max(errors, key=errors.get)
  print(f"EVA02-L/14 gradient parity: worst leaf error {errors[worst]:.2e} of its largest "
        f"gradient ({worst})")
  assert errors[worst] <= 1e-5


@pytest.mark.parametrize("timm_name,name,embed", [
    ("eva02_base_patch16_clip_224", "EVA02-B/16", 512),
    ("eva02_large_patch14_clip_336", "EVA02-L/14-336", 768)])
def test_other_variants_match_timm(timm_name, name, embed):
  """EVA02-CLIP-B/16 (RoPE grid 14 scaled to 16) and L/14-336 (24 scaled to 16), one block
  each at their real sizes: inferred config and forward against timm."""
  torch.manual_seed(7)
  model = timm.create_model(timm_name, pretrained=False, depth=1, num_classes=embed).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.02 * torch.randn(p.shape))
  size = model.patch_embed.img_size[0]
  pixels = np.random.default_rng(8).normal(size=(1, size, size, 3)).astype(np.float32)
  with torch.no_grad():
    feats = model(torch.tensor(pixels.transpose(0, 3, 1, 2))).numpy()
  cfg, params, _ = convert_eva_visual(_torch_sd(model))
  assert cfg == EvaVisionConfig.named(name, layers=1)
  got = jax.jit(EvaTower(cfg).apply)({"params": params}, pixels)
  err = np.abs(_unit(got) - _unit(feats)).max()
  print(f"{name} forward parity: max abs error of normalised features {err:.2e}")
  assert err <= 1e-5


@pytest.mark.parametrize("grid,ref_grid", [(16, 16), (24, 16), (14, 16), (3, 5)])
def test_rope_tables_match_timm(grid, ref_grid):
  """L/14 (16), L/14-336 (24) and B/16 (14) grids against timm's RotaryEmbeddingCat."""
  rope = RotaryEmbeddingCat(64, in_pixels=False, feat_shape=[grid, grid],
                            ref_feat_shape=(ref_grid, ref_grid))
  want = rope.get_embed().numpy()
  sin, cos = rope_tables(grid, ref_grid, 64)
  np.testing.assert_allclose(np.concatenate([sin, cos], -1), want, atol=1e-6)


def test_convert_cli_path_and_load_clip(small, tmp_path):
  """A whole EVA-CLIP checkpoint file (image tower, ``text.*`` tower in OpenAI layout,
  logit_scale) through convert() and load_clip."""
  sd, rope, pixels, feats = small
  text_cfg = TextConfig(vocab_size=50, context_length=7, width=64, layers=1, heads=1,
                        embed_dim=feats.shape[-1], act="gelu")
  text_clip = CLIPConfig(vision=None, text=text_cfg)
  text_params = init_clip(text_clip, seed=9)
  exported = clip_to_openai(text_params, text_clip)
  state = {k: torch.tensor(v) for k, v in eva_clip_layout(sd, rope).items()}
  state.update({"text." + k: torch.tensor(v) for k, v in exported.items() if k != "logit_scale"})
  state["logit_scale"] = torch.tensor(4.0)
  src = tmp_path / "eva02_clip.pt"
  torch.save({"state_dict": state}, src)
  assert detect(str(src))[0] == "eva-clip"
  # The text tower (64 wide, 1 head) is not an OpenAI standard size: its heads are given.
  out = convert(str(src), str(tmp_path / "out"), scan_layers=True, text_heads=1)
  clip = load_clip(out)
  assert isinstance(clip.config.vision, EvaVisionConfig) and clip.config.vision.scan_layers
  assert clip.config.vision.heads == 2 and clip.config.vision.mlp_dim == int(128 * 8 / 3)
  assert clip.logit_scale == pytest.approx(4.0)
  assert clip.config.text == dataclasses.replace(text_cfg, scan_layers=True)
  jax.tree.map(np.testing.assert_array_equal, unstack_layers(clip.params["text"]),
               text_params["text"])
  assert np.abs(clip.encode_image(pixels) - _unit(feats)).max() <= 1e-5
  # Stage 2 starts from it (train/checkpoints.load_clip_tower): restacked to the run's layout;
  # an OpenAI ViT of the same size in the config is refused.
  from proclip_jax.train.checkpoints import load_clip_tower  # pylint: disable=import-outside-toplevel
  vision = dataclasses.replace(clip.config.vision, scan_layers=False)
  tower = load_clip_tower(out, vision)
  assert "blocks_1" in tower["visual"]["transformer"] and tower["logit_scale"] == 4.0
  vit_like = VisionConfig(image_size=28, patch_size=7, width=128, layers=LAYERS, heads=2,
                          embed_dim=8)
  with pytest.raises(ProclipError, match="does not match config.model.vision"):
    load_clip_tower(out, vit_like)


def test_proclip_release_with_eva_tower(small, tmp_path):
  """A ProCLIP / LLM2CLIP release file: EVA-CLIP ``visual.*`` + adapter + logit_scale, through
  convert() and the inference API's image encoder."""
  from proclip_jax.inference import ProCLIP  # pylint: disable=import-outside-toplevel
  sd, rope, pixels, feats = small
  rng = np.random.default_rng(3)
  d, e = 16, feats.shape[-1]
  adapter = {"text.text_adaptor.0.ln.weight": 1 + 0.1 * rng.normal(size=d),
             "text.text_adaptor.0.ln.bias": 0.1 * rng.normal(size=d),
             "text.text_adaptor.0.fn.0.weight": rng.normal(size=(8 * d, d)),
             "text.text_adaptor.0.fn.0.bias": rng.normal(size=8 * d),
             "text.text_adaptor.0.fn.3.weight": rng.normal(size=(d, 8 * d)),
             "text.text_adaptor.0.fn.3.bias": rng.normal(size=d),
             "text.text_adaptor.1.weight": np.ones(d), "text.text_adaptor.1.bias": np.zeros(d),
             "text.text_adaptor.2.weight": rng.normal(size=(e, d)),
             "text.text_adaptor.2.bias": rng.normal(size=e)}
  state = {k: torch.tensor(np.asarray(v, np.float32)) for k, v in adapter.items()}
  state.update({k: torch.tensor(v) for k, v in eva_clip_layout(sd, rope).items()})
  state["logit_scale"] = torch.tensor(4.5)
  src = tmp_path / "proclip_eva.pt"
  torch.save({"module": state}, src)
  assert detect(str(src))[0] == "proclip"
  model = ProCLIP.load(convert(str(src), str(tmp_path / "out")))
  assert isinstance(model.config.vision, EvaVisionConfig)
  assert model.logit_scale == pytest.approx(4.5)
  assert np.abs(model.encode_images(pixels) - _unit(feats)).max() <= 1e-5


def test_refusals(ref):
  _, sd, rope, _, _ = ref
  eva = eva_clip_layout(sd, rope)
  extra = dict(eva, **{"visual.blocks.0.attn.relative_position_bias_table": np.zeros((3, 16))})
  with pytest.raises(ProclipError, match="relative_position_bias_table"):
    convert_eva_visual(extra)
  with pytest.raises(ProclipError, match="RoPE table"):
    convert_eva_visual(eva, rope_ref_grid=24)
  missing = {k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.weight"}
  with pytest.raises(ProclipError, match="missing"):
    convert_eva_visual(missing)


@pytest.fixture(scope="module")
def tiny():
  """Random parameters of the TINY tower, filled in from its abstract shapes (no compile)."""
  images = np.random.default_rng(1).normal(size=(2, 28, 28, 3)).astype(np.float32)
  abstract = meta.unbox(jax.eval_shape(
      lambda: EvaTower(TINY).init(jax.random.PRNGKey(0), images))["params"])
  rng = np.random.default_rng(2)
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: ((path[-1].key == "scale") + 0.1 * rng.normal(size=x.shape)).astype(
          np.float32), abstract)
  return params, images


def test_scan_and_remat_same_values_and_grads(tiny):
  params, images = tiny

  def value_and_grad(cfg, p):
    f = lambda q: jnp.sum(jnp.sin(EvaTower(cfg).apply({"params": q}, images)))  # noqa: E731
    return jax.jit(jax.value_and_grad(f))(p)

  v0, g0 = value_and_grad(TINY, params)
  scanned = dataclasses.replace(TINY, scan_layers=True, remat="dots_with_no_batch_dims_saveable")
  v1, g1 = value_and_grad(scanned, stack_layers(params))
  assert abs(float(v0) - float(v1)) <= 1e-5
  g1 = unstack_layers(g1)
  scale = max(float(jnp.abs(a).max()) for a in jax.tree.leaves(g0))
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    assert float(jnp.abs(a - b).max()) <= 1e-5 * scale


def test_bf16_and_fused_attention(tiny):
  """bfloat16 compute within bf16 rounding of float32; attention="xla" (jax.nn's fused
  attention on padded tokens) equal to the dense path; "cudnn" refused without a GPU."""
  params, images = tiny
  run = lambda cfg: jax.jit(EvaTower(cfg).apply)({"params": params}, images)  # noqa: E731
  f32, bf16 = run(TINY), run(dataclasses.replace(TINY, dtype="bfloat16"))
  assert bf16.dtype == jnp.float32
  assert np.abs(_unit(bf16) - _unit(f32)).max() <= 3e-2
  assert np.abs(np.asarray(run(dataclasses.replace(TINY, attention="xla"))) - f32).max() <= 1e-5
  if jax.default_backend() != "gpu":
    with pytest.raises(ProclipError, match="cuDNN"):
      run(dataclasses.replace(TINY, dtype="bfloat16", attention="cudnn"))


def test_axis_names_and_layer_decay_groups():
  """Logical axis names on every parameter; layer-wise decay sees the stem, each block (also
  stacked on the scanned "layers" axis) and the head."""
  images = jnp.zeros((1, 28, 28, 3))
  for scan in (False, True):
    cfg = dataclasses.replace(TINY, scan_layers=scan)
    boxed = jax.eval_shape(lambda c=cfg: EvaTower(c).init(jax.random.PRNGKey(0), images))
    names = mesh_lib.logical_names(boxed["params"])
    params = meta.unbox(boxed["params"])
    ids, n = layer_ids({"visual": params}, {"visual": names})
    assert n == TINY.layers
    assert ids["visual/patch_embed/kernel"] == 0 and ids["visual/positional_embedding"] == 0
    assert ids["visual/class_embedding"] == 0
    assert ids["visual/head/kernel"] == ids["visual/norm/scale"] == TINY.layers + 1
    block = "visual/transformer/blocks" + ("" if scan else "_1")
    assert ids[block + "/mlp/fc1_g/kernel"] == ("scanned" if scan else 2)
    flat_names = jax.tree.leaves(names, is_leaf=lambda x: isinstance(x, tuple))
    assert all(isinstance(x, tuple) for x in flat_names)
  assert names["head"]["kernel"] == ("embed", "joint")
  assert names["transformer"]["blocks"]["attn"]["query"]["kernel"] == (
      "layers", "embed", "heads", "kv")
  assert names["transformer"]["blocks"]["mlp"]["norm"]["scale"] == ("layers", "mlp")


def test_configs_round_trip_and_refuse():
  for name in ("EVA02-B/16", "EVA02-L/14", "EVA02-L/14-336"):
    cfg = EvaVisionConfig.named(name)
    assert EvaVisionConfig.from_dict(cfg.to_dict()) == cfg
  assert EvaVisionConfig.named("EVA02-B/16").mlp_dim == int(768 * 8 / 3)
  assert EvaVisionConfig.named("EVA02-L/14-336").grid == 24
  from proclip_jax.models.adapter import AdapterConfig  # pylint: disable=import-outside-toplevel
  pc = ProCLIPConfig(vision=REAL, adapter=AdapterConfig(in_dim=16, out_dim=768))
  assert ProCLIPConfig.from_dict(pc.to_dict()).vision == REAL
  cc = CLIPConfig(vision=REAL, text=None)
  assert CLIPConfig.from_dict(cc.to_dict()).vision == REAL
  with pytest.raises(ProclipError, match="head size"):
    EvaVisionConfig(width=60, heads=6)
  with pytest.raises(ProclipError, match="unknown fields"):
    EvaVisionConfig.from_dict({"arch": "eva02", "act": "gelu"})
  with pytest.raises(ProclipError, match="28x28"):
    EvaTower(TINY).init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))


def test_stage2_setup_with_eva_tower():
  """A stage-2 config whose image tower is EVA02 (given as a dict, as from a JSON config): the
  model, born shardings on a (data, fsdp, tensor) mesh and layer-wise lr multipliers."""
  from proclip_jax.train.optimizer import lr_multipliers  # pylint: disable=import-outside-toplevel
  from proclip_jax.train.state import setup  # pylint: disable=import-outside-toplevel
  vision = dataclasses.replace(TINY, scan_layers=True).to_dict()
  config = {"stage": 2, "total_steps": 10,
            "model": {"vision": vision, "adapter": {"in_dim": 8, "out_dim": TINY.embed_dim}},
            "optim": {"lr": 1e-3, "layer_decay": 0.5}}
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])
  s = setup(make_config(config), mesh)
  assert isinstance(s.model.config.vision, EvaVisionConfig)
  kernel = s.param_shardings["visual"]["transformer"]["blocks"]["mlp"]["fc1_g"]["kernel"]
  assert tuple(kernel.spec) == (None, "fsdp", "tensor")  # (layers, embed, mlp)
  mults = lr_multipliers(s.abstract, s.names, layer_decay=0.5)
  blocks = mults["visual"]["transformer"]["blocks"]["attn"]["query"]["kernel"]
  np.testing.assert_allclose(np.ravel(blocks), [0.5 ** 2, 0.5])  # decay**(L - i)
  assert mults["visual"]["patch_embed"]["kernel"] == 0.5 ** 3
  assert mults["visual"]["head"]["kernel"] == 1.0 and mults["adapter"]["proj"]["kernel"] == 1.0
