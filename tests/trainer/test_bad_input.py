"""Bad input ends with a clean exit code naming the file, row or field (never exit 1, which the Job retries
with a model reload each time); a hub that stays unreachable exits 69, which the Job retries."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytestmark = pytest.mark.trainer

torch = pytest.importorskip("torch")

from sft_trainer import __main__ as entry  # noqa: E402
from sft_trainer import architectures, data  # noqa: E402
from sft_contract.exit_codes import ExitCode  # noqa: E402

from trainer_helpers import read_log, run_interrupted_at, run_module, trainer_env, write_config  # noqa: E402


@pytest.fixture
def exit_of(tmp_path, monkeypatch):
    """Run the trainer's entry point on a spec; (exit code, termination message)."""
    term = tmp_path / "termination-log"
    monkeypatch.setenv("SFT_TERMINATION_LOG", str(term))

    def run(spec: dict) -> tuple[int, str]:
        code = entry.main(["--config", str(write_config(spec, tmp_path / "config.json"))])
        return code, term.read_text().strip() if term.exists() else ""

    return run


def test_a_long_csv_field_is_read_and_a_huge_one_names_its_row(make_spec, tmp_path, exit_of, monkeypatch):
    long = tmp_path / "long.csv"
    long.write_text("prompt,completion\n" + f"say it,{'a' * 200_000}\n")  # over Python's default 131,072
    assert len(data.read_rows(str(long))[0].data["completion"]) == 200_000
    huge = tmp_path / "huge.csv"
    monkeypatch.setattr(data, "CSV_FIELD_LIMIT", 1_000_000)  # the limit is 16 Mi characters; a smaller file here
    huge.write_text("prompt,completion\np,c\n" + f"say it,{'a' * 1_000_001}\n")
    code, reason = exit_of(make_spec(dataset={"train": {"source": str(huge)}}))
    assert code == ExitCode.DATA_ERROR
    assert reason == f"{huge} row 2: field larger than field limit (1000000)"


def test_deeply_nested_json_row_exits_65_naming_the_row(make_spec, tmp_path, exit_of):
    f = tmp_path / "train.jsonl"
    f.write_text('{"instruction": "a", "output": "b"}\n' + '{"instruction": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    code, reason = exit_of(make_spec(dataset={"train": {"source": str(f)}}))
    assert (code, reason) == (ExitCode.DATA_ERROR, f"{f} row 2: JSON nested too deeply to be a training row")


def test_a_chat_template_that_rejects_the_roles_exits_65_naming_the_row(make_spec, tmp_path, exit_of):
    model = architectures.build(architectures.FAMILIES["llama"], tmp_path / "llama2")  # [INST] template
    f = tmp_path / "chat.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"},
                        {"role": "assistant", "content": "hello"}]}
    f.write_text("".join(json.dumps(r) + "\n" for r in (good, good, bad)))
    code, reason = exit_of(make_spec(model={"source": str(model)}, dataset={"train": {"source": str(f)}}))
    assert code == ExitCode.DATA_ERROR
    assert reason == (f"{f} row 3: the tokenizer's chat template rejects these messages: "
                      "Conversation roles must alternate user/assistant/user/assistant/...")


def test_unknown_lora_target_modules_exit_64_listing_the_real_ones(make_spec, exit_of):
    code, reason = exit_of(make_spec(peft={"targetModules": ["q_proj", "qkv_projection"]}))
    assert code == ExitCode.INVALID_CONFIG
    assert reason == ("peft.targetModules: qkv_projection not in this model; its linear layers are down_proj, "
                      "gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj (or use all-linear)")


def test_a_cut_off_last_log_line_is_dropped_on_resume_and_a_bad_middle_line_exits_65(make_spec, tmp_path, exit_of):
    def interrupted_at_step_3(dest):
        spec = make_spec(hyperparameters={"maxSteps": 6}, evaluation={"strategy": "no"}, dataset={"validationSplit": 0},
                         checkpointing={"strategy": "steps", "steps": 2}, output={"destination": str(dest)})
        run_interrupted_at(spec, 3)
        return spec, dest / "trainer_log.jsonl"

    spec, log = interrupted_at_step_3(tmp_path / "cut")
    log.write_text(log.read_text() + '{"step": 4, "epoch": 0.04, "lo')  # the disk filled up mid-write
    code, reason = exit_of(spec)
    assert code == ExitCode.OK, reason
    assert [r["step"] for r in read_log(tmp_path / "cut") if "loss" in r] == [1, 2, 3, 4, 5, 6]

    spec, log = interrupted_at_step_3(tmp_path / "bad")
    first, *rest = log.read_text().splitlines()
    log.write_text("\n".join([first, "{garbage", *rest]) + "\n")
    code, reason = exit_of(spec)
    assert code == ExitCode.DATA_ERROR
    assert reason.startswith(f"{log} line 2: not a JSON object")


