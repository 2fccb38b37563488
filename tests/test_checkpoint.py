import json
import logging
import random
import shutil
import threading

import numpy as np
import pytest
import torch

from data_pipelines.shards import sha256_file
from trainer.backends.accelerate import AccelerateBackend
from trainer.checkpoint import (
    MARKER,
    Checkpointer,
    CheckpointError,
    IncompatibleCheckpointError,
    complete_checkpoints,
    file_digest,
    latest,
    rng_state,
    share_of,
    verify,
)
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
    return ck.save(
        step, model=model, optimizer=opt, scheduler=sched, trainer_state={"step": step}, data_state={"batches": step}
    )


def _flip_bit(path, at=-3):
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


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
    assert {
        "state/.metadata",
        "state/__0_0.distcp",
        "scheduler.pt",
        "trainer_state.json",
        "rng-rank0.pt",
        "data-rank0.json",
        "extra.pt",
    } == set(meta["files"])
    assert (meta["format"], meta["hash"], meta["layout"], meta["world_size"]) == (2, "xxh3_128", "dcp", 1)
    for name, entry in meta["files"].items():  # who wrote it, how big, its digest
        assert entry["rank"] == 0 and entry["bytes"] == (path / name).stat().st_size
        assert entry["digest"] == file_digest(path / name)


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
        assert ck.resolve("auto").name == "step-300"
    assert "step-400" in caplog.text and "half-written" in caplog.text

    # a bit flip in the newest complete one's shard: fall back to the one before
    _flip_bit(tmp_path / "step-300" / "state/__0_0.distcp")
    assert "state/__0_0.distcp does not match its checksum (written by rank 0)" in verify(tmp_path / "step-300")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert latest(tmp_path).name == "step-200"
        assert ck.resolve("auto").name == "step-200"
    assert "damaged" in caplog.text
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        ck.resolve(str(tmp_path / "step-300"))
    # a shard cut short says so before any hashing
    f = tmp_path / "step-200" / "state/__0_0.distcp"
    f.write_bytes(f.read_bytes()[:-10])
    assert "bytes, " in verify(tmp_path / "step-200") and "were written" in verify(tmp_path / "step-200")


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


def test_background_save_keeps_the_state_of_its_step(tmp_path, backend, monkeypatch):
    """trainer.checkpoint_async: save returns once the state is staged; the weights may move
    on at once, and the checkpoint still holds the step it was asked for."""
    model, opt, sched = _parts(backend)
    _train(model, opt, sched, 3)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = opt.state_dict()["state"][0]["exp_avg"].clone()
    gate = threading.Event()  # the background write starts only once the weights have moved
    real = backend.checkpoint_writer

    def gated(*args, **kwargs):
        write = real(*args, **kwargs)
        return lambda: gate.wait(30) and write()

    monkeypatch.setattr(backend, "checkpoint_writer", gated)
    ck = Checkpointer(tmp_path, backend, keep_last_k=3, background=True)
    path = _save(ck, 3, model, opt, sched)
    assert not (tmp_path / "step-3").exists()  # returned before the write
    _train(model, opt, sched, 2)
    gate.set()
    ck.wait()
    assert ck._pending is None and verify(path) is None
    [done] = ck.take_finished()
    assert done["step"] == 3 and 0 < done["blocked_s"] <= done["save_s"]
    model2, opt2, sched2 = _parts(backend)
    ck.load(path, model=model2, optimizer=opt2, scheduler=sched2)
    assert all(torch.equal(weights[k], v) for k, v in model2.state_dict().items())
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], moments)
    # the next save waits for the one in flight; both end up complete
    _save(ck, 4, model, opt, sched)
    _save(ck, 5, model, opt, sched)
    ck.wait()
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-3", "step-4", "step-5"]


def _earlier_layout(path, model, opt, sched):
    """A checkpoint as the trainer wrote them before DCP: whole files by rank 0, sha256."""
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    torch.save(opt.state_dict(), path / "optimizer.pt")
    torch.save(sched.state_dict(), path / "scheduler.pt")
    torch.save({}, path / "extra.pt")
    torch.save(rng_state(), path / "rng-rank0.pt")
    (path / "data-rank0.json").write_text(json.dumps({"batches": 7}))
    (path / "trainer_state.json").write_text(json.dumps({"step": 7}))
    files = {p.name: sha256_file(p) for p in sorted(path.iterdir())}
    (path / MARKER).write_text(json.dumps({"step": 7, "world_size": 1, "time": 0, "files": files}))


