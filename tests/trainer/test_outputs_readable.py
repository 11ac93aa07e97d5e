"""Saved models are readable by every user: a model on a volume is read by another UID (a trainer
pod, UID 1000, reading assets written by root; the host's user reading what a pod wrote), and
safetensors alone writes model.safetensors with mode 0600."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

pytestmark = pytest.mark.trainer


def unreadable_by_others(folder: Path) -> list[str]:
    """Paths under ``folder`` another user could not read (files) or enter (folders)."""
    need = lambda p: stat.S_IROTH | (stat.S_IXOTH if p.is_dir() else 0)  # noqa: E731
    return [f"{p.relative_to(folder)} {oct(p.stat().st_mode & 0o777)}"
            for p in [folder, *folder.rglob("*")] if p.stat().st_mode & need(p) != need(p)]


def test_tiny_assets_are_readable_by_every_user(tiny):
    assert (tiny / "model" / "model.safetensors").exists()
    assert unreadable_by_others(tiny) == []


def test_a_saved_model_is_readable_by_every_user(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft_trainer.outputs import save_model

    model = AutoModelForCausalLM.from_pretrained(tiny / "model")
    tokenizer = AutoTokenizer.from_pretrained(tiny / "model")
    out = save_model(model, tokenizer, tmp_path / "run" / "model")
    assert list(out.glob("*.safetensors"))
    assert unreadable_by_others(out) == []


def test_the_architecture_matrix_models_are_readable_by_every_user(tmp_path):
    from sft_trainer import architectures

    out = architectures.build(architectures.FAMILIES["llama"], tmp_path / "llama")
    assert list(out.glob("*.safetensors"))
    assert unreadable_by_others(out) == []
