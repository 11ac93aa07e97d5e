"""The architecture matrix: tiny random-weight Llama (untied and tied), Qwen2, Qwen3, Mistral (sliding
window), Gemma 2 (tied, soft-capping), Phi-3, GPT-NeoX and OLMo 2, each with its family's tokenizer and
chat template, through what a user does: a run interrupted after a checkpoint, the resume, a LoRA run
merged at the end, and the exported models reloaded with AutoModelForCausalLM and generating."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.trainer

torch = pytest.importorskip("torch")

from sft_trainer import architectures, data, train  # noqa: E402
from sft_contract.spec import DatasetSpec, TrainingSpec  # noqa: E402

from trainer_helpers import read_log, run_interrupted_at  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return architectures.build_all(tmp_path_factory.mktemp("architectures"))


def generates(model_dir) -> bool:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    msgs = [{"role": "user", "content": "What is 2 plus 3?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) if tok.chat_template else msgs[0]["content"]
    ids = tok(text, return_tensors="pt", add_special_tokens=not tok.chat_template)
    out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    return out.shape[1] > ids["input_ids"].shape[1]


def tied(model_dir) -> bool:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


@pytest.mark.parametrize("name", list(architectures.FAMILIES))
def test_architecture_trains_resumes_and_exports(name, models, tiny, tmp_path):
    family = architectures.FAMILIES[name]
    chat = tiny / "data" / "chat.jsonl"
    spec = {
        "model": {"source": str(models[name])},
        "dataset": {"train": {"source": str(chat)}, "validationSplit": 0.1, "maxSeqLength": 64},
        "hyperparameters": {"learningRate": 1e-3, "maxSteps": 4, "perDeviceBatchSize": 4, "gradientAccumulationSteps": 1},
        "evaluation": {"strategy": "steps", "steps": 2},
        "checkpointing": {"strategy": "steps", "steps": 2},
        "output": {"destination": str(tmp_path / "full")},
    }

    # Chat rows are trained in the family's own format (its template), not a generic one.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models[name])
    data.ensure_pad_token(tok)
    row = json.loads(chat.read_text().splitlines()[0])
    (ex,) = data.tokenize_rows([data.RawRow(str(chat), 1, row)], data.DataFormat.messages,
                               DatasetSpec.model_validate({"train": {"source": "x.jsonl"}, "maxSeqLength": 512}), tok,
                               "task", data.LengthStats())
    if family.chat_template:  # the template's rendering, plus EOS where the template does not end with it
        rendered = tok.apply_chat_template(row["messages"], tokenize=False).rstrip()
        assert rendered in (tok.decode(ex.input_ids).rstrip(), tok.decode(ex.input_ids[:-1]).rstrip())
    assert ex.input_ids[-1] == ex.labels[-1] == tok.eos_token_id

    # Interrupted after the step-2 checkpoint, then resumed to the end.
    run_interrupted_at(spec, 2)
    metrics = train.run(TrainingSpec.model_validate(spec), stdout=None)
    assert metrics["steps"] == 4
    assert [r["step"] for r in read_log(tmp_path / "full") if "loss" in r] == [1, 2, 3, 4]
    full = tmp_path / "full" / "model"
    assert generates(full)
    assert tied(full) == family.tied  # tied embeddings survive checkpoint, resume and export

    lora = {**spec, "peft": {"rank": 4, "alpha": 8, "merge": True}, "output": {"destination": str(tmp_path / "lora")}}
    metrics = train.run(TrainingSpec.model_validate(lora), stdout=None)
    merged = tmp_path / "lora" / "model"
    assert metrics["trainableParameters"] < 20_000 and not (merged / "adapter_config.json").exists()
    assert generates(merged)
    assert tied(merged) == family.tied
