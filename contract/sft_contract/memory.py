"""Peak memory per device of a fine-tuning run (a GPU's, or a CPU process's), estimated from the model's config.json alone.

Pure and light (the standard library only): the operator's advice, ``sftctl validate`` and the trainer
(at start, before it allocates anything) all call it. What is counted, per device:

- **weights**: full fine-tuning keeps fp32 master weights (4 B/parameter); bf16/fp16 autocast keeps a
  compute-dtype copy of every weight for the backward (+2 B). LoRA keeps the frozen base in the compute
  dtype (2 B; 4 B in fp32). FSDP holds 1/N of the fp32 weights plus the layers being gathered (the
  running and the prefetched layer) and the root module (embeddings, LM head) unsharded in the compute dtype.
- **gradients**: fp32 for trainable parameters (DDP keeps them in its all-reduce buckets: one copy);
  FSDP 1/N plus one layer and the root unsharded.
- **optimizer**: AdamW, two fp32 moments (8 B per trainable parameter); FSDP 1/N.
- **activations** at per-device batch × maxSeqLength (the worst batch: every row at maxSeqLength). Per
  layer and token, a Llama-style block saves its residual input and the norm output, q/k/v after rotary,
  the attention output and 4 intermediate-size tensors of a gated MLP (2 for a plain one); sdpa /
  flash-attention never materialise the seq × seq scores (but on CPU, sdpa with a padded batch's mask
  keeps 4.5 B per row, query and key in each layer: quadratic, it dominates long sequences there). Gradient checkpointing keeps one hidden
  vector per layer and token, plus one layer recomputed. LoRA dropout adds a copy of each adapted input.
- **logits**: the trainer fuses the loss with the LM head (loss.py) for the architectures in
  ``FUSED_LOSS_TYPES``: one chunk of rows' fp32 logits at a time (and log-sum-exp's temporary),
  plus the hidden states' gradient at every position (fp32; the trainer keeps only response positions: an
  upper bound); the head's gradient, made in the forward, is the gradients term's. Any other architecture
  (or ``SFT_FUSED_LOSS=0``, which the estimate does not know) holds them at every response position,
  counted at every position (compute dtype, the fp32 copy for the loss, its gradient).
- **overhead**: on GPUs the CUDA context, communication buffers and allocator slack: 1.5 GiB + 5%. On CPU
  (``Setup.device="cpu"``: what the process's resident memory peaks at) the runtime instead: the Python
  interpreter, torch, transformers, the tokenizer, the rows, the allocator's own (``CPU_RUNTIME``).

FSDP with ``cpuOffload`` moves the sharded weights, gradients and optimizer states to CPU memory.
The estimate was checked against measured peaks on CPU (BENCHMARKS.md, "Memory estimate").

Shapes come from the model's config.json (``Shapes.from_config``) or the bundled table ``model_shapes.json``
(popular hub ids, transcribed from their config.json files); ``sftctl validate`` also reads a local or hub
config.json (``sft_operator.cli.model_shapes``). ``Shapes.source`` says which.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

GiB = 1024**3
OVERHEAD_FIXED = int(1.5 * GiB)
# A CPU trainer's resident memory besides the tensors counted here: peak RSS less the estimated tensors on the
# wide-vocabulary fixture was 810-900 MiB at 1k, 2k, 4k and 8k tokens (BENCHMARKS.md, "memory at a real vocabulary").
CPU_RUNTIME = 850 * 2**20
# sdpa on CPU with a padded batch (an explicit mask): each layer keeps 4.5 B per row, query and key in fp32
# (measured with 1, 2 and 4 layers at 4,096 tokens); an unpadded batch keeps none. Not measured on GPUs.
CPU_MASKED_ATTENTION_EXTRA = 0.5
OVERHEAD_FRACTION = 0.05
TABLE = Path(__file__).with_name("model_shapes.json")
# Architectures whose MLP has two matrices (up, down) instead of a gated three (gate, up, down).
PLAIN_MLP = frozenset({"gpt_neox", "gpt2", "gptj", "opt", "phi", "falcon", "bloom", "gpt_bigcode", "starcoder2", "mpt"})
# Layer traits that change what a layer saves for the backward (measured: BENCHMARKS.md, "Memory estimate").
FUSED_QKV = frozenset({"phi3", "gpt_neox", "phi", "falcon", "gpt_bigcode", "mpt"})
QK_NORM = frozenset({"qwen3", "olmo2", "olmo3", "gemma3", "gemma3_text"})
POST_NORMS = frozenset({"olmo2", "olmo3", "gemma2", "gemma3", "gemma3_text"})
# tie_word_embeddings defaults of the model classes, for config.json files that leave it out.
TIED_BY_DEFAULT = frozenset({"gemma", "gemma2", "gemma3", "gemma3_text", "phi"})
DEFAULT_LORA_RANK = 16
# Architectures whose LM head the trainer's fused loss reproduces exactly (loss.HEADS is built from this).
FUSED_LOSS_TYPES = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "phi",
                              "gpt_neox", "olmo", "olmo2", "gemma", "gemma2", "gemma3_text", "starcoder2", "smollm3",
                              "cohere", "granite"})
LOSS_CHUNK_BYTES = 128 * 2**20  # fp32 logits of one chunk of rows (loss.CHUNK_BYTES)


@dataclass(frozen=True)
class Shapes:
    """The dimensions that decide memory, read from a config.json."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    gated_mlp: bool
    fused_qkv: bool = False  # one projection for q, k and v (Phi-3, GPT-NeoX)
    qk_norm: bool = False  # norms on q and k (Qwen3, OLMo 2, Gemma 3)
    post_norms: bool = False  # norms after attention and MLP too (OLMo 2, Gemma 2/3)
    eager_attention: bool = False  # attention logit soft-capping: sdpa cannot, eager materialises seq x seq
    source: str = ""  # where the shapes came from, for the user

    @classmethod
    def from_config(cls, cfg: dict[str, Any], source: str = "") -> Shapes:
        cfg = {**cfg.get("text_config", {}), **{k: v for k, v in cfg.items() if k != "text_config"}} if "text_config" in cfg else cfg
        model_type = str(cfg.get("model_type", "unknown"))
        hidden = int(_first(cfg, "hidden_size", "n_embd", "d_model"))
        heads = int(_first(cfg, "num_attention_heads", "n_head"))
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        return cls(
            model_type=model_type,
            hidden=hidden,
            intermediate=int(_first(cfg, "intermediate_size", "n_inner", "ffn_dim", default=4 * hidden) or 4 * hidden),
            layers=int(_first(cfg, "num_hidden_layers", "n_layer")),
            heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            vocab=int(cfg["vocab_size"]),
            tied=bool(cfg.get("tie_word_embeddings", model_type in TIED_BY_DEFAULT)),
            gated_mlp=model_type not in PLAIN_MLP,
            fused_qkv=model_type in FUSED_QKV,
            qk_norm=model_type in QK_NORM,
            post_norms=model_type in POST_NORMS,
            eager_attention=cfg.get("attn_logit_softcapping") is not None,
            source=source,
        )

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """One layer's linear maps (in, out) by their usual module names (fused ones under their own)."""
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        out = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h)}
        out.update({"gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)} if self.gated_mlp else {"up_proj": (h, i), "down_proj": (i, h)})
        return out

    @property
    def layer_parameters(self) -> int:
        return sum(a * b for a, b in self.linears().values()) + 2 * self.hidden

    @property
    def root_parameters(self) -> int:
        """Embeddings, LM head (unless tied) and the final norm: what sits outside the layers."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def parameters(self) -> int:
        return self.layers * self.layer_parameters + self.root_parameters


def _first(cfg: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    if default is not None:
        return default
    raise KeyError(f"config.json has none of {', '.join(keys)}")


@dataclass(frozen=True)
class Setup:
    """How the model is trained, as far as memory goes."""

    batch: int  # rows per device per micro-batch
    seq: int  # maxSeqLength
    precision: str = "bf16"  # compute dtype: bf16, fp16 or fp32
    world: int = 1  # processes (GPUs) in all
    strategy: str = "ddp"  # ddp or fsdp (one process: unsharded either way)
    cpu_offload: bool = False
    gradient_checkpointing: bool = False
    lora_rank: int | None = None  # None: full fine-tuning
    lora_targets: tuple[str, ...] = ("all-linear",)
    lora_dropout: float = 0.0
    frozen_layers: int = 0
    device: str = "cuda"  # cuda: per GPU; cpu: one CPU process's resident memory

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp" and self.world > 1


@dataclass(frozen=True)
class Estimate:
    setup: Setup
    shapes: Shapes
    parameters: int
    trainable: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    overhead: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits + self.overhead

    def fits(self, gpu_bytes: int) -> bool:
        return self.total <= gpu_bytes

    def summary(self) -> str:
        parts = [("weights", self.weights), ("gradients", self.gradients), ("optimizer", self.optimizer),
                 ("activations", self.activations), ("logits", self.logits), ("overhead", self.overhead)]
        return f"{gib(self.total)} = " + " + ".join(f"{name} {gib(v, unit=False)}" for name, v in parts)


def gib(n: int, unit: bool = True) -> str:
    return f"{n / GiB:.1f}" + (" GiB" if unit else "")


def _lora_parameters(shapes: Shapes, setup: Setup) -> int:
    linears = shapes.linears()
    targets = setup.lora_targets
    if "all-linear" in targets or not any(t in linears for t in targets):
        chosen = list(linears.values())  # unknown names: count every linear (an upper bound)
    else:
        chosen = [linears[t] for t in targets if t in linears]
    per_layer = sum(setup.lora_rank * (a + b) for a, b in chosen)
    return per_layer * (shapes.layers - setup.frozen_layers)


def estimate(shapes: Shapes, setup: Setup) -> Estimate:
    """Peak memory of one device, in bytes, by category (see the module doc)."""
    s, n = shapes, max(1, setup.world)
    act_b = 4 if setup.precision == "fp32" else 2
    params = s.parameters
    full = setup.lora_rank is None
    frozen = setup.frozen_layers * s.layer_parameters
    trainable = params - frozen if full else _lora_parameters(s, setup)
    shard = n if setup.sharded else 1
    on_gpu = 0 if (setup.sharded and setup.cpu_offload) else 1

    if full:
        weights = 4 * params // shard * on_gpu
        if not setup.sharded and act_b == 2:
            weights += 2 * params  # the autocast copies saved for the backward
    else:
        weights = act_b * params // shard * on_gpu + 4 * trainable // shard * on_gpu
    if setup.sharded:  # gathered for compute: two layers (running, prefetched) and the root
        weights += act_b * (2 * s.layer_parameters + s.root_parameters)
    gradients = 4 * trainable // shard * on_gpu
    if setup.sharded and full:
        gradients += 4 * (s.layer_parameters + s.root_parameters)  # unsharded before the reduce-scatter
    optimizer = 8 * trainable // shard * on_gpu

    tokens = setup.batch * setup.seq
    per_layer = _layer_activation_bytes(s, setup, act_b)
    if setup.gradient_checkpointing:  # each layer's fp32 input, plus the one layer being recomputed
        activations = tokens * (s.layers * s.hidden * 4 + per_layer)
    else:
        activations = tokens * s.layers * per_layer
    activations += tokens * s.hidden * (4 + 4 + act_b)  # embeddings output, final norm
    logits = _logits_bytes(s, tokens, act_b)
    subtotal = weights + gradients + optimizer + activations + logits
    if setup.device == "cpu":
        overhead = CPU_RUNTIME
    else:
        overhead = OVERHEAD_FIXED + int(OVERHEAD_FRACTION * subtotal)
    return Estimate(setup, s, params, trainable, weights, gradients, optimizer, activations, logits, overhead)


def _logits_bytes(s: Shapes, tokens: int, act_b: int) -> int:
    """The loss's share. Unfused: the logits at every position (compute dtype, the fp32 copy, its gradient).
    Fused with the head (loss.py): one chunk of rows, whose fp32 logits and log-sum-exp's temporary are alive
    at once (the gradient is made in place; the compute-dtype copies are smaller and never alive with both),
    plus the hidden states' gradient (fp32), made in the forward and held until the backward. The head's
    gradient, made in the forward too, is the one the gradients term counts (it becomes the parameter's
    ``.grad``; counting it here as well put the wide-vocabulary fixture's tensors 27% over the measured peak)."""
    if s.model_type not in FUSED_LOSS_TYPES:
        return tokens * s.vocab * (act_b + 4 + 4)
    rows = max(1, min(tokens, LOSS_CHUNK_BYTES // (4 * s.vocab)))
    return rows * s.vocab * (4 + 4) + tokens * s.hidden * 4


def _layer_activation_bytes(s: Shapes, setup: Setup, act_b: int) -> int:
    """Bytes one layer saves for the backward, per token. The residual stream and the norms' inputs are
    fp32 (4 B); linear outputs are in the compute dtype (``act_b``)."""
    h, q, kv, i = s.hidden, s.q_dim, s.kv_dim, s.intermediate
    norm = 4 + act_b  # a norm keeps its fp32 input and its output
    out = 2 * h * norm  # the attention and MLP input norms
    out += (q + 2 * kv) * act_b + q * act_b  # q, k (after rotary) and v for attention; its output
    out += (4 * i if s.gated_mlp else 2 * i) * act_b  # gate, up, activation, product (plain MLP: 2)
    if s.fused_qkv:
        out += (q + kv) * act_b  # the fused projection's output stays alive under the v view
    if s.qk_norm:
        out += (q + kv) * norm
    if s.post_norms:
        out += 2 * h * norm
    if s.eager_attention:  # scores (and their soft-capped copy) and the fp32 softmax, per head and key
        out += s.heads * setup.seq * (act_b * 2 + 4)
    elif setup.device == "cpu":  # sdpa's masked path on CPU (a padded batch): per key, not per head
        out += int(setup.seq * (act_b + CPU_MASKED_ATTENTION_EXTRA))
    if setup.lora_rank is not None and setup.lora_dropout > 0:
        # each adapted layer's dropped-out input and its mask (1 B), saved for the adapter's backward
        out += sum(a for a, _ in s.linears().values()) * (act_b + 1)
    return out


# ---------------------------------------------------------------- the way out


def ways_out(shapes: Shapes, setup: Setup, gpu_bytes: int) -> list[str]:
    """Changes that make ``setup`` fit ``gpu_bytes`` per device, each with its estimate; fitting ones first."""
    out: list[tuple[bool, str]] = []

    def option(text: str, changed: Setup) -> None:
        e = estimate(shapes, changed)
        out.append((e.fits(gpu_bytes), f"{text} ({gib(e.total)} per {'CPU process' if changed.device == 'cpu' else 'GPU'})"))

    if setup.device == "cpu":
        pass  # FSDP over more processes means more pods, each paying the runtime again: not offered on CPU
    elif setup.world > 1 and not setup.sharded:
        option(f"distributed.strategy: fsdp over the {setup.world} GPUs", replace(setup, strategy="fsdp"))
    else:
        for n in (2, 4, 8, 16, 32, 64):
            if n > setup.world and estimate(shapes, replace(setup, world=n, strategy="fsdp")).fits(gpu_bytes):
                option(f"FSDP over {n} GPUs (resources.nodes x gpusPerNode = {n}, distributed.strategy: fsdp)",
                       replace(setup, world=n, strategy="fsdp"))
                break
    if not setup.gradient_checkpointing:
        option("hyperparameters.gradientCheckpointing: true", replace(setup, gradient_checkpointing=True))
    if setup.lora_rank is None:
        option(f"LoRA (peft: {{rank: {DEFAULT_LORA_RANK}}})", replace(setup, lora_rank=DEFAULT_LORA_RANK, lora_dropout=0.05))
    if setup.batch > 1:
        fitting = [b for b in range(setup.batch - 1, 0, -1) if estimate(shapes, replace(setup, batch=b)).fits(gpu_bytes)]
        b = fitting[0] if fitting else 1
        option(f"perDeviceBatchSize {b} (raise gradientAccumulationSteps {setup.batch / b:g}x to keep the effective batch)",
               replace(setup, batch=b))
    out.sort(key=lambda fit_text: not fit_text[0])
    return [("" if fit else "not enough alone: ") + text for fit, text in out]


# ---------------------------------------------------------------- the SIGTERM save

# What a SIGTERM'd trainer must do before the kubelet's SIGKILL: finish the running micro-batch, gather the
# state on rank 0 (FSDP) and write and fsync the checkpoint. Measured on CPU for a 0.5B model (BENCHMARKS.md,
# "SIGTERM save"); the bandwidth assumes a network volume slower than that machine's disk.
GRACE_FIXED_S = 60
SAVE_BYTES_PER_S = 200e6
GRACE_UNKNOWN_S = 600  # shapes and size unknown: room for a ~3B full fine-tune at that bandwidth
GRACE_MAX_S = 3600


def checkpoint_bytes(e: Estimate) -> int:
    """What one checkpoint writes: trainable parameters in fp32 and AdamW's two moments (12 B each)."""
    return 12 * e.trainable


def grace_period_seconds(ckpt_bytes: int | None) -> int:
    """terminationGracePeriodSeconds for a checkpoint of ``ckpt_bytes`` (None: unknown), rounded up to 30 s."""
    if ckpt_bytes is None:
        return GRACE_UNKNOWN_S
    seconds = GRACE_FIXED_S + ckpt_bytes / SAVE_BYTES_PER_S
    return int(min(GRACE_MAX_S, 30 * -(-seconds // 30)))


# ---------------------------------------------------------------- where the shapes come from


@functools.lru_cache(maxsize=1)
def bundled_table() -> dict[str, dict[str, Any]]:
    return {k: v for k, v in json.loads(TABLE.read_text()).items() if not k.startswith("_")}


def table_shapes(model_id: str) -> Shapes | None:
    """Shapes from the bundled table only (no file or network access)."""
    cfg = bundled_table().get(model_id)
    return Shapes.from_config(cfg, f"bundled table entry {model_id}") if cfg else None


# ---------------------------------------------------------------- from a spec


def setup_for(spec, world: int, strategy: str | None = None, precision: str | None = None, device: str = "cuda") -> Setup:
    """A ``Setup`` from a ``TrainingSpec`` (duck-typed, so the operator's SFTJobSpec works too). ``device``
    cpu: the trainer's ``auto`` precision is fp32 there."""
    hp = spec.hyperparameters
    auto = "fp32" if device == "cpu" else "bf16"
    prec = precision or (auto if hp.precision == "auto" else hp.precision)
    lora = spec.peft
    return Setup(
        batch=hp.per_device_batch_size,
        seq=spec.dataset.max_seq_length,
        precision=prec,
        world=world,
        strategy=strategy or spec.distributed.strategy,
        cpu_offload=spec.distributed.cpu_offload,
        gradient_checkpointing=hp.gradient_checkpointing,
        lora_rank=lora.rank if lora else None,
        lora_targets=tuple(lora.target_modules) if lora else ("all-linear",),
        lora_dropout=lora.dropout if lora else 0.0,
        frozen_layers=spec.freeze_layers,
        device=device,
    )


@dataclass(frozen=True)
class Plan:
    """The estimate for a spec on ``world`` GPUs of ``gpu_bytes``, with ``auto`` resolved. On CPU
    (``setup.device``), ``gpu_bytes`` is the pod's memory limit, or None when the spec sets none."""

    estimate: Estimate
    strategy: str
    gpu_bytes: int | None

    @property
    def fits(self) -> bool:
        return self.gpu_bytes is None or self.estimate.fits(self.gpu_bytes)

    def report(self) -> str:
        s = self.estimate.setup
        how = "full fine-tuning" if s.lora_rank is None else f"LoRA rank {s.lora_rank}"
        if s.device == "cpu":
            per = "CPU process"
            limit = "no memory limit set" if self.gpu_bytes is None else f"memory limit {gib(self.gpu_bytes)}"
            where = f"{s.world} pod(s), {limit}"
        else:
            per = "GPU"
            where = f"{s.world} GPU(s) of {gib(self.gpu_bytes)}" + (f", {self.strategy}" if s.world > 1 else "")
        text = (f"memory per {per} (estimate, {how}, {self.estimate.parameters / 1e9:.2f}B parameters, batch {s.batch} x "
                f"{s.seq} tokens, {s.precision}{', gradient checkpointing' if s.gradient_checkpointing else ''}; "
                f"{where}): {self.estimate.summary()}; shapes from {self.estimate.shapes.source}")
        if self.fits:
            return text + ": fits"
        ways = ways_out(self.estimate.shapes, s, self.gpu_bytes)
        return text + ": does NOT fit. Ways out: " + "; ".join(ways)


def plan(spec, shapes: Shapes, world: int, gpu_bytes: int | None, precision: str | None = None,
         device: str = "cuda") -> Plan:
    """Resolve ``distributed.strategy: auto`` (ddp when it fits, else fsdp; ddp on CPU) and estimate.
    ``device`` cpu: ``gpu_bytes`` is the pod's memory limit (None: none set)."""
    strategy = spec.distributed.strategy
    if device == "cpu":
        e = estimate(shapes, setup_for(spec, world, "ddp" if strategy == "auto" else strategy, precision, "cpu"))
        return Plan(e, e.setup.strategy, gpu_bytes)
    if world <= 1:
        strategy = "ddp"
    elif strategy == "auto":
        ddp = estimate(shapes, setup_for(spec, world, "ddp", precision))
        strategy = "ddp" if ddp.fits(gpu_bytes) else "fsdp"
    e = estimate(shapes, setup_for(spec, world, strategy, precision))
    return Plan(e, strategy, gpu_bytes)


def parse_quantity(q: str) -> int:
    """A Kubernetes quantity (``80Gi``, ``141G``, ``1e11``) in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "k": 10**3, "K": 10**3, "M": 10**6,
             "G": 10**9, "T": 10**12, "P": 10**15, "": 1}
    q = q.strip()
    for suffix in sorted(units, key=len, reverse=True):
        if suffix and q.endswith(suffix):
            return int(float(q[: -len(suffix)]) * units[suffix])
    return int(float(q))
