"""The data check (sft_trainer.datacheck): every bad row named by file and row, duplicates, lengths against
maxSeqLength and the steps the trainer will take, found before the model loads, in the fetch stage, in
``sftctl run`` and in ``sftctl validate --data``."""

from __future__ import annotations

import json
import math
import shutil

import pytest

pytestmark = pytest.mark.trainer

torch = pytest.importorskip("torch")

from sft_trainer import architectures, collate, data, datacheck, fetch  # noqa: E402
from sft_contract.spec import TrainingSpec  # noqa: E402
from sft_contract.exit_codes import ExitCode  # noqa: E402
from sft_trainer.loading import load_tokenizer  # noqa: E402

from trainer_helpers import run_module, trainer_env, write_config  # noqa: E402

GOOD = [{"instruction": f"Say the number {i}.", "output": f"{i}"} for i in range(12)]


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def checked(spec: dict, world: int = 1) -> datacheck.DataCheck:
    parsed = TrainingSpec.model_validate(spec)
    return datacheck.check(parsed, load_tokenizer(parsed), world)


def test_every_bad_row_is_named_by_file_and_row(make_spec, tmp_path):
    f = write_jsonl(tmp_path / "train.jsonl", [
        GOOD[0], GOOD[1],
        '{"instruction": "cut off", ',  # line 3
        GOOD[2],
        {"instruction": "No answer."},  # line 5
        {"instruction": "Blank answer.", "output": "  "},  # line 6
        "",  # blank lines are skipped, and still count as lines
        ["not", "an", "object"],  # line 8
        *GOOD[3:],
    ])
    result = checked(make_spec(dataset={"train": {"source": str(f)}}))
    assert not result.ok
    assert result.invalid == [
        f"{f} row 3: invalid JSON (Expecting property name enclosed in double quotes)",
        f"{f} row 5: missing field 'output'",
        f"{f} row 6: field 'output' is empty",
        f"{f} row 8: a row must be an object, got list",
    ]
    assert (result.rows, result.invalid_rows, result.format) == (len(GOOD) + 4, 4, "instruction")
    # The job's failure names the first rows; status.data carries the same.
    assert result.error().reason.startswith(f"4 invalid row(s) of 16: {f} row 3: invalid JSON")
    assert result.summary().first_invalid == result.invalid


def test_a_chat_template_that_rejects_the_roles_names_each_row(make_spec, tmp_path):
    model = architectures.build(architectures.FAMILIES["llama"], tmp_path / "llama2")  # [INST] template
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    twice = {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"},
                          {"role": "assistant", "content": "hello"}]}
    f = write_jsonl(tmp_path / "chat.jsonl", [good, twice, good, twice])
    result = checked(make_spec(model={"source": str(model)}, dataset={"train": {"source": str(f)}}))
    why = "the tokenizer's chat template rejects these messages: Conversation roles must alternate"
    assert [r.split(": ", 1)[0] for r in result.invalid] == [f"{f} row 2", f"{f} row 4"]
    assert all(why in r for r in result.invalid)
    assert result.format == "messages"


def test_duplicates_are_counted_across_the_train_and_validation_files(make_spec, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [*GOOD, GOOD[0], GOOD[5], GOOD[0]])
    val = write_jsonl(tmp_path / "val.jsonl", [{"instruction": "Other.", "output": "x"}, GOOD[3]])
    result = checked(make_spec(dataset={"train": {"source": str(train)}, "validation": {"source": str(val)},
                                        "validationSplit": None}))
    assert result.ok and result.duplicate_rows == 4
    assert result.duplicates == [f"{train} row 13 repeats row 1", f"{train} row 14 repeats row 6",
                                 f"{train} row 15 repeats row 1", f"{val} row 2 repeats {train} row 4"]
    assert result.summary().duplicate_rows == 4


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_rows_longer_than_max_seq_length_are_counted_as_the_trainer_cuts_them(make_spec, tmp_path, overlong):
    long = [{"instruction": "Repeat: " + "word " * 200, "output": "done"} for _ in range(3)]
    f = write_jsonl(tmp_path / "train.jsonl", [*GOOD, *long])
    spec = make_spec(dataset={"train": {"source": str(f)}, "validationSplit": 0, "maxSeqLength": 64,
                              "overlong": overlong}, evaluation={"strategy": "no"})
    result = checked(spec)
    summary = result.summary()
    assert summary.token_lengths.max > 200 > 64 >= summary.token_lengths.p50
    if overlong == "drop":
        assert (summary.truncated_rows, summary.dropped_rows, summary.train_rows) == (0, 3, len(GOOD))
    else:  # the cut leaves no response in these rows: truncated, then dropped as the trainer drops them
        assert (summary.truncated_rows, summary.dropped_rows, summary.train_rows) == (3, 3, len(GOOD))
    # The trainer's own build agrees.
    parsed = TrainingSpec.model_validate(spec)
    built = data.build(parsed.dataset, load_tokenizer(parsed), parsed.hyperparameters.seed)
    assert built.stats["train"]["truncated"] == summary.truncated_rows
    assert built.stats["train"]["dropped"] == summary.dropped_rows


