"""CLIP conversion parity against transformers' PyTorch CLIP, and converter bad inputs.

Reference: transformers models with random weights (LayerNorms and biases perturbed too),
saved with ``save_pretrained`` and converted by the production path
(``convert.api.convert`` -> ``load_clip``). An OpenAI-layout state dict is derived from the
same weights by a mapping written here (q/k/v fused into ``in_proj``), independently of the
converter's tables.
"""
import json
import os
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import (CLIPConfig as HFCLIPConfig, CLIPModel, CLIPTextModelWithProjection,
                          CLIPVisionModel, CLIPVisionModelWithProjection)

from proclip_jax.convert.api import convert, summary
from proclip_jax.convert.clip import clip_to_openai, convert_openai_visual, hf_to_clip
from proclip_jax.convert.openclip_arch import Arch, TowerArch
from proclip_jax.errors import ProclipError
from proclip_jax.models.clip import CLIP, load_clip
from tests.torch_openai_clip import features, make_openai_clip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5


def _randomize(model, seed):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.02 * torch.randn(p.shape, generator=g))
  return model.eval()


def _tiny_hf_config(eos_token_id, vision_width=32, vision_heads=4, text_width=32, text_heads=4,
                    vocab=99, context=16):
  return HFCLIPConfig(
      text_config=dict(vocab_size=vocab, hidden_size=text_width, intermediate_size=37,
                       num_hidden_layers=2, num_attention_heads=text_heads,
                       max_position_embeddings=context, eos_token_id=eos_token_id,
                       bos_token_id=min(vocab - 2, 49406), pad_token_id=0),
      vision_config=dict(hidden_size=vision_width, intermediate_size=4 * vision_width + 5,
                         num_hidden_layers=2, num_attention_heads=vision_heads, image_size=30,
                         patch_size=6),
      projection_dim=24)


def _pixels(n, size, seed=0):
  return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def _hf_clip_outputs(model, pixels, ids):
  with torch.no_grad():
    o = model(input_ids=torch.tensor(ids, dtype=torch.long),
              pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)))
  return o.image_embeds.numpy(), o.text_embeds.numpy(), o.logits_per_image.numpy()


def _compare(clip, model, pixels, ids, what):
  img_ref, txt_ref, logits_ref = _hf_clip_outputs(model, pixels, ids)
  img, txt = clip.encode_image(pixels), clip.encode_text(ids)
  logits = np.exp(clip.logit_scale) * img @ txt.T
  errs = (np.abs(img - img_ref).max(), np.abs(txt - txt_ref).max(),
          np.abs(logits - logits_ref).max())
  print(f"{what}: max abs err image {errs[0]:.2e} text {errs[1]:.2e} logits {errs[2]:.2e}")
  assert errs[0] <= TOL and errs[1] <= TOL
  assert errs[2] <= TOL * np.exp(clip.logit_scale)  # logits are scaled cosines
  return errs


# ----------------------------------------------------------------- Hugging Face folders

@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
  """Tiny CLIPModel pooling at the first eos (eos=3 is smaller than other ids)."""
  torch.manual_seed(0)
  model = _randomize(CLIPModel(_tiny_hf_config(eos_token_id=3)), 1)
  path = str(tmp_path_factory.mktemp("hf") / "clip")
  model.save_pretrained(path)
  return model, path


