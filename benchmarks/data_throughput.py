"""Samples/s of the data path: tar shards against a file per sample, over HTTP and from
local disk, and against what a smoke training step consumes.

    .venv/bin/python -m benchmarks.data_throughput [--samples N] [--repeats R] [--quick]
                                                   [--batch-size B] [--server auto|nginx|python]
                                                   [--smoke-only] [--train-threads T]

Makes N small captioned images (32x32 RGB PNGs of coloured rectangles and circles, one
caption each) in a temp dir, written both as files (`<key>.png` + `<key>.txt`) and as
WebDataset shards of up to 1000 samples, and serves that dir from a web server on
127.0.0.1 (nginx if installed, else Python's http.server), started and stopped here.
Every pipeline decodes the same way (PIL -> numpy -> tensor, caption bytes -> str) and
batches the same way:

* http_shard_vs_files: our ShardStream over http:// shard URLs (webdataset reads them
  through a `curl` pipe) / one keep-alive connection GETting each sample's two files.
  Also given against a connection per GET (what urllib does), over at most 4000 samples.
* stream_vs_webdataset: our ShardStream / webdataset's plain pipeline, same local shards.
* local files and local stream: file-per-sample reads from the page cache vs our stream;
  and decode_only, the same decode and batching of samples already in memory (the ceiling).
* shard_vs_train: our local stream / the samples/s of the MADE smoke model's training
  step (forward, backward, AdamW) on ready-made batches; also our stream through a real
  DataLoader (StreamLoader) with 1 and 2 workers, timed after each worker's first batch.
* smoke_shard_vs_train: what `make train` really reads. The digits shards as `make_shards
  digits` writes them (an .npy and a PNG per sample) through our local stream with each
  smoke model's own decode (its decode_batch), against that model's training step with
  --train-threads threads (make train's 2 ranks on 2 cores get 1 each); also the same
  shards without the .npy (as written before it; PNG decode), and a 1-worker StreamLoader.
  --smoke-only runs just this part.

Each repeat runs every pipeline once, in turn; samples/s are over medians. Earlier lines
are per-repeat JSON; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import http.client
import io
import itertools
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

if not __package__:  # `python benchmarks/this.py`: the repo root on sys.path, as with -m
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageDraw

from data_pipelines.shards import read_manifest, write_shards
from data_pipelines.sources import digits
from data_pipelines.stream import ShardList, ShardStream, StreamLoader, iter_raw_samples, resolve_shards
from models.autoregressive import (
    FactorizedConfig,
    FactorizedWorkload,
    FVSBNConfig,
    FVSBNWorkload,
    MADEConfig,
    MADEWorkload,
    NADEConfig,
    NADEWorkload,
)
from models.base import Workload

# the smoke models of `make train`, as configs/autoregressive/*.yaml build them
SMOKE_MODELS = {
    "factorized": lambda: FactorizedWorkload(FactorizedConfig()),
    "fvsbn": lambda: FVSBNWorkload(FVSBNConfig()),
    "nade": lambda: NADEWorkload(NADEConfig(hidden=256)),
    "made": lambda: MADEWorkload(MADEConfig(hidden=[512])),
}

SHUFFLE_BUFFER = 256
PREFETCH_FACTOR = 4
LOADER_WORKERS = (1, 2)
HTTP_TIMEOUT_S = 10.0
NEW_CONNECTION_MAX_SAMPLES = 4000  # x2 GETs, each a TCP connection left in TIME_WAIT
TARGETS = {"http_shard_vs_files": 3.0, "stream_vs_webdataset": 0.9, "shard_vs_train": 5.0}
SMOKE_TARGET = 3.0  # smoke_shard_vs_train of every smoke model
SMOKE_BATCHES = 600  # timed batches of the digits stream (~15 epochs of the train split)

COLOURS = {
    "red": (220, 50, 47),
    "green": (64, 160, 43),
    "blue": (38, 139, 210),
    "yellow": (235, 200, 40),
    "purple": (136, 57, 239),
    "orange": (254, 100, 11),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "grey": (128, 128, 128),
}


# ------------------------------------------------------------------ data
def make_sample(rng: np.random.Generator, index: int) -> dict:
    names = list(COLOURS)
    background = names[rng.integers(len(names))]
    image = Image.new("RGB", (32, 32), COLOURS[background])
    draw = ImageDraw.Draw(image)
    parts = []
    for _ in range(int(rng.integers(1, 4))):
        colour = names[rng.integers(len(names))]
        shape = ("rectangle", "circle")[int(rng.integers(2))]
        x0, y0 = (int(v) for v in rng.integers(0, 24, size=2))
        w, h = (int(v) for v in rng.integers(4, 16, size=2))
        box = [x0, y0, min(31, x0 + w), min(31, y0 + h)]
        (draw.rectangle if shape == "rectangle" else draw.ellipse)(box, fill=COLOURS[colour])
        parts.append(f"a {colour} {shape}")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    caption = " and ".join(parts) + f" on a {background} background"
    return {"__key__": f"{index:06d}", "png": buf.getvalue(), "txt": caption.encode()}


def build_data(root: Path, n: int, samples_per_shard: int) -> dict:
    """Write the samples as files under root/files and as shards under root/shards."""
    rng = np.random.default_rng(0)
    samples = [make_sample(rng, i) for i in range(n)]
    files = root / "files"
    files.mkdir()
    for s in samples:
        (files / f"{s['__key__']}.png").write_bytes(s["png"])
        (files / f"{s['__key__']}.txt").write_bytes(s["txt"])
    manifest = write_shards(iter(samples), root / "shards", prefix="shard", maxcount=samples_per_shard)
    return {
        "samples": samples,
        "keys": [s["__key__"] for s in samples],
        "mean_png_bytes": statistics.fmean(len(s["png"]) for s in samples),
        "mean_txt_bytes": statistics.fmean(len(s["txt"]) for s in samples),
        "shards": len(manifest["shards"]),
        "shard_bytes": sum(s["bytes"] for s in manifest["shards"]),
    }


def decode(sample: dict) -> tuple[torch.Tensor, str]:
    """The one decode every pipeline uses: (32, 32, 3) uint8 tensor and the caption."""
    image = torch.from_numpy(np.array(Image.open(io.BytesIO(sample["png"])).convert("RGB")))
    return image, sample["txt"].decode("utf-8")


def collate(samples: list) -> tuple[torch.Tensor, list[str]]:
    images, captions = zip(*samples)
    return torch.stack(images), list(captions)


def file_batches(read: Callable[[str], bytes], keys: Iterable[str], batch_size: int) -> Iterator[tuple]:
    batch = []
    for key in keys:
        batch.append(decode({"__key__": key, "png": read(f"{key}.png"), "txt": read(f"{key}.txt")}))
        if len(batch) == batch_size:
            yield collate(batch)
            batch = []


def read_local(folder: Path) -> Callable[[str], bytes]:
    def read(name: str) -> bytes:
        with open(folder / name, "rb") as f:
            return f.read()

    return read


class HTTPFileClient:
    """GETs of single files; counts the TCP connections it opened.

    keep_alive=True reuses one HTTP/1.1 connection (fair to the per-file path);
    False opens one per GET, as urllib.request.urlopen does."""

    def __init__(self, port: int, prefix: str, *, keep_alive: bool):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT_S)
        self.prefix, self.keep_alive = prefix, keep_alive
        self.connections = 0

    def read(self, name: str) -> bytes:
        if self.conn.sock is None:
            self.connections += 1
        self.conn.request("GET", f"{self.prefix}/{name}")
        response = self.conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise RuntimeError(f"GET {self.prefix}/{name}: HTTP {response.status}")
        if not self.keep_alive:
            self.conn.close()
        return body

    def close(self) -> None:
        self.conn.close()


# ------------------------------------------------------------------ web server
PYTHON_SERVER = r"""
import functools, sys
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

