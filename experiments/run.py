"""Trains ProCLIP: ``python experiments/run.py --config NAME.py[:ARGS] --workdir DIR``.

::

    python experiments/run.py --config stage1.py:size=B/16,root=/data/proclip \\
        --workdir /ckpt/stage1_b16 --config.total_steps=2000 --config.optim.lr=2e-4

* ``--config``: a config file (``get_config(arg)`` returning an ml_collections ConfigDict);
  a bare name such as ``stage1.py`` is looked up in ``experiments/configs/``; the text after
  ``:`` is its argument string (see ``experiments/configs/common.py``).
* ``--config.a.b=VALUE`` (or ``--config.a.b VALUE``): overrides any field. The value is
  parsed as the field's current type (int, float, bool, str; tuples and lists as Python
  literals or ``a;b``; ``None`` fields take a literal or a string).
  ``--config.evals.NAME.FIELD=VALUE`` adds a periodic evaluation (e.g.
  ``--config.evals.imagenet.every=1000``; fields in docs/evaluation.md).
* ``--workdir``: checkpoints, metrics.jsonl, TensorBoard files. A workdir that holds a
  checkpoint is resumed.
* ``--print-config``: print the config and exit (stages 1 and 2: with the model shapes read
  from the caches / converted CLIP it names, when they exist; train/run_config.py).
* ``config.stage``: 1 or 2 runs :func:`proclip_jax.train.loop.train`; ``"demo"`` (the demo
  config) runs :func:`experiments.demo.run_demo`, whose workdir has a default.
* ``--host-malloc``: glibc heap settings for XLA:CPU's per-step temporaries (the same as
  ``PROCLIP_HOST_MALLOC=1``; applied only on the CPU backend, see ``experiments/hostmem.py``).

A multi-host TPU slice runs the same command on every worker: ``jax.distributed`` is
initialised when the environment (or ``config.distributed="on"``) says so. A user mistake
(bad field, missing file) prints one line and exits with status 2; SIGTERM saves a
checkpoint and exits 0.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

from proclip_jax.errors import ProclipError

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def resolve_config_path(spec: str) -> tuple[str, str | None]:
  """``"stage1.py:size=L/14"`` -> (absolute file, "size=L/14"); bare names from configs/."""
  path, sep, arg = spec.partition(":")
  candidates = [path]
  if not os.path.isabs(path):
    candidates.append(os.path.join(CONFIG_DIR, path))
    if not path.endswith(".py"):
      candidates.append(os.path.join(CONFIG_DIR, path + ".py"))
  for c in candidates:
    if os.path.isfile(c):
      return os.path.abspath(c), (arg if sep else None)
  known = sorted(f for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and f != "common.py")
  raise ProclipError(f"Config file {path!r} not found (looked in the current folder and "
                     f"{CONFIG_DIR}); known configs: {', '.join(known)}.")


def load_config(spec: str):
  """Imports the config file and returns ``get_config(arg)``."""
  path, arg = resolve_config_path(spec)
  name = "proclip_config_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ProclipError(f"Config file {path} has no get_config(arg) function.")
  return module.get_config(arg)


def _parse_value(text: str, current, field: str):
  import ml_collections  # pylint: disable=import-outside-toplevel
  from experiments.configs.common import parse_value  # pylint: disable=import-outside-toplevel
  if isinstance(current, ml_collections.ConfigDict):
    raise ProclipError(f"--config.{field} is a group of fields "
                       f"({', '.join(sorted(current.keys())) or 'empty'}); set its fields "
                       f"one by one (--config.{field}.NAME=VALUE).")
  try:
    return parse_value(text, current)
  except (ValueError, SyntaxError):
    raise ProclipError(f"--config.{field}={text!r}: expected a value of type "
                       f"{type(current).__name__} (now {current!r}).") from None


def apply_override(config, field: str, text: str) -> None:
  """Sets ``config.<field>`` (dotted) from a command-line string, type-checked."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  parts = field.split(".")
  if len(parts) == 3 and parts[0] == "evals":  # a periodic evaluation: may add NAME / FIELD
    from proclip_jax.eval.evaluators import add_trainer_setting  # pylint: disable=import-outside-toplevel
    add_trainer_setting(config, parts[1], parts[2])
  node = config
  for i, name in enumerate(parts[:-1]):
    if not isinstance(node, ml_collections.ConfigDict) or name not in node:
      where = ".".join(parts[:i]) or "config"
      known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      raise ProclipError(f"--config.{field}: {where} has no field {name!r}; it has "
                         f"{', '.join(known) or 'no subfields'}.")
    node = node[name]
  last = parts[-1]
  if not isinstance(node, ml_collections.ConfigDict) or last not in node:
    where = ".".join(["config"] + parts[:-1])
    known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
    raise ProclipError(f"--config.{field}: unknown field; {where} has "
                       f"{', '.join(known) or 'no fields'}.")
  value = _parse_value(text, node[last], field)
  try:
    node[last] = value
  except (TypeError, ValueError) as e:
    raise ProclipError(f"--config.{field}={text!r}: {e}") from None


