"""SFT Operator: the Kopf operator and the `sftctl` CLI for SFTJob resources (never imports torch)."""

__version__ = "0.1.0"

GROUP = "sft.dev"
VERSION = "v1alpha1"
KIND = "SFTJob"
PLURAL = "sftjobs"
SINGULAR = "sftjob"
SHORT_NAME = "sft"
API_VERSION = f"{GROUP}/{VERSION}"
