"""Shard tools for users' data: Hugging Face datasets, image folders, img2dataset output.

The acceptance tests train the smoke model on shards made each way, unchanged.
"""

import io
import json
import logging
import math
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import datasets as hf
import numpy as np
import pytest
from PIL import Image

from data_pipelines.shards import index_shards, read_manifest, sha256_file, verify_shards
from data_pipelines.sources.digits import binarized_digits
from data_pipelines.sources.folder import folder_to_shards
from data_pipelines.sources.hf import dataset_to_shards, load_source, parse_columns
from data_pipelines.stream import iter_raw_samples, resolve_shards
from launch.make_shards import main as make_shards

ROOT = Path(__file__).resolve().parents[1]


def digit_arrays(n, start=0):
    images, labels = binarized_digits()
    return images[start : start + n] * 255, labels[start : start + n]


def png_bytes(array):
    """Uncompressed PNG: bytes that a re-encode with PIL's defaults would not reproduce."""
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG", compress_level=0)
    return out.getvalue()


def digits_dataset(n, start=0):
    images, labels = digit_arrays(n, start)
    features = hf.Features(
        {
            "image": hf.Image(),
            "caption": hf.Value("string"),
            "label": hf.ClassLabel(names=[str(d) for d in range(10)]),
            "meta": {"index": hf.Value("int64")},
        }
    )
    return hf.Dataset.from_dict(
        {
            "image": [{"bytes": png_bytes(a), "path": None} for a in images],
            "caption": [f"a handwritten {d}" for d in labels],
            "label": [int(d) for d in labels],
            "meta": [{"index": start + i} for i in range(n)],
        },
        features=features,
    )


def decode_gray(data):
    return np.asarray(Image.open(io.BytesIO(data)).convert("L"))


def jpeg_bytes(array):
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="JPEG", quality=95)
    return out.getvalue()


def read_back(folder):
    shards = resolve_shards(str(folder))
    return shards, list(iter_raw_samples(shards.urls))


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "launch.make_shards", *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def train_density_model(run_dir, train, val, test, env):
    """The smoke model's recipe, pointed at other shards and nothing else changed."""
    cmd = [
        sys.executable,
        "-m",
        "launch.train",
        "--config",
        str(ROOT / "configs/autoregressive/made.yaml"),
        f"run.dir={run_dir}",
        f"data.train.urls={train}",
        f"data.val.urls={val}",
        f"data.test.urls={test}",
        "model.hidden=[64]",
        "trainer.max_steps=30",
        "trainer.log_every=10",
        "trainer.checkpoint_every=0",
        "trainer.eval_every=0",
        "trainer.sample_every=0",
        "trainer.progress_bar=false",
        "data.num_workers=1",
        "optim.warmup_steps=2",
    ]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-5000:]
    final = json.loads((Path(run_dir) / "final_metrics.json").read_text())
    assert final["step"] == 30 and math.isfinite(final["test/nll"])
    return final


# --- Hugging Face datasets ------------------------------------------------------------


def test_dataset_columns_become_fields(tmp_path):
    ds = digits_dataset(40)
    m = dataset_to_shards(ds, tmp_path, maxcount=16, columns=parse_columns("image:png,caption:txt,label:cls,meta:json"))
    assert [s["samples"] for s in m["shards"]] == [16, 16, 8] and m["total_samples"] == 40
    assert read_manifest(tmp_path) == m and verify_shards(tmp_path) == []

    shards, got = read_back(tmp_path)
    assert shards.samples_per_shard == [16, 16, 8]
    images, labels = digit_arrays(40)
    assert [s["__key__"] for s in got] == [f"{i:06d}" for i in range(40)]
    for i, s in enumerate(got):
        assert set(s) - {"__key__", "__url__"} == {"png", "txt", "cls", "json"}
        assert s["png"] == png_bytes(images[i])  # PNG already: copied, not re-encoded
        assert np.array_equal(decode_gray(s["png"]), images[i])
        assert s["txt"] == f"a handwritten {labels[i]}".encode()
        assert s["cls"] == str(labels[i]).encode()
        assert json.loads(s["json"]) == {"index": i}


