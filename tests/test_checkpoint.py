import json
import logging
import random
import shutil

import numpy as np
import pytest
import torch

from trainer.backends.accelerate import AccelerateBackend
from trainer.checkpoint import MARKER, Checkpointer, latest, verify
from trainer.config import TrainerConfig


@pytest.fixture(scope="module")
def backend():
    return AccelerateBackend(TrainerConfig())


def _parts(backend):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    model, opt = backend.prepare(model, opt)
    return model, opt, sched


def _train(model, opt, sched, steps):
    for _ in range(steps):
        model(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()


def _save(ck, step, model, opt, sched):
    return ck.save(step, model=model, optimizer=opt, scheduler=sched,
                   trainer_state={"step": step}, data_state={"batches": step})


def test_round_trip_restores_every_listed_piece(tmp_path, backend):
    model, opt, sched = _parts(backend)
    _train(model, opt, sched, 3)
    ck = Checkpointer(tmp_path, backend, keep_last_k=3)
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    path = _save(ck, 3, model, opt, sched)
    expect_rng = (random.random(), np.random.rand(), torch.rand(1).item())
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model, opt, sched, 2)  # move everything away

    model2, opt2, sched2 = _parts(backend)
    trainer_state, data_state = ck.load(path, model=model2, optimizer=opt2, scheduler=sched2)
    ck.restore_rng(path)
    assert (trainer_state, data_state) == ({"step": 3}, [{"batches": 3}])
    assert all(torch.equal(weights[k], v) for k, v in model2.state_dict().items())
    assert sched2.last_epoch == 3
    assert opt2.state_dict()["state"][0]["step"].item() == 3
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expect_rng
    meta = json.loads((path / MARKER).read_text())
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json",
            "rng-rank0.pt", "data-rank0.json", "extra.pt"} == set(meta["files"])


def test_latest_skips_half_written_and_damaged(tmp_path, backend, caplog):
    model, opt, sched = _parts(backend)
    ck = Checkpointer(tmp_path, backend, keep_last_k=10)
    for step in (100, 200, 300):
        _save(ck, step, model, opt, sched)
    assert latest(tmp_path).name == "step-300"

    # a newer folder without the completeness marker, and an unfinished temp folder
    shutil.copytree(tmp_path / "step-300", tmp_path / "step-400")
    (tmp_path / "step-400" / MARKER).unlink()
    shutil.copytree(tmp_path / "step-300", tmp_path / ".step-500.partial")
    with caplog.at_level(logging.WARNING):
        assert latest(tmp_path).name == "step-300"
    assert "step-400" in caplog.text and "half-written" in caplog.text

    # a bit flip in the newest complete one: fall back to the one before
    f = tmp_path / "step-300" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x01
    f.write_bytes(bytes(data))
    assert "checksum" in verify(tmp_path / "step-300")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert latest(tmp_path).name == "step-200"
    assert "damaged" in caplog.text


def test_keep_last_k(tmp_path, backend):
    model, opt, sched = _parts(backend)
    ck = Checkpointer(tmp_path, backend, keep_last_k=2)
    for step in range(1, 6):
        _save(ck, step, model, opt, sched)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-4", "step-5"]


def test_resume_path_must_be_complete(tmp_path, backend):
    model, opt, sched = _parts(backend)
    ck = Checkpointer(tmp_path, backend, keep_last_k=2)
    path = _save(ck, 1, model, opt, sched)
    (path / MARKER).unlink()
    with pytest.raises(RuntimeError, match="half-written"):
        ck.resolve(str(path))
    assert ck.resolve("never") is None
    assert ck.resolve("auto") is None


class _Payload:
    """Unpickling this runs a command: what a tampered checkpoint file could carry."""

    def __init__(self, flag):
        self.flag = flag

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.flag}",))


def test_checkpoint_files_load_weights_only(tmp_path):
    """Our files, and DeepSpeed's (which it reads with weights_only=False), load without
    running pickled code: a planted payload is refused and never runs."""
    import pickle

    from trainer.backends.deepspeed import weights_only_torch_load
    from trainer.checkpoint import load_weights_only

    flag = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"state": _Payload(flag)}, evil)
    with pytest.raises(pickle.UnpicklingError):
        load_weights_only(evil)
    with weights_only_torch_load(), pytest.raises(pickle.UnpicklingError):
        torch.load(evil, weights_only=False)  # as DeepSpeed's checkpoint engine calls it
    assert torch.load.__module__.startswith("torch")  # restored after the block
    assert not flag.exists()
    torch.load(evil, weights_only=False)  # the payload is real: unguarded, it runs
    assert flag.exists()


def test_failpoint_spec_is_read_and_bad_specs_are_named():
    from trainer.faults import _parse

    assert _parse("save.marker@80/0=pause, step.loss@12=nan") == {
        ("save.marker", 80): (0, "pause"), ("step.loss", 12): (None, "nan")}
    with pytest.raises(ValueError, match="cannot read 'save.marker80=pause'"):
        _parse("save.marker80=pause")