def split_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
  """``(other_args, overrides)``: the ``--config.a.b=VALUE`` pairs taken out of ``argv``."""
  rest, overrides = [], []
  i = 0
  while i < len(argv):
    a = argv[i]
    if a.startswith("--config."):
      key, eq, text = a[len("--config."):].partition("=")
      if not eq:
        if i + 1 >= len(argv):
          raise ProclipError(f"{a} needs a value ({a}=VALUE).")
        i += 1
        text = argv[i]
      if not key:
        raise ProclipError(f"{a}: name a field, e.g. --config.total_steps=100.")
      overrides.append((key, text))
    else:
      rest.append(a)
    i += 1
  return rest, overrides


def parse_args(argv: list[str]):
  """``(args, overrides)``; overrides are ``[(dotted_field, text), ...]`` in order."""
  rest, overrides = split_overrides(argv)
  parser = argparse.ArgumentParser(
      prog="experiments/run.py", description=__doc__.split("\n")[0],
      epilog="Any config field: --config.a.b=VALUE.")
  parser.add_argument("--config", required=True, help="NAME.py[:ARGS] (see experiments/configs)")
  parser.add_argument("--workdir", default=None,
                      help="run folder (required for stage 1 / 2; the demo has a default)")
  parser.add_argument("--print-config", action="store_true", help="print the config and exit")
  parser.add_argument("--host-malloc", action="store_true",
                      help="on the CPU backend, restart once with glibc heap settings for "
                           "XLA:CPU (PROCLIP_HOST_MALLOC=1; experiments/hostmem.py)")
  return parser.parse_args(rest), overrides


def _compilation_cache(config) -> None:
  """Points JAX's persistent compilation cache at ``config.compilation_cache_dir``.

  A resumed or repeated run then loads its compiled steps. Not on XLA:CPU: there a stage-2
  step loaded from the cache deadlocks in its collectives on a multi-device mesh (jax
  0.10). A cache set already (``JAX_COMPILATION_CACHE_DIR``, or the caller) is kept.
  """
  import jax  # pylint: disable=import-outside-toplevel
  if (config.compilation_cache_dir and not jax.config.jax_compilation_cache_dir
      and jax.default_backend() != "cpu"):
    jax.config.update("jax_compilation_cache_dir",
                      os.path.expanduser(config.compilation_cache_dir))


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  try:
    args, overrides = parse_args(argv)
    config = load_config(args.config)
    for field, text in overrides:
      apply_override(config, field, text)
    config.lock()  # the library reads config.a.b; a misspelt field is an error, not a default
    if args.print_config:
      from proclip_jax.train.loop import config_to_dict  # pylint: disable=import-outside-toplevel
      if config.stage in (1, 2):  # with the shapes the files give, when they are there
        from proclip_jax.train.run_config import resolve_model  # pylint: disable=import-outside-toplevel
        try:
          config = resolve_model(config)
        except ProclipError as e:
          print(f"note: model shapes not resolved ({e})", file=sys.stderr)
      print(json.dumps(config_to_dict(config), indent=1))
      return 0
    import logging  # pylint: disable=import-outside-toplevel
    # Our own progress at INFO; libraries (Orbax, grain) only at WARNING and above.
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("proclip_jax").setLevel(logging.INFO)
    from proclip_jax.train import distributed, loop  # pylint: disable=import-outside-toplevel
    if config.stage == "demo":  # the end-to-end demo (experiments/configs/demo.py)
      from experiments.demo import run_demo  # pylint: disable=import-outside-toplevel
      _compilation_cache(config)
      result = run_demo(config, args.workdir or None)
    else:
      if not args.workdir:
        raise ProclipError("--workdir is required: the folder for checkpoints and metrics "
                           "(an existing one is resumed).")
      distributed.initialize_distributed(config)  # before anything touches the devices
      _compilation_cache(config)
      result = loop.train(config, args.workdir)
  except ProclipError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps({k: v for k, v in result.items()
                    if isinstance(v, (int, float, bool, str))}, sort_keys=True))
  return 0


if __name__ == "__main__":
  from experiments import hostmem
  if "--host-malloc" in sys.argv[1:]:
    os.environ[hostmem.ENV] = "1"
  hostmem.restart_with_tunables()  # opt-in, CPU backend only (experiments/hostmem.py)
  sys.exit(main())