class HubDown(BaseHTTPRequestHandler):
    status = 503
    requests = 0

    def _answer(self):
        type(self).requests += 1
        self.send_response(self.status)
        self.send_header("Retry-After", "0")  # huggingface_hub's own retries wait 1 s instead of 1-8 s
        self.end_headers()

    do_GET = do_HEAD = _answer

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status, expected", [(503, ExitCode.STORAGE_UNAVAILABLE), (404, ExitCode.MODEL_LOAD_ERROR)])
def test_an_unreachable_hub_is_retried_then_exits_69_and_a_missing_model_exits_67(make_spec, tmp_path, status, expected):
    HubDown.status, HubDown.requests = status, 0
    srv = ThreadingHTTPServer(("127.0.0.1", 0), HubDown)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    env = trainer_env(HF_ENDPOINT=f"http://127.0.0.1:{srv.server_address[1]}", HF_HOME=str(tmp_path / "hf"),
                      SFT_HUB_ATTEMPTS="2", SFT_HUB_RETRY_DELAY="0.1", SFT_TERMINATION_LOG=str(tmp_path / "term"))
    env.pop("HF_HUB_OFFLINE", None)
    cfg = write_config(make_spec(model={"source": "some-org/some-model"}), tmp_path / "config.json")
    try:
        result = run_module("sft_trainer", "--config", str(cfg), env=env, timeout=120)
    finally:
        srv.shutdown()
    reason = (tmp_path / "term").read_text()
    assert result.returncode == expected, result.stderr[-2000:]
    assert "some-org/some-model" in reason
    if status == 503:
        assert "still unreachable after 2 attempts" in reason and "attempt 2 of 2" in result.stderr
        assert HubDown.requests >= 2 * 6  # huggingface_hub's own 5 retries inside each of our attempts
    else:
        assert "transient failure" not in result.stderr  # a missing model is not retried


def test_a_cluster_spec_run_locally_says_the_claim_is_not_mounted_and_how_to_map_it(tmp_path, monkeypatch):
    # Issue #19: `sftctl run examples/dev-cluster-tiny.yaml` used to end in a hub lookup of "/mnt/pvc/...".
    import io

    from rich.console import Console
    from sft_trainer import local

    from trainer_helpers import ROOT

    monkeypatch.setenv("SFT_PVC_ROOT", str(tmp_path / "no-claims-here"))
    out = io.StringIO()
    code = local.run(ROOT / "examples" / "dev-cluster-tiny.yaml", console=Console(file=out, width=400))
    text = " ".join(out.getvalue().split())
    assert code == ExitCode.INVALID_CONFIG, text
    assert "not mounted on this machine: the claim 'datasets' (spec.model.source)" in text
    assert "SFT_PVC_ROOT" in text and "Repo id" not in text


@pytest.mark.parametrize("source, says", [
    ("pvc://models/missing", "pvc://models/missing: no such file or folder"),
    ("s3://models/base/missing", "s3://models/base/missing: not in the fetch cache"),
])
def test_a_missing_pvc_or_s3_model_exits_67_naming_it_without_a_hub_lookup(make_spec, tmp_path, monkeypatch, exit_of,
                                                                           source, says):
    (tmp_path / "pvcs" / "models").mkdir(parents=True)
    monkeypatch.setenv("SFT_PVC_ROOT", str(tmp_path / "pvcs"))
    monkeypatch.setenv("SFT_CACHE_DIR", str(tmp_path / "cache"))
    code, reason = exit_of(make_spec(model={"source": source}))
    assert code == ExitCode.MODEL_LOAD_ERROR, reason
    assert says in reason and "Repo id" not in reason
