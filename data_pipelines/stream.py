"""The resumable, elastic sample stream over WebDataset shards.

webdataset reads the tars (URL opening, `pipe:`, grouping files into samples); what it
lacks is a position that survives a restart (docs/platform-notes.md: no state_dict in 1.0.2), so the
order and the position are ours.

Readers. A rank with K loader workers runs K readers; reader (r, w) of W ranks reads, in
epoch e, the shards perm_e[r::W][w::K] where perm_e permutes all shards from (seed, e).
Samples of the shard being read go through a seeded shuffle buffer; a reader's epoch ends
by draining its buffer, so its samples of epoch e all come before any of e+1. A reader's
stream runs on from epoch to epoch without end: every rank has a next batch at every step
however uneven its shards (no DDP hang, nothing dropped or padded).

Position. A sample is named by (epoch, shard, offset-in-shard). A reader's state is its
queue of shard segments still to read ([epoch, shard, start, picks]), the names of the
samples in its buffer, its RNG state and the next epoch to plan: a few hundred integers,
whatever has been read before. Each batch carries its reader's state, so the rank keeps,
per reader, the state after the last batch it consumed; batches prefetched but not
consumed are simply made again.

Resume with the same ranks, workers, seed and shards restores every reader and restarts
the DataLoader's round-robin where it was: the same batches in the same order. Resume
with other ranks or workers pools what the old readers had left of the epochs in flight
(buffers, queues, and the epochs they had not reached yet) and deals it to the new
readers: every remaining sample of those epochs comes exactly once, in a different order;
after that, epochs are planned for the new layout. Partially read shards are re-read up
to their offset (bounded by one shard per reader); consumed shards are never rescanned.

Buckets (data.buckets). Each reader routes its samples, in stream order, to the bucket
their size picks (data_pipelines.buckets) and sends a batch when a bucket holds
batch_size of them: every batch has one bucket. A bucket still partly filled at an
epoch's end is carried on, and fills up with samples of the next epochs: nothing is
padded or dropped, each sample still comes in exactly one batch (named by its own
epoch), and every rank keeps a next batch at every step as before. The held samples are
part of the reader's state by name (`pending`): an exact resume reads them back (their
shards' prefixes), an elastic one pools them with the buffers. A reader holds at most
(buckets x (batch_size - 1)) undecoded samples; a bucket rarer than batch_size samples
per reader and epoch waits over several epochs.
"""

from __future__ import annotations

import http.client
import itertools
import json
import logging
import os
import re
import signal
import tarfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import braceexpand
import numpy as np
import torch
import xxhash
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander

from data_pipelines.buckets import Buckets
from data_pipelines.shards import MANIFEST, read_manifest

log = logging.getLogger(__name__)

POLICIES = ("skip", "fail")
UNKNOWN_SHARD_SIZE = 1000  # for balancing work when a shard list has no manifest


class DataError(RuntimeError):
    """A data problem, naming the shard and sample at fault."""


# ------------------------------------------------------------------ shard lists
@dataclass
class ShardList:
    urls: list[str]
    samples_per_shard: list[int] | None  # from the manifest, when there is one

    @property
    def total_samples(self) -> int | None:
        return sum(self.samples_per_shard) if self.samples_per_shard is not None else None


@dataclass
class Source:
    """One training dataset of a mixture."""

    shards: ShardList
    weight: float = 1.0
    name: str = "train"


def _is_local(url: str) -> bool:
    return urlparse(url).scheme in ("", "file") and not url.startswith("pipe:")


def manifest_path(spec: str, manifest: str = "") -> Path | None:
    """The manifest describing a recipe's `urls`: the recipe's own `manifest`, else the one of a
    local folder, else the one beside the first local shard when it exists; None otherwise."""
    if manifest:
        return Path(manifest)
    if _is_local(spec) and Path(spec).is_dir():
        return Path(spec) / MANIFEST
    first = next((u for part in spec.split("::") for u in braceexpand.braceexpand(part) if u), "")
    if first and _is_local(first):
        candidate = Path(first).parent / MANIFEST
        return candidate if candidate.exists() else None
    return None


def resolve_shards(spec: str, manifest: str = "", *, key: str = "data.urls") -> ShardList:
    """Turn a recipe's `urls` into a shard list.

    `spec` is a folder holding shards and a manifest.json (as launch.make_shards writes),
    or URLs with brace expansion, several joined by '::'. `key` names the config key in
    errors.
    """
    if not spec:
        raise DataError(f"{key}: empty URL list")
    if _is_local(spec) and Path(spec).is_dir():
        mpath = manifest_path(spec, manifest)
        if not mpath.exists():
            raise DataError(
                f"{key}: folder '{spec}' has no {MANIFEST}; give a brace list of "
                "shards instead, or write the folder with launch.make_shards"
            )
        m = read_manifest(mpath)
        if not m["shards"]:
            raise DataError(f"{key}: manifest {mpath} lists no shards")
        for s in m["shards"]:
            # a manifest is data, not config: it may only name files inside its folder.
            # `pipe:` commands and remote URLs come from the recipe alone.
            name = str(s["url"])
            if ":" in name or Path(name).is_absolute() or ".." in Path(name).parts:
                raise DataError(
                    f"{key}: manifest {mpath} names shard '{name}', which is not a "
                    "file inside its folder; refusing it (pipe: and remote URLs "
                    "belong in the recipe's urls)"
                )
        return ShardList([str(Path(spec) / s["url"]) for s in m["shards"]], [s["samples"] for s in m["shards"]])

    urls = [u for part in spec.split("::") for u in braceexpand.braceexpand(part) if u]
    if not urls:
        raise DataError(f"{key}: '{spec}' expands to no URLs")
    counts = None
    mpath = manifest_path(spec, manifest)
    if mpath is not None:
        m = read_manifest(mpath)
        by_name = {s["url"]: s["samples"] for s in m["shards"]}
        names = [os.path.basename(u) for u in urls]
        if all(n in by_name for n in names):
            counts = [by_name[n] for n in names]
    for url in urls:
        if _is_local(url) and not Path(url).exists():
            raise DataError(f"{key}: shard '{url}' does not exist")
    return ShardList(urls, counts)


