"""The manual tracks the code: every CLI flag and trainer key is in docs/cli.md, links resolve.

The flags come from the real argparse parsers of the console scripts named in pyproject.toml
(captured when each entry point starts parsing, so nothing runs), the trainer keys from
``dataclasses.fields(TrainerConfig)`` (the trainer's config, `p2pfl.learn.trainer.TrainerConfig`).
"""

from __future__ import annotations

import argparse
import importlib
import re
import tomllib
import unicodedata
from dataclasses import fields
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLI_DOC = ROOT / "docs" / "cli.md"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 220


class _Captured(BaseException):
    """Raised from inside ``parse_known_args`` to hand the parser out without running anything."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__()
        self.parser = parser


def _scripts() -> dict[str, str]:
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return doc["project"]["scripts"]


def _parser_of(target: str, monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    """The parser an entry point ``module:function`` builds, caught as it starts parsing."""

    def capture(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        raise _Captured(self)

    module, _, func = target.partition(":")
    entry = getattr(importlib.import_module(module), func)
    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_known_args", capture)
        try:
            entry(["--help"])
        except _Captured as c:
            return c.parser
    raise AssertionError(f"{target} returned without parsing arguments")


def _options(parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    """(where, token) for every option string, sub-command and fixed choice (e.g. a generator
    kind) of a parser, sub-commands included; -h/--help left out."""
    out: list[tuple[str, str]] = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.append((f"{parser.prog} (sub-command)", name))
                out.extend(_options(sub))
            continue
        out.extend((parser.prog, opt) for opt in action.option_strings)
        if action.choices is not None:
            out.extend((f"{parser.prog} {action.dest} (choice)", str(c)) for c in action.choices)
    return out


def _section(text: str, heading: str) -> str:
    """The text under ``## heading`` up to the next level-2 heading."""
    parts = re.split(r"^## ", text, flags=re.M)
    for part in parts[1:]:
        title, _, body = part.partition("\n")
        if title.strip() == heading:
            return body
    raise AssertionError(f"docs/cli.md has no section '## {heading}'")


def _mentioned(token: str, text: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(token)}(?![\w-])", text) is not None


def test_console_scripts_are_the_documented_three():
    assert set(_scripts()) == {"p2pfl-peer", "p2pfl-topology", "p2pfl-report"}


@pytest.mark.parametrize("script", ["p2pfl-peer", "p2pfl-topology", "p2pfl-report"])
def test_every_flag_is_in_the_cli_reference(script: str, monkeypatch: pytest.MonkeyPatch):
    parser = _parser_of(_scripts()[script], monkeypatch)
    options = _options(parser)
    assert options, f"{script}: no options found"
    text = _section(CLI_DOC.read_text(), script)  # each script's flags in its own section
    missing = [f"{where} {opt}" for where, opt in options if not _mentioned(opt, text)]
    assert not missing, f"docs/cli.md, section {script}, does not mention: {missing}"


def test_the_peer_parser_has_the_flags_we_know(monkeypatch: pytest.MonkeyPatch):
    """Guards the capture above: it must find the real parser, not an empty one."""
    opts = {o for _, o in _options(_parser_of(_scripts()["p2pfl-peer"], monkeypatch))}
    assert {"--topology", "--id", "--compress", "--set", "--clusters"} <= opts


def _trainer_config() -> type:
    """`TrainerConfig`, the class the trainer is built from (defined in p2pfl.config, light; older
    trees define it in p2pfl.learn.trainer)."""
    from p2pfl import config

    if hasattr(config, "TrainerConfig"):
        return config.TrainerConfig
    from p2pfl.learn.trainer import TrainerConfig

    return TrainerConfig


def test_every_trainer_key_is_in_the_cli_reference():
    TrainerConfig = _trainer_config()
    text = _section(CLI_DOC.read_text(), "Trainer keys")
    keys = [f.name for f in fields(TrainerConfig)]
    missing = [k for k in keys if f"`{k}`" not in text]
    assert not missing, f"docs/cli.md, section Trainer keys, has no row for {missing}"


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    out: set[str] = set()
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (m := re.match(r"#{1,6}\s+(.*)", line)):
            out.add(_slug(m.group(1)))
    return out


def _links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path):
    bad = []
    for target in _links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target} (no heading #{anchor} in {dest.name})")
    assert not bad, f"{page.relative_to(ROOT)}: dead links {bad}"


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; the manual goes in docs/"