def _ids_with_eos(n, length, vocab, eos, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(4, vocab, size=(n, length))
  for row, pos in enumerate(rng.integers(2, length - 1, size=n)):
    ids[row, pos] = eos
    ids[row, pos + 1:] = eos if row % 2 else 0  # padding with eos or zeros
  ids[:, 0] = vocab - 2
  return ids


def test_hf_clip_parity_and_layouts(hf_clip, tmp_path):
  model, src = hf_clip
  out = convert(src, str(tmp_path / "out"))
  assert "hf-clip" in summary(out)
  clip = load_clip(out)
  assert clip.config.text.eos_token_id == 3
  assert sorted(clip.params) == ["logit_scale", "text", "visual"]
  pixels, ids = _pixels(3, 30), _ids_with_eos(5, 16, 99, 3)
  _compare(clip, model, pixels, ids, "HF tiny CLIPModel")
  # Stored in the scan layout: same features, and loadable in either layout.
  out_scan = convert(src, str(tmp_path / "scan"), scan_layers=True)
  scan = load_clip(out_scan)
  assert "blocks" in scan.params["visual"]["transformer"]
  for other in (scan, load_clip(out_scan, scan_layers=False), load_clip(out, scan_layers=True)):
    assert np.abs(other.encode_image(pixels) - clip.encode_image(pixels)).max() <= 1e-6
    assert np.abs(other.encode_text(ids) - clip.encode_text(ids)).max() <= 1e-6
  with pytest.raises(ProclipError, match="already exists"):
    convert(src, out)


def test_tower_gradients_match_pytorch(hf_clip):
  """Gradients of both towers (the image tower's unmasked attention and the text tower's causal
  one, through the explicit attention backward) against PyTorch autograd on transformers'
  model. PyTorch's gradients are mapped to the JAX layout by the production converter."""
  model, _ = hf_clip
  pixels, ids = _pixels(3, 30, seed=5), _ids_with_eos(4, 16, 99, 3, seed=2)
  model.zero_grad()
  img = model.get_image_features(pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)))
  txt = model.get_text_features(input_ids=torch.tensor(ids, dtype=torch.long))
  loss = torch.sin(3 * img.pooler_output).sum() + torch.cos(3 * txt.pooler_output).sum()
  loss.backward()
  grads = {k: (np.zeros(v.shape, np.float32) if v.grad is None else v.grad.numpy().copy())
           for k, v in model.named_parameters()}
  weights = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  config, params, _ = hf_to_clip(weights, model.config.to_dict())
  _, want, _ = hf_to_clip(grads, model.config.to_dict())

  def f(p):
    clip = CLIP(config)
    i = clip.apply({"params": p}, pixels, normalize=False, method=CLIP.encode_image)
    t = clip.apply({"params": p}, ids, normalize=False, method=CLIP.encode_text)
    return jnp.sum(jnp.sin(3 * i)) + jnp.sum(jnp.cos(3 * t))

  value, got = jax.jit(jax.value_and_grad(f))(params)
  assert abs(float(value) - loss.item()) <= 1e-5 * abs(loss.item())
  scale = max(float(np.abs(a).max()) for a in jax.tree.leaves(want))
  assert jax.tree.structure(got) == jax.tree.structure(want)
  worst = 0.0
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
    err = float(np.abs(np.asarray(a) - b).max())
    if [key.key for key in path][-2:] == ["key", "bias"] or not np.abs(b).max():
      # True gradient 0: logit_scale is not in this loss, and softmax ignores a constant added
      # to a row's logits (the key biases), so both sides' gradient is 0 or rounding.
      assert max(float(np.abs(np.asarray(a)).max()), float(np.abs(b).max())) <= 1e-5 * scale
      continue
    worst = max(worst, err / float(np.abs(b).max()))  # each leaf against its largest gradient
  print(f"gradient parity: worst leaf error {worst:.2e} of its largest gradient")
  assert worst <= 1e-5
  for tower in ("visual", "text"):  # the attention's q/k/v kernels do get gradients
    q = np.asarray(got[tower]["transformer"]["blocks_0"]["attn"]["query"]["kernel"])
    assert np.abs(q).max() > 1e-3 * scale


