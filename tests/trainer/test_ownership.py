"""Checkpoints belong to their run: another run's checkpoint is never resumed (or deleted), two live runs
cannot share a destination, and a checkpoint is loaded without running code planted in it."""

from __future__ import annotations

import json
import os
import pickle
import socket
import time

import pytest

pytestmark = pytest.mark.trainer

torch = pytest.importorskip("torch")

from sft_trainer import __main__ as entry  # noqa: E402
from sft_trainer import checkpoint, ownership  # noqa: E402
from sft_contract.spec import TrainingSpec  # noqa: E402
from sft_trainer.errors import TrainerError  # noqa: E402
from sft_contract.exit_codes import ExitCode  # noqa: E402

from trainer_helpers import run_interrupted_at, write_config  # noqa: E402


@pytest.fixture
def spec(make_spec):
    return make_spec(hyperparameters={"maxSteps": 6}, evaluation={"strategy": "no"}, dataset={"validationSplit": 0},
                     checkpointing={"strategy": "steps", "steps": 2})


def interrupted(spec: dict) -> None:
    """A run stopped by SIGTERM at step 3: checkpoints at steps 2 and 3 stay behind."""
    run_interrupted_at(spec, 3)


def exit_of(spec: dict, tmp_path, monkeypatch) -> tuple[int, str]:
    term = tmp_path / "termination-log"
    monkeypatch.setenv("SFT_TERMINATION_LOG", str(term))
    code = entry.main(["--config", str(write_config(spec, tmp_path / "config.json"))])
    return code, term.read_text().strip() if term.exists() else ""


