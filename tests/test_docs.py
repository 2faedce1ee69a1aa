"""The user docs name only things that exist: repository paths, local links and their anchors, subcommand flags,
config fields and benchmark-script options (README.md, benchmarks/README.md, docs/*.md).

Cheap: the docs are parsed with regular expressions, the CLI signatures and config dataclasses are inspected (nothing
runs), the benchmark scripts' options are read from their ``add_argument`` calls.
"""

from __future__ import annotations

import dataclasses
import glob
import inspect
import re
import typing
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", ROOT / "benchmarks" / "README.md", *(ROOT / "docs").glob("*.md")])
# The user docs describe the code as it is; the experiment log keeps paths and flags as they were at the time.
USER_DOCS = [d for d in DOCS if d.name != "LOG.md"]

# Docs that other work in progress adds; README links to them already. Remove a name once its file has landed
# (test_pending_docs_are_still_pending fails as a reminder).
PENDING_DOCS: set[str] = set()
# Subcommands and flags of the same work in progress, named in README's "Your own data" section.
PENDING_SUBCOMMANDS: set[str] = set()
# --recipe is read from the command line before jsonargparse (cli._apply_recipe): no parameter of the function
PENDING_FLAGS = {("train", "--recipe"), ("tune", "--recipe")}

# Top-level names whose paths the docs may mention; anything else in backticks (runs/..., data/...) is an example.
REPO_PREFIXES = ("vqakit/", "configs/", "benchmarks/", "docs/", "tests/", "notebooks/", ".ci/")


def _text(doc: Path) -> str:
    return doc.read_text(encoding="utf-8")


def _rel(doc: Path) -> str:
    return str(doc.relative_to(ROOT))


def _code_spans(text: str) -> list[str]:
    """Inline code spans and fenced blocks (continuation lines ending in a backslash joined)."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
    spans = re.findall(r"`([^`\n]+)`", prose)
    for block in blocks:
        if not block.startswith(("vqakit/\n", "checkpoint/\n")):  # package trees: test_package_tree_matches_the_code
            spans += block.replace("\\\n", " ").splitlines()
    return spans


def _expand(token: str) -> list[str]:
    """``a{0,1}b`` -> ``a0b``, ``a1b``."""
    m = re.search(r"\{([^{}]*,[^{}]*)\}", token)
    if not m:
        return [token]
    return [x for part in m.group(1).split(",") for x in _expand(token[:m.start()] + part + token[m.end():])]


def _exists(path: str, doc: Path) -> bool:
    for base in (ROOT, doc.parent):
        for p in _expand(path):
            if glob.glob(str(base / p)) if "*" in p else (base / p).exists():
                return True
    return False


def _is_placeholder(token: str) -> bool:
    return any(s in token for s in ("<", "NAME", "FILE", "..4", "seedN", "stageN")) or token.endswith("..")


def test_docs_exist():
    names = {_rel(d) for d in DOCS}
    assert {"README.md", "benchmarks/README.md", "docs/cli.md", "docs/data.md", "docs/models.md",
            "docs/training.md", "docs/serving.md", "docs/architecture.md", "docs/LOG.md"} <= names
    assert len(_text(ROOT / "README.md").encode()) <= 12_500, "README.md is for users: keep it at about 12 KB"


@pytest.mark.parametrize("doc", USER_DOCS, ids=_rel)
def test_repository_paths_exist(doc):
    missing = []
    for span in _code_spans(_text(doc)):
        for token in re.findall(r"[\w.][\w./{},*+-]*", span):
            token = token.rstrip(".,:")
            if token.startswith(REPO_PREFIXES) and not _is_placeholder(token) and not _exists(token, doc):
                missing.append(token)
    # files run or read by a command: python benchmarks/x.py, --config configs/x.yaml
    for span in _code_spans(_text(doc)):
        for token in re.findall(r"(?:python |--config |--suite )(\S+\.(?:py|yaml))", span):
            if token.startswith(REPO_PREFIXES) and not _is_placeholder(token) and not _exists(token, doc):
                missing.append(token)
    assert not missing, f"{_rel(doc)} names paths that do not exist: {sorted(set(missing))}"


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    heading = re.sub(r"`|\*", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", heading).replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    text = re.sub(r"^```[^\n]*\n.*?^```", "", _text(doc), flags=re.S | re.M)
    return {_slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_local_links_and_anchors_resolve(doc):
    text = re.sub(r"^```[^\n]*\n.*?^```", "", _text(doc), flags=re.S | re.M)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        rel = str(dest.relative_to(ROOT)) if dest.is_relative_to(ROOT) else str(dest)
        if not dest.exists():
            if rel not in PENDING_DOCS:
                broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(target)
    assert not broken, f"{_rel(doc)} has broken links: {broken}"


def test_pending_docs_are_still_pending():
    landed = sorted(p for p in PENDING_DOCS if (ROOT / p).exists())
    assert not landed, f"{landed} exist now: remove them from PENDING_DOCS so their links are checked"


def _fields(cls) -> dict[str, typing.Any]:
    """Field name -> nested dataclass type (or None) of a config dataclass."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        t = hints.get(f.name)
        args = [a for a in typing.get_args(t) if dataclasses.is_dataclass(a)]
        out[f.name] = t if dataclasses.is_dataclass(t) else (args[0] if args else None)
    return out