def test_checkpoints_of_the_earlier_layout_still_load(tmp_path, backend):
    model, opt, sched = _parts(backend)
    _train(model, opt, sched, 7)
    _earlier_layout(tmp_path / "step-7", model, opt, sched)
    ck = Checkpointer(tmp_path, backend, keep_last_k=3)
    assert ck.resolve("auto") == tmp_path / "step-7"
    model2, opt2, sched2 = _parts(backend)
    assert ck.load(tmp_path / "step-7", model=model2, optimizer=opt2, scheduler=sched2) == (
        {"step": 7},
        [{"batches": 7}],
    )
    assert all(torch.equal(model.state_dict()[k], v) for k, v in model2.state_dict().items())
    assert opt2.state_dict()["state"][0]["step"].item() == 7 and sched2.last_epoch == 7
    _flip_bit(tmp_path / "step-7" / "model.safetensors")  # its sha256 digests are still checked
    assert "model.safetensors does not match its checksum" in verify(tmp_path / "step-7")
    assert ck.resolve("auto") is None


def test_a_checkpoint_of_another_model_shape_is_refused_by_name(tmp_path, backend):
    model, opt, sched = _parts(backend)
    _save(Checkpointer(tmp_path / "dcp", backend, keep_last_k=1), 1, model, opt, sched)
    _earlier_layout(tmp_path / "old" / "step-7", model, opt, sched)
    torch.manual_seed(0)
    wider = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    wopt = torch.optim.AdamW(wider.parameters(), lr=0.1)
    wider, wopt = backend.prepare(wider, wopt)
    wsched = torch.optim.lr_scheduler.LambdaLR(wopt, lambda s: 1.0)
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    for ckpt in (tmp_path / "dcp/step-1", tmp_path / "old/step-7"):
        with pytest.raises(IncompatibleCheckpointError, match=r"'0.weight' is \(16, 4\) in the model but \(8, 4\)"):
            Checkpointer(ckpt.parent, backend, keep_last_k=1).load(ckpt, model=wider, optimizer=wopt, scheduler=wsched)
    assert all(torch.equal(before[k], v) for k, v in wider.state_dict().items())  # nothing loaded


def test_a_deepspeed_checkpoint_under_accelerate_says_which_backend_wrote_it(tmp_path, backend):
    model, opt, sched = _parts(backend)
    path = _save(Checkpointer(tmp_path, backend, keep_last_k=1), 1, model, opt, sched)
    shutil.rmtree(path / "state")
    (path / "deepspeed").mkdir()
    with pytest.raises(IncompatibleCheckpointError, match="written by DeepSpeed.*trainer.backend=deepspeed"):
        Checkpointer(tmp_path, backend, keep_last_k=1).load(path, model=model, optimizer=opt, scheduler=sched)


def test_verification_is_split_by_bytes_and_reads_each_file_once():
    sizes = {f"f{i}": s for i, s in enumerate([100, 90, 50, 40, 30, 5, 5, 1])}
    for world in (1, 2, 3, 5):
        shares = [share_of(sizes, r, world) for r in range(world)]
        assert sorted(n for s in shares for n in s) == sorted(sizes)  # every file once
        loads = [sum(sizes[n] for n in s) for s in shares]
        assert max(loads) - min(loads) <= max(sizes.values())


def _through(module: str, name: str, command: str) -> bytes:
    """A pickle that calls `module`.`name`(command), the name dotted (protocol 4's STACK_GLOBAL
    resolves `filesystem` + `os.system` through the module's own imports)."""

    def text(x: str) -> bytes:
        return b"\x8c" + bytes([len(x)]) + x.encode()

    return b"\x80\x04" + text(module) + text(name) + b"\x93" + text(command) + b"\x85R."


def test_a_tampered_dcp_index_is_refused_without_running_it(tmp_path, backend):
    import pickle

    model, opt, sched = _parts(backend)
    path = _save(Checkpointer(tmp_path, backend, keep_last_k=1), 1, model, opt, sched)
    flag = tmp_path / "ran"
    for payload, named in [
        (pickle.dumps({"x": _Payload(flag)}), "posix.system"),
        (
            _through("torch.distributed.checkpoint.filesystem", "os.system", f"touch {flag}"),
            "torch.distributed.checkpoint.filesystem.os.system",
        ),
    ]:
        (path / "state/.metadata").write_bytes(payload)
        model2, opt2, sched2 = _parts(backend)
        with pytest.raises(pickle.UnpicklingError, match=f"refusing to load {named}"):
            Checkpointer(tmp_path, backend, keep_last_k=1).load(path, model=model2, optimizer=opt2, scheduler=sched2)
    assert not flag.exists()
    pickle.loads(_through("torch.distributed.checkpoint.filesystem", "os.system", f"touch {flag}"))
    assert flag.exists()  # the dotted payload is real: plain pickle runs it