def snapshot(folder):
    return {p.relative_to(folder): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("how", ["edited config (sftctl run)", "another SFTJob uid"])
def test_a_checkpoint_of_another_run_is_never_resumed_nor_deleted(spec, tmp_path, monkeypatch, how):
    if how == "another SFTJob uid":
        monkeypatch.setenv("SFT_RUN_ID", "uid-of-the-deleted-sftjob")
    interrupted(spec)
    ckpts = tmp_path / "out" / "checkpoints"
    before = snapshot(ckpts)
    assert len(before) > 0
    if how == "another SFTJob uid":
        monkeypatch.setenv("SFT_RUN_ID", "uid-of-the-new-sftjob")
        again = spec
    else:
        again = {**spec, "hyperparameters": {**spec["hyperparameters"], "learningRate": 1e-3}}
    code, reason = exit_of(again, tmp_path, monkeypatch)
    assert code == ExitCode.INVALID_CONFIG
    assert f"{tmp_path / 'out' / 'checkpoints'}/step-00000002 is a checkpoint of another run" in reason
    assert "Use a new output.destination" in reason
    assert snapshot(ckpts) == before  # untouched: nothing resumed, rotated or deleted
    assert not (tmp_path / "out" / "model").exists()


def test_the_same_run_resumes_and_records_its_id(spec, tmp_path, monkeypatch):
    monkeypatch.setenv("SFT_RUN_ID", "uid-1234")
    interrupted(spec)
    state = json.loads((tmp_path / "out" / "checkpoints" / "step-00000003" / "trainer_state.json").read_text())
    assert state["runId"] == "uid-1234" and state["step"] == 3
    code, reason = exit_of(spec, tmp_path, monkeypatch)
    assert code == ExitCode.OK, reason
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["runId"] == "uid-1234"
    assert not (tmp_path / "out" / ownership.LOCK).exists()  # released at the end


def test_a_live_run_holding_the_destination_stops_a_second_one_and_a_stale_lock_is_taken_over(spec, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    lock = out / ownership.LOCK
    lock.write_text(json.dumps({"runId": "uid-other", "host": "trainer-pod-0", "pid": 7, "heartbeat": time.time() - 5}))
    code, reason = exit_of(spec, tmp_path, monkeypatch)
    assert code == ExitCode.INVALID_CONFIG
    assert reason.startswith(f"{out}/.sft-lock: another run (uid-other, pod trainer-pod-0, pid 7) holds it")
    assert not (out / "checkpoints").exists()

    lock.write_text(json.dumps({"runId": "uid-other", "host": "trainer-pod-0", "pid": 7,
                                "heartbeat": time.time() - ownership.STALE_S - 1}))  # that pod was killed
    code, reason = exit_of(spec, tmp_path, monkeypatch)
    assert code == ExitCode.OK, reason


def test_a_second_copy_of_the_same_run_on_this_host_is_stopped(spec, tmp_path, monkeypatch):
    import subprocess
    import sys

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a live process of "the run"
    try:
        out = tmp_path / "out"
        out.mkdir()
        rid = ownership.run_id(TrainingSpec.model_validate(spec))
        (out / ownership.LOCK).write_text(json.dumps({"runId": rid, "host": socket.gethostname(), "pid": other.pid,
                                                      "heartbeat": time.time()}))
        code, reason = exit_of(spec, tmp_path, monkeypatch)
    finally:
        other.kill()
        other.wait()
    assert code == ExitCode.INVALID_CONFIG and f"a second copy of this run (pod {socket.gethostname()}" in reason


class Planted:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PLANTED_MARKER']}",))


def test_code_planted_in_a_checkpoint_is_refused_not_run(spec, tmp_path, monkeypatch):
    interrupted(spec)
    newest = tmp_path / "out" / "checkpoints" / "step-00000003"
    marker = tmp_path / "pwned"
    monkeypatch.setenv("PLANTED_MARKER", str(marker))
    with open(newest / "optimizer.pt", "wb") as f:
        pickle.dump({"optimizer": Planted()}, f)
    code, reason = exit_of(spec, tmp_path, monkeypatch)
    assert code == ExitCode.DATA_ERROR
    assert reason.startswith(f"{newest}: cannot be loaded safely as a checkpoint (UnpicklingError")
    assert not marker.exists()


def test_a_superseded_writer_stops_before_its_next_commit_and_deletes_nothing(tmp_path, monkeypatch):
    """A partition: the old pod (A) keeps running while its replacement (B) of the same run takes the lock
    over. Two writers in one process stand for the two pods."""
    out = tmp_path / "out"
    ckpts = out / "checkpoints"
    out.mkdir()
    tensors, states = {"w": torch.ones(2, 2)}, {"optimizer": {}}
    monkeypatch.setenv("SFT_POD_NAME", "trainer-0-aaaaa")
    a = ownership.DestinationLock(out, "uid-1", str(out))
    a.acquire()
    checkpoint.save(ckpts, 2, tensors, states, {"runId": "uid-1", "step": 2}, fence=a.check)

    monkeypatch.setenv("SFT_POD_NAME", "trainer-0-bbbbb")  # the replacement: same run, same host name
    b = ownership.DestinationLock(out, "uid-1", str(out))
    b.acquire()  # at once: the old pod is unreachable, not known dead
    checkpoint.clean_partial(ckpts, fence=b.check)
    checkpoint.save(ckpts, 3, tensors, states, {"runId": "uid-1", "step": 3}, fence=b.check)
    before = snapshot(ckpts)

    with pytest.raises(ownership.Superseded) as stopped:
        checkpoint.save(ckpts, 4, tensors, states, {"runId": "uid-1", "step": 4}, fence=a.check)
    assert stopped.value.code == ExitCode.SUPERSEDED
    assert "pod trainer-0-bbbbb took the lock over (epoch 2, this pod trainer-0-aaaaa held epoch 1)" in stopped.value.reason
    with pytest.raises(ownership.Superseded):
        checkpoint.rotate(ckpts, keep=1, fence=a.check)
    with pytest.raises(ownership.Superseded):
        checkpoint.clean_partial(ckpts, fence=a.check)
    assert a.refresh() is False  # A's heartbeat leaves B's lock alone
    a.release()  # and so does its release
    assert snapshot(ckpts) == before  # nothing of B's deleted, no step 4 committed by A
    held = json.loads((out / ownership.LOCK).read_text())
    assert (held["pod"], held["epoch"]) == ("trainer-0-bbbbb", 2)
    b.check()  # B goes on
    checkpoint.rotate(ckpts, keep=1, fence=b.check)
    assert [p.name for p in checkpoint.complete(ckpts)] == ["step-00000003"]
    b.release()
    assert not (out / ownership.LOCK).exists()


def test_a_run_whose_destination_is_taken_over_stops_with_79_and_writes_no_model(spec, tmp_path, monkeypatch):
    from sft_trainer import train

    monkeypatch.setenv("SFT_RUN_ID", "uid-1")
    monkeypatch.setenv("SFT_POD_NAME", "trainer-0-aaaaa")
    out = tmp_path / "out"
    replacement = []

    def partition_at_step_3(report):
        if report.step == 3 and not replacement:  # the replacement pod starts and takes the lock
            monkeypatch.setenv("SFT_POD_NAME", "trainer-0-bbbbb")
            replacement.append(ownership.DestinationLock(out, "uid-1", str(out)))
            replacement[0].acquire()

    with pytest.raises(TrainerError) as stopped:
        train.run(TrainingSpec.model_validate(spec), stdout=None, listener=partition_at_step_3)
    assert stopped.value.code == ExitCode.SUPERSEDED and "trainer-0-bbbbb took the lock over" in stopped.value.reason
    assert [p.name for p in checkpoint.complete(out / "checkpoints")] == ["step-00000002"]  # none after step 3
    assert not (out / "model").exists() and not (out / "metrics.json").exists()
    assert json.loads((out / ownership.LOCK).read_text())["pod"] == "trainer-0-bbbbb"  # still the new owner's
    replacement[0].release()
