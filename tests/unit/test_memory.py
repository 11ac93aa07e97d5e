"""The memory preflight: per-GPU peak estimated from a model's config.json, the way out when it does not fit,
where the shapes come from, and the grace period sized from the checkpoint it implies."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sft_contract import memory
from sft_operator.api.types import SFTJob
from sft_operator.cli.model_shapes import find_shapes
from sft_operator.core.advice import advise, grace_period_seconds, memory_plan
from sft_operator.core.render import render_children

from .helpers import EXAMPLES, ROOT, load, manifest

GiB = 2**30
LLAMA2_7B = "meta-llama/Llama-2-7b-hf"


def spec_of(**overrides):
    return SFTJob.model_validate(manifest(**overrides)).spec


def seven_b(gpus=1, gpu_memory="80Gi", **overrides):
    return spec_of(model={"source": LLAMA2_7B}, resources={"gpusPerNode": gpus, "gpuMemory": gpu_memory},
                   hyperparameters={"perDeviceBatchSize": 4, "gradientCheckpointing": True}, **overrides)


@pytest.mark.parametrize("model, billions", [(LLAMA2_7B, 6.74), ("Qwen/Qwen2.5-0.5B", 0.494),
                                             ("mistralai/Mistral-7B-v0.1", 7.24), ("google/gemma-2-2b", 2.61),
                                             ("meta-llama/Llama-3.2-1B", 1.24), ("EleutherAI/pythia-1b", 1.01)])
def test_parameter_counts_from_the_bundled_shapes_match_the_published_sizes(model, billions):
    assert memory.table_shapes(model).parameters / 1e9 == pytest.approx(billions, abs=0.01)


def test_a_7b_full_fine_tune_does_not_fit_one_80gib_gpu_and_the_ways_out_do():
    plan, _ = memory_plan(seven_b(gpus=1))
    e = plan.estimate
    assert not plan.fits and e.total > 100 * GiB
    # fp32 weights, gradients and AdamW: 16 B per parameter, plus the bf16 autocast copy
    assert e.weights + e.gradients + e.optimizer == pytest.approx(18 * e.parameters, rel=0.01)
    report = plan.report()
    assert "does NOT fit" in report and "shapes from bundled table entry meta-llama/Llama-2-7b-hf" in report
    assert "FSDP over 2 GPUs" in report and "LoRA (peft: {rank: 16})" in report
    assert memory_plan(seven_b(gpus=2, distributed={"strategy": "fsdp"}))[0].fits


def test_auto_picks_fsdp_only_when_ddp_does_not_fit():
    plan, _ = memory_plan(seven_b(gpus=4))
    assert plan.strategy == "fsdp" and plan.fits
    lora, _ = memory_plan(seven_b(gpus=4, peft={"rank": 16}))
    assert lora.strategy == "ddp" and lora.fits


def test_fsdp_shards_the_states_and_gradient_checkpointing_and_lora_shrink_what_they_should():
    shapes = memory.table_shapes(LLAMA2_7B)
    base = memory.Setup(batch=4, seq=2048, strategy="fsdp")
    one, eight = memory.estimate(shapes, base), memory.estimate(shapes, memory.Setup(batch=4, seq=2048, world=8, strategy="fsdp"))
    assert eight.optimizer == one.optimizer // 8 and eight.gradients < one.gradients / 4
    gc = memory.estimate(shapes, memory.Setup(batch=4, seq=2048, gradient_checkpointing=True))
    assert gc.activations < one.activations / 5
    lora = memory.estimate(shapes, memory.Setup(batch=4, seq=2048, lora_rank=16))
    assert lora.trainable < 0.01 * lora.parameters and lora.optimizer < GiB
    offload = memory.estimate(shapes, memory.Setup(batch=4, seq=2048, world=8, strategy="fsdp", cpu_offload=True))
    assert offload.optimizer == 0


def test_the_logits_term_is_one_chunk_when_the_trainer_fuses_the_loss_with_the_head():
    # Qwen2.5-0.5B, batch 4 x 2048 (issue #20): the full fp32 logits, their softmax and gradient were 11.6 GiB
    # of a 32.8 GiB estimate; fused (loss.py), one chunk of rows and the hidden states' gradient (the head's
    # gradient, made in the forward, is the parameter's: counted under gradients once).
    import dataclasses

    shapes = memory.table_shapes("Qwen/Qwen2.5-0.5B")
    setup = memory.Setup(batch=4, seq=2048)
    fused = memory.estimate(shapes, setup)
    chunk = memory.LOSS_CHUNK_BYTES // (4 * shapes.vocab) * shapes.vocab * (4 + 4)
    assert fused.logits == chunk + 4 * 2048 * shapes.hidden * 4
    assert fused.gradients == 4 * fused.trainable
    assert fused.logits < GiB and fused.total < 22 * GiB
    # An architecture whose head the fused loss does not reproduce keeps the full logits.
    unfused = memory.estimate(dataclasses.replace(shapes, model_type="somethingelse"), setup)
    assert unfused.logits == 4 * 2048 * shapes.vocab * (2 + 4 + 4) and unfused.total > 32 * GiB


def test_the_operator_warns_when_the_gpus_asked_for_are_too_small():
    advice = [a for a in advise(seven_b(gpus=1)) if a.reason == "MemoryWontFit"]
    assert len(advice) == 1 and advice[0].field == "spec.resources"
    assert len(str(advice[0])) <= 1024  # an Event message
    assert not [a for a in advise(seven_b(gpus=1, gpu_memory="141Gi")) if a.reason == "MemoryWontFit"]


def test_a_cpu_job_is_estimated_per_process_against_its_pods_memory_limit():
    # gpusPerNode 0: the process's resident memory, with the runtime (Python, torch, the tokenizer) in place of
    # the CUDA context, fp32 (the trainer's auto precision on CPU), checked against resources.memory.
    def cpu_job(memory_limit=None):
        resources = {"gpusPerNode": 0, **({"memory": memory_limit} if memory_limit else {})}
        return spec_of(model={"source": "Qwen/Qwen2.5-0.5B"}, resources=resources,
                       hyperparameters={"perDeviceBatchSize": 2}, dataset={"train": {"source": "pvc://data/t.jsonl"},
                                                                           "maxSeqLength": 2048})

    plan, why = memory_plan(cpu_job())
    e = plan.estimate
    assert why == "" and plan.fits and e.setup.precision == "fp32"
    assert e.overhead == memory.CPU_RUNTIME
    assert "memory per CPU process (estimate, full fine-tuning, 0.49B parameters, batch 2 x 2048 tokens, fp32; " \
           "1 pod(s), no memory limit set)" in plan.report()
    assert e.weights + e.gradients + e.optimizer == 16 * e.parameters  # fp32: no autocast copies
    assert memory_plan(cpu_job("32Gi"))[0].fits
    advice = [a for a in advise(cpu_job("16Gi")) if a.reason == "MemoryWontFit"]
    assert len(advice) == 1 and advice[0].field == "spec.resources"
    assert "memory limit 16.0 GiB): " in advice[0].message and "does NOT fit" in advice[0].message
    assert "FSDP" not in advice[0].message and "LoRA (peft: {rank: 16})" in advice[0].message


def test_every_example_fits_what_it_asks_for():
    for path in EXAMPLES:
        plan, why = memory_plan(SFTJob.model_validate(load(path)).spec)
        assert plan is None or plan.fits, (path.name, plan.report())


def test_the_7b_recipe_prints_its_estimate_in_sftctl_validate():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "sft_operator.cli.sftctl", "validate", str(ROOT / "examples" / "llama2-7b-recipe.yaml")],
                         capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                                              "PYTHONPATH": ":".join(sys.path)})
    assert out.returncode == 0, out.stderr
    assert "memory per GPU (estimate, full fine-tuning, 6.74B parameters, batch 4 x 2048 tokens, bf16, gradient " \
           "checkpointing; 2 GPU(s) of 80.0 GiB, fsdp)" in out.stdout
    assert ": fits" in out.stdout and "warning" not in out.stdout


def test_shapes_come_from_a_local_config_then_the_table_then_the_hub(tmp_path, monkeypatch):
    cfg = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "vocab_size": 1000}
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(cfg))
    shapes, _ = find_shapes(str(tmp_path / "model"))
    assert shapes.hidden == 64 and shapes.source == f"{tmp_path / 'model'}/config.json"
    monkeypatch.setenv("SFT_PVC_ROOT", str(tmp_path))
    assert find_shapes("pvc://model")[0].layers == 2
    assert find_shapes("pvc://elsewhere/model")[1] == "pvc://elsewhere/model/config.json cannot be read here (the trainer checks at start)"

    class Hub(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            ok = self.path == "/acme/private-7b/resolve/main/config.json"
            self.send_response(200 if ok else 404)
            self.end_headers()
            if ok:
                self.wfile.write(json.dumps({**cfg, "hidden_size": 4096}).encode())

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{srv.server_address[1]}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    try:
        offline, why = find_shapes("acme/private-7b")
        assert offline is None and why == "acme/private-7b is not in the bundled table and its config.json was not fetched (the trainer checks at start)"
        shapes, _ = find_shapes("acme/private-7b", network=True)
        assert shapes.hidden == 4096 and shapes.source == "hub config.json of acme/private-7b"
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        assert find_shapes("acme/private-7b", network=True)[0] is None
    finally:
        srv.shutdown()


def test_the_grace_period_is_the_specs_or_sized_from_the_checkpoint():
    def grace(doc):
        job = next(c for c in render_children(doc) if c["kind"] == "Job")
        return job["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]

    seven = manifest(model={"source": LLAMA2_7B})
    full = grace(seven)  # 6.7B x 12 B (fp32 weights + AdamW) = 81 GB at 200 MB/s, + 60 s
    assert full == 480
    assert grace(manifest(model={"source": LLAMA2_7B}, peft={"rank": 16})) == 90  # adapters only
    assert grace(manifest(model={"source": "acme/unknown"})) == memory.GRACE_UNKNOWN_S
    assert grace(manifest(model={"source": "acme/thing-13b"})) == 840  # size read from the name
    assert grace(manifest(model={"source": LLAMA2_7B}, runPolicy={"terminationGracePeriodSeconds": 1200})) == 1200
    assert grace_period_seconds(SFTJob.model_validate(seven).spec) == full


def test_the_sftjob_uid_is_the_trainers_run_id():
    doc = manifest()
    doc["metadata"]["uid"] = "5b1c-uid"
    job = next(c for c in render_children(doc) if c["kind"] == "Job")
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["SFT_RUN_ID"] == "5b1c-uid"
    offline = next(c for c in render_children(manifest()) if c["kind"] == "Job")  # sftctl render: no uid yet
    assert "SFT_RUN_ID" not in {e["name"] for e in offline["spec"]["template"]["spec"]["containers"][0]["env"]}


@pytest.mark.parametrize("text, value", [("80Gi", 80 * GiB), ("141G", 141 * 10**9), ("1e11", 10**11), ("512Mi", 512 * 2**20)])
def test_gpu_memory_quantities(text, value):
    assert memory.parse_quantity(text) == value
