"""What every absl command-line entry point (train, eval, predict) does first."""

from absl import app

from bihier_jax.common import host


def start(argv) -> None:
  """Refuses stray arguments, tunes the host allocator, quiets chatty library logs.

  Call it first in `main(argv)`, before importing anything that runs JAX or TensorFlow:
  the allocator settings only reach threads created after them (bihier_jax.common.host).
  """
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  host.tune_malloc()
  from bihier_jax.training import logs  # pylint: disable=g-import-not-at-top
  logs.quiet_library_logs()
