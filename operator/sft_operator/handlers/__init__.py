"""Kopf handlers; importing this package registers them (sft_operator.main does)."""

from . import handle_children, handle_lifecycle, handle_reconcile  # noqa: F401  (registration)
