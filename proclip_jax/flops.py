"""Model FLOP counts: the matmul FLOPs of the towers, the adapter and one train step.

Used by the benchmarks (FLOP/s and MFU) and by the ahead-of-time compile report
(``proclip_jax.train.aot``), which compares them with XLA's own cost analysis.
"""
from __future__ import annotations


def _mm(m: int, k: int, n: int) -> int:
  """FLOPs of an ``[m, k] @ [k, n]`` product."""
  return 2 * m * k * n


def encoder_layer_flops(tokens: int, width: int, mlp: int) -> int:
  """One pre-LN transformer block over ``tokens`` tokens (per sequence).

  q, k, v and output projections (``4·T·w²`` MACs), the attention logits and the
  probabilities times values (``2·T²·w`` MACs; a causal mask is computed in full, as the
  models do), and the two MLP products (``2·T·w·mlp`` MACs).
  """
  return (4 * _mm(tokens, width, width) + 2 * _mm(tokens, width, tokens)
          + _mm(tokens, width, mlp) + _mm(tokens, mlp, width))


def vit_forward_flops(cfg, batch: int = 1) -> int:
  """Matmul FLOPs of a ViT image tower forward (a ``VisionConfig``) on ``batch`` images.

  Patch embedding (``g²`` patches of ``p·p·3`` values to ``width``), ``layers`` blocks over
  ``g² + 1`` tokens, and the class token's projection to ``embed_dim`` (if any).
  """
  g = cfg.image_size // cfg.patch_size
  tokens = g * g + 1
  mlp = cfg.mlp_dim or 4 * cfg.width
  per_image = (_mm(g * g, cfg.patch_size ** 2 * 3, cfg.width)
               + cfg.layers * encoder_layer_flops(tokens, cfg.width, mlp))
  if cfg.embed_dim is not None:
    per_image += _mm(1, cfg.width, cfg.embed_dim)
  return batch * per_image


def text_forward_flops(*, width: int, layers: int, mlp: int, context: int,
                       embed_dim: int | None, batch: int = 1) -> int:
  """Matmul FLOPs of a CLIP text tower forward (token embedding is a gather: 0 FLOPs)."""
  per_text = layers * encoder_layer_flops(context, width, mlp)
  if embed_dim is not None:
    per_text += _mm(1, width, embed_dim)
  return batch * per_text


def adapter_forward_flops(cfg, batch: int = 1) -> int:
  """Matmul FLOPs of a TextProj forward (an ``AdapterConfig``) on ``batch`` features."""
  hidden = cfg.expansion * cfg.in_dim
  per_row = cfg.n_blocks * (_mm(1, cfg.in_dim, hidden) + _mm(1, hidden, cfg.in_dim))
  per_row += _mm(1, cfg.in_dim, cfg.out_dim)
  return batch * per_row


def stage1_step_flops(adapter_cfg, batch: int, fields: int = 2) -> int:
  """Stage 1 (JAX): the adapter trained on ``fields`` caption fields, 3× forward each."""
  return 3 * fields * adapter_forward_flops(adapter_cfg, batch)


def stage2_step_flops(vision_cfg, adapter_cfg, batch: int, *, teacher: bool = True) -> dict:
  """Stage 2: image tower and adapter trained (3× forward), EMA teacher forward (1×).

  Returns ``{"total", "vision", "adapter", "teacher"}``; the losses' ``B×B`` products are
  negligible and left out.
  """
  vis = 3 * vit_forward_flops(vision_cfg, batch)
  ad = 3 * adapter_forward_flops(adapter_cfg, batch)
  te = vit_forward_flops(vision_cfg, batch) if teacher else 0
  return {"total": vis + ad + te, "vision": vis, "adapter": ad, "teacher": te}
