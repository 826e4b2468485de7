"""The one exception type for user mistakes: a missing file, a wrong key, a bad value.

Its message names the thing, where it was expected and what to do about it. Library code
raises it instead of ``assert`` on anything a user controls.
"""


class ProclipError(Exception):
  """A user-facing error: the message says what is wrong and how to fix it."""