def check_readers(num_shards: int, world_size: int, num_workers: int, *, key: str) -> None:
    """Every (rank, worker) reader needs a shard of its own in every epoch."""
    readers = world_size * max(1, num_workers)
    if num_shards < readers:
        raise DataError(
            f"{key}: {num_shards} shard(s) cannot feed {world_size} rank(s) x "
            f"{max(1, num_workers)} worker(s) = {readers} readers; write more, "
            "smaller shards or lower data.num_workers"
        )


# ------------------------------------------------------------------ reading tars
LOG_EACH_SKIP = 10  # skips of a kind logged one by one in a process; then the 100th, 1000th, ...
_skips_seen: Counter = Counter()
FAILURES_NAMED = 3  # shards named in a "yields nothing" error, with their causes


def _log_skip(kind: str, message: str) -> None:
    """A thousand bad shards must not bury the log: the first few skips of each kind,
    then one line per power of ten (the counters in the metrics hold every one)."""
    _skips_seen[kind] += 1
    n = _skips_seen[kind]
    if n <= LOG_EACH_SKIP:
        log.warning("skipped (%s): %s", kind, message)
    elif re.fullmatch(r"10*", str(n)):
        log.warning(
            "skipped (%s), the %dth in this process (only the first %d and each power of ten are logged): %s",
            kind,
            n,
            LOG_EACH_SKIP,
            message,
        )


class ErrorPolicy:
    """`skip`: count, warn with shard and key, go on. `fail`: raise DataError.

    Shard failures are also remembered (the first few, and how many), so that a source
    which ends up yielding nothing can say why."""

    def __init__(self, policy: str, stats: dict[str, int]):
        if policy not in POLICIES:
            raise ValueError(f"data.on_error must be one of {POLICIES}, not '{policy}'")
        self.policy, self.stats = policy, stats
        self.failures: list[str] = []  # "url: cause", at most FAILURES_NAMED
        self.failed: set[str] = set()  # every failing url since forget_failures()

    def __call__(self, kind: str, message: str) -> None:
        if self.policy == "fail":
            raise DataError(message)
        self.stats[kind] = self.stats.get(kind, 0) + 1
        _log_skip(kind, message)

    def shard_failed(self, kind: str, url: str, cause: str) -> None:
        if url not in self.failed and len(self.failures) < FAILURES_NAMED:
            self.failures.append(f"{url}: {cause}")
        self.failed.add(url)
        self(kind, f"shard '{url}': {cause}")

    def forget_failures(self) -> None:
        self.failures.clear()
        self.failed.clear()

    def why_nothing(self) -> str:
        if not self.failed:
            return "its shards hold no samples"
        more = len(self.failed) - len(self.failures)
        return "; ".join(self.failures) + (f"; +{more} more failing shard(s)" if more else "")


HTTP_TIMEOUT = 60  # seconds without a byte before a remote shard counts as failed
HTTP_RETRY_WAITS = (1, 2, 4)  # seconds before each retry of a transient HTTP failure
HTTP_TRANSIENT = {408, 425, 429, 500, 502, 503, 504}


def open_http(url: str):
    """An http(s) shard through urllib, retried on transient failures.

    Ours, not webdataset's: its `curl -f -s` pipe ends an HTTP 404 as "exit 22", the
    status lost. (`pipe:curl -s -L URL` still works for anyone who wants curl.)
    """
    for wait in (*HTTP_RETRY_WAITS, None):
        try:
            return urllib.request.urlopen(url, timeout=HTTP_TIMEOUT)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code not in HTTP_TRANSIENT or wait is None:
                raise
        except (urllib.error.URLError, OSError):
            if wait is None:
                raise
        time.sleep(wait)


def open_url(url: str):
    """Local paths, file:// and pipe: through webdataset's gopen, http(s) through
    `open_http`; other schemes (s3://, gs://, ...) through fsspec when its filesystem
    package is installed."""
    scheme = urlparse(url).scheme
    if scheme in ("http", "https"):
        return open_http(url)
    if url.startswith("pipe:") or scheme in ("", "file"):
        return gopen(url, "rb")
    try:
        import fsspec

        return fsspec.open(url, "rb").open()
    except (ImportError, ValueError):
        return gopen(url, "rb")  # webdataset's own handlers (gsutil, hf, ais)


def _first_arg(exc: BaseException) -> str:
    """An exception's own words, without what webdataset appends (" @ <stream>", the url)."""
    text = str(exc.args[0]) if exc.args else str(exc)
    return text.split(" @ ")[0]


