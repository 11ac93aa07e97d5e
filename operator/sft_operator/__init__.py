"""SFT Operator: the Kopf operator and the `sftctl` CLI for SFTJob resources (never imports torch)."""

__version__ = "0.1.0"