def test_hf_tower_models(tmp_path):
  torch.manual_seed(0)
  cfg = _tiny_hf_config(eos_token_id=2)  # legacy config: pool at argmax(ids)
  text = _randomize(CLIPTextModelWithProjection(cfg.text_config), 2)
  text.save_pretrained(str(tmp_path / "text"))
  vision = _randomize(CLIPVisionModel(cfg.vision_config), 3)  # no projection
  vision.save_pretrained(str(tmp_path / "vision"))
  clip_t = load_clip(convert(str(tmp_path / "text"), str(tmp_path / "t_out")))
  clip_v = load_clip(convert(str(tmp_path / "vision"), str(tmp_path / "v_out")))
  ids = _ids_with_eos(4, 16, 99, 98, seed=1)
  ids[:, 0] = 1
  with torch.no_grad():
    t_ref = text(input_ids=torch.tensor(ids)).text_embeds.numpy()
    pixels = _pixels(2, 30, seed=3)
    v_ref = vision(pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2))).pooler_output.numpy()
  t_ref /= np.linalg.norm(t_ref, axis=-1, keepdims=True)
  v_ref /= np.linalg.norm(v_ref, axis=-1, keepdims=True)
  assert clip_t.config.vision is None and clip_t.config.text.eos_token_id is None
  assert clip_v.config.text is None and clip_v.config.vision.embed_dim is None
  assert np.abs(clip_t.encode_text(ids) - t_ref).max() <= TOL
  assert np.abs(clip_v.encode_image(pixels) - v_ref).max() <= TOL
  with pytest.raises(ProclipError, match="no text tower"):
    clip_v.encode_text(ids)


def test_real_b16_image_tower(tmp_path):
  """ViT-B/16 dimensions (random weights), image tower only, two images."""
  torch.manual_seed(0)
  model = CLIPVisionModelWithProjection(
      HFCLIPConfig().vision_config.__class__(
          hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
          image_size=224, patch_size=16, projection_dim=512)).eval()
  model.save_pretrained(str(tmp_path / "b16"))
  clip = load_clip(convert(str(tmp_path / "b16"), str(tmp_path / "out"), scan_layers=True))
  assert clip.config.vision == clip.config.vision.named("B/16", scan_layers=True)
  pixels = _pixels(2, 224, seed=4)
  with torch.no_grad():
    ref = model(pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2))).image_embeds.numpy()
  ref /= np.linalg.norm(ref, axis=-1, keepdims=True)
  err = np.abs(clip.encode_image(pixels) - ref).max()
  print(f"B/16 image tower: max abs err {err:.2e}")
  assert err <= TOL


# ------------------------------------------------------------------- OpenAI state dicts

def _hf_to_openai(sd):
  """Independent reference mapping: HF CLIPModel tensors -> OpenAI / open_clip names."""
  out = {}
  for src, dst in (("vision_model.", "visual."), ("text_model.", "")):
    n = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith(src + "encoder.layers."))
    for i in range(n):
      s, d = f"{src}encoder.layers.{i}.", f"{dst}transformer.resblocks.{i}."
      out[d + "attn.in_proj_weight"] = torch.cat(
          [sd[s + f"self_attn.{x}_proj.weight"] for x in "qkv"])
      out[d + "attn.in_proj_bias"] = torch.cat([sd[s + f"self_attn.{x}_proj.bias"] for x in "qkv"])
      for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                   ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
        out[d + a + ".weight"] = sd[s + b + ".weight"]
        out[d + a + ".bias"] = sd[s + b + ".bias"]
  out["visual.conv1.weight"] = sd["vision_model.embeddings.patch_embedding.weight"]
  out["visual.class_embedding"] = sd["vision_model.embeddings.class_embedding"]
  out["visual.positional_embedding"] = sd["vision_model.embeddings.position_embedding.weight"]
  for a, b in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
    out[f"visual.{a}.weight"] = sd[f"vision_model.{b}.weight"]
    out[f"visual.{a}.bias"] = sd[f"vision_model.{b}.bias"]
  out["visual.proj"] = sd["visual_projection.weight"].T
  out["token_embedding.weight"] = sd["text_model.embeddings.token_embedding.weight"]
  out["positional_embedding"] = sd["text_model.embeddings.position_embedding.weight"]
  out["ln_final.weight"] = sd["text_model.final_layer_norm.weight"]
  out["ln_final.bias"] = sd["text_model.final_layer_norm.bias"]
  out["text_projection"] = sd["text_projection.weight"].T
  out["logit_scale"] = sd["logit_scale"]
  return {k: v.detach().clone().contiguous() for k, v in out.items()}


