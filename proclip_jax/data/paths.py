"""Path strings that may be local paths or URIs (``gs://bucket/...``), read through epath.

The data modules keep paths as strings (they appear in reports and manifests) and open them
with ``etils.epath``; ``is_local`` and ``absolute`` are the two things ``os.path`` gets wrong
for a URI. ``check_output_apart`` keeps a tool's output folder away from its inputs.
"""
import os

from proclip_jax.errors import ProclipError


def is_local(path) -> bool:
  """Whether ``path`` names the local file system (a URI such as ``gs://b/x`` does not)."""
  return "://" not in os.fspath(path)


def absolute(path) -> str:
  """``path`` as an absolute path string; a URI is absolute already and kept as given."""
  path = os.fspath(path)
  return os.path.abspath(path) if is_local(path) else path


def _resolved(path) -> str:
  """``path`` with symlinks resolved (local) or without a trailing slash (URI)."""
  path = os.fspath(path)
  return os.path.realpath(os.path.expanduser(path)) if is_local(path) else path.rstrip("/")


def _within(path: str, folder: str) -> bool:
  """Whether resolved ``path`` is ``folder`` or lies inside it."""
  return path == folder or path.startswith(folder.rstrip("/") + "/")


def check_output_apart(out, inputs=(), roots=()) -> None:
  """Refuses an output folder that would overwrite or delete what a tool reads.

  Called by the tools that write a folder (``--overwrite`` deletes it) before anything is
  deleted or written: the dataset builder, precompute and the converter.

  Args:
    out: the output folder.
    inputs: ``(what, path)`` pairs (files or folders read): ``out`` must not be one, contain
      one or lie inside one.
    roots: ``(what, folder)`` pairs that ``out`` may lie inside but must not be or contain
      (a manifest's folder, the folders of its images).

  Raises:
    ProclipError: naming the input and the output.
  """
  o = _resolved(out)
  for what, path, inside_too in ([(w, p, True) for w, p in inputs] +
                                 [(w, p, False) for w, p in roots]):
    if path is None:
      continue
    r = _resolved(path)
    if o == r:
      how = "is"
    elif _within(r, o):
      how = "contains"
    elif inside_too and _within(o, r):
      how = "lies inside"
    else:
      continue
    raise ProclipError(f"The output {os.fspath(out)} {how} the {what} {os.fspath(path)}"
                       f"{f' ({r})' if r != os.fspath(path) else ''}: an output there would delete "
                       "(--overwrite replaces it), overwrite or mix with that input. Choose an "
                       "output folder apart from the inputs.")