def test_dataset_image_reencoded_to_another_format(tmp_path):
    dataset_to_shards(digits_dataset(5), tmp_path, columns={"image": "jpeg", "label": "cls"})
    _, got = read_back(tmp_path)
    images, _ = digit_arrays(5)
    for s, want in zip(got, images):
        assert set(s) - {"__key__", "__url__"} == {"jpg", "cls"}
        assert s["jpg"][:2] == b"\xff\xd8"  # a JPEG stream
        assert np.array_equal(decode_gray(s["jpg"]) > 127, want > 127)


def test_dataset_auto_mapping_by_feature_type(tmp_path):
    ds = digits_dataset(6).add_column("url", [f"http://x/{i}" for i in range(6)])
    ds = ds.add_column("embedding", [[float(i), 0.5] for i in range(6)])
    m = dataset_to_shards(ds, tmp_path)
    assert m["total_samples"] == 6
    _, got = read_back(tmp_path)
    # two string columns: each field gets its column's name so neither overwrites the other
    assert set(got[3]) - {"__key__", "__url__"} == {"png", "caption.txt", "url.txt", "cls", "json", "npy"}
    assert got[3]["url.txt"] == b"http://x/3"
    assert got[3]["cls"] == str(digit_arrays(6)[1][3]).encode()
    assert np.load(io.BytesIO(got[3]["npy"])).tolist() == [3.0, 0.5]
    assert json.loads(got[3]["json"]) == {"index": 3}


def test_dataset_key_column_and_nulls(tmp_path, caplog):
    ds = hf.Dataset.from_dict(
        {"name": ["cat.1", "dir/dog", "eel", "fox"], "caption": ["a", None, "c", None], "n": [1, 2, 3, None]}
    )
    with caplog.at_level(logging.WARNING):
        m = dataset_to_shards(ds, tmp_path, columns={"caption": "txt", "n": "cls"}, key_column="name")
    _, got = read_back(tmp_path)
    assert m["total_samples"] == 3
    assert [s["__key__"] for s in got] == ["cat_1", "dir__dog", "eel"]
    assert [s.get("txt") for s in got] == [b"a", None, b"c"]
    assert "column 'caption': 2 null value" in caplog.text
    assert "1 row(s) with nothing but nulls left out (first: key 'fox')" in caplog.text


@pytest.mark.parametrize(
    "columns, key_column, message",
    [
        ({"caption": "txt", "nope": "json"}, None, "column 'nope' is not in the dataset"),
        ({"label": "txt"}, None, "row 0 (key '000000'), column 'label' -> txt"),
        ({"caption": "txt", "meta": "txt"}, None, "two columns map to the same field"),
        ({"caption": "mp3"}, None, "column 'caption': extension 'mp3'"),
        ({"label": "cls"}, "label", "duplicate sample key"),
    ],
)
def test_dataset_bad_input_names_the_culprit(tmp_path, columns, key_column, message):
    ds = digits_dataset(12)
    with pytest.raises(ValueError, match=re.escape(message)):
        dataset_to_shards(ds, tmp_path, columns=columns, key_column=key_column)


def test_dataset_without_mapping_for_a_type_asks_for_columns(tmp_path):
    ds = hf.Dataset.from_dict({"blob": [b"\x00\x01"]}, features=hf.Features({"blob": hf.Value("binary")}))
    with pytest.raises(ValueError, match="column 'blob'.*pass --columns"):
        dataset_to_shards(ds, tmp_path)


def test_load_source_picks_the_split(tmp_path):
    hf.DatasetDict({"train": digits_dataset(3), "test": digits_dataset(2)}).save_to_disk(tmp_path / "dict")
    digits_dataset(4).save_to_disk(tmp_path / "single")
    assert len(load_source(str(tmp_path / "dict"))) == 3  # train by default
    assert len(load_source(str(tmp_path / "dict"), "test")) == 2
    assert len(load_source(str(tmp_path / "single"))) == 4
    with pytest.raises(ValueError, match="no split 'val' \\(it has train, test\\)"):
        load_source(str(tmp_path / "dict"), "val")
    with pytest.raises(ValueError, match="single Dataset"):
        load_source(str(tmp_path / "single"), "train")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_source(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="expected COLUMN:EXTENSION"):
        parse_columns("image:png,caption")