@pytest.mark.parametrize("world", [1, 3])
def test_estimated_steps_and_tokens_are_the_trainers(make_spec, tiny, world):
    spec = make_spec(hyperparameters={"numEpochs": 2, "perDeviceBatchSize": 4, "gradientAccumulationSteps": 2})
    result = checked(spec, world)
    parsed = TrainingSpec.model_validate(spec)
    tok = load_tokenizer(parsed)
    data.ensure_pad_token(tok)
    built = data.build(parsed.dataset, tok, parsed.hyperparameters.seed)
    batcher = collate.Batcher(built.train, batch_size=4, seed=parsed.hyperparameters.seed, world=world, rank=0,
                              pad_id=tok.pad_token_id, packing=False, split_cost=None)
    per_epoch = max(1, math.ceil(len(batcher.epoch(0)) / 2))  # as train.py computes it
    assert (result.train_rows, result.validation_rows) == (len(built.train), len(built.validation))
    assert (result.steps_per_epoch, result.estimated_steps) == (per_epoch, 2 * per_epoch)
    assert result.estimated_tokens == 2 * sum(len(e) for e in built.train)
    assert result.estimated_trained_tokens == 2 * sum(e.trained_tokens for e in built.train)


def test_the_fetch_stage_fails_a_bad_dataset_before_the_model_loads(make_spec, tiny, tmp_path):
    """The model has no weights at all: the stage still ends with the data's error (65), naming the rows."""
    model = tmp_path / "model"
    shutil.copytree(tiny / "model", model)
    for weights in model.glob("*.safetensors"):
        weights.unlink()
    f = write_jsonl(tmp_path / "train.jsonl", [*GOOD, {"instruction": "No answer."}, GOOD[0]])
    term = tmp_path / "termination-log"
    env = trainer_env(SFT_TERMINATION_LOG=str(term))
    env.pop("SFT_PROGRESS_URL", None)
    config = write_config(make_spec(model={"source": str(model)}, dataset={"train": {"source": str(f)}}),
                          tmp_path / "config.json")
    stage = run_module("sft_trainer.fetch", "--config", str(config), "--world-size=2", env=env)
    assert stage.returncode == ExitCode.DATA_ERROR, stage.stderr
    assert term.read_text().strip() == f"1 invalid row(s) of 14: {f} row 13: missing field 'output'"
    reports = [json.loads(line) for line in stage.stdout.splitlines() if line.startswith("{")]
    (summary,) = [r["data"] for r in reports if "data" in r]  # what the operator keeps as status.data
    assert summary["invalidRows"] == 1 and summary["duplicateRows"] == 1
    assert summary["firstInvalid"] == [f"{f} row 13: missing field 'output'"]
    assert "data check: format instruction; 14 rows, 1 invalid, 1 duplicate" in stage.stderr

    good = write_jsonl(tmp_path / "good.jsonl", GOOD)
    config = write_config(make_spec(model={"source": str(model)}, dataset={"train": {"source": str(good)}}),
                          tmp_path / "good.json")
    assert fetch.main(["--config", str(config)]) == ExitCode.OK  # good data passes; the weights are the trainer's