class Handler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as nginx does
    disable_nagle_algorithm = True  # as nginx's tcp_nodelay: else each GET waits ~40 ms

    def log_message(self, *args):
        pass

root, port = sys.argv[1], int(sys.argv[2])
ThreadingHTTPServer(("127.0.0.1", port), functools.partial(Handler, directory=root)).serve_forever()
"""

NGINX_CONF = """\
daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    keepalive_timeout 300s;
    keepalive_requests 1000000;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
}}
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(proc: subprocess.Popen, port: int, path: str, log: Path, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"web server exited with {proc.returncode}: "
                f"{log.read_text(errors='replace')[-2000:] if log.exists() else ''}"
            )
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
        try:
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(0.1)
    raise RuntimeError(f"web server on 127.0.0.1:{port} did not answer within {timeout_s:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (nginx: fast shutdown of master and workers), then SIGKILL its process group."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # the group we started: leftover nginx workers
    proc.wait()


@contextlib.contextmanager
def web_server(root: Path, choice: str, probe: str) -> Iterator[tuple[str, int]]:
    """Serve `root` on 127.0.0.1 from a child process; yields (server name, port)."""
    nginx = shutil.which("nginx")
    if choice == "nginx" and nginx is None:
        raise SystemExit("--server nginx: nginx is not installed (apt-get install -y nginx)")
    use_nginx = nginx is not None and choice != "python"
    port = free_port()
    prefix = root / "server"
    prefix.mkdir()
    log = prefix / "error.log"
    if use_nginx:
        version = subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr
        name = version.strip().split(": ")[-1]
        conf = prefix / "nginx.conf"
        conf.write_text(NGINX_CONF.format(prefix=prefix, port=port, root=root))
        cmd = [nginx, "-p", f"{prefix}/", "-c", str(conf), "-e", str(log)]
    else:
        name = f"python{sys.version_info.major}.{sys.version_info.minor} http.server (ThreadingHTTPServer, HTTP/1.1)"
        cmd = [sys.executable, "-c", PYTHON_SERVER, str(root), str(port)]
    with open(prefix / "stdout.log", "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    try:
        wait_until_serving(proc, port, probe, log if use_nginx else prefix / "stdout.log")
        yield name, port
    finally:
        stop(proc)


# ------------------------------------------------------------------ timing
def cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process and its children)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
    machine = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    ours = sum(
        r.ru_utime + r.ru_stime
        for r in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN))
    )
    return machine, ours


