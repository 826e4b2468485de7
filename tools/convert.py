"""Convert a checkpoint: ``python tools/convert.py SRC OUT [--lora DIR] [--preset NAME] ...``.

SRC: a Hugging Face folder (CLIP, Llama, Qwen3, BERT, ...), an OpenAI / open_clip CLIP
state dict or a ProCLIP checkpoint. OUT: a folder with an Orbax checkpoint and model.json,
loaded with ``proclip_jax.load_clip(OUT)`` / ``load_embedder(OUT)`` / ``ProCLIP.load(OUT)``.
Prints one summary line; a user error prints its message and exits with status 2.
"""
import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from proclip_jax.convert.api import convert, summary  # noqa: E402
from proclip_jax.errors import ProclipError  # noqa: E402


def main(argv=None):
  parser = argparse.ArgumentParser(prog="convert.py", description=__doc__.split("\n")[0])
  parser.add_argument("src", help="checkpoint file or Hugging Face folder")
  parser.add_argument("out", help="output folder (Orbax params + model.json)")
  parser.add_argument("--lora", help="PEFT adapter folder to merge (embedders)")
  parser.add_argument("--preset", help="embedder preset name; for an OpenAI-layout CLIP / "
                      "ProCLIP checkpoint an open_clip model name (ViT-H-14) or config JSON")
  parser.add_argument("--vision-heads", type=int,
                      help="image-tower attention heads of an OpenAI-layout checkpoint")
  parser.add_argument("--text-heads", type=int,
                      help="text-tower attention heads of an OpenAI-layout checkpoint")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
  parser.add_argument("--scan-layers", action="store_true",
                      help="store CLIP blocks stacked for nn.scan")
  parser.add_argument("--act", choices=("quick_gelu", "gelu", "gelu_tanh"),
                      help="activation of an OpenAI-layout CLIP (default: the preset's, else "
                      "quick_gelu)")
  args = parser.parse_args(argv)
  try:
    out = convert(args.src, args.out, lora=args.lora, preset=args.preset,
                  overwrite=args.overwrite, scan_layers=args.scan_layers, act=args.act,
                  vision_heads=args.vision_heads, text_heads=args.text_heads)
    print(summary(out))
  except ProclipError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