# --- image folders (img2dataset output_format=files) ----------------------------------


def write_files_layout(root, n, per_folder=10, start=0):
    """img2dataset's files layout: 00000/000000000.jpg + .txt + .json, stats beside."""
    images, labels = digit_arrays(n, start)
    for i in range(n):
        shard, key = f"{i // per_folder:05d}", f"{i:09d}"
        (root / shard).mkdir(parents=True, exist_ok=True)
        (root / shard / f"{key}.jpg").write_bytes(jpeg_bytes(images[i]))
        (root / shard / f"{key}.txt").write_text(f"a handwritten {labels[i]}")
        (root / shard / f"{key}.json").write_text(json.dumps({"key": key, "status": "success"}))
    for shard in sorted({f"{i // per_folder:05d}" for i in range(n)}):
        (root / f"{shard}.parquet").write_bytes(b"PAR1 not really")
        (root / f"{shard}_stats.json").write_text("{}")


def test_folder_of_images_and_sidecars(tmp_path, caplog):
    src = tmp_path / "src"
    write_files_layout(src, 12)
    (src / "00001/000000011.txt").unlink()  # image without caption
    (src / "00001/000000010.jpg").unlink()  # sidecars without image
    (src / "extra").mkdir()
    (src / "extra/v1.2 cat.jpeg").write_bytes(jpeg_bytes(digit_arrays(1)[0][0]))
    (src / "extra/v1.2 cat.txt").write_text("a cat")
    (src / "extra/notes.md").write_text("not a sample")
    with caplog.at_level(logging.WARNING):
        m = folder_to_shards(src, tmp_path / "out", maxcount=5)
    assert m["total_samples"] == 12 and [s["samples"] for s in m["shards"]] == [5, 5, 2]
    assert "1 image(s) without a .txt caption: 00001/000000011" in caplog.text
    assert "2 sidecar file(s) without an image: 00001/000000010.json, 00001/000000010.txt" in caplog.text
    assert "1 other file(s) ignored" in caplog.text  # notes.md; img2dataset's stats are expected

    _, got = read_back(tmp_path / "out")
    by_key = {s["__key__"]: s for s in got}
    assert len(by_key) == 12
    assert by_key["00000__000000003"]["jpg"] == (src / "00000/000000003.jpg").read_bytes()
    assert by_key["00000__000000003"]["txt"] == (src / "00000/000000003.txt").read_bytes()
    assert json.loads(by_key["00000__000000003"]["json"])["key"] == "000000003"
    assert set(by_key["00001__000000011"]) - {"__key__", "__url__"} == {"jpg", "json"}
    assert by_key["extra__v1_2 cat"]["jpg"] == (src / "extra/v1.2 cat.jpeg").read_bytes()