def time_batches(batches: Iterable, n: int, warmup: int = 0) -> float:
    it = iter(batches)
    for _ in itertools.islice(it, warmup):
        pass
    start = time.perf_counter()
    got = sum(1 for _ in itertools.islice(it, n))
    elapsed = time.perf_counter() - start
    if got != n:
        raise RuntimeError(f"pipeline ended after {got} of {n} batches")
    return elapsed


def shard_stream(shards: ShardList, batch_size: int, num_workers: int, workload: Workload | None = None) -> ShardStream:
    """Our stream over `shards`: this file's image decode, or a smoke `workload`'s own
    decode, collate and decode_batch."""
    own = {"decode": decode, "collate": collate}
    if workload is not None:
        own = {"decode": workload.decode, "collate": workload.collate, "decode_batch": workload.decode_batch}
    return ShardStream(
        shards,
        **own,
        batch_size=batch_size,
        seed=0,
        shuffle_buffer=SHUFFLE_BUFFER,
        rank=0,
        world_size=1,
        num_workers=num_workers,
        on_error="fail",
    )


def time_loader(shards: ShardList, batch_size: int, num_workers: int, n: int) -> float:
    loader = StreamLoader(
        shard_stream(shards, batch_size, num_workers), num_workers=num_workers, prefetch_factor=PREFETCH_FACTOR
    )
    try:
        # worker start-up (fork, first shard open) is paid once per run: exclude it
        return time_batches(loader, n, warmup=num_workers)
    finally:
        del loader
        gc.collect()