def test_a_tampered_optimizer_value_in_a_shard_is_refused(tmp_path, backend):
    """The optimizer's param groups are stored as pickled values inside the shard files; DCP's
    own planner would load them with weights_only=False."""
    import pickle

    import torch.distributed.checkpoint as dcp

    from trainer import sharded

    model, opt, sched = _parts(backend)
    _train(model, opt, sched, 1)
    path = _save(Checkpointer(tmp_path, backend, keep_last_k=1), 1, model, opt, sched)
    flag = tmp_path / "ran"
    state = sharded.state_of(backend.unwrap(model), opt.optimizer)
    state["optim"]["param_groups"][0]["lr"] = _Payload(flag)
    shutil.rmtree(path / "state")
    dcp.save(state, checkpoint_id=str(path / "state"), no_dist=True)  # digests do not help: rewrite them
    meta = json.loads((path / MARKER).read_text())
    for name in ("state/__0_0.distcp", "state/.metadata"):
        meta["files"][name] = {"digest": file_digest(path / name), "bytes": (path / name).stat().st_size, "rank": 0}
    (path / MARKER).write_text(json.dumps(meta))
    assert verify(path) is None
    model2, opt2, sched2 = _parts(backend)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        Checkpointer(tmp_path, backend, keep_last_k=1).load(path, model=model2, optimizer=opt2, scheduler=sched2)
    with pytest.raises(pickle.UnpicklingError):
        sharded.read_all(path / "state")
    assert not flag.exists()


def test_an_optimizer_that_never_stepped_is_saved_as_it_is(tmp_path, backend):
    """Every step so far skipped (fp16 overflows, trainer.nonfinite=skip): the optimizer has no
    state. Saving must not give it one (DCP's helper runs a zero-lr step to build it, which
    would count AdamW's first real step as its second), and the resumed run steps as the
    unbroken one does."""
    model, opt, sched = _parts(backend)
    path = _save(Checkpointer(tmp_path, backend, keep_last_k=1), 1, model, opt, sched)
    assert not opt.optimizer.state  # untouched by the save
    model2, opt2, sched2 = _parts(backend)
    Checkpointer(tmp_path, backend, keep_last_k=1).load(path, model=model2, optimizer=opt2, scheduler=sched2)
    assert not opt2.optimizer.state
    torch.manual_seed(3)
    _train(model, opt, sched, 2)
    torch.manual_seed(3)
    _train(model2, opt2, sched2, 2)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in model2.state_dict().items())
    assert opt2.state_dict()["state"][0]["step"].item() == opt.state_dict()["state"][0]["step"].item() == 2


def test_export_writes_indexed_shards_that_other_readers_load(tmp_path, backend):
    """A DCP checkpoint -> Hugging Face-style shards of at most max_shard_size, a tensor group
    at a time; accelerate's reader of the index format and a plain load_model agree."""
    from accelerate.utils import load_checkpoint_in_model
    from safetensors.torch import load_file

    from trainer.export import INDEX, export_checkpoint, exported_files

    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)])
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    net, opt = backend.prepare(net, opt)
    path = _save(Checkpointer(tmp_path / "ck", backend, keep_last_k=1), 1, net, opt, sched)
    files = export_checkpoint(path, tmp_path / "out", max_shard_size="20KB")  # 16.6 KB a layer
    assert [f.name for f in files] == [
        "model-00001-of-00004.safetensors",
        "model-00002-of-00004.safetensors",
        "model-00003-of-00004.safetensors",
        "model-00004-of-00004.safetensors",
    ]
    assert all(f.stat().st_size < 20_000 for f in files)
    index = json.loads((tmp_path / "out" / INDEX).read_text())
    assert set(index["weight_map"]) == set(net.state_dict())
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in net.state_dict().values())
    fresh = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)])
    load_checkpoint_in_model(fresh, str(tmp_path / "out" / INDEX))
    assert all(torch.equal(net.state_dict()[k], v) for k, v in fresh.state_dict().items())
    whole = {}
    for f in set(exported_files(tmp_path / "out").values()):
        whole.update(load_file(str(f)))
    assert all(torch.equal(net.state_dict()[k], whole[k]) for k in whole)
    # one shard when the model fits: a plain model.safetensors, no index
    files = export_checkpoint(path, tmp_path / "out", max_shard_size="5GB")
    assert [f.name for f in files] == ["model.safetensors"] and not (tmp_path / "out" / INDEX).exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.safetensors"]


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
        ("save.marker", 80): (0, "pause"),
        ("step.loss", 12): (None, "nan"),
    }
    with pytest.raises(ValueError, match="cannot read 'save.marker80=pause'"):
        _parse("save.marker80=pause")
