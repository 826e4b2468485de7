"""A PyTorch CLIP with OpenAI's parameter names (``visual.conv1.weight``, ``visual.transformer.
resblocks.N.attn.in_proj_weight``, ``token_embedding.weight``, ...), the reference of the
OpenAI / open_clip layout tests: written here from the published architecture (pre-LN
residual blocks with ``nn.MultiheadAttention``, class token, ``ln_post(x[:, 0]) @ proj``; text
pooled at ``argmax(ids)``, causal mask), independent of the converter.

The module can be traced (``torch.jit.trace``) as OpenAI's released ``.pt`` archives were:
the causal mask is a plain attribute (a traced constant), and ``input_resolution`` /
``context_length`` / ``vocab_size`` are buffers, as in those archives' state dicts.
"""
import torch
from torch import nn


class QuickGELU(nn.Module):
  def forward(self, x):
    return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
  def __init__(self, width, heads, mlp, act, attn_mask=None):
    super().__init__()
    self.attn = nn.MultiheadAttention(width, heads)
    self.ln_1 = nn.LayerNorm(width)
    self.mlp = nn.Sequential()
    self.mlp.add_module("c_fc", nn.Linear(width, mlp))
    self.mlp.add_module("act", QuickGELU() if act == "quick_gelu" else nn.GELU())
    self.mlp.add_module("c_proj", nn.Linear(mlp, width))
    self.ln_2 = nn.LayerNorm(width)
    self.attn_mask = attn_mask

  def forward(self, x):  # x: [L, N, D]
    y = self.ln_1(x)
    x = x + self.attn(y, y, y, need_weights=False, attn_mask=self.attn_mask)[0]
    return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
  def __init__(self, width, layers, heads, mlp, act, attn_mask=None):
    super().__init__()
    self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, mlp, act, attn_mask)
                                     for _ in range(layers)])

  def forward(self, x):
    return self.resblocks(x)


class VisionTransformer(nn.Module):
  def __init__(self, image, patch, width, layers, heads, mlp, embed, act):
    super().__init__()
    self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
    grid = image // patch
    self.class_embedding = nn.Parameter(0.1 * torch.randn(width))
    self.positional_embedding = nn.Parameter(0.1 * torch.randn(grid * grid + 1, width))
    self.ln_pre = nn.LayerNorm(width)
    self.transformer = Transformer(width, layers, heads, mlp, act)
    self.ln_post = nn.LayerNorm(width)
    self.proj = nn.Parameter(0.1 * torch.randn(width, embed))

  def forward(self, x):  # NCHW
    x = self.conv1(x).flatten(2).permute(0, 2, 1)
    cls = self.class_embedding.expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], 1) + self.positional_embedding
    x = self.transformer(self.ln_pre(x).permute(1, 0, 2)).permute(1, 0, 2)
    return self.ln_post(x[:, 0]) @ self.proj


class OpenAICLIP(nn.Module):
  """Both towers; ``forward(pixels NCHW, ids)`` -> unnormalised (image, text) features."""

  def __init__(self, *, image=30, patch=6, vision_width=128, vision_layers=2, vision_heads=2,
               vision_mlp=None, text_width=64, text_layers=2, text_heads=1, text_mlp=None,
               context=16, vocab=99, embed=24, act="quick_gelu"):
    super().__init__()
    self.visual = VisionTransformer(image, patch, vision_width, vision_layers, vision_heads,
                                    vision_mlp or 4 * vision_width, embed, act)
    mask = torch.full((context, context), float("-inf")).triu_(1)
    self.transformer = Transformer(text_width, text_layers, text_heads,
                                   text_mlp or 4 * text_width, act, mask)
    self.token_embedding = nn.Embedding(vocab, text_width)
    self.positional_embedding = nn.Parameter(0.1 * torch.randn(context, text_width))
    self.ln_final = nn.LayerNorm(text_width)
    self.text_projection = nn.Parameter(0.1 * torch.randn(text_width, embed))
    self.logit_scale = nn.Parameter(torch.tensor(2.5))
    for name, value in (("input_resolution", image), ("context_length", context),
                        ("vocab_size", vocab)):
      self.register_buffer(name, torch.tensor(value))

  def encode_text(self, ids):
    x = self.token_embedding(ids) + self.positional_embedding
    x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
    x = self.ln_final(x)
    return x[torch.arange(x.shape[0]), ids.argmax(-1)] @ self.text_projection

  def forward(self, pixels, ids):
    return self.visual(pixels), self.encode_text(ids)


def make_openai_clip(seed=0, **kw):
  """A random OpenAI-layout CLIP with LayerNorms and biases perturbed too, in eval mode."""
  torch.manual_seed(seed)
  model = OpenAICLIP(**kw)
  g = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.02 * torch.randn(p.shape, generator=g))
  return model.eval()


def features(model, pixels, ids):
  """Unit-norm (image, text) features for NHWC numpy pixels and numpy ids."""
  with torch.no_grad():
    img, txt = model(torch.tensor(pixels.transpose(0, 3, 1, 2)), torch.tensor(ids))
  img = img / img.norm(dim=-1, keepdim=True)
  txt = txt / txt.norm(dim=-1, keepdim=True)
  return img.numpy(), txt.numpy()