def time_train_steps(batch_size: int, n: int, workload: Workload | None = None) -> float:
    """A smoke model's step (MADE unless given) on ready-made (B, 64) batches: no data loading."""
    torch.manual_seed(0)
    workload = workload or MADEWorkload(MADEConfig())
    model = workload.build_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(batch_size, workload.dims, generator=g) > 0.5).float() for _ in range(64)]

    def step(x: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        workload.training_loss(model, x).backward()
        optimizer.step()

    for x in batches[:16]:
        step(x)
    start = time.perf_counter()
    for i in range(n):
        step(batches[i % len(batches)])
    return time.perf_counter() - start


# ------------------------------------------------------------------ the smoke data
def build_digits(root: Path) -> dict[str, ShardList]:
    """The digits train split as make_shards writes it, and as it was written before the .npy."""
    digits.build(root / "digits")
    old = [
        {k: v for k, v in s.items() if k not in ("npy", "__url__")}
        for s in iter_raw_samples(resolve_shards(str(root / "digits" / "train")).urls)
    ]
    per_shard = digits.samples_per_shard(len(old), digits.SHARDS["train"])
    write_shards(iter(old), root / "digits_png" / "train", maxcount=per_shard)
    return {
        fmt: resolve_shards(str(root / folder / "train")) for fmt, folder in (("npy", "digits"), ("png", "digits_png"))
    }


def smoke(root: Path, batch_size: int, repeats: int, n: int, train_threads: int) -> dict:
    """Each smoke model's digits stream and training step, interleaved repeat by repeat."""
    shards = build_digits(root)
    rates: dict[str, list[float]] = {}
    for repeat in range(repeats):
        run = {}
        for name, make in SMOKE_MODELS.items():
            workload = make()
            for fmt, sl in shards.items():
                run[f"{name}/stream_{fmt}"] = (
                    n * batch_size / time_batches(shard_stream(sl, batch_size, 1, workload), n, 1)
                )
            threads = torch.get_num_threads()
            torch.set_num_threads(train_threads)
            try:
                run[f"{name}/train_step"] = n * batch_size / time_train_steps(batch_size, n, workload)
            finally:
                torch.set_num_threads(threads)
        workload = SMOKE_MODELS["made"]()
        for fmt, sl in shards.items():
            loader = StreamLoader(
                shard_stream(sl, batch_size, 1, workload), num_workers=1, prefetch_factor=PREFETCH_FACTOR
            )
            run[f"loader_1w_{fmt}"] = n * batch_size / time_batches(loader, n, warmup=1)
            del loader
            gc.collect()
        for key, value in run.items():
            rates.setdefault(key, []).append(value)
        print(
            json.dumps({"smoke_repeat": repeat, "samples_per_s": {k: round(v, 1) for k, v in run.items()}}), flush=True
        )
    rate = {k: statistics.median(v) for k, v in rates.items()}
    models = {
        name: {
            "train_step_samples_per_s": rate[f"{name}/train_step"],
            "train_step_ms": 1000 * batch_size / rate[f"{name}/train_step"],
            "stream_samples_per_s": rate[f"{name}/stream_npy"],
            "stream_png_samples_per_s": rate[f"{name}/stream_png"],
            "shard_vs_train": rate[f"{name}/stream_npy"] / rate[f"{name}/train_step"],
            "png_shard_vs_train": rate[f"{name}/stream_png"] / rate[f"{name}/train_step"],
        }
        for name in SMOKE_MODELS
    }
    return {
        "smoke_batches": n,
        "smoke_train_threads": train_threads,
        "smoke_models": models,
        "smoke_loader_1_worker_samples_per_s": rate["loader_1w_npy"],
        "smoke_loader_1_worker_png_samples_per_s": rate["loader_1w_png"],
        "smoke_shard_vs_train": {name: m["shard_vs_train"] for name, m in models.items()},
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--server",
        choices=("auto", "nginx", "python"),
        default="auto",
        help="auto: nginx when installed, else Python's http.server",
    )
    parser.add_argument("--quick", action="store_true", help="3000 samples, 1 repeat")
    parser.add_argument("--smoke-only", action="store_true", help="only the digits stream against the smoke models")
    parser.add_argument(
        "--train-threads", type=int, default=1, help="torch threads of the smoke models' timed step (default: 1)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.repeats = 3000, 1
    smoke_batches = SMOKE_BATCHES // 4 if args.quick else SMOKE_BATCHES
    if args.smoke_only:
        wall0, (machine0, ours0) = time.perf_counter(), cpu_seconds()
        tmp = Path(tempfile.mkdtemp(prefix="tributary-data-throughput-"))
        try:
            result = smoke(tmp, args.batch_size, args.repeats, smoke_batches, args.train_threads)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        (machine1, ours1), wall = cpu_seconds(), time.perf_counter() - wall0
        others = max(0.0, (machine1 - machine0) - (ours1 - ours0)) / (wall * os.cpu_count())
        result = {
            "repeats": args.repeats,
            "batch_size": args.batch_size,
            "wall_s": round(wall, 1),
            "other_processes_cpu_frac": round(others, 3),
            "cpu_count": os.cpu_count(),
            **result,
        }
        result["targets_met"] = {
            f"smoke_shard_vs_train/{k}": v >= SMOKE_TARGET for k, v in result["smoke_shard_vs_train"].items()
        }
        print(json.dumps(result))
        return result
    if args.samples < 4 * args.batch_size:
        parser.error(f"--samples must be at least 4 x batch size ({4 * args.batch_size})")
    if shutil.which("curl") is None:
        raise SystemExit(
            "webdataset opens http:// shards through `curl`, which is not installed (apt-get install -y curl)"
        )
    # curl must not route 127.0.0.1 through a proxy
    os.environ["no_proxy"] = ",".join(filter(None, [os.environ.get("no_proxy"), "127.0.0.1"]))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally blocks run

    n_batches = args.samples // args.batch_size
    timed = n_batches * args.batch_size
    n_fresh = min(n_batches, NEW_CONNECTION_MAX_SAMPLES // args.batch_size)
    samples_per_shard = min(1000, args.samples // 2)  # >= 2 shards for the 2-worker loader

    wall0, (machine0, ours0) = time.perf_counter(), cpu_seconds()
    tmp = Path(tempfile.mkdtemp(prefix="tributary-data-throughput-"))
    try:
        tmp.chmod(0o755)  # nginx workers run as an unprivileged user when started by root
        t0 = time.perf_counter()
        data = build_data(tmp, args.samples, samples_per_shard)
        build_s = time.perf_counter() - t0
        local = resolve_shards(str(tmp / "shards"))
        keys = data["keys"]
        in_memory = {f"{s['__key__']}.{ext}": s[ext] for s in data.pop("samples") for ext in ("png", "txt")}
        warm = read_local(tmp / "files")
        for name in (f for k in keys for f in (f"{k}.png", f"{k}.txt")):
            warm(name)  # page cache warm for every pipeline

        with web_server(tmp, args.server, "/shards/manifest.json") as (server, port):
            manifest = read_manifest(tmp / "shards")
            remote = ShardList(
                [f"http://127.0.0.1:{port}/shards/{s['url']}" for s in manifest["shards"]],
                [s["samples"] for s in manifest["shards"]],
            )
            rates: dict[str, list[float]] = {}  # samples/s of each pipeline, one per repeat
            for repeat in range(args.repeats):
                order = [keys[i] for i in np.random.default_rng(repeat).permutation(len(keys))]
                run = {}

                def measure(name: str, batches: Iterable, n: int = n_batches, run: dict = run) -> None:
                    run[name] = n * args.batch_size / time_batches(batches, n)

                measure("http_stream", shard_stream(remote, args.batch_size, 1))
                for name, keep_alive, n in (
                    ("http_files", True, n_batches),
                    ("http_files_new_connection", False, n_fresh),
                ):
                    client = HTTPFileClient(port, "/files", keep_alive=keep_alive)
                    try:
                        measure(name, file_batches(client.read, order, args.batch_size), n)
                    finally:
                        client.close()
                    if keep_alive:
                        keep_alive_connections = client.connections
                measure("local_stream", shard_stream(local, args.batch_size, 1))
                measure(
                    "webdataset",
                    wds.WebDataset(local.urls, shardshuffle=False, empty_check=False)
                    .repeat()
                    .shuffle(SHUFFLE_BUFFER)
                    .map(decode)
                    .batched(args.batch_size, collation_fn=collate),
                )
                measure("local_files", file_batches(read_local(tmp / "files"), order, args.batch_size))
                measure("decode_only", file_batches(in_memory.__getitem__, order, args.batch_size))
                for k in LOADER_WORKERS:
                    run[f"loader_{k}w"] = timed / time_loader(local, args.batch_size, k, n_batches)
                run["train_step"] = timed / time_train_steps(args.batch_size, n_batches)
                for name, value in run.items():
                    rates.setdefault(name, []).append(value)
                print(
                    json.dumps(
                        {"repeat": repeat, "samples_per_s": {name: round(value, 1) for name, value in run.items()}}
                    ),
                    flush=True,
                )
        smoke_result = smoke(tmp, args.batch_size, args.repeats, smoke_batches, args.train_threads)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    (machine1, ours1), wall = cpu_seconds(), time.perf_counter() - wall0
    others_cpu = max(0.0, (machine1 - machine0) - (ours1 - ours0))

    rate = {name: statistics.median(values) for name, values in rates.items()}
    result = {
        "server": server,
        "dataset_samples": args.samples,
        "samples": timed,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "shards": data["shards"],
        "samples_per_shard": samples_per_shard,
        "mean_png_bytes": round(data["mean_png_bytes"], 1),
        "mean_txt_bytes": round(data["mean_txt_bytes"], 1),
        "shard_bytes": data["shard_bytes"],
        "shuffle_buffer": SHUFFLE_BUFFER,
        "loader_workers": list(LOADER_WORKERS),
        "prefetch_factor": PREFETCH_FACTOR,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "build_data_s": round(build_s, 2),
        "wall_s": round(wall, 1),
        # share of the machine's CPUs that other processes used meanwhile: they skew
        # every number here, so read the rates only when this is near 0
        "other_processes_cpu_frac": round(others_cpu / (wall * os.cpu_count()), 3),
        "http_files_connections_per_pass": keep_alive_connections,
        "http_files_new_connection_samples": n_fresh * args.batch_size,
        "http_stream_samples_per_s": rate["http_stream"],
        "http_files_samples_per_s": rate["http_files"],
        "http_shard_vs_files": rate["http_stream"] / rate["http_files"],
        "http_files_new_connection_samples_per_s": rate["http_files_new_connection"],
        "http_shard_vs_files_new_connection": rate["http_stream"] / rate["http_files_new_connection"],
        "local_stream_samples_per_s": rate["local_stream"],
        "webdataset_samples_per_s": rate["webdataset"],
        "stream_vs_webdataset": rate["local_stream"] / rate["webdataset"],
        "local_files_samples_per_s": rate["local_files"],
        "local_stream_vs_files": rate["local_stream"] / rate["local_files"],
        "decode_only_samples_per_s": rate["decode_only"],
        **{f"loader_{k}_workers_samples_per_s": rate[f"loader_{k}w"] for k in LOADER_WORKERS},
        "train_step_samples_per_s": rate["train_step"],
        "train_step_ms": 1000 * args.batch_size / rate["train_step"],
        "shard_vs_train": rate["local_stream"] / rate["train_step"],
        **{f"loader_{k}_workers_vs_train": rate[f"loader_{k}w"] / rate["train_step"] for k in LOADER_WORKERS},
        **smoke_result,
        "targets": {**TARGETS, "smoke_shard_vs_train": SMOKE_TARGET},
    }
    result["targets_met"] = {k: result[k] >= v for k, v in TARGETS.items()}
    for name, ratio in result["smoke_shard_vs_train"].items():
        result["targets_met"][f"smoke_shard_vs_train/{name}"] = ratio >= SMOKE_TARGET
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