def test_folder_require_caption_and_bad_files(tmp_path, capsys, caplog):
    src = tmp_path / "src"
    write_files_layout(src, 3)
    for _ in range(2):  # shards written inside the source are not read back as input
        assert make_shards(["from-folder", str(src), "--out", str(src / "shards"), "--require-caption"]) == 0
        assert read_manifest(src / "shards")["total_samples"] == 3
    assert caplog.text == ""

    (src / "00000/000000001.txt").unlink()
    assert make_shards(["from-folder", str(src), "--out", str(tmp_path / "a"), "--require-caption"]) == 2
    assert "without a .txt caption: 00000/000000001" in capsys.readouterr().err
    assert not (tmp_path / "a" / "manifest.json").exists()

    (src / "00000/000000002.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="000000002.jpg: unreadable jpg"):
        folder_to_shards(src, tmp_path / "b")
    (src / "00000/000000002.png").write_bytes(b"whatever")
    with pytest.raises(ValueError, match="two images for one sample"):
        folder_to_shards(src, tmp_path / "c")


# --- Hugging Face imagefolder (metadata.jsonl), as the diffusers scripts read it ----------


def write_imagefolder(root, n):
    images, labels = digit_arrays(n)
    (root / "pics").mkdir(parents=True)
    rows = []
    for i in range(n):
        name = f"pics/{i:03d}.png" if i % 2 else f"{i:03d}.jpg"
        (root / name).write_bytes(png_bytes(images[i]) if i % 2 else jpeg_bytes(images[i]))
        rows.append({"file_name": name, "text": f"a handwritten {labels[i]}", "label": int(labels[i])})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_imagefolder_with_metadata_jsonl(tmp_path, capsys, caplog):
    src = tmp_path / "train"
    rows = write_imagefolder(src, 6)
    (src / "stray.png").write_bytes(png_bytes(digit_arrays(1)[0][0]))  # not in the metadata
    with caplog.at_level(logging.WARNING):
        assert make_shards(["from-folder", str(src), "--out", str(tmp_path / "out"), "--maxcount", "4"]) == 0
    assert "1 other file(s) ignored (images not in metadata.jsonl)" in caplog.text
    _, got = read_back(tmp_path / "out")
    by_key = {s["__key__"]: s for s in got}
    assert sorted(by_key) == ["000", "002", "004", "pics__001", "pics__003", "pics__005"]
    for i, row in enumerate(rows):
        sample = by_key[row["file_name"].rsplit(".", 1)[0].replace("/", "__")]
        assert sample["txt"].decode() == row["text"]
        field = "png" if i % 2 else "jpg"
        assert sample[field] == (src / row["file_name"]).read_bytes(), "image bytes changed"
        assert json.loads(sample["json"]) == {"label": row["label"]}


def test_imagefolder_other_caption_column_and_csv(tmp_path):
    src = tmp_path / "csv"
    src.mkdir()
    images, _ = digit_arrays(2)
    for i in range(2):
        (src / f"{i}.png").write_bytes(png_bytes(images[i]))
    (src / "metadata.csv").write_text('file_name,prompt\n0.png,"a zero, small"\n1.png,a one\n')
    m = folder_to_shards(src, tmp_path / "out", caption_column="prompt")
    assert m["total_samples"] == 2
    _, got = read_back(tmp_path / "out")
    assert sorted(s["txt"].decode() for s in got) == ["a one", "a zero, small"]
    assert all("json" not in s for s in got)  # no column beyond file_name and the caption


def test_imagefolder_problems_are_named(tmp_path, capsys):
    src = tmp_path / "train"
    rows = write_imagefolder(src, 4)
    (src / rows[2]["file_name"]).unlink()
    assert make_shards(["from-folder", str(src), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "metadata.jsonl:3: file_name '002.jpg' does not exist" in err
    assert not (tmp_path / "a" / "manifest.json").exists()

    rows[2] = {"file_name": rows[1]["file_name"]}  # listed twice, and without a caption
    (src / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(
        ValueError, match=r"metadata.jsonl:3: file_name 'pics/001.png' is listed again \(first at .*:2\)"
    ):
        folder_to_shards(src, tmp_path / "b")
    rows[2] = {"file_name": "003.jpg"}
    rows[3] = {"file_name": "pics/003.png"}
    (src / "003.jpg").write_bytes(jpeg_bytes(digit_arrays(1)[0][0]))
    (src / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert make_shards(["from-folder", str(src), "--out", str(tmp_path / "c"), "--require-caption"]) == 2
    assert "image(s) without a 'text' in metadata.jsonl: 003.jpg, pics/003.png" in capsys.readouterr().err


# --- shard counts that fit a cluster -----------------------------------------------------


def write_pictures(folder, n):
    folder.mkdir(parents=True)
    images, labels = digit_arrays(n)
    for i in range(n):
        (folder / f"{i:04d}.png").write_bytes(png_bytes(images[i]))
        (folder / f"{i:04d}.txt").write_text(f"a handwritten {labels[i]}")


def test_a_small_folder_is_still_cut_into_enough_shards(tmp_path, capsys):
    """256 images once made one shard (one reader at most) and nothing said so: now at
    least 16 by default, and a split with fewer than a typical run's readers is named."""
    write_pictures(tmp_path / "pics", 256)
    assert make_shards(["from-folder", str(tmp_path / "pics"), "--out", str(tmp_path / "train")]) == 0
    assert len(read_manifest(tmp_path / "train")["shards"]) == 16
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{tmp_path / 'train'}: 16 shard(s)" in err[0]
    assert "2 nodes x 8 GPUs x 4 workers = 64 readers" in err[0] and "--min-shards 64" in err[0]

    assert (
        make_shards(["from-folder", str(tmp_path / "pics"), "--out", str(tmp_path / "big"), "--min-shards", "64"]) == 0
    )
    assert [s["samples"] for s in read_manifest(tmp_path / "big")["shards"]] == [4] * 64
    assert capsys.readouterr().err == ""


def test_a_small_dataset_is_still_cut_into_enough_shards(tmp_path, capsys):
    hf.DatasetDict({"train": digits_dataset(256), "validation": digits_dataset(20, 256)}).save_to_disk(
        tmp_path / "saved"
    )
    assert make_shards(["from-datasets", str(tmp_path / "saved"), "--out", str(tmp_path / "train")]) == 0
    assert [s["samples"] for s in read_manifest(tmp_path / "train")["shards"]] == [16] * 16
    assert "16 shard(s), fewer than the 2 nodes x 8 GPUs x 4 workers = 64" in capsys.readouterr().err
    # an eval split is read by sample, whatever its shard count: no warning
    assert (
        make_shards(
            [
                "from-datasets",
                str(tmp_path / "saved"),
                "--out",
                str(tmp_path / "v"),
                "--split",
                "validation",
                "--min-shards",
                "2",
            ]
        )
        == 0
    )
    assert len(read_manifest(tmp_path / "v")["shards"]) == 2 and capsys.readouterr().err == ""


def test_every_shard_writer_takes_min_shards(tmp_path, capsys):
    """The generated datasets keep their own counts by default (recipes and tests rely on
    them) and cut finer on request."""
    import argparse

    from launch.make_shards import build_parser

    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    takes = {
        name
        for name, sub in subcommands.choices.items()
        if any("--min-shards" in a.option_strings for a in sub._actions)
    }
    assert takes == {
        "digits",
        "from-datasets",
        "from-folder",
        "shapes",
        "detection",
        "action-streams",
        "latents",
        "mixture2d",
        "text",
    }  # all but index and verify, which write no tars

    assert make_shards(["digits", "--out", str(tmp_path / "d")]) == 0
    assert [len(read_manifest(tmp_path / "d" / s)["shards"]) for s in ("train", "val", "test")] == [8, 2, 2]
    err = capsys.readouterr().err
    assert "d/train: 8 shard(s)" in err and "d/val" not in err
    assert make_shards(["digits", "--out", str(tmp_path / "d20"), "--min-shards", "20"]) == 0
    assert all(len(read_manifest(tmp_path / "d20" / s)["shards"]) >= 20 for s in ("train", "val", "test"))


# --- existing tars (img2dataset output_format=webdataset) -----------------------------


def write_webdataset_layout(root, counts, start=0):
    """img2dataset's webdataset layout, written with tarfile: 00000.tar + .parquet + stats."""
    root.mkdir(parents=True, exist_ok=True)
    images, labels = digit_arrays(sum(counts), start)
    i = 0
    for shard, n in enumerate(counts):
        with tarfile.open(root / f"{shard:05d}.tar", "w") as tar:
            for _ in range(n):
                key = f"{shard:05d}{i:04d}"
                for ext, data in (
                    ("jpg", jpeg_bytes(images[i])),
                    ("txt", f"a handwritten {labels[i]}".encode()),
                    ("json", json.dumps({"key": key}).encode()),
                ):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                i += 1
        (root / f"{shard:05d}.parquet").write_bytes(b"PAR1 not really")
        (root / f"{shard:05d}_stats.json").write_text(json.dumps({"count": n}))


def test_index_existing_tars(tmp_path):
    write_webdataset_layout(tmp_path, [7, 5, 3])
    before = {p.name: sha256_file(p) for p in tmp_path.iterdir()}
    assert make_shards(["index", str(tmp_path)]) == 0
    after = {p.name: sha256_file(p) for p in tmp_path.iterdir() if p.name != "manifest.json"}
    assert after == before  # nothing renamed, rewritten or added besides the manifest

    m = read_manifest(tmp_path)
    assert [s["url"] for s in m["shards"]] == ["00000.tar", "00001.tar", "00002.tar"]
    assert [s["samples"] for s in m["shards"]] == [7, 5, 3] and m["total_samples"] == 15
    assert all(s["sha256"] == before[s["url"]] for s in m["shards"])
    shards, got = read_back(tmp_path)
    assert shards.samples_per_shard == [7, 5, 3] and len(got) == 15
    assert set(got[0]) - {"__key__", "__url__"} == {"jpg", "txt", "json"}

    assert make_shards(["verify", str(tmp_path)]) == 0
    (tmp_path / "00001.tar").write_bytes((tmp_path / "00001.tar").read_bytes()[:-1024])
    problems = verify_shards(tmp_path)
    assert len(problems) == 1 and "00001.tar" in problems[0] and "bytes" in problems[0]


def test_index_skips_empty_tars_and_names_bad_ones(tmp_path, caplog):
    write_webdataset_layout(tmp_path, [2])
    with tarfile.open(tmp_path / "00001.tar", "w"):
        pass
    with caplog.at_level(logging.WARNING):
        m = index_shards(tmp_path)
    assert [s["url"] for s in m["shards"]] == ["00000.tar"]
    assert "00001.tar: no samples" in caplog.text

    (tmp_path / "00002.tar").write_bytes(b"garbage" * 100)
    with pytest.raises(ValueError, match="00002.tar: cannot read"):
        index_shards(tmp_path)
    (tmp_path / "00002.tar").unlink()

    with tarfile.open(tmp_path / "00003.tar", "w") as tar:  # key 'a' in two places
        for name in ("a.jpg", "b.jpg", "a.txt"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(ValueError, match="00003.tar.*key 'a' appears twice"):
        index_shards(tmp_path)
    with pytest.raises(FileNotFoundError, match="no files match"):
        index_shards(tmp_path / "00000.parquet")


# --- acceptance: the smoke model trains on each kind, unchanged ------------------------


def test_datasets_shards_train_the_smoke_model(tmp_path, cpu_env):
    splits = hf.DatasetDict(
        {"train": digits_dataset(300), "validation": digits_dataset(60, 300), "test": digits_dataset(60, 360)}
    )
    splits.save_to_disk(tmp_path / "saved")
    for split, maxcount in (("train", 100), ("validation", 1000), ("test", 1000)):
        out = run_cli(
            "from-datasets",
            tmp_path / "saved",
            "--split",
            split,
            "--out",
            tmp_path / split,
            "--maxcount",
            maxcount,
            "--min-shards",
            1,
            env=cpu_env,
        )
        assert out.returncode == 0, out.stderr
        # only the training split is read shard by shard, so only it can have too few
        assert ("3 shard(s), fewer than" in out.stderr) == (split == "train")
    assert out.stdout.strip() == f"{tmp_path / 'test'}: 60 samples in 1 shards"
    assert [s["samples"] for s in read_manifest(tmp_path / "train")["shards"]] == [100, 100, 100]

    final = train_density_model(
        tmp_path / "run", tmp_path / "train", tmp_path / "validation", tmp_path / "test", cpu_env
    )
    assert final["test/count"] == 60


@pytest.mark.drill  # make test trains on converted shards in the test above (CI time)
def test_img2dataset_layouts_train_the_smoke_model(tmp_path, cpu_env):
    write_webdataset_layout(tmp_path / "train", [100, 100, 100])  # output_format=webdataset
    write_files_layout(tmp_path / "val_files", 60, start=300)  # output_format=files
    write_webdataset_layout(tmp_path / "test", [60], start=360)
    for args in (
        ["index", tmp_path / "train"],
        ["index", tmp_path / "test"],
        ["from-folder", tmp_path / "val_files", "--out", tmp_path / "val"],
    ):
        out = run_cli(*args, env=cpu_env)
        assert out.returncode == 0, out.stderr

    final = train_density_model(tmp_path / "run", tmp_path / "train", tmp_path / "val", tmp_path / "test", cpu_env)
    assert final["val/count"] == 60 and final["test/count"] == 60
