"""Log hygiene for the command-line entry points."""

import logging as std_logging

from absl import logging

# Libraries whose INFO records (one per checkpoint file rename, thread hand-off, ...)
# bury the training progress; their warnings and errors still show.
_CHATTY_LIBRARIES = ("/orbax/",)


class _DropLibraryInfo(std_logging.Filter):

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno >= std_logging.WARNING:
      return True
    return not any(part in record.pathname for part in _CHATTY_LIBRARIES)


def quiet_library_logs() -> None:
  """Keeps only warnings and errors of chatty libraries in the absl log."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _DropLibraryInfo) for f in handler.filters):
    handler.addFilter(_DropLibraryInfo())
