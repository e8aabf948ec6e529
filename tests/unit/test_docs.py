"""The documentation says what the software does: flags, settings, models, links, examples.

Each test reads README.md (or the Docker/Make files) and compares it with the code it
describes, so a flag, setting or model added without a word in the README fails here.
"""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

import pytest

from pipeline.config import LimitsConfig, RoiConfig, TemporalConfig
from server.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _prose(text: str) -> str:
    """The text without its fenced code blocks."""
    return re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)


def _section(title: str) -> str:
    """The README section under the heading ``title``, up to the next heading of its level or
    above (code blocks left out: a shell comment is no heading)."""
    lines = _prose(README).splitlines()
    start = next((i for i, line in enumerate(lines) if re.fullmatch(rf"#+ {re.escape(title)}", line)), None)
    assert start is not None, f"README has no section {title!r}"
    level = len(lines[start]) - len(lines[start].lstrip("#"))
    end = next(
        (i for i in range(start + 1, len(lines)) if re.match(rf"#{{1,{level}}} ", lines[i])), len(lines)
    )
    return "\n".join(lines[start + 1 : end])


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _flags(command: str) -> set[str]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices[command]
    return {s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"}


def test_every_link_inside_the_readme_reaches_a_heading() -> None:
    anchors: set[str] = set()
    for heading in re.findall(r"^#{1,6} (.+)$", _prose(README), re.MULTILINE):
        slug = _slug(heading)
        n = sum(1 for a in anchors if a == slug or re.fullmatch(rf"{re.escape(slug)}-\d+", a))
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    links = re.findall(r"\]\(#([^)]+)\)", README)
    assert links, "the table of contents is gone"
    assert not [link for link in links if link not in anchors]


def test_the_table_of_contents_lists_every_top_level_section() -> None:
    toc = re.search(r"<!-- toc -->\n(.*?)\n\n", README, re.DOTALL)
    assert toc
    listed = re.findall(r"\]\(#([^)]+)\)", toc.group(1))
    sections = [_slug(h) for h in re.findall(r"^## (.+)$", _prose(README), re.MULTILINE)]
    assert listed == sections


def test_files_the_readme_links_to_exist() -> None:
    for target in re.findall(r"\]\(((?!#|https?:)[^)]+)\)", README):
        assert (ROOT / target).exists(), target


def test_python_examples_are_complete_programs() -> None:
    """Every Python block parses as a script (an `async with` outside a function does not)."""
    blocks = re.findall(r"^```python\n(.*?)^```", README, re.MULTILINE | re.DOTALL)
    assert len(blocks) >= 2
    for block in blocks:
        compile(block, "README.md", "exec")


def test_every_serve_flag_is_documented() -> None:
    text = _section("Using it")
    missing = sorted(f for f in _flags("serve") if f"`{f}" not in text)
    assert not missing, f"segstream serve flags not in README's 'Using it': {missing}"


@pytest.mark.parametrize("command", ["segment", "eval"])
def test_every_offline_flag_is_documented(command: str) -> None:
    text = _section("Offline: `segstream segment` and `segstream eval`")
    missing = sorted(f for f in _flags(command) if not re.search(rf"{re.escape(f)}(?![\w-])", text))
    assert not missing, f"segstream {command} flags not in README: {missing}"


def test_every_watch_flag_is_documented() -> None:
    missing = sorted(f for f in _flags("watch") if not re.search(rf"`{re.escape(f)}(?![\w-])", README))
    assert not missing, f"segstream watch flags not in README: {missing}"


def _table_rows(text: str) -> dict[str, str]:
    """First column (a `name`) -> second column, for every row of the markdown tables in text."""
    return dict(re.findall(r"^\| `([a-z_]+)` \| ([^|]+) \|", text, re.MULTILINE))


def test_the_roi_settings_table_has_every_setting_with_its_default() -> None:
    rows = _table_rows(_section("Settings (`RoiConfig`, per stream)"))
    assert set(rows) == set(RoiConfig.model_fields)
    for name, field in RoiConfig.model_fields.items():
        documented = rows[name].strip()
        assert documented == str(field.default).lower(), f"{name}: README {documented}, code {field.default}"


def test_the_limits_table_has_every_limit() -> None:
    rows = _table_rows(_section("Limits"))
    assert set(rows) == set(LimitsConfig.model_fields)


def test_every_temporal_threshold_is_named() -> None:
    text = _section("Temporal refinement")
    missing = sorted(f for f in TemporalConfig.model_fields if f != "mode" and f"`{f}`" not in text)
    assert not missing


def test_the_models_table_lists_every_registered_model() -> None:
    from models.registry import list_models

    text = _section("Models")
    missing = sorted(spec.name for spec in list_models() if f"`{spec.name}`" not in text)
    assert not missing


def test_the_torch_version_is_the_same_everywhere() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    pinned = next(d for d in pyproject["project"]["dependencies"] if d.startswith("torch"))
    version = pinned.split("==")[1]
    assert f"ARG TORCH_VERSION={version}" in (ROOT / "docker" / "Dockerfile").read_text(encoding="utf-8")
    assert f"TORCH_VERSION ?= {version}" in (ROOT / "Makefile").read_text(encoding="utf-8")


def test_make_targets_in_the_readme_exist() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([a-z][\w-]*):", makefile, re.MULTILINE))
    named = set(re.findall(r"(?:`|^)make ([a-z][\w-]*)", README, re.MULTILINE))
    assert named and not named - targets, sorted(named - targets)


def test_the_dockerfile_copies_what_exists_and_checks_health_on_its_port() -> None:
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text(encoding="utf-8")
    ignore = (ROOT / "docker" / "Dockerfile.dockerignore").read_text(encoding="utf-8")
    for line in re.findall(r"^COPY (.+)$", dockerfile, re.MULTILINE):
        for src in line.split()[:-1]:
            assert (ROOT / src).exists(), src
            assert f"!{src}" in ignore, f"{src} is copied but left out of the build context"
    port = re.search(r"^EXPOSE (\d+)$", dockerfile, re.MULTILINE)
    assert port
    assert f"127.0.0.1:{port.group(1)}/healthz" in dockerfile
    assert f'"--port", "{port.group(1)}"' in dockerfile


def test_the_compose_file_builds_from_the_dockerfile_and_mounts_what_exists() -> None:
    compose = (ROOT / "docker-compose.yml").read_text(encoding="utf-8")
    for dockerfile in re.findall(r"dockerfile: (\S+)", compose):
        assert (ROOT / dockerfile).is_file(), dockerfile
    for host, inside in re.findall(r"- \./([\w/.-]+):(/[\w/.-]+)", compose):
        assert (ROOT / host).exists(), host
        for used in re.findall(rf"{re.escape(inside)}/([\w.-]+)", compose):
            if used != "clip.mp4":  # the example of one's own clip
                assert (ROOT / host / used).exists(), used
