"""The SFTJob API: its group, version and names; the types (``types``) and the CRD generated from them (``crd``)."""

GROUP = "sft.dev"
VERSION = "v1alpha1"
KIND = "SFTJob"
PLURAL = "sftjobs"
SINGULAR = "sftjob"
SHORT_NAME = "sft"
API_VERSION = f"{GROUP}/{VERSION}"
