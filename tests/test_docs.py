"""The README and docs/ stay true to the repository: the README is a short front door,
every relative link lands on a file (and heading), every `configs/...yaml` named exists and
every recipe is named somewhere, and every dotted config key named in backticks (or as an
`a.b=c` override in a bash block) is a key of the config tree or of a registered workload.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 260
SECTIONS = ("run", "trainer", "optim", "data", "model")

# keys the pages name on purpose although the schema does not have them: the old names that
# trainer.config.RENAMED_KEYS refuses with the right one (docs/config.md, "Renamed keys")
NOT_KEYS_BUT_NAMED = {
    "model.compile",
    "model.gradient_checkpointing",
    "trainer.activation_checkpointing",
    "trainer.gradient_checkpointing",
    # typos that docs/config.md shows as the mistakes a launch refuses
    "trainer.max_stpes",
    "model.hiden",
    "trainer.lr",
}
# a span ending like a file name is a file (`model.safetensors`, `data.json`), not a key
FILE_SUFFIXES = (".json", ".safetensors", ".py", ".yaml", ".pt", ".txt", ".tar", ".out", ".md")

KEY_SPAN = re.compile(
    r"^(?P<key>(?:%s)(?:\.[A-Za-z_][A-Za-z0-9_]*)+|(?:%s)\.\*|(?:%s)(?:\.[A-Za-z_]"
    r"[A-Za-z0-9_]*)+\.\*)(?:=.*|:\s.*)?$" % (("|".join(SECTIONS),) * 3),
    re.S,
)
OVERRIDE = re.compile(r"^(?P<key>(?:{})(?:\.[A-Za-z_][A-Za-z0-9_]*)+)=".format("|".join(SECTIONS)))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
RECIPE = re.compile(r"configs/[A-Za-z0-9_./{},-]+?\.yaml")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def pages() -> list[Path]:
    return [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))


# ---- config keys ---------------------------------------------------------------------------


@cache
def model_keys() -> frozenset[str]:
    from models.registry import names, workload_config_class

    return frozenset(f.name for n in names() for f in dataclasses.fields(workload_config_class(n)))


def schema_has(key: str) -> bool:
    """`key` (dotted; a trailing `.*` means "a section") is in the config tree."""
    from trainer.config import RunConfig

    if key in NOT_KEYS_BUT_NAMED:
        return True
    parts = key.split(".")
    wildcard = parts[-1] == "*"
    parts = parts[:-1] if wildcard else parts
    if parts[0] == "model":
        return len(parts) == 1 or parts[1] in model_keys()
    cls = RunConfig
    for part in parts:
        if not (dataclasses.is_dataclass(cls) and part in {f.name for f in dataclasses.fields(cls)}):
            return False
        cls = typing.get_type_hints(cls)[part]
    return not wildcard or dataclasses.is_dataclass(cls)


def named_keys(text: str) -> list[str]:
    """Dotted config keys the text names: whole backtick spans, and `a.b=c` words in bash blocks."""
    keys = []
    for span in re.findall(r"`([^`\n]+)`", FENCE.sub("", text)):
        m = KEY_SPAN.match(span.strip())
        if m and not m["key"].endswith(FILE_SUFFIXES):
            keys.append(m["key"])
    for lang, body in FENCE.findall(text):
        if lang in ("bash", "sh", "shell"):
            keys += [m["key"] for word in body.split() if (m := OVERRIDE.match(word.strip("'\"")))]
    return keys


def bad_keys(text: str) -> list[str]:
    return sorted({k for k in named_keys(text) if not schema_has(k)})


# ---- links ---------------------------------------------------------------------------------


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} (.+)$", FENCE.sub("", text), re.M):
        s = slug(heading)
        out.add(s if s not in seen else f"{s}-{seen[s]}")
        seen[s] = seen.get(s, 0) + 1
    return out


def bad_links(path: Path, text: str) -> list[str]:
    bad = []
    for target in LINK.findall(FENCE.sub("", text)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text() if file else text):
            bad.append(f"{target}: no heading #{anchor}")
    return bad


# ---- recipes -------------------------------------------------------------------------------


def expand_braces(pattern: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    return [x for alt in m[1].split(",") for x in expand_braces(pattern[: m.start()] + alt + pattern[m.end() :])]


def named_recipes(text: str) -> set[str]:
    return {p for found in RECIPE.findall(text) for p in expand_braces(found)}


def missing_recipes(text: str) -> list[str]:
    return sorted(p for p in named_recipes(text) if not (ROOT / p).is_file())


# ---- the checks ----------------------------------------------------------------------------


def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; reference material belongs in docs/"


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_page_links_recipes_and_keys_exist(page):
    text = page.read_text()
    problems = (
        [f"link {x}" for x in bad_links(page, text)]
        + [f"recipe {x} does not exist" for x in missing_recipes(text)]
        + [f"config key `{x}` is in no schema" for x in bad_keys(text)]
    )
    assert not problems, f"{page.relative_to(ROOT)}:\n" + "\n".join(problems)


def test_every_recipe_is_named_in_the_docs():
    named = set().union(*(named_recipes(p.read_text()) for p in pages()))
    recipes = {str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml")}
    assert not recipes - named, f"recipes no page names: {sorted(recipes - named)}"


def test_readme_links_the_topic_pages():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in LINK.findall((ROOT / "README.md").read_text())}
    missing = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "docs").rglob("*.md")) if p not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"


# ---- the checker checks what it should -----------------------------------------------------


@pytest.mark.parametrize(
    "text, bad",
    [
        ("set `trainer.max_stepz` to 5", ["trainer.max_stepz"]),
        ("`data.on_eror: skip`", ["data.on_eror"]),
        ("`trainer.deepspeed.zero_stag=3`", ["trainer.deepspeed.zero_stag"]),
        ("`trainer.max_steps.*`", ["trainer.max_steps.*"]),  # a leaf is no section
        ("`optim.learning_rate`", ["optim.learning_rate"]),
        ("`model.hidde`", ["model.hidde"]),
        ("```bash\npython -m launch.train --config x.yaml trainer.maxsteps=3\n```\n", ["trainer.maxsteps"]),
        # what is a key and exists, or is not a key at all
        ("`trainer.max_steps` and `data.train.urls=/x` and `trainer.deepspeed.*`", []),
        ("`trainer.deepspeed.save_full_weights: true`, `model.*`, `model.hidden`", []),
        ("`model.compile` is now `trainer.compile`", []),  # renamed, named on purpose
        ("`model.safetensors`, `model.safetensors.index.json`, `data.mix.<i>.urls`", []),
    ],
)
def test_the_key_checker(text, bad):
    assert bad_keys(text) == bad


@pytest.mark.parametrize(
    "text, bad",
    [
        ("[x](nope.md)", ["nope.md: no such file"]),
        ("[x](docs/data.md#no-such-heading)", ["docs/data.md#no-such-heading: no heading #no-such-heading"]),
        ("[x](docs/data.md) [y](https://example.org/z.md) [z](#the-two-commands)\n## The two commands\n", []),
        ("[x](docs/data.md#when-data-is-bad-dataon_error)", []),
    ],
)
def test_the_link_checker(text, bad):
    assert bad_links(ROOT / "README.md", text) == bad


@pytest.mark.parametrize(
    "text, missing",
    [
        ("`configs/lm/causal_2k.yaml`", ["configs/lm/causal_2k.yaml"]),
        ("configs/autoregressive/made_{fsdp,zero9}.yaml", ["configs/autoregressive/made_zero9.yaml"]),
        ("configs/score/{vp,ve}_mixture2d.yaml", []),
    ],
)
def test_the_recipe_checker(text, missing):
    assert missing_recipes(text) == missing


def test_the_config_error_shown_is_the_one_a_launch_prints():
    """docs/config.md shows the error of a typo; it is what load_config says today."""
    from launch.recipes import load_recipe
    from trainer.config import ConfigError

    shown = [
        line
        for line in (ROOT / "docs" / "config.md").read_text().splitlines()
        if line.startswith("error: config key 'trainer.max_stpes'")
    ]
    assert len(shown) == 1, "docs/config.md no longer shows the trainer.max_stpes error"
    with pytest.raises(ConfigError) as err:
        load_recipe(str(ROOT / "configs/autoregressive/made.yaml"), ["run.dir=/tmp/x", "trainer.max_stpes=5"])
    assert shown[0] == f"error: {err.value}"


def doctor_blocks() -> list[list[str]]:
    """The doctor outputs docs/faults.md shows: each plain code block that opens with `ok    config`."""
    text = (ROOT / "docs" / "faults.md").read_text()
    blocks = re.findall(r"^```\n(ok    config .*?)^```$", text, re.M | re.S)
    return [block.splitlines() for block in blocks]


@pytest.mark.parametrize(
    "which,args",
    [
        (0, ["--config", "configs/autoregressive/made.yaml", "--nodes", "2", "--gpus-per-node", "4"]),
        (
            1,
            [
                "--config",
                "configs/autoregressive/made_zero2.yaml",
                "--nodes",
                "2",
                "--gpus-per-node",
                "4",
                "data.num_workers=2",
                "data.global_batch_size=200",
                "run.dir=/proc/x",
            ],
        ),
    ],
)
def test_the_doctor_output_shown_is_what_it_prints(which, args, digits_dir, tmp_path, cpu_env):
    """docs/faults.md's two doctor reports are what the doctor prints now for the same command,
    run from a checkout-like folder with the digits built and no runs yet; only the free disk,
    which is the machine's, may differ."""
    import subprocess
    import sys

    shown = doctor_blocks()
    assert len(shown) == 2, "docs/faults.md no longer shows the doctor's two reports"
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "digits").symlink_to(digits_dir)
    (tmp_path / "runs").mkdir()
    env = dict(cpu_env, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-m", "launch.doctor", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == (0 if which == 0 else 1), out.stdout + out.stderr

    def machine_free(lines):
        return [re.sub(r"[\d.]+ [KMGT]?B free", "N free", line) for line in lines]

    assert machine_free(out.stdout.splitlines()) == machine_free(shown[which])