def open_failure(exc: Exception) -> str:
    """Why a shard would not open, in a few words."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}".rstrip()
    if isinstance(exc, urllib.error.URLError):
        return f"cannot connect ({exc.reason})"
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, IsADirectoryError):
        return "a folder, not a tar file"
    if isinstance(exc, TimeoutError):
        return f"timed out ({_first_arg(exc)})"
    return f"{type(exc).__name__}: {_first_arg(exc)}"


def read_failure(exc: Exception, n: int) -> str:
    """Why a shard stopped after `n` samples, in a few words."""
    text = _first_arg(exc)
    if isinstance(exc, tarfile.TarError):
        if text in ("unexpected end of data", "truncated header"):
            return f"truncated: a tar member is cut short after {n} sample(s)"
        if n == 0:
            return "not a tar archive" if text != "empty file" else "an empty file, not a tar archive"
        return f"damaged tar header after {n} sample(s) ({text})"
    if isinstance(exc, EOFError):
        return f"truncated after {n} sample(s) (compressed stream ends early)"
    if isinstance(exc, (http.client.HTTPException, ConnectionError, TimeoutError)):
        return f"connection lost after {n} sample(s) ({type(exc).__name__})"
    return f"unreadable after {n} sample(s) ({type(exc).__name__}: {text})"


def pipe_failure(stream) -> str | None:
    """The exit status of a `pipe:` URL's command, when it failed: the real cause behind
    the empty or cut stream that tarfile saw."""
    proc = getattr(stream, "proc", None)  # webdataset's Pipe
    if proc is None:
        return None
    try:
        stream.stream.close()  # a command still writing ends on SIGPIPE, not after a wait
        status = proc.wait(timeout=5)
    except Exception:
        return None
    if status in (0, 141, -signal.SIGPIPE) or status in getattr(stream, "ignore_status", [0]):
        return None
    return f"its command exited with status {status}"


def shard_samples(url: str, on_error: ErrorPolicy, expected: int | None = None) -> Iterator[dict]:
    """Raw samples (bytes per extension, plus __key__/__url__) of one shard, in order.

    Python's tarfile ends a stream cut at a member boundary without complaint; with the
    manifest's count (`expected`) such a shard is caught as truncated.
    """
    try:
        stream = open_url(url)
    except Exception as exc:
        on_error.shard_failed("missing_shards", url, f"cannot open: {open_failure(exc)}")
        return
    n, samples = 0, None
    try:
        if _small_local_tar(url):
            data = stream.read(PLAIN_TAR_MAX_BYTES + 1)
            if len(data) <= PLAIN_TAR_MAX_BYTES:
                # keyed by the bytes' digest: a shard rewritten in place is parsed again however
                # coarse the file system's timestamps
                key = (url, xxhash.xxh3_128_digest(data))
                samples = _parsed_shards.get(key)
                if samples is None:
                    samples = plain_tar_samples(data, url)
                    if samples is not None:
                        _parsed_shards.put(key, samples, len(data))
            if samples is None:  # anything unusual: webdataset's reader, with its errors
                stream = _Prefixed(data, stream)
        if samples is not None:
            for sample in samples:
                n += 1
                yield dict(sample)  # a copy: the stream annotates its samples for decode
        else:
            for sample in group_by_keys(tar_file_expander([{"url": url, "stream": stream}])):
                n += 1
                yield sample
        if expected is not None and n < expected:
            cause = f"truncated: ends after {n} sample(s), its manifest lists {expected}"
        elif n == 0:
            cause = "a tar without samples"
        else:
            cause = None
        if cause is not None:
            on_error.shard_failed("bad_shards", url, pipe_failure(stream) or cause)
    except (tarfile.TarError, OSError, ValueError, EOFError, http.client.HTTPException) as exc:
        cause = pipe_failure(stream)
        cause = f"{cause} after {n} sample(s)" if cause else read_failure(exc, n)
        on_error.shard_failed("bad_shards", url, cause)
    finally:
        try:
            if stream is not None:
                stream.close()
        except Exception:  # a pipe whose command failed; already reported above
            pass


class ParsedShards:
    """Local shards already parsed in this process, by (url, digest of their bytes): a small
    dataset's every epoch then costs a read and a hash, no tar parsing. Bounded by the shards'
    bytes (least recently read dropped first)."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self.entries: dict[tuple, tuple[list[dict], int]] = {}

    def get(self, key: tuple) -> list[dict] | None:
        entry = self.entries.pop(key, None)
        if entry is not None:
            self.entries[key] = entry  # most recent last
        return entry[0] if entry is not None else None

    def put(self, key: tuple, samples: list[dict], size: int) -> None:
        if size > self.max_bytes:
            return
        while self.entries and self.bytes + size > self.max_bytes:
            self.bytes -= self.entries.pop(next(iter(self.entries)))[1]
        self.entries[key] = (samples, size)
        self.bytes += size


# local shards up to this size are read whole and indexed in memory (larger ones stream: their
# samples are big, so tar parsing is a small part of their cost)
PLAIN_TAR_MAX_BYTES = 64 << 20
PARSED_SHARDS_MAX_BYTES = 64 << 20  # of them kept parsed, per process (loader worker)
_BASE_PLUS_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta
_REGULAR, _DIRECTORY = (ord("0"), 0), ord("5")
_ZERO_BLOCK = bytes(512)


def _small_local_tar(url: str) -> bool:
    if urlparse(url).scheme or not url.endswith(".tar"):
        return False
    try:
        return os.path.getsize(url) <= PLAIN_TAR_MAX_BYTES
    except OSError:
        return False


class _Prefixed:
    """A stream whose first bytes were already read: `head`, then the rest of `stream`."""

    def __init__(self, head: bytes, stream):
        self.head, self.stream = memoryview(head), stream

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(size)
        n = len(self.head) if size < 0 else min(size, len(self.head))
        out, self.head = bytes(self.head[:n]), self.head[n:]
        return out if size < 0 or n == size else out + self.stream.read(size - n)

    def close(self) -> None:
        self.stream.close()


