"""Path strings that may be local paths or URIs (``gs://bucket/...``), read through epath.

The data modules keep paths as strings (they appear in reports and manifests) and open them
with ``etils.epath``; these helpers are the two things ``os.path`` gets wrong for a URI.
"""
import os


def is_local(path) -> bool:
  """Whether ``path`` names the local file system (a URI such as ``gs://b/x`` does not)."""
  return "://" not in os.fspath(path)


def absolute(path) -> str:
  """``path`` as an absolute path string; a URI is absolute already and kept as given."""
  path = os.fspath(path)
  return os.path.abspath(path) if is_local(path) else path