@pytest.fixture(scope="module")
def openai_clip(tmp_path_factory):
  """OpenAI-shaped tiny CLIP (head size 64, CLIP vocabulary, context 77) + its state dict."""
  torch.manual_seed(0)
  cfg = _tiny_hf_config(eos_token_id=49407, vision_width=128, vision_heads=2, text_width=64,
                        text_heads=1, vocab=49408, context=77)
  model = _randomize(CLIPModel(cfg), 4)
  return model, _hf_to_openai(model.state_dict()), tmp_path_factory.mktemp("openai")


def test_openai_state_dict_parity_and_export(openai_clip):
  model, sd, tmp = openai_clip
  pt = str(tmp / "wrapped.pt")
  torch.save({"state_dict": sd, "epoch": 3}, pt)
  st = str(tmp / "plain.safetensors")
  save_file({k: v.numpy() for k, v in sd.items()}, st)
  texts = ["a photo of a cat", "Ein Foto von einem Hund 🐶", "a diagram " * 40, "&amp; x"]
  for src in (pt, st):
    clip = load_clip(convert(src, str(tmp / (os.path.basename(src) + ".out")), vision_heads=2,
                             text_heads=1))
    assert clip.config.vision.heads == 2 and clip.config.text.heads == 1
    ids = clip.tokenize(texts)
    assert ids.shape == (4, 77) and ids.dtype == np.int32
    _compare(clip, model, _pixels(3, 30, seed=5), ids, f"OpenAI layout {os.path.basename(src)}")
  back = clip_to_openai(clip.params, clip.config)
  assert sorted(back) == sorted(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(back[k], v.numpy().reshape(back[k].shape), err_msg=k)
  # The image tower alone, as ProCLIP / LLM2CLIP checkpoints embed it.
  np_sd = {k: v.numpy() for k, v in sd.items()}
  vcfg, vparams = convert_openai_visual(np_sd, "visual.", scan_layers=True,
                                        arch=Arch(vision=TowerArch(heads=2)))
  assert vcfg == clip.config.vision.__class__(**{**clip.config.vision.to_dict(),
                                                  "scan_layers": True})
  assert vparams["transformer"]["blocks"]["attn"]["query"]["kernel"].shape == (2, 128, 2, 64)
  bad = dict(np_sd, **{"visual.extra_head.weight": np.zeros(3, np.float32)})
  with pytest.raises(ProclipError, match="visual.extra_head.weight"):
    convert_openai_visual(bad, "visual.", arch=Arch(vision=TowerArch(heads=2)))


# ------------------------------------------------------------------------ bad inputs

def _hf_variant(src, dst, edit):
  os.makedirs(dst)
  with open(os.path.join(src, "config.json")) as f, open(os.path.join(dst, "config.json"), "w") as g:
    g.write(f.read())
  sd = load_file(os.path.join(src, "model.safetensors"))
  edit(sd)
  save_file(sd, os.path.join(dst, "model.safetensors"))
  return dst


def _expect_error(src, out, match):
  with pytest.raises(ProclipError, match=match) as e:
    convert(src, out)
  assert not os.path.exists(out)
  assert not [p for p in os.listdir(os.path.dirname(out)) if ".tmp-" in p]
  return str(e.value)


def test_bad_checkpoints(hf_clip, tmp_path):
  _, src = hf_clip

  def rename(sd):
    sd["vision_model.post_layernorm.gamma"] = sd.pop("vision_model.post_layernorm.weight")

  msg = _expect_error(_hf_variant(src, str(tmp_path / "keys"), rename), str(tmp_path / "o1"),
                      "does not fit")
  assert "visual/ln_post/scale" in msg and "(source) vision_model.post_layernorm.gamma" in msg

  def reshape(sd):
    sd["text_projection.weight"] = np.zeros((25, 32), np.float32)

  msg = _expect_error(_hf_variant(src, str(tmp_path / "shape"), reshape), str(tmp_path / "o2"),
                      "mis-shaped")
  assert "text/text_projection: got (32, 25), model expects (32, 24)" in msg

  trunc = _hf_variant(src, str(tmp_path / "trunc"), lambda sd: None)
  path = os.path.join(trunc, "model.safetensors")
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])
  _expect_error(trunc, str(tmp_path / "o3"), "truncated")

  unknown = str(tmp_path / "unknown.safetensors")
  save_file({"encoder.weight": np.zeros((2, 2), np.float32)}, unknown)
  _expect_error(unknown, str(tmp_path / "o4"), "Cannot tell what")


