"""SFT trainer: supervised fine-tuning of causal language models from an SFTJob's training spec.

Only the standard library and pydantic are imported here, so the operator can import
``sft_contract.spec`` and ``sft_contract.exit_codes`` without torch.
"""

__version__ = "0.1.0"
