"""Kopf handlers; importing this package registers them (sft_operator.main does)."""

from . import handle_lifecycle, handle_watches  # noqa: F401  (registration)