class _RunsCode:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_not_executed(tmp_path):
  marker = tmp_path / "pwned"
  evil = str(tmp_path / "evil.pt")
  torch.save({"visual.conv1.weight": _RunsCode(str(marker)), "token_embedding.weight":
              torch.zeros(2)}, evil)
  _expect_error(evil, str(tmp_path / "out"), "weights_only")
  assert not marker.exists()
  # The payload is live: an unsafe load of the same kind of file does run it.
  live_marker = tmp_path / "live"
  live = str(tmp_path / "live.pt")
  torch.save({"x": _RunsCode(str(live_marker))}, live)
  torch.load(live, weights_only=False)
  assert live_marker.exists()
  # A plain (non-zip) pickle with the same payload is refused too.
  raw = str(tmp_path / "raw.bin")
  with open(raw, "wb") as f:
    pickle.dump({"visual.conv1.weight": _RunsCode(str(marker))}, f)
  _expect_error(raw, str(tmp_path / "out2"), "weights_only")
  assert not marker.exists()


def test_cli(hf_clip, tmp_path, capsys):
  _, src = hf_clip
  from tools import convert as cli  # pylint: disable=import-outside-toplevel
  assert cli.main([src, str(tmp_path / "ok")]) == 0
  assert "hf-clip" in capsys.readouterr().out
  bad = str(tmp_path / "bad.safetensors")
  save_file({"foo": np.zeros(1, np.float32)}, bad)
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert.py"), bad,
                         str(tmp_path / "o")], capture_output=True, text=True, check=False,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 2, proc.stderr
  assert "Cannot tell what" in proc.stderr and "Traceback" not in proc.stderr
  assert not os.path.exists(tmp_path / "o")


# ------------------------------------------------- TorchScript archives (OpenAI's .pt files)

OPENAI_DIMS = dict(image=30, patch=6, vision_width=128, vision_layers=2, vision_heads=2,
                   text_width=64, text_layers=2, text_heads=1, context=16, vocab=99, embed=24)


def _openai_inputs(seed=0, vocab=99, context=16):
  rng = np.random.default_rng(seed)
  pixels = rng.normal(size=(3, 30, 30, 3)).astype(np.float32)
  ids = rng.integers(1, vocab - 9, size=(4, context))
  ids[np.arange(4), [3, 7, context - 1, 9]] = vocab - 1  # pooled at argmax(ids)
  return pixels, ids


def _check_features(out, model, pixels, ids, what):
  clip = load_clip(out)
  img, txt = features(model, pixels, ids)
  errs = (np.abs(clip.encode_image(pixels) - img).max(), np.abs(clip.encode_text(ids) - txt).max())
  print(f"{what}: max abs err image {errs[0]:.2e} text {errs[1]:.2e}")
  assert max(errs) <= TOL
  return clip


