"""Data and batches: formats, label masking, EOS, pad token, malformed rows, the general-data mix, packing."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.trainer

torch = pytest.importorskip("torch")

from sft_trainer import collate, data  # noqa: E402
from sft_contract.spec import DatasetSpec  # noqa: E402
from sft_trainer.errors import DataError  # noqa: E402
from sft_contract.exit_codes import ExitCode  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny / "model")
    data.ensure_pad_token(tok)
    return tok


def tokenize(rows, tokenizer, **spec):
    ds = DatasetSpec.model_validate({"train": {"source": "unused.jsonl"}, "maxSeqLength": 256, **spec})
    raw = [data.RawRow("rows.jsonl", i, r) for i, r in enumerate(rows, 1)]
    stats = data.LengthStats()
    return data.tokenize_rows(raw, data.DataFormat(ds.format), ds, tokenizer, "task", stats), stats


def response_text(ex, tokenizer):
    return tokenizer.decode([t for t in ex.labels if t != data.IGNORE])


ROWS = [
    {"instruction": "Reverse the word.", "input": "apple", "output": "elppa"},
    {"instruction": "What is 2 plus 3?", "output": "5"},
    {"prompt": "Say hi:", "completion": " hi there"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Spell cat in capitals."},
                  {"role": "assistant", "content": "CAT"}, {"role": "user", "content": "And dog?"},
                  {"role": "assistant", "content": "DOG"}]},
    {"text": "The quiet cat reads the old book."},
]


def test_collated_batch_trains_only_the_response_and_its_eos(tokenizer):
    examples, _ = tokenize(ROWS, tokenizer)
    batch = collate.pad_batch(examples, tokenizer.pad_token_id)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert pad != eos
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    # Padding: pad id, never trained, masked out.
    assert ((ids == pad) == (mask == 0)).all()
    assert (labels[mask == 0] == data.IGNORE).all()
    assert not (labels == pad).any()
    for i, ex in enumerate(examples):
        n = len(ex)
        assert ids[i, n - 1] == eos and labels[i, n - 1] == eos  # EOS appended and trained
        assert labels[i, 0] == data.IGNORE
    assert response_text(examples[0], tokenizer) == "elppa</s>"
    assert response_text(examples[1], tokenizer) == "5</s>"
    assert response_text(examples[2], tokenizer) == " hi there</s>"
    # Chat: both assistant turns (with their EOS from the template) and nothing from system/user.
    assert response_text(examples[3], tokenizer) == "CAT</s>DOG</s>"
    assert "Spell cat" not in response_text(examples[3], tokenizer)
    assert response_text(examples[4], tokenizer) == "The quiet cat reads the old book.</s>"


def test_prompt_template_is_applied_and_not_trained(tokenizer):
    (ex,), _ = tokenize([ROWS[0]], tokenizer, promptTemplateWithInput="Q: {instruction} | {input}\nA: ")
    prompt = tokenizer.decode([t for t, l in zip(ex.input_ids, ex.labels) if l == data.IGNORE])
    assert prompt == "<s>Q: Reverse the word. | apple\nA: "


def test_braces_in_a_row_survive_the_prompt_template_untouched():
    spec = DatasetSpec.model_validate({"train": {"source": "unused.jsonl"}})
    row = data.RawRow("rows.jsonl", 1, {"instruction": "Fill {input} and {} in", "input": "x {instruction} y",
                                         "output": "done"})
    (prompt, _), _ = data.row_segments(row, data.DataFormat.instruction, spec, None)
    assert prompt == "### Instruction:\nFill {input} and {} in\n\n### Input:\nx {instruction} y\n\n### Response:\n"
    row = data.RawRow("rows.jsonl", 2, {"instruction": "Say {instruction} and {input}", "output": "ok"})
    (prompt, _), _ = data.row_segments(row, data.DataFormat.instruction, spec, None)
    assert prompt == "### Instruction:\nSay {instruction} and {input}\n\n### Response:\n"


def test_a_tokenizer_whose_pad_is_eos_gets_a_distinct_pad(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny / "model")
    tok.pad_token = tok.eos_token  # the classic mistake
    assert data.ensure_pad_token(tok) is True
    assert tok.pad_token_id != tok.eos_token_id


def test_overlong_rows_are_truncated_or_dropped_and_counted(tokenizer):
    long = {"instruction": "Repeat the list backwards.", "input": "apple " * 3, "output": "apple " * 60}
    (ex,), stats = tokenize([long, ROWS[1]][:1], tokenizer, maxSeqLength=64)
    assert len(ex) == 64 and stats.truncated == 1
    kept, stats = tokenize([long, ROWS[1]], tokenizer, maxSeqLength=64, overlong="drop")
    assert len(kept) == 1 and stats.dropped == 1 and stats.max > 64


GOOD_INSTRUCTION = {"instruction": "a", "output": "b"}
GOOD_CHAT = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}


@pytest.mark.parametrize(
    "good, bad, needle",
    [
        (GOOD_INSTRUCTION, '{"instruction": "x"}', "missing field 'output'"),
        (GOOD_INSTRUCTION, '{"instruction": "x", "output": 5}', "'output' must be a string"),
        (GOOD_INSTRUCTION, "{not json", "invalid JSON"),
        (GOOD_INSTRUCTION, '{"messages": []}', "missing field 'instruction'"),
        (GOOD_CHAT, '{"messages": [{"role": "robot", "content": "x"}]}', "message 1"),
        (GOOD_CHAT, '{"messages": [{"role": "user", "content": "x"}]}', "no non-empty assistant message"),
    ],
)
def test_malformed_row_is_a_data_error_naming_file_and_row(tmp_path, tokenizer, good, bad, needle):
    f = tmp_path / "train.jsonl"
    good = json.dumps(good)
    f.write_text("\n".join([good, good, bad, good]) + "\n")
    spec = DatasetSpec.model_validate({"train": {"source": str(f)}, "validationSplit": 0, "format": "auto"})
    with pytest.raises(DataError) as e:
        data.build(spec, tokenizer, seed=1)
    assert e.value.code == ExitCode.DATA_ERROR
    assert f"{f} row 3" in e.value.reason and needle in e.value.reason


def test_csv_parquet_json_and_pvc_paths_load(tmp_path, monkeypatch, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(5)]
    claim = tmp_path / "pvcs" / "datasets"
    claim.mkdir(parents=True)
    (claim / "rows.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), claim / "rows.parquet")
    (claim / "rows.csv").write_text("prompt,completion\n" + "".join(f"p{i},c{i}\n" for i in range(5)))
    monkeypatch.setenv("SFT_PVC_ROOT", str(tmp_path / "pvcs"))
    for name in ("rows.json", "rows.parquet", "rows.csv"):
        got = data.read_rows(f"pvc://datasets/{name}")
        assert [r.data for r in got] == rows and got[2].row == 3
    assert len(data.read_rows("pvc://datasets")) == 15  # a folder: every supported file in it


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.35])
def test_general_data_is_mixed_in_at_the_requested_ratio(tiny, tokenizer, ratio):
    spec = DatasetSpec.model_validate({
        "train": {"source": str(tiny / "data" / "train.jsonl")},
        "validationSplit": 0.1,
        "general": {"source": str(tiny / "data" / "general.jsonl"), "mixRatio": ratio, "heldOutRows": 40},
    })
    ds = data.build(spec, tokenizer, seed=3)
    general = sum(e.source == "general" for e in ds.train)
    assert abs(general / len(ds.train) - ratio) <= 0.02
    assert len(ds.general_held_out) == 40
    held = {tuple(e.input_ids) for e in ds.general_held_out}
    assert not held & {tuple(e.input_ids) for e in ds.train if e.source == "general"}  # held out means unseen


def test_epoch_batches_are_random_deterministic_and_split_over_ranks():
    lengths = [5 + (i * 37) % 300 for i in range(1000)]
    batches = collate.epoch_batches(lengths, 8, seed=1, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert batches == collate.epoch_batches(lengths, 8, seed=1, epoch=0)  # deterministic (resume relies on it)
    assert batches != collate.epoch_batches(lengths, 8, seed=1, epoch=1)  # reshuffled every epoch
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # the longest row first: OOM shows at step 1
    # Random, not length-grouped: batches mix short and long rows like the whole set does.
    spread = sorted(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)
    assert spread[len(spread) // 2] > 150
    # Two ranks: disjoint rows, the same number of batches.
    r0 = collate.epoch_batches(lengths, 8, seed=1, epoch=0, world_size=2, rank=0)
    r1 = collate.epoch_batches(lengths, 8, seed=1, epoch=0, world_size=2, rank=1)
    assert len(r0) == len(r1)
    assert len(set(sum(r0, [])) & set(sum(r1, []))) <= 16 - 1000 % 16  # only the few rows repeated to even out


def test_length_splits_keep_every_row_and_cut_the_padding():
    lengths = [30, 200, 35, 41, 33, 90, 38, 36]
    runs = collate.length_splits(lengths, call_cost=64)
    assert sorted(i for r in runs for i in r) == list(range(8))
    padded = sum(len(r) * max(lengths[i] for i in r) for r in runs)
    assert padded < 0.4 * len(lengths) * max(lengths)  # one padded batch: 1600 positions
    assert runs[-1] == [1]  # the long row alone, the short ones together
    assert collate.length_splits(lengths, call_cost=10**6) == [sorted(range(8), key=lambda i: lengths[i])]
    assert collate.length_splits([], call_cost=64) == []


def test_sub_batches_give_the_same_gradient_as_the_whole_batch(tiny, tokenizer):
    from transformers import AutoModelForCausalLM

    from sft_trainer.train import loss_sum

    rows = ROWS + [{"instruction": "Repeat the list backwards.", "input": " ".join(["apple river stone"] * 20),
                    "output": " ".join(["stone river apple"] * 20)}]
    examples, _ = tokenize(rows, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(tiny / "model", attn_implementation="sdpa")

    def grads(batches):
        model.zero_grad()
        n = sum(collate.trained_tokens(b) for b in batches)
        for b in batches:
            (loss_sum(model, b) / n).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    whole = grads([collate.pad_batch(examples, tokenizer.pad_token_id)])
    runs = collate.length_splits([len(e) for e in examples], call_cost=8)
    assert len(runs) > 1
    split = grads([collate.pad_batch([examples[i] for i in r], tokenizer.pad_token_id) for r in runs])
    assert torch.allclose(whole, split, rtol=1e-4, atol=1e-6)


def test_packed_batch_resets_positions_and_matches_the_unpacked_loss(tiny, tokenizer):
    from transformers import AutoModelForCausalLM

    from sft_trainer.train import loss_sum

    examples, _ = tokenize(ROWS, tokenizer)
    packed = collate.pack_batch(examples)
    pos = packed["position_ids"][0].tolist()
    starts = [i for i, p in enumerate(pos) if p == 0]
    assert starts == [0] + list(__import__("itertools").accumulate(len(e) for e in examples))[:-1]
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] == 1
    padded = collate.pad_batch(examples, tokenizer.pad_token_id)
    assert collate.trained_tokens(packed) == collate.trained_tokens(padded)

    model = AutoModelForCausalLM.from_pretrained(tiny / "model", attn_implementation="sdpa").eval()
    with torch.no_grad():
        a = loss_sum(model, packed) / collate.trained_tokens(packed)
        b = loss_sum(model, padded) / collate.trained_tokens(padded)
        # Without position ids the rows would see each other: the isolation is what makes them equal.
        leaky = loss_sum(model, {k: v for k, v in packed.items() if k != "position_ids"}) / collate.trained_tokens(packed)
    assert abs(float(a) - float(b)) < 1e-4
    assert abs(float(leaky) - float(b)) > 1e-3