def _subcommands() -> dict[str, dict]:
    """Subcommand -> {parameter name: dataclass type or None}."""
    from vqakit import cli

    subs = {}
    for name, fn in vars(cli).items():
        if inspect.isfunction(fn) and not name.startswith("_") and fn.__module__ == cli.__name__ and name != "main":
            hints = typing.get_type_hints(fn)
            params = {}
            for p in inspect.signature(fn).parameters:
                t = hints.get(p)
                args = [a for a in typing.get_args(t) if dataclasses.is_dataclass(a)]
                params[p] = t if dataclasses.is_dataclass(t) else (args[0] if args else None)
            subs[name] = params
    return subs


def _flag_ok(flag: str, params: dict) -> bool:
    parts = flag[2:].rstrip("+").split(".")
    if parts[-1] == "":  # ``--data.*``: the group itself
        parts = parts[:-1]
    if parts[0] in ("config", "print_config", "help"):
        return len(parts) == 1
    if parts[0] not in params:
        return False
    cls = params[parts[0]]
    for part in parts[1:]:
        if cls is None:
            return False
        fields = _fields(cls)
        if part not in fields:
            return False
        cls = fields[part]
    return True


def _script_options(script: Path) -> set[str]:
    return set(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", script.read_text(encoding="utf-8")))


@pytest.mark.parametrize("doc", USER_DOCS, ids=_rel)
def test_commands_use_real_flags(doc):
    subs = _subcommands()
    bad = []
    for span in _code_spans(_text(doc)):
        for command in re.split(r"&&|;|\|\|", span):
            m = re.search(r"vqakit(?:\.cli)? ([a-z_]+)\b(.*)", command)
            if m and m.group(1) in subs:
                sub = m.group(1)
                for flag in re.findall(r"(?<![\w-])--[a-z][\w.]*\+?", m.group(2)):
                    if not _flag_ok(flag, subs[sub]) and (sub, flag) not in PENDING_FLAGS:
                        bad.append(f"vqakit {sub} {flag}")
            elif m and m.group(1) not in PENDING_SUBCOMMANDS and re.match(r"\s*(vqakit|python -m)", command):
                bad.append(f"vqakit {m.group(1)} (no such subcommand)")
            s = re.search(r"python (benchmarks/\w+\.py)(.*)", command)
            if s and (ROOT / s.group(1)).exists():
                known = _script_options(ROOT / s.group(1))
                bad += [f"{s.group(1)} {f}" for f in re.findall(r"(?<![\w-])--[a-z][\w-]*", s.group(2))
                        if f not in known]
    assert not bad, f"{_rel(doc)} uses flags that do not exist: {sorted(set(bad))}"


def _tree_files(doc: Path, heading: str) -> dict[str, list[str]]:
    """The ``vqakit/`` tree under ``heading`` of ``doc``: package folder -> the ``.py`` files named for it."""
    text = _text(doc)
    block = re.search(rf"^#+ {re.escape(heading)}\n.*?^```\n(vqakit/\n.*?)^```", text, flags=re.S | re.M)
    assert block, f"{_rel(doc)} has no vqakit/ tree under '{heading}'"
    tree, package = {}, ""
    for line in block.group(1).splitlines()[1:]:
        m = re.match(r"  (\w+)/", line)
        if m:
            package = m.group(1)
        elif re.match(r"\S", line):  # back at the top level (benchmarks/, docs/, ...)
            break
        elif re.match(r"  \w+\.py", line):
            package = ""
        tree.setdefault(package, []).extend(re.findall(r"\b(\w+\.py)\b", line))
    return tree


@pytest.mark.parametrize("doc,heading", [("README.md", "What is inside"), ("docs/architecture.md", "Package layout")])
def test_package_tree_matches_the_code(doc, heading):
    tree = _tree_files(ROOT / doc, heading)
    packages = sorted(p.parent.name for p in (ROOT / "vqakit").glob("*/__init__.py"))
    assert sorted(p for p in tree if p) == packages, f"{doc}: the tree's packages differ from vqakit/'s"
    missing = [f"{p}/{f}" for p, files in tree.items() for f in files if not (ROOT / "vqakit" / p / f).exists()]
    assert not missing, f"{doc}'s tree names files that do not exist: {missing}"