def test_torchscript_archive(tmp_path):
  """A traced OpenAI-layout CLIP saved with torch.jit.save, as OpenAI released ViT-B-16.pt."""
  model = make_openai_clip(seed=7, **OPENAI_DIMS)
  pixels, ids = _openai_inputs()
  traced = torch.jit.trace(model, (torch.tensor(pixels.transpose(0, 3, 1, 2)), torch.tensor(ids)))
  archive = str(tmp_path / "ViT-tiny.pt")
  torch.jit.save(traced, archive)
  with pytest.raises(Exception):  # what made the old reader fail
    torch.load(archive, weights_only=True)
  msg = _expect_error(archive, str(tmp_path / "refused"), "--vision-heads")
  assert "head count of the vision tower" in msg
  ts = _check_features(convert(archive, str(tmp_path / "ts"), vision_heads=2, text_heads=1),
                       model, pixels, ids, "TorchScript archive")
  plain = str(tmp_path / "plain.pt")
  torch.save(model.state_dict(), plain)
  sd_clip = load_clip(convert(plain, str(tmp_path / "sd"), vision_heads=2, text_heads=1))
  for a, b in zip(jax.tree.leaves(ts.params), jax.tree.leaves(sd_clip.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # float16 storages, as OpenAI's archives hold them.
  half = torch.jit.trace(make_openai_clip(seed=7, **OPENAI_DIMS).half(),
                         (torch.tensor(pixels.transpose(0, 3, 1, 2)).half(), torch.tensor(ids)),
                         check_trace=False)
  torch.jit.save(half, str(tmp_path / "half.pt"))
  from proclip_jax.convert.common import read_state_dict  # pylint: disable=import-outside-toplevel
  got = read_state_dict(str(tmp_path / "half.pt"))
  want = half.state_dict()
  assert sorted(got) == sorted(want)
  for k, v in want.items():
    assert got[k].dtype == v.numpy().dtype, k
    np.testing.assert_array_equal(got[k], v.numpy(), err_msg=k)


def _torchscript_zip(path, data_pkl):
  """A zip shaped as a TorchScript archive with the given data.pkl (and code/ that would run)."""
  import zipfile  # pylint: disable=import-outside-toplevel
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("evil/data.pkl", data_pkl)
    z.writestr("evil/code/__torch__.py", "import os\nos.system('touch /tmp/never')\n")
    z.writestr("evil/constants.pkl", pickle.dumps(()))
    z.writestr("evil/version", "3\n")
  return path


class _CallsScriptClass:
  """Pickles as ``__torch__.Evil(...)``: a REDUCE on a TorchScript class (not NEWOBJ)."""

  def __reduce__(self):
    import importlib  # pylint: disable=import-outside-toplevel
    return (importlib.import_module, ("os",))


def test_torchscript_archive_that_runs_code_is_refused(tmp_path):
  marker = tmp_path / "pwned"
  cases = {
      "system": pickle.dumps({"visual.conv1.weight": _RunsCode(str(marker))}, protocol=2),
      "import": pickle.dumps({"x": _CallsScriptClass()}, protocol=2),
      # A __torch__ class called with arguments (REDUCE) instead of rebuilt (NEWOBJ).
      "script_call": b"\x80\x02c__torch__\nM\nq\x00X\x05\x00\x00\x00touchq\x01\x85q\x02Rq\x03.",
  }
  for name, payload in cases.items():
    src = _torchscript_zip(str(tmp_path / f"{name}.pt"), payload)
    msg = _expect_error(src, str(tmp_path / f"out_{name}"), "TorchScript archive")
    assert "code/ is never run" in msg, msg
  assert not marker.exists() and not os.path.exists("/tmp/never")


# ----------------------------------------------------------------- head counts (issue #23)

def _head_width_model(tmp_path, name, **dims):
  model = make_openai_clip(seed=11, **{**OPENAI_DIMS, **dims})
  src = str(tmp_path / name / "model.safetensors")
  os.makedirs(os.path.dirname(src))
  save_file({k: v.contiguous().numpy() for k, v in model.state_dict().items()}, src)
  return model, src


def test_two_head_model_needs_its_head_count(tmp_path):
  """Width 64 with 2 heads of 32: width // 64 would make it 1 head and drift silently."""
  model, src = _head_width_model(tmp_path, "two", vision_width=64, vision_heads=2,
                                 text_width=64, text_heads=2)
  msg = _expect_error(src, str(tmp_path / "o1"), "Cannot tell the attention head count")
  assert "--vision-heads N" in msg and "--preset" in msg
  with pytest.raises(ProclipError, match="text tower"):
    convert(src, str(tmp_path / "o2"), vision_heads=2)
  pixels, ids = _openai_inputs(1)
  clip = _check_features(convert(src, str(tmp_path / "ok"), vision_heads=2, text_heads=2),
                         model, pixels, ids, "2-head tiny model")
  assert clip.config.vision.heads == 2 and clip.config.text.heads == 2
  # With the wrong count the model loads but computes something else: why it is refused.
  wrong = load_clip(convert(src, str(tmp_path / "wrong"), vision_heads=1, text_heads=1))
  assert np.abs(wrong.encode_image(pixels) - clip.encode_image(pixels)).max() > 1e-3


def test_head_width_80_from_open_clip_config(tmp_path):
  """Heads 80 wide (as open_clip's ViT-H/14): from open_clip_config.json or a preset JSON."""
  model, src = _head_width_model(tmp_path, "h80", vision_width=160, vision_heads=2,
                                 vision_layers=2)
  _expect_error(src, str(tmp_path / "o1"), "Cannot tell the attention head count")
  cfg = {"model_cfg": {"embed_dim": 24, "quick_gelu": True,
                       "vision_cfg": {"image_size": 30, "layers": 2, "width": 160,
                                      "head_width": 80, "patch_size": 6},
                       "text_cfg": {"context_length": 16, "vocab_size": 99, "width": 64,
                                    "heads": 1, "layers": 2}}}
  preset = str(tmp_path / "tiny-h.json")
  with open(preset, "w") as f:
    json.dump(cfg["model_cfg"], f)
  pixels, ids = _openai_inputs(2)
  clip = _check_features(convert(src, str(tmp_path / "preset"), preset=preset), model, pixels,
                         ids, "head width 80 (--preset JSON)")
  assert clip.config.vision.heads == 2 and clip.config.vision.act == "quick_gelu"
  with open(os.path.join(os.path.dirname(src), "open_clip_config.json"), "w") as f:
    json.dump(cfg, f)
  _check_features(convert(src, str(tmp_path / "beside")), model, pixels, ids,
                  "head width 80 (open_clip_config.json)")
  msg = _expect_error_with(src, str(tmp_path / "o2"), "does not match preset 'ViT-H-14'",
                           preset="ViT-H-14")
  assert "width 160 (expected 1280)" in msg
  # OpenAI's own files (they carry input_resolution etc.) use QuickGELU: an open_clip GELU
  # preset is refused unless --act says so.
  with open(preset, "w") as f:
    json.dump({**cfg["model_cfg"], "quick_gelu": False}, f)
  _expect_error_with(src, str(tmp_path / "o3"), "QuickGELU", preset=preset)


def _expect_error_with(src, out, match, **kw):
  with pytest.raises(ProclipError, match=match) as e:
    convert(src, out, **kw)
  assert not os.path.exists(out)
  return str(e.value)


def test_head_count_rules_at_real_sizes():
  """The rules on the shapes of real models (no weights needed): OpenAI's sizes are known,
  open_clip's ViT-H/g/bigG image towers are refused with their preset named, and the preset
  gives 16 heads of 80 / 88 / 104."""
  from proclip_jax.convert.openclip_arch import (OPEN_CLIP_MODELS, arch_from_open_clip,  # pylint: disable=import-outside-toplevel
                                                 tower_heads)
  b16 = TowerArch(width=768, layers=12, patch_size=16, image_size=224, mlp_dim=3072)
  assert tower_heads("vision", Arch(), b16, "B/16") == 12
  assert tower_heads("text", Arch(), TowerArch(width=768, layers=12), "L/14 text") == 12
  for name, width, layers, mlp in (("ViT-H-14", 1280, 32, 5120), ("ViT-g-14", 1408, 40, 6144),
                                   ("ViT-bigG-14", 1664, 48, 8192)):
    shapes = TowerArch(width=width, layers=layers, patch_size=14, image_size=224, mlp_dim=mlp)
    with pytest.raises(ProclipError, match=f"--preset {name}"):
      tower_heads("vision", Arch(), shapes, name)
    arch = arch_from_open_clip(OPEN_CLIP_MODELS[name], name)
    assert tower_heads("vision", arch, shapes, name) == 16
    assert arch.act == "gelu"
  with pytest.raises(ProclipError, match="not a multiple of 64"):
    tower_heads("vision", Arch(), TowerArch(width=96, layers=2, patch_size=4, image_size=8), "x")
  assert arch_from_open_clip(OPEN_CLIP_MODELS["ViT-B/16"], "b").act == "quick_gelu"


# ------------------------------------------------------ release files as saved (issue #23)

def test_training_checkpoint_files(tmp_path):
  """open_clip's epoch_N.pt (DDP "module." keys, optimizer state) and DeepSpeed's model states
  convert as saved: the optimizer is ignored, every weight consumed."""
  model = make_openai_clip(seed=13, **OPENAI_DIMS)
  sd = model.state_dict()
  moments = {i: {"step": torch.tensor(7.0), "exp_avg": torch.randn(v.shape),
                 "exp_avg_sq": torch.rand(v.shape)} for i, v in enumerate(sd.values())}
  epoch = str(tmp_path / "epoch_3.pt")
  torch.save({"epoch": 3, "name": "run-1", "state_dict": {"module." + k: v for k, v in sd.items()},
              "optimizer": {"state": moments, "param_groups": [{"lr": 1e-4, "params": [0]}]}},
             epoch)
  deepspeed = str(tmp_path / "mp_rank_00_model_states.pt")
  torch.save({"module": dict(sd), "optimizer": None, "global_steps": 5, "ds_version": "0.14.0",
              "buffer_names": ["input_resolution"], "dp_world_size": 8}, deepspeed)
  pixels, ids = _openai_inputs(3)
  for src in (epoch, deepspeed):
    out = convert(src, str(tmp_path / (os.path.basename(src) + ".out")), vision_heads=2,
                  text_heads=1)
    _check_features(out, model, pixels, ids, os.path.basename(src))
  # Tensors outside the weights and the training state are not dropped silently.
  other = str(tmp_path / "other.pt")
  torch.save({"state_dict": dict(sd), "ema": {"visual.proj": torch.zeros(2)}}, other)
  _expect_error(other, str(tmp_path / "o_other"), "Cannot tell what")


def test_non_finite_and_integer_weights_are_refused(tmp_path):
  model = make_openai_clip(seed=17, **OPENAI_DIMS)
  sd = {k: v.contiguous().numpy().copy() for k, v in model.state_dict().items()}
  nan = dict(sd)
  nan["visual.ln_post.weight"] = sd["visual.ln_post.weight"].copy()
  nan["visual.ln_post.weight"][3] = np.inf
  path = str(tmp_path / "nan.safetensors")
  save_file(nan, path)
  with pytest.raises(ProclipError, match="non-finite") as e:
    convert(path, str(tmp_path / "o1"), vision_heads=2, text_heads=1)
  assert "visual/ln_post/scale" in str(e.value) and len(str(e.value).splitlines()) == 1
  assert not os.path.exists(tmp_path / "o1")
  ints = dict(sd, text_projection=np.ones(sd["text_projection"].shape, np.int32))
  path = str(tmp_path / "int.safetensors")
  save_file(ints, path)
  with pytest.raises(ProclipError, match="text/text_projection is int32, not floating point"):
    convert(path, str(tmp_path / "o2"), vision_heads=2, text_heads=1)
  assert not os.path.exists(tmp_path / "o2")