def plain_tar_samples(data: bytes, url: str) -> list[dict] | None:
    """The samples of a whole uncompressed tar in memory, grouped as webdataset groups them;
    None for anything but plain ustar/v7 members ending in an end-of-archive block (PAX or GNU
    long-name headers, a bad checksum, truncation, a repeated field), which then go through
    webdataset and tarfile (their errors name the damage). Ours because tarfile's header
    parsing costs ~30 us a member: most of a small sample's cost (benchmarks/data_throughput.py)."""
    starts, samples, current, pos, end = [], [], None, 0, len(data)
    while True:
        if pos + 512 > end:
            return None  # no end-of-archive block: maybe cut at a member boundary
        if data[pos] == 0 and data[pos : pos + 512] == _ZERO_BLOCK:
            break
        size_field = data[pos + 124 : pos + 136]
        if size_field[0] >= 0x80 or data[pos + 345] != 0:
            return None  # base-256 size, or a ustar name prefix
        try:
            size = int(size_field.strip(b"\0 ") or b"0", 8)
        except ValueError:
            return None
        type_flag = data[pos + 156]
        if type_flag not in _REGULAR and type_flag != _DIRECTORY:
            return None  # links, PAX and GNU headers: tarfile knows them
        if pos + 512 + size > end:
            return None
        starts.append(pos)
        body, pos = pos + 512, pos + 512 + (size + 511) // 512 * 512
        if type_flag == _DIRECTORY:
            continue
        name = data[body - 512 : body - 412].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        if not name or _SKIP_META.match(name) or ("/" not in name and name.startswith("__") and name.endswith("__")):
            continue
        match = _BASE_PLUS_EXT.match(name)
        if match is None:
            continue
        prefix, suffix = match.groups()
        suffix = suffix.lower()
        if current is None or prefix != current["__key__"]:
            current = {"__key__": prefix, "__url__": url}
            samples.append(current)
        if suffix in current:
            return None  # webdataset raises, naming it
        current[suffix] = data[body : body + size]
    if starts:  # every header's checksum at once: unsigned, the field counted as spaces
        blocks = np.frombuffer(data, np.uint8, (end // 512) * 512).reshape(-1, 512)
        rows = blocks[[p // 512 for p in starts]]
        sums = rows.sum(axis=1, dtype=np.int64) - rows[:, 148:156].sum(axis=1, dtype=np.int64) + 8 * 32
        for start, total in zip(starts, sums.tolist()):
            try:
                if int(data[start + 148 : start + 156].strip(b"\0 ") or b"-1", 8) != total:
                    return None
            except ValueError:
                return None
    return samples


_parsed_shards = ParsedShards(PARSED_SHARDS_MAX_BYTES)


def decode_or_explain(decode: Callable[[dict], Any], sample: dict) -> Any:
    try:
        return decode(sample)
    except KeyError as exc:
        raise DataError(
            f"sample '{sample.get('__key__')}' in shard '{sample.get('__url__')}': missing key {exc}"
        ) from exc
    except Exception as exc:
        raise DataError(
            f"sample '{sample.get('__key__')}' in shard '{sample.get('__url__')}': "
            f"cannot decode ({type(exc).__name__}: {exc})"
        ) from exc


def iter_raw_samples(urls: list[str], on_error: str = "fail") -> Iterator[dict]:
    """Raw samples of `urls`, in order (eval splits, tools); a list whose every shard
    fails is an error under either policy, naming them."""
    policy = ErrorPolicy(on_error, {})
    n = 0
    for url in urls:
        for sample in shard_samples(url, policy):
            n += 1
            yield sample
    if n == 0 and policy.failed:
        raise DataError(f"{len(urls)} shard(s) yield no samples: {policy.why_nothing()}")


def iter_samples(urls: list[str], on_error: str = "fail", decode: Callable[[dict], Any] | None = None) -> Iterator[Any]:
    """The samples of `urls` in order, raw or through `decode`; under on_error=skip a sample
    that does not decode is left out (and logged), as in eval_batches."""
    policy = ErrorPolicy(on_error, {})
    for sample in iter_raw_samples(urls, on_error):
        if decode is None:
            yield sample
            continue
        try:
            yield decode_or_explain(decode, sample)
        except DataError as exc:
            policy("bad_samples", str(exc))


# ------------------------------------------------------------------ one reader
def plan_epoch(
    num_shards: int, epoch: int, seed: int, rank: int, world: int, role: int, workers: int, resampled: bool
) -> list[int]:
    if resampled:  # shards drawn with replacement; every reader gets an equal share
        n = max(1, num_shards // (world * workers))
        rng = np.random.default_rng([seed, epoch, rank * workers + role, 1])
        return [int(i) for i in rng.integers(num_shards, size=n)]
    perm = np.random.default_rng([seed, epoch]).permutation(num_shards)
    return [int(i) for i in perm[rank::world][role::workers]]


def fresh_reader_state(next_epoch: int = 0) -> dict:
    return {"queue": [], "buffer": [], "next_epoch": next_epoch, "rng": None, "stats": {}}


class SourceReader:
    """One reader of one source: its queue of shard segments and its shuffle buffer."""

    def __init__(
        self,
        source: Source,
        state: dict | None,
        *,
        seed: int,
        rank: int,
        world: int,
        role: int,
        workers: int,
        buffer_size: int,
        on_error: str,
        resampled: bool,
    ):
        self.source, self.seed = source, seed
        self.rank, self.world, self.role, self.workers = rank, world, role, workers
        self.buffer_size, self.resampled = buffer_size, resampled
        state = state or fresh_reader_state()
        self.queue = [[e, sh, st, list(p) if p is not None else None] for e, sh, st, p in state["queue"]]
        self.next_epoch = state["next_epoch"]
        self.stats = dict(state["stats"])
        self.policy = ErrorPolicy(on_error, self.stats)
        self.rng = np.random.default_rng()
        if state["rng"] is not None:
            self.rng.bit_generator.state = state["rng"]
        self.buffer: list[tuple[list[int], dict]] = self._refetch(state["buffer"])
        self._open: Iterator | None = None  # samples of queue[0] from its start

    def state_dict(self) -> dict:
        return {
            "queue": [[e, sh, st, list(p) if p is not None else None] for e, sh, st, p in self.queue],
            "buffer": [name for name, _ in self.buffer],
            "next_epoch": self.next_epoch,
            "rng": self.rng.bit_generator.state,
            "stats": dict(self.stats),
        }

    def _segment(self, item: list) -> Iterator[tuple[int, dict]]:
        """(offset, sample) of one queue item: from `start`, or only the `picks`."""
        _, shard, start, picks = item
        wanted = set(picks) if picks is not None else None
        last = max(picks) if picks else None
        counts = self.source.shards.samples_per_shard
        expected = counts[shard] if counts is not None and picks is None else None
        samples = enumerate(shard_samples(self.source.shards.urls[shard], self.policy, expected))
        if picks is None:  # the common case, without a test per sample
            yield from itertools.islice(samples, start, None)
            return
        for offset, sample in samples:
            if offset < start or (wanted is not None and offset not in wanted):
                continue
            yield offset, sample
            if last is not None and offset >= last:
                return

    def _refetch(self, names: list[list[int]]) -> list[tuple[list[int], dict]]:
        """Read back the samples a saved buffer held (re-reading their shards' prefixes)."""
        found: dict[tuple, dict] = {}
        by_shard: dict[tuple[int, int], list[int]] = {}
        for epoch, shard, offset in names:
            by_shard.setdefault((epoch, shard), []).append(offset)
        for (epoch, shard), offsets in by_shard.items():
            for offset, sample in self._segment([epoch, shard, 0, sorted(offsets)]):
                found[(epoch, shard, offset)] = sample
        return [(list(n), found[tuple(n)]) for n in names if tuple(n) in found]

    def _plan_next_epoch(self) -> None:
        e = self.next_epoch
        shards = plan_epoch(
            len(self.source.shards.urls), e, self.seed, self.rank, self.world, self.role, self.workers, self.resampled
        )
        self.queue = [[e, s, 0, None] for s in shards]
        self.rng = np.random.default_rng([self.seed, e, self.rank * self.workers + self.role])
        self.next_epoch = e + 1

    def _read_one(self) -> bool:
        """Move one sample from the head of the queue into the buffer; False at a boundary."""
        while self.queue:
            item = self.queue[0]
            if self.buffer and item[0] != self.buffer[0][0][0]:
                return False  # next item is a later epoch: drain the buffer first
            if self._open is None:
                self._open = self._segment(item)
            got = next(self._open, None)
            if got is None:
                self.queue.pop(0)
                self._open = None
                continue
            offset, sample = got
            if item[3] is None:
                item[2] = offset + 1
            else:
                item[3].remove(offset)
                if not item[3]:
                    self.queue.pop(0)
                    self._open = None
            self.buffer.append(([item[0], item[1], offset], sample))
            return True
        return False

    def next_raw(self) -> tuple[list[int], dict]:
        """The next (name, raw sample) of this reader's endless stream."""
        empty_plans = 0
        while True:
            while len(self.buffer) < self.buffer_size and self._read_one():
                pass
            if self.buffer:
                if self.policy.failed:
                    self.policy.forget_failures()  # only failures since the last sample explain
                # a uniform index from 64 random bits: Generator.integers costs ~7x more a call,
                # the largest part of a small sample's cost here
                j = (self.rng.bit_generator.random_raw() * len(self.buffer)) >> 64
                self.buffer[j], self.buffer[-1] = self.buffer[-1], self.buffer[j]
                return self.buffer.pop()
            if not self.queue:
                empty_plans += 1
                if empty_plans > 2:
                    # one line: launch.train keeps a worker error's last line
                    raise DataError(
                        f"rank {self.rank} worker {self.role}: no readable samples in "
                        f"source '{self.source.name}' for two epochs in a row: "
                        f"{self.policy.why_nothing()}"
                    )
                self._plan_next_epoch()


# ------------------------------------------------------------------ the dataset
@dataclass
class StreamBatch:
    """What a loader worker sends: the batch, and where its reader stands after it.

    Small CPU tensors of the batch travel by value through the loader's pipe: the
    DataLoader's default puts every tensor in a shared-memory segment of its own, which
    costs ~1 ms a batch on 2 cores (benchmarks/data_throughput.py), more than a small batch
    takes to make; large ones still go through shared memory."""

    data: Any
    role: int
    state: dict
    keys: list | None = None

    def __reduce__(self):
        return StreamBatch, (_by_value(self.data), self.role, self.state, self.keys)


INLINE_TENSOR_BYTES = 1 << 20  # tensors up to this size go through the pipe by value


class _TensorByValue:
    """Pickles as its tensor's numpy array and unpickles as a tensor again."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def __reduce__(self):
        return torch.from_numpy, (self.array,)


def _by_value(data: Any) -> Any:
    """`data` with its small plain CPU tensors (those numpy can hold) as _TensorByValue."""
    if isinstance(data, torch.Tensor):
        if data.nbytes > INLINE_TENSOR_BYTES or data.requires_grad or data.device.type != "cpu":
            return data
        try:
            return _TensorByValue(np.ascontiguousarray(data.numpy()))
        except (TypeError, RuntimeError):  # bfloat16, sparse, ...: the usual way
            return data
    if type(data) is dict:
        return {k: _by_value(v) for k, v in data.items()}
    if type(data) in (list, tuple):
        return type(data)(_by_value(v) for v in data)
    return data


class ShardStream(IterableDataset):
    """Endless batches for one rank; see the module docstring for the order."""

    def __init__(
        self,
        shards: ShardList | list[Source],
        *,
        decode: Callable[[dict], Any],
        collate: Callable[[list], Any],
        batch_size: int,
        seed: int,
        shuffle_buffer: int,
        rank: int,
        world_size: int,
        num_workers: int,
        on_error: str = "skip",
        resampled: bool = False,
        with_keys: bool = False,
        key: str = "data.train.urls",
        buckets: Buckets | None = None,
        transforms: Any = None,
        decode_batch: Callable[[list[dict]], Any] | None = None,
    ):
        self.sources = [Source(shards)] if isinstance(shards, ShardList) else list(shards)
        for src in self.sources:  # a mixture's sources are named by their config key
            check_readers(
                len(src.shards.urls), world_size, num_workers, key=src.name if src.name.startswith("data.") else key
            )
        total = sum(s.weight for s in self.sources)
        self.weights = np.array([s.weight / total for s in self.sources])
        # decode_batch(raws) must equal collate([decode(r) for r in raws]); it makes a batch at
        # once, and a batch it cannot make is made again sample by sample, naming each bad one
        self.decode, self.collate, self.decode_batch = decode, collate, decode_batch
        self.batch_size, self.seed, self.shuffle_buffer = batch_size, seed, shuffle_buffer
        self.rank, self.world_size, self.num_workers = rank, world_size, max(1, num_workers)
        self.on_error, self.resampled, self.with_keys = on_error, resampled, with_keys
        # handed to decode in each sample: `__bucket__`, and `__transforms__` with the
        # `__seed__` and `__epoch__` that seed its random choices (image_transforms)
        self.buckets, self.transforms = buckets, transforms
        ErrorPolicy(on_error, {})  # validates the policy name
        self.reader_states: dict[int, dict | None] = {}  # by role; set on resume
        self.start_batch = 0  # batches consumed under this layout; rotates the round-robin

    @property
    def shards(self) -> ShardList:
        return self.sources[0].shards

    def reader_shards(self, epoch: int, role: int, source: int = 0) -> list[int]:
        return plan_epoch(
            len(self.sources[source].shards.urls),
            epoch,
            self.seed + 7919 * source,
            self.rank,
            self.world_size,
            role,
            self.num_workers,
            self.resampled,
        )

    def _readers(self, role: int, state: dict | None) -> tuple[list[SourceReader], np.random.Generator]:
        state = state or {"sources": [None] * len(self.sources), "mix_rng": None}
        readers = [
            SourceReader(
                src,
                s,
                seed=self.seed + 7919 * i,
                rank=self.rank,
                world=self.world_size,
                role=role,
                workers=self.num_workers,
                buffer_size=self.shuffle_buffer,
                on_error=self.on_error,
                resampled=self.resampled,
            )
            for i, (src, s) in enumerate(zip(self.sources, state["sources"]))
        ]
        mix = np.random.default_rng([self.seed, self.rank * self.num_workers + role, 2])
        if state["mix_rng"] is not None:
            mix.bit_generator.state = state["mix_rng"]
        return readers, mix

    def _role_reader(self, role: int, state: dict | None):
        """(draw, decode_one, snapshot) of one reader: draw() gives the next (raw sample, name);
        decode_one(raw, name) its decoded sample, or None when it is skipped (on_error)."""
        readers, mix = self._readers(role, state)
        policy = ErrorPolicy(self.on_error, readers[0].stats)
        failing_since: dict[int, int] = {}  # source -> epoch of its first undecodable sample in a row

        def draw() -> tuple[dict, list]:
            i = int(mix.choice(len(readers), p=self.weights)) if len(readers) > 1 else 0
            name, raw = readers[i].next_raw()
            self._annotate(raw, name[0])
            return raw, [i, *name, raw.get("__key__")]

        def decoded(name: list) -> None:
            if failing_since:
                failing_since.pop(name[0], None)

        def decode_one(raw: dict, name: list) -> Any:
            i = name[0]
            try:
                sample = decode_or_explain(self.decode, raw)
            except DataError as exc:
                policy("missing_key" if "missing key" in str(exc) else "bad_samples", str(exc))
                if name[1] - failing_since.setdefault(i, name[1]) >= 2:
                    raise DataError(
                        f"rank {self.rank} worker {role}: no sample of source "
                        f"'{readers[i].source.name}' decodes for two epochs in "
                        f"a row; the last: {exc}"
                    ) from None
                return None
            decoded(name)
            return sample

        def snapshot():
            return {"sources": [r.state_dict() for r in readers], "mix_rng": mix.bit_generator.state}

        return draw, decode_one, decoded, snapshot

    def role_samples(
        self, role: int, state: dict | None = None
    ) -> tuple[Iterator[tuple[Any, list]], Callable[[], dict]]:
        """(decoded sample, name) of one reader, endless; and a function giving its state."""
        draw, decode_one, _, snapshot = self._role_reader(role, state)

        def samples():
            while True:
                raw, name = draw()
                sample = decode_one(raw, name)
                if sample is not None:
                    yield sample, name

        return samples(), snapshot

    def role_batches(
        self, role: int, state: dict | None = None
    ) -> tuple[Iterator[tuple[Any, list]], Callable[[], dict]]:
        """(batch, names) of one reader through `decode_batch`, endless: the same samples in the
        same batches as role_samples gives; a batch that `decode_batch` refuses is decoded
        sample by sample (a bad sample skipped and named, the next one drawn in its place)."""
        draw, decode_one, decoded, snapshot = self._role_reader(role, state)

        def batches():
            while True:
                drawn = [draw() for _ in range(self.batch_size)]
                try:
                    batch = self.decode_batch([raw for raw, _ in drawn])
                except Exception:
                    batch = None
                if batch is not None:
                    for _, name in drawn:
                        decoded(name)
                    yield batch, [name for _, name in drawn]
                    continue
                samples, names = [], []
                while len(samples) < self.batch_size:
                    raw, name = drawn.pop(0) if drawn else draw()
                    sample = decode_one(raw, name)
                    if sample is not None:
                        samples.append(sample)
                        names.append(name)
                yield self.collate(samples), names

        return batches(), snapshot

    def _annotate(self, raw: dict, epoch: int) -> None:
        if self.transforms is not None:
            raw["__transforms__"], raw["__seed__"], raw["__epoch__"] = self.transforms, self.seed, epoch

    def _place(self, raw: dict, epoch: int) -> str:
        """The sample's bucket group; its bucket and transform settings go into it for decode."""
        group, bucket = self.buckets.group_of(raw)
        self._annotate(raw, epoch)
        if bucket is not None:
            raw["__bucket__"] = bucket
        return group

    def bucket_batches(
        self, role: int, state: dict | None = None
    ) -> tuple[Iterator[tuple[list, list]], Callable[[], dict]]:
        """(decoded samples, names) of one reader's batches, each from one bucket, endless;
        and a function giving its state (the readers' and the samples held per bucket)."""
        readers, mix = self._readers(role, state)
        policy = ErrorPolicy(self.on_error, readers[0].stats)
        failing_since: dict[int, int] = {}
        held: dict[str, list[tuple[list, dict]]] = self._refetch_held(readers, (state or {}).get("pending", {}))

        def where(name: list) -> str:
            return f"sample '{name[4]}' in shard '{readers[name[0]].source.shards.urls[name[2]]}'"

        def batches():
            while True:
                i = int(mix.choice(len(readers), p=self.weights)) if len(readers) > 1 else 0
                name, raw = readers[i].next_raw()
                name = [i, *name, raw.get("__key__")]
                try:
                    group = self._place(raw, name[1])
                except Exception as exc:
                    policy("bad_samples", f"{where(name)}: no size for its bucket ({type(exc).__name__}: {exc})")
                    continue
                group_items = held.setdefault(group, [])
                group_items.append((name, raw))
                if len(group_items) < self.batch_size:
                    continue
                del held[group]  # the state after this batch no longer holds them
                samples, names = [], []
                for nm, rw in group_items:
                    try:
                        samples.append(decode_or_explain(self.decode, rw))
                        names.append(nm)
                        failing_since.pop(nm[0], None)
                    except DataError as exc:
                        policy("missing_key" if "missing key" in str(exc) else "bad_samples", str(exc))
                        if nm[1] - failing_since.setdefault(nm[0], nm[1]) >= 2:
                            raise DataError(
                                f"rank {self.rank} worker {role}: no sample of source "
                                f"'{readers[nm[0]].source.name}' decodes for two epochs in "
                                f"a row; the last: {exc}"
                            ) from None
                if len(samples) < self.batch_size:  # some did not decode: wait for more
                    held[group] = [(nm, rw) for nm, rw in group_items if nm in names]
                    continue
                yield samples, names

        def snapshot():
            return {
                "sources": [r.state_dict() for r in readers],
                "mix_rng": mix.bit_generator.state,
                "pending": {g: [nm for nm, _ in items] for g, items in held.items()},
            }

        return batches(), snapshot

    def _refetch_held(self, readers: list[SourceReader], pending: dict[str, list]) -> dict[str, list]:
        """Read back the samples a saved state held per bucket, in their order."""
        found: dict[tuple, dict] = {}
        for i, reader in enumerate(readers):
            names = [nm[1:4] for names in pending.values() for nm in names if nm[0] == i]
            for name, raw in reader._refetch(names):
                found[(i, *name)] = raw
        held = {}
        for group, names in pending.items():
            items = []
            for nm in names:
                raw = found.get(tuple(nm[:4]))
                if raw is not None:
                    self._place(raw, nm[1])
                    items.append((list(nm), raw))
            if items:
                held[group] = items
        return held

    def __iter__(self) -> Iterator[StreamBatch]:
        info = get_worker_info()
        worker, nworkers = (info.id, info.num_workers) if info else (0, 1)
        if nworkers != self.num_workers:
            raise DataError(f"stream built for {self.num_workers} workers runs in {nworkers}")
        # The DataLoader restarts its round-robin at worker 0, so worker w plays the reader
        # that owned the batch start_batch + w in the uninterrupted order.
        role = (worker + self.start_batch) % nworkers
        if self.buckets is not None:
            batches, snapshot = self.bucket_batches(role, self.reader_states.get(role))
            for samples, names in batches:
                yield StreamBatch(self.collate(samples), role, snapshot(), names if self.with_keys else None)
            return
        if self.decode_batch is not None:
            batches, snapshot = self.role_batches(role, self.reader_states.get(role))
            for data, names in batches:
                yield StreamBatch(data, role, snapshot(), names if self.with_keys else None)
            return
        samples, snapshot = self.role_samples(role, self.reader_states.get(role))
        batch, names = [], []
        for sample, name in samples:
            batch.append(sample)
            names.append(name)
            if len(batch) == self.batch_size:
                yield StreamBatch(self.collate(batch), role, snapshot(), names if self.with_keys else None)
                batch, names = [], []


# ------------------------------------------------------------------ elastic resume
def _pool_remaining(
    states: list[dict | None], layout: dict, num_shards: int, seed: int, resampled: bool
) -> tuple[list[list], int]:
    """What old readers of one source had left of the epochs in flight: (items, next epoch)."""
    world, workers = layout["world_size"], layout["num_workers"]
    states = [s or fresh_reader_state() for s in states]
    top = max(s["next_epoch"] for s in states) - 1
    if resampled:  # nothing to preserve: draws with replacement
        return [], top + 1
    items, picks = [], {}
    for g, s in enumerate(states):
        for epoch, shard, offset in s["buffer"]:
            picks.setdefault((epoch, shard), []).append(offset)
        items += [list(item) for item in s["queue"]]
        rank, role = divmod(g, workers)
        for e in range(s["next_epoch"], top + 1):
            items += [
                [e, shard, 0, None] for shard in plan_epoch(num_shards, e, seed, rank, world, role, workers, False)
            ]
    items += [[e, shard, 0, sorted(offs)] for (e, shard), offs in sorted(picks.items())]
    return items, top + 1


def _deal(items: list[list], n_readers: int, sizes: list[int] | None) -> list[list[list]]:
    """Deal work items to readers, largest first, each to the least loaded reader."""

    def size(item):
        if item[3] is not None:
            return len(item[3])
        full = sizes[item[1]] if sizes is not None else UNKNOWN_SHARD_SIZE
        return max(0, full - item[2])

    loads, dealt = [0] * n_readers, [[] for _ in range(n_readers)]
    for item in sorted(items, key=lambda it: (-size(it), it[0], it[1], it[2])):
        g = loads.index(min(loads))
        dealt[g].append(item)
        loads[g] += size(item)
    for d in dealt:
        d.sort(key=lambda it: (it[0], it[1], it[2]))
    return dealt


def _with_held(role_state: dict, source: int) -> dict:
    """A reader's state of one source, with the samples its role held in buckets counted as
    buffered: read but not delivered, so pooled like the buffer."""
    state = role_state["sources"][source]
    held = [nm[1:4] for names in role_state.get("pending", {}).values() for nm in names if nm[0] == source]
    return {**state, "buffer": list(state["buffer"]) + held} if held else state


def elastic_reader_states(stream: ShardStream, old_rank_states: list[dict]) -> dict[int, dict]:
    """New reader states (by role, for `stream`'s rank) from all old ranks' saved states."""
    old_layout = old_rank_states[0]
    old_workers = old_layout["num_workers"]
    n_new = stream.world_size * stream.num_workers
    per_source: list[list[list[list]]] = []
    next_epochs = []
    for i, src in enumerate(stream.sources):
        old = [rs["readers"].get(str(w)) for rs in old_rank_states for w in range(old_workers)]
        old = [_with_held(o, i) if o else None for o in old]
        items, next_epoch = _pool_remaining(
            old, old_layout, len(src.shards.urls), stream.seed + 7919 * i, stream.resampled
        )
        per_source.append(_deal(items, n_new, src.shards.samples_per_shard))
        next_epochs.append(next_epoch)
    states = {}
    for role in range(stream.num_workers):
        g = stream.rank * stream.num_workers + role
        sources = []
        for i, dealt in enumerate(per_source):
            s = fresh_reader_state(next_epochs[i])
            s["queue"] = dealt[g]
            s["rng"] = np.random.default_rng([stream.seed + 7919 * i, next_epochs[i], g, 3]).bit_generator.state
            sources.append(s)
        states[role] = {"sources": sources, "mix_rng": None}
    return states


# ------------------------------------------------------------------ the rank's loader
def ignore_sigint(worker_id: int) -> None:
    """Ctrl-C reaches every process of the terminal's group: the main process handles it
    (stop and save); a worker that took it too would die with a traceback of its own."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class StreamLoader:
    """A rank's training batches, and the data position the trainer checkpoints.

    The DataLoader is built at the first batch, after `load_state_dict()` had its chance.
    With a `ledger` path, the names of consumed samples are appended there (tests and
    audits use it to count deliveries).
    """

    def __init__(self, stream: ShardStream, *, num_workers: int, prefetch_factor: int = 4, ledger: Path | None = None):
        self.stream, self.num_workers, self.prefetch_factor = stream, num_workers, prefetch_factor
        self.batches = 0  # consumed under the current layout (drives the round-robin)
        self.total_batches = 0  # consumed since the run began (never reset)
        self.samples_seen = 0  # over all ranks
        self.base_stats: dict[str, int] = {}
        self.states: dict[int, dict | None] = {w: None for w in range(stream.num_workers)}
        self.ledger = ledger
        self._it = None

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None:
            self.stream.start_batch = self.batches
            self.stream.reader_states = dict(self.states)
            kwargs = {}
            if self.num_workers > 0:
                kwargs = dict(
                    prefetch_factor=self.prefetch_factor, persistent_workers=True, worker_init_fn=ignore_sigint
                )
            loader = DataLoader(
                self.stream,
                batch_size=None,
                num_workers=self.num_workers,
                # own generator: building the loader must not draw from
                # the global RNG, or a resumed run's RNG would drift
                generator=torch.Generator().manual_seed(self.stream.seed),
                **kwargs,
            )
            self._it = iter(loader)
        got: StreamBatch = next(self._it)
        self.states[got.role] = got.state
        self.batches += 1
        self.total_batches += 1
        self.samples_seen += self.stream.batch_size * self.stream.world_size
        if self.ledger is not None:
            with open(self.ledger, "a") as f:
                f.write(json.dumps({"b": self.total_batches, "keys": got.keys}) + "\n")
        return got.data

    @property
    def epoch(self) -> float | None:
        totals = [s.shards.total_samples for s in self.stream.sources]
        return self.samples_seen / sum(totals) if all(totals) else None

    def stats(self) -> dict[str, int]:
        """Skip counters of this rank's readers (cumulative over the run)."""
        out = dict(self.base_stats)
        for state in self.states.values():
            for src in (state or {}).get("sources", []):
                for k, v in src["stats"].items():
                    out[k] = out.get(k, 0) + v
        return out

    def layout(self) -> dict:
        s = self.stream
        return {
            "world_size": s.world_size,
            "num_workers": s.num_workers,
            "seed": s.seed,
            "batch_size": s.batch_size,
            "shuffle_buffer": s.shuffle_buffer,
            "resampled": s.resampled,
            "num_shards": [len(src.shards.urls) for src in s.sources],
            "buckets": s.buckets.signature() if s.buckets is not None else None,
        }

    def state_dict(self) -> dict:
        return {
            **self.layout(),
            "rank": self.stream.rank,
            "batches": self.batches,
            "total_batches": self.total_batches,
            "samples_seen": self.samples_seen,
            "base_stats": self.base_stats,
            "readers": {str(w): st for w, st in self.states.items()},
        }

    def load_state_dict(self, rank_states: list[dict]) -> str:
        """Resume from the states every old rank saved; returns 'exact' or 'elastic'."""
        if self._it is not None:
            raise RuntimeError("load_state_dict after iteration started")
        old = rank_states[0]
        now = self.layout()
        for k in ("seed", "num_shards", "resampled"):
            if old[k] != now[k]:
                raise DataError(
                    f"rank {self.stream.rank}: the checkpoint's data position was made "
                    f"with {k}={old[k]}, this run has {now[k]}; resume needs the same "
                    "shards and data seed"
                )
        self.total_batches = old["total_batches"]
        self.samples_seen = old["samples_seen"]
        if all(old.get(k) == now[k] for k in now):  # `buckets` is absent from older positions
            mine = rank_states[self.stream.rank]
            self.batches = mine["batches"]
            self.base_stats = dict(mine["base_stats"])
            self.states = {int(w): st for w, st in mine["readers"].items()}
            return "exact"
        self.batches = 0
        self.states = elastic_reader_states(self.stream, rank_states)
        self.base_stats = {}
        if self.stream.rank == 0:  # keep the run's skip counts
            for rs in rank_states:
                for k, v in StreamLoader._sum_stats(rs).items():
                    self.base_stats[k] = self.base_stats.get(k, 0) + v
        return "elastic"

    @staticmethod
    def _sum_stats(rank_state: dict) -> dict[str, int]:
        out = dict(rank_state["base_stats"])
        for st in rank_state["readers"].values():
            for src in (st or {}).get("sources", []):
                for k, v in src["stats"].items():
                    out[k] = out.get(k, 0) + v
        return out


def truncate_ledgers(folder: Path, total_batches: int) -> None:
    """Drop ledger lines past a resume point (made by the run that died)."""
    for path in Path(folder).glob("rank*.jsonl"):
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["b"] <= total_batches:
                    kept.append(line)
            except (ValueError, KeyError):
                continue
        path.write_text("".join(line + "\n" for line in kept))


def eval_batches(
    shards: ShardList,
    *,
    decode: Callable[[dict], Any],
    collate: Callable[[list], Any],
    batch_size: int,
    rank: int,
    world_size: int,
    on_error: str = "fail",
) -> Iterator[Any]:
    """One ordered pass over an eval split; sample i goes to rank i % world_size.

    Splitting by sample (not shard) lets a small eval set of one shard serve any world
    size; ranks get batch counts that may differ by one, so callers reduce sums, never
    run a collective per batch.
    """
    policy = ErrorPolicy(on_error, {})
    batch = []
    for i, sample in enumerate(iter_raw_samples(shards.urls, on_error)):
        if i % world_size != rank:
            continue
        try:
            batch.append(decode_or_explain(decode, sample))
        except DataError as exc:
            policy("bad_samples", str(exc))
            continue
        if len(batch) == batch_size:
            yield collate(batch)
            batch = []
    if batch:
        yield collate(batch)
