"""Log hygiene for the command-line entry points."""

import logging as std_logging
import re

from absl import logging

# Libraries whose INFO records (one per checkpoint file rename, thread hand-off, ...)
# bury the training progress; their warnings and errors still show.
_CHATTY_LIBRARIES = ("/orbax/",)
# Orbax warnings that describe our own settings and ask nothing of the user: opening a
# checkpoint directory read-only (eval, predict), and saves without validation metrics
# (periodic checkpoints between evaluations).
_EXPECTED_WARNINGS = re.compile(
    r"Given directory is read only|read_only=True, setting save_interval_steps"
    r"|Requested `tracked_metric`; did not provide metrics")


# JAX tries every platform it knows and says so at INFO when one is absent ("Unable to
# initialize backend 'tpu': ... libtpu.so" on every CPU command); the backend it did
# start opens every run's log (train_lib.start_backend).
_ABSENT_BACKEND = re.compile(r"^Unable to initialize backend '")


class _DropLibraryInfo(std_logging.Filter):

  def filter(self, record: std_logging.LogRecord) -> bool:
    if (record.levelno < std_logging.WARNING and "xla_bridge" in record.pathname
        and _ABSENT_BACKEND.match(record.getMessage())):
      return False
    ours = not any(part in record.pathname for part in _CHATTY_LIBRARIES)
    if ours or record.levelno >= std_logging.ERROR:
      return True
    if record.levelno >= std_logging.WARNING:
      return not _EXPECTED_WARNINGS.search(record.getMessage())
    return False


def quiet_library_logs() -> None:
  """Keeps only warnings and errors of chatty libraries in the absl log (less the
  warnings that are expected)."""
  # The absl handler (absl apps) and the absl logger (also outside absl apps, e.g.
  # launch.ablate reading checkpoints, where records go to Python's default handler).
  for target in (logging.get_absl_handler(), std_logging.getLogger("absl")):
    if not any(isinstance(f, _DropLibraryInfo) for f in target.filters):
      target.addFilter(_DropLibraryInfo())
