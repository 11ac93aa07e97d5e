"""The fused, chunked LM-head cross-entropy (sft_trainer.loss) is the unfused loss: the same summed loss and the
same gradient for every trainable parameter, on every architecture the trainer supports and every head
``loss.HEADS`` claims (tied embeddings, Gemma's soft-capping, Cohere's and Granite's scales, Phi's head bias),
with LoRA (the head frozen), with packing, in evaluation and under bf16 autocast; and it never allocates a
``[tokens x vocab]`` tensor. FSDP with the head sharded: test_fused_loss_fsdp.py."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.trainer

torch = pytest.importorskip("torch")

from sft_trainer import architectures, collate, loss, modeling, train  # noqa: E402
from sft_trainer.data import IGNORE, Example  # noqa: E402

VOCAB = 300
SMALL = architectures.SMALL
# Heads loss.HEADS claims beyond the architecture matrix, each with a tiny config. Soft-cap and scales are set
# where they bite: at random init the logits are small, and a soft-cap of 30 would be the identity.
EXTRA = {
    "gemma": ("GemmaConfig", {**SMALL, "head_dim": 16}),
    "gemma3_text": ("Gemma3TextConfig", {**SMALL, "head_dim": 16, "sliding_window": 16, "final_logit_softcapping": 0.5}),
    "cohere": ("CohereConfig", {**SMALL, "logit_scale": 4.0}),
    "granite": ("GraniteConfig", {**SMALL, "logits_scaling": 0.25}),
    "mixtral": ("MixtralConfig", {**SMALL, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": ("Qwen2MoeConfig", {**SMALL, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                     "shared_expert_intermediate_size": 32}),
    "qwen3_moe": ("Qwen3MoeConfig", {**SMALL, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                     "head_dim": 16}),
    "olmo": ("OlmoConfig", SMALL),
    "starcoder2": ("Starcoder2Config", SMALL),
    "phi": ("PhiConfig", SMALL),  # the one head with a bias
    "smollm3": ("SmolLM3Config", SMALL),
}
CASES = {name: (f.config_class, f.config) for name, f in architectures.FAMILIES.items()}
CASES["gemma2-softcap-bites"] = ("Gemma2Config", {**architectures.FAMILIES["gemma2"].config, "final_logit_softcapping": 0.5})
CASES.update(EXTRA)


def build(config_class: str, cfg: dict, vocab: int = VOCAB, seed: int = 0):
    import transformers

    config = getattr(transformers, config_class)(vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2, **cfg)
    torch.manual_seed(seed)
    attn = modeling.attention_implementation(config, torch.device("cpu"))
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn)


def examples(vocab: int = VOCAB, lengths=(23, 9, 17), seed: int = 1) -> list[Example]:
    """Rows of different lengths whose first ~third is an unlabelled prompt."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        prompt = n // 3
        out.append(Example(input_ids=ids, labels=[IGNORE] * prompt + ids[prompt:]))
    return out


def loss_and_grads(model, batch, monkeypatch, fused: bool):
    monkeypatch.setenv("SFT_FUSED_LOSS", "1" if fused else "0")
    model.zero_grad(set_to_none=True)
    s = train.loss_sum(model, batch)
    s.backward()
    s = s.detach()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    with torch.no_grad():
        evaluated = float(train.loss_sum(model, batch))
    return float(s), grads, evaluated


def assert_same(model, batch, monkeypatch, rtol=1e-5):
    fused_loss, fused_grads, fused_eval = loss_and_grads(model, batch, monkeypatch, fused=True)
    plain_loss, plain_grads, plain_eval = loss_and_grads(model, batch, monkeypatch, fused=False)
    assert fused_loss == pytest.approx(plain_loss, rel=rtol) and fused_eval == pytest.approx(plain_eval, rel=rtol)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(fused_grads) == sorted(plain_grads) == sorted(trainable)  # every trainable parameter gets one
    for name in trainable:  # fp32 rounding, relative to the gradient's own scale
        scale = float(plain_grads[name].abs().max())
        torch.testing.assert_close(fused_grads[name], plain_grads[name], rtol=rtol * 10, atol=rtol * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("name", list(CASES))
def test_the_fused_loss_is_the_unfused_one_on_every_architecture(name, monkeypatch):
    model = build(*CASES[name])
    assert loss.head_of(model)[0] is not None, "the fused loss must serve this architecture, not fall back"
    rows = examples()
    assert_same(model, collate.pad_batch(rows, pad_id=0), monkeypatch)
    assert_same(model, collate.pack_batch(rows), monkeypatch)  # several rows in one, position ids restarting


def test_every_architecture_the_fused_loss_claims_is_in_the_matrix_above():
    import transformers

    tested = {getattr(transformers, cls).model_type for cls, _ in CASES.values()}
    assert set(loss.HEADS) <= tested


@pytest.mark.parametrize("name", list(architectures.FAMILIES))
def test_the_fused_loss_is_the_unfused_one_with_lora_and_the_head_frozen(name, monkeypatch):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build(*CASES[name]), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    head, _, _ = loss.head_of(model)
    assert head is not None and not head.weight.requires_grad
    assert_same(model, collate.pad_batch(examples(), pad_id=0), monkeypatch)


def test_a_lora_adapter_on_the_head_itself_keeps_the_unfused_loss(monkeypatch, caplog):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build(*CASES["llama"]), LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    head, _, why = loss.head_of(model)
    assert head is None and "not a plain Linear" in why
    loss_and_grads(model, collate.pad_batch(examples(), pad_id=0), monkeypatch, fused=True)  # runs, unfused


def test_under_bf16_autocast_the_fused_loss_stays_close_to_the_unfused_one(monkeypatch):
    model = build(*CASES["gemma2-softcap-bites"])
    batch = collate.pad_batch(examples(), pad_id=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused_loss, fused_grads, _ = loss_and_grads(model, batch, monkeypatch, fused=True)
        plain_loss, plain_grads, _ = loss_and_grads(model, batch, monkeypatch, fused=False)
    assert fused_loss == pytest.approx(plain_loss, rel=1e-2)
    for name, g in plain_grads.items():
        cos = torch.nn.functional.cosine_similarity(fused_grads[name].flatten(), g.flatten(), dim=0)
        assert fused_grads[name].dtype == g.dtype and cos > 0.99, name


class LargestAllocation:
    """The largest tensor storage any op creates while active (deterministic, unlike RSS)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self
        self.largest = 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in torch.utils._pytree.tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        outer.largest = max(outer.largest, t.untyped_storage().nbytes())
                return out

        self.mode = Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def test_at_a_150k_vocabulary_no_tensor_of_tokens_by_vocab_is_ever_allocated(monkeypatch):
    vocab = 150_000
    cfg = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
           "num_key_value_heads": 1, "max_position_embeddings": 2048, "tie_word_embeddings": True}
    model = build("LlamaConfig", cfg, vocab=vocab)
    batch = collate.pad_batch(examples(vocab, lengths=(1200, 900)), pad_id=0)
    tokens = collate.trained_tokens(batch)
    one_logits = tokens * vocab * 4  # one fp32 [response tokens x vocab] tensor: ~800 MB here
    monkeypatch.setenv("SFT_FUSED_LOSS", "1")
    with LargestAllocation() as seen:
        train.loss_sum(model, batch).backward()
    assert seen.largest <= loss.CHUNK_BYTES < one_logits / 4
