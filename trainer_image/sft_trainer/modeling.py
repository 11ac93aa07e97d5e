"""The model side of a run: precision, tokenizer and model loading, dropout, freezing, LoRA, gradient
checkpointing. Nothing here knows about the architecture by name: layers are found by their count,
linear modules by their type, so a model a user brings works the same as the ones tested.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch

from sft_contract.spec import Precision, TrainingSpec

from .errors import ConfigError
from .loading import load_or_fail as _load, load_tokenizer, model_location as _where  # noqa: F401 - train loads the tokenizer here


# ---------------------------------------------------------------- precision


@dataclass
class Amp:
    name: str  # "bf16", "fp16" or "fp32"
    autocast_dtype: torch.dtype | None
    scaler: Any = None

    def autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)


def resolve_precision(p: str, device: torch.device) -> Amp:
    """auto: bf16 where the GPU has it, else fp32 (always fp32 on CPU). Weights stay fp32 (master weights)."""
    if p == Precision.auto.value:
        p = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if p == "fp16":
        if device.type != "cuda":
            raise ConfigError("hyperparameters.precision: fp16 needs a CUDA GPU; use fp32 or bf16 (or auto)")
        return Amp("fp16", torch.float16, torch.amp.GradScaler("cuda"))
    if p == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("hyperparameters.precision: this GPU has no bf16; use fp16 (fp32 master weights) or fp32")
        return Amp("bf16", torch.bfloat16)
    return Amp("fp32", None)


def check_no_fp16_training(model, amp: Amp) -> None:
    """fp16 weights under fp16 mixed precision cannot be unscaled and lose updates: refuse them."""
    if amp.name == "fp16" and any(p.requires_grad and p.dtype == torch.float16 for p in model.parameters()):
        raise ConfigError("fp16 trainable weights with fp16 mixed precision are refused: keep fp32 master weights")


# ---------------------------------------------------------------- loading


def load_config(spec: TrainingSpec):
    """The model's config (config.json only: the memory check runs on it before any weight is loaded)."""
    from transformers import AutoConfig

    kw = {"revision": spec.model.revision, "token": os.environ.get("HF_TOKEN")}
    config = _load(f"cannot load the model config from {spec.model.source}",
                   lambda: AutoConfig.from_pretrained(_where(spec), **kw))
    if spec.hyperparameters.dropout is not None:
        override_dropout(config, spec.hyperparameters.dropout)
    return config


def attention_implementation(config, device: torch.device) -> str:
    """flash-attention 2 (varlen: exact packing isolation) on GPUs that have it, else sdpa; eager for an
    architecture that supports neither (e.g. Gemma 2's attention soft-capping). All three isolate packed rows."""
    from transformers import AutoModelForCausalLM

    cls = AutoModelForCausalLM._model_mapping.get(type(config), None)
    if device.type == "cuda" and getattr(cls, "_supports_flash_attn", False):
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa" if cls is None or getattr(cls, "_supports_sdpa", False) else "eager"


def load_model(spec: TrainingSpec, config, amp: Amp, device: torch.device):
    from transformers import AutoModelForCausalLM

    kw = {"revision": spec.model.revision, "token": os.environ.get("HF_TOKEN")}
    # Full fine-tuning keeps fp32 weights (master weights; autocast does bf16/fp16 compute).
    # LoRA trains fp32 adapters, so the frozen base may sit in the compute dtype and save memory.
    dtype = amp.autocast_dtype if (spec.peft is not None and amp.autocast_dtype is not None) else torch.float32
    return _load(
        f"cannot load the model from {spec.model.source}",
        lambda: AutoModelForCausalLM.from_pretrained(
            _where(spec), config=config, dtype=dtype, attn_implementation=attention_implementation(config, device), **kw
        ),
    )


def override_dropout(config, p: float) -> list[str]:
    """Set every dropout probability the model config declares (attention_dropout, hidden_dropout, *_pdrop...)."""
    changed = []
    for key, value in config.to_dict().items():
        if isinstance(value, float) and ("dropout" in key or key.endswith("_pdrop")) and not key.startswith("classifier"):
            setattr(config, key, p)
            changed.append(key)
    return changed


# ---------------------------------------------------------------- what trains


def decoder_layers(model) -> torch.nn.ModuleList:
    """The transformer blocks, whatever the architecture calls them."""
    n = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ConfigError("freezeLayers: cannot find this model's transformer layers")


def freeze(model, n_layers: int, embeddings: bool) -> None:
    layers = decoder_layers(model) if n_layers else []
    if n_layers > len(layers):
        raise ConfigError(f"freezeLayers: {n_layers} is more than the model's {len(layers)} layers")
    for layer in list(layers)[:n_layers]:
        layer.requires_grad_(False)
    if embeddings:
        model.get_input_embeddings().requires_grad_(False)


def linear_module_names(model) -> list[str]:
    """The short names of the model's linear layers (what peft.targetModules may name), LM head excluded."""
    out_emb = model.get_output_embeddings()
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and m is not out_emb}
    return sorted(names)


def add_lora(model, spec: TrainingSpec):
    """peft LoRA adapters; freezeLayers keeps adapters off the frozen layers (peft freezes the base)."""
    from peft import LoraConfig, get_peft_model

    lora = spec.peft
    targets = "all-linear" if lora.target_modules == ["all-linear"] else lora.target_modules
    n_layers = len(decoder_layers(model)) if spec.freeze_layers else 0
    available = linear_module_names(model)
    if targets != "all-linear":
        unknown = [t for t in targets if t not in available and not any(a.endswith(t) for a in available)]
        if unknown:
            raise ConfigError(
                f"peft.targetModules: {', '.join(unknown)} not in this model; its linear layers are "
                f"{', '.join(available)} (or use all-linear)"
            )
    cfg = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
        layers_to_transform=list(range(spec.freeze_layers, n_layers)) if spec.freeze_layers else None,
    )
    try:
        return get_peft_model(model, cfg)
    except ValueError as e:  # e.g. a target that names a non-linear module
        raise ConfigError(f"peft.targetModules: {e}") from None


def enable_gradient_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing (works with DDP, FSDP2, frozen inputs and LoRA)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def prepare_model(spec: TrainingSpec, config, tokenizer, amp: Amp, device: torch.device, pad_added: bool):
    """Load the model and make it ready to train: pad row, freezing, LoRA, checkpointing, device, precision."""
    model = load_model(spec, config, amp, device)
    if pad_added or model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.config.pad_token_id = tokenizer.pad_token_id
    freeze(model, spec.freeze_layers, spec.freeze_embeddings)
    if spec.peft is not None:
        model = add_lora(model, spec)
    if spec.hyperparameters.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.to(device)
    check_no_fp16_training(model, amp)
    return model
