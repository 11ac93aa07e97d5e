"""Tiny random-weight models of the architectures people fine-tune, built offline from transformers'
config classes, each with a tokenizer shaped like its family's (special tokens, BOS/EOS/pad choices and a
chat template in the family's format, written here; GPT-NeoX has none).

``python -m sft_trainer.architectures OUT_DIR [NAME...]`` writes ``OUT_DIR/<name>/`` (model + tokenizer).
The architecture-matrix test and the memory benchmark use them; they exercise what the tiny Llama does
not: tied embeddings, pad = EOS or no pad at all, sliding-window attention, logit soft-capping, fused
qkv / gate-up projections, q/k norms, GPT-NeoX's naming, chat templates that reject bad role orders.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .outputs import readable_by_all

# Written for this project in each family's format (not copies of the published templates).
LLAMA2_CHAT = (
    "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}{% set msgs = messages[1:] %}"
    "{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
    "{% for m in msgs %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if m['role'] == 'user' %}{{ bos_token }}[INST] {% if loop.first and sys %}<<SYS>>\n{{ sys }}\n<</SYS>>\n\n{% endif %}"
    "{{ m['content'] }} [/INST]{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}"
)
LLAMA3_CHAT = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MISTRAL_CHAT = (
    "{{ bos_token }}{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)
GEMMA_CHAT = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
PHI3_CHAT = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}"
)
OLMO2_CHAT = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class Family:
    name: str
    config_class: str
    config: dict[str, Any]
    specials: dict[str, str | None]  # bos / eos / pad (None: the family has none)
    extra_specials: tuple[str, ...] = ()
    add_bos: bool = False  # the tokenizer prepends BOS to plain text
    chat_template: str | None = None
    notes: str = ""
    tied: bool = False


SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512)

FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("llama", "LlamaConfig", {**SMALL, "tie_word_embeddings": False},
           {"bos": "<s>", "eos": "</s>", "pad": None}, add_bos=True, chat_template=LLAMA2_CHAT,
           notes="Llama 2: untied, no pad token, [INST] template that raises on non-alternating roles"),
    Family("llama-tied", "LlamaConfig", {**SMALL, "tie_word_embeddings": True},
           {"bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "pad": None},
           ("<|start_header_id|>", "<|end_header_id|>"), add_bos=True, chat_template=LLAMA3_CHAT,
           notes="Llama 3.2 1B/3B style: tied embeddings, header template", tied=True),
    Family("qwen2", "Qwen2Config", {**SMALL, "tie_word_embeddings": True},
           {"bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>"}, ("<|im_start|>",), chat_template=CHATML,
           notes="Qwen2.5 0.5B-3B style: tied, qkv bias, ChatML", tied=True),
    Family("qwen3", "Qwen3Config", {**SMALL, "head_dim": 16, "tie_word_embeddings": True},
           {"bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>"}, ("<|im_start|>",), chat_template=CHATML,
           notes="Qwen3: q/k norms, explicit head_dim, tied", tied=True),
    Family("mistral", "MistralConfig", {**SMALL, "sliding_window": 16, "tie_word_embeddings": False},
           {"bos": "<s>", "eos": "</s>", "pad": None}, add_bos=True, chat_template=MISTRAL_CHAT,
           notes="Mistral: sliding-window attention (16 tokens here), strict [INST] template"),
    Family("gemma2", "Gemma2Config", {**SMALL, "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 16,
                                      "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0,
                                      "tie_word_embeddings": True},
           {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>"}, ("<start_of_turn>", "<end_of_turn>"), add_bos=True,
           chat_template=GEMMA_CHAT, notes="Gemma 2: tied, attention and final logit soft-capping, sliding window",
           tied=True),
    Family("phi3", "Phi3Config", {**SMALL, "tie_word_embeddings": False},
           {"bos": "<s>", "eos": "<|endoftext|>", "pad": "<|endoftext|>"}, ("<|user|>", "<|assistant|>", "<|end|>",
                                                                           "<|system|>"),
           chat_template=PHI3_CHAT, notes="Phi-3: fused qkv and gate_up projections, pad = EOS"),
    Family("gpt-neox", "GPTNeoXConfig", {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
                                         "num_attention_heads": 4, "max_position_embeddings": 512,
                                         "tie_word_embeddings": False},
           {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "pad": None},
           notes="GPT-NeoX (Pythia): other module names, parallel residual, no chat template"),
    Family("olmo2", "Olmo2Config", {**SMALL, "tie_word_embeddings": False},
           {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "pad": "<|pad|>"}, ("<|user|>", "<|assistant|>",
                                                                              "<|system|>"),
           chat_template=OLMO2_CHAT, notes="OLMo 2: post-norms, q/k norms"),
]}


def _base_tokenizer(vocab_size: int = 384):
    """One byte-level BPE trained on the tiny assets' text generator (seeded: the same every time)."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from .tiny import general_row, task_row

    rng = random.Random(7)
    texts = [" ".join(task_row(rng).values()) for _ in range(400)] + [general_row(rng)["text"] for _ in range(200)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def tokenizer_for(family: Family, base=None):
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str((base or _base_tokenizer()).to_str())
    named = [t for t in family.specials.values() if t]
    tok.add_special_tokens(list(dict.fromkeys(named + list(family.extra_specials))))
    bos = family.specials["bos"]
    if family.add_bos and bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=family.specials["eos"],
                                   pad_token=family.specials["pad"])
    if family.chat_template:
        fast.chat_template = family.chat_template
    return fast


def build(family: Family, out: Path, base_tokenizer=None, seed: int = 0) -> Path:
    """Write ``family``'s tiny model and tokenizer into ``out``."""
    import torch
    import transformers

    tokenizer = tokenizer_for(family, base_tokenizer)
    ids = {f"{k}_token_id": tokenizer.convert_tokens_to_ids(v) if v else None for k, v in family.specials.items()}
    config = getattr(transformers, family.config_class)(vocab_size=len(tokenizer), **family.config, **ids)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "family.json").write_text(json.dumps({"name": family.name, "notes": family.notes}) + "\n")
    readable_by_all(out)  # like the tiny assets: a pod of another user may read them from a volume
    return out


def build_all(out_dir: Path, names: list[str] | None = None) -> dict[str, Path]:
    base = _base_tokenizer()
    return {n: build(FAMILIES[n], out_dir / n, base) for n in (names or list(FAMILIES))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sft_trainer.architectures", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("names", nargs="*", help=f"some of {', '.join(FAMILIES)} (default: all)")
    args = p.parse_args(argv)
    unknown = set(args.names) - set(FAMILIES)
    if unknown:
        p.error(f"unknown: {', '.join(sorted(unknown))}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name, path in build_all(Path(args.out_dir), args.names or None).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