def test_validate_data_prints_the_report_and_exits_1_on_bad_rows(make_spec, tiny, tmp_path, capsys, monkeypatch):
    from sft_operator.cli import sftctl as cli

    f = write_jsonl(tmp_path / "train.jsonl", [*GOOD, {"instruction": "Blank.", "output": ""}])
    (tmp_path / "claims" / "models").mkdir(parents=True)  # the output claim: a cluster spec writes to pvc://
    monkeypatch.setenv("SFT_PVC_ROOT", str(tmp_path / "claims"))

    def manifest(name, source):
        spec = make_spec(dataset={"train": {"source": source}}, output={"destination": "pvc://models/out"})
        doc = {"apiVersion": "sft.dev/v1alpha1", "kind": "SFTJob", "metadata": {"name": "t"},
               "spec": {**spec, "resources": {"gpusPerNode": 2}}}
        path = tmp_path / name
        path.write_text(json.dumps(doc))
        return str(path)

    assert cli.main(["validate", "--data", "--no-advice", manifest("bad.yaml", str(f))]) == 1
    out, err = capsys.readouterr()
    assert f"data: format instruction; {len(GOOD) + 1} rows, 1 invalid, 0 duplicate" in out
    assert f"data: 1 invalid row(s) of {len(GOOD) + 1}: {f} row {len(GOOD) + 1}: field 'output' is empty" in err

    assert cli.main(["validate", "--data", "--no-advice", manifest("pvc.yaml", "pvc://datasets/train.jsonl")]) == 1
    _, err = capsys.readouterr()
    assert "not mounted on this machine: the claim 'datasets' (spec.dataset.train.source)" in err

    (tmp_path / "claims" / "datasets").mkdir()
    write_jsonl(tmp_path / "claims" / "datasets" / "train.jsonl", GOOD)
    assert cli.main(["validate", "--data", "--no-advice", manifest("ok.yaml", "pvc://datasets/train.jsonl")]) == 0
    out, _ = capsys.readouterr()
    assert "0 invalid" in out and "steps" in out and "valid" in out.splitlines()[-1]


def test_sftctl_run_names_every_bad_row_before_training(make_spec, tmp_path):
    import io

    from rich.console import Console
    from sft_trainer import local

    f = write_jsonl(tmp_path / "train.jsonl", [*GOOD[:4], {"instruction": "a"}, *GOOD[4:], {"instruction": "b", "output": ""}])
    manifest = {"apiVersion": "sft.dev/v1alpha1", "kind": "SFTJob", "metadata": {"name": "bad-rows"},
                "spec": make_spec(dataset={"train": {"source": str(f)}})}
    out = io.StringIO()
    assert local.run(manifest, console=Console(file=out, width=400)) == ExitCode.DATA_ERROR
    text = " ".join(out.getvalue().split())
    assert (f"2 invalid row(s) of 14: {f} row 5: missing field 'output'; {f} row 14: field 'output' is empty"
            in text), text
    assert "fine-tuning summary" not in text and not (tmp_path / "out" / "checkpoints").exists()


def test_a_long_reason_is_clipped_in_the_summary_but_whole_in_the_report(make_spec, tmp_path):
    deep = tmp_path / ("d" * 200) / ("e" * 200)
    deep.mkdir(parents=True)
    f = write_jsonl(deep / "train.jsonl", [*GOOD, {"instruction": "x"}])
    result = checked(make_spec(dataset={"train": {"source": str(f)}}))
    (whole,) = result.invalid
    (clipped,) = result.summary().first_invalid
    assert whole == f"{f} row 13: missing field 'output'" and len(whole) > 400
    assert len(clipped) == 300 and clipped.endswith("...") and whole.startswith(clipped[:-3])


def test_the_checks_report_keeps_the_fetched_bytes_so_status_still_shows_them(make_spec):
    reports = []

    class Reporter:
        def report(self, report, final=False):
            reports.append(report)

    spec = TrainingSpec.model_validate(make_spec())
    datacheck.run(spec, reporter=Reporter(), fetched=(1234, 1234))
    datacheck.run(spec, reporter=Reporter(), fetched=(0, 0))  # nothing fetched: no bytes to show
    (after_fetch, nothing_fetched) = reports
    assert (after_fetch.stage, after_fetch.bytes_done, after_fetch.bytes_total) == ("fetching", 1234, 1234)
    assert after_fetch.data is not None and after_fetch.data.rows > 0
    assert nothing_fetched.bytes_total is None
