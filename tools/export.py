"""Export a model for PyTorch: ``python tools/export.py SRC OUT --format openai|open_clip|hf|proclip``.

SRC: a converted CLIP, EVA02-CLIP, SigLIP or ProCLIP folder (tools/convert.py, ProCLIP.save) or
a training workdir (its latest checkpoint, or ``--step``). OUT: a ``.pt`` file (openai: a plain
OpenAI state dict; proclip: the ProCLIP release layout ``{"state_dict": ...}``) or a folder
(open_clip: open_clip_model.safetensors + open_clip_config.json; hf: a transformers folder).
By image tower: OpenAI ViT: all four formats; EVA02: open_clip (timm's visual.trunk.*) and
proclip (EVA-CLIP's visual.*); SigLIP: hf (SiglipVisionModel). A format with no layout for the
tower is refused, naming the ones that work. Prints one summary line; a user error prints its
message and exits with status 2.
"""
import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from proclip_jax.convert.export import export  # noqa: E402
from proclip_jax.errors import ProclipError  # noqa: E402


def main(argv=None):
  parser = argparse.ArgumentParser(prog="export.py", description=__doc__.split("\n")[0])
  parser.add_argument("src", help="converted model folder or training workdir")
  parser.add_argument("out", help="output .pt file (openai, proclip) or folder (open_clip, hf)")
  parser.add_argument("--format", required=True, choices=("openai", "open_clip", "hf", "proclip"),
                      help="openai, open_clip, hf, proclip (ProCLIP models); EVA02 towers: "
                      "open_clip or proclip; SigLIP towers: hf")
  parser.add_argument("--step", type=int, help="checkpoint step of a workdir (default: latest)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
  args = parser.parse_args(argv)
  try:
    print(export(args.src, args.out, args.format, step=args.step, overwrite=args.overwrite))
  except ProclipError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
