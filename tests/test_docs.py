"""The docs say what is true: every repository path, every `rdistill.` symbol and every
setting (`train.lr`) named in ARCHITECTURE.md, README.md and docs/ exists, and every link between
pages (and to a heading) resolves. Code is read statically (files and their ASTs); only the
config's dataclasses are imported."""

from __future__ import annotations

import ast
import re
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "ARCHITECTURE.md", REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TOP = ("rdistill/", "tests/", "conf/", "jobs/", "benchmarks/", "notebooks/", "docs/", ".ci/")
CODE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def spans(page: Path) -> list[str]:
    """Inline code spans outside fenced blocks (a code block's shell lines name run outputs)."""
    return CODE.findall(FENCE.sub("", page.read_text()))


def repo_paths(page: Path) -> list[str]:
    """Backticked repository paths: they start at a top-level folder of the repository; a
    placeholder (`<stage>`) or a glob (`*.yaml`) must match at least one file."""
    out = []
    for s in spans(page):
        s = s.split()[0] if s.split() else s
        if s.startswith(TOP) and "{" not in s and "$" not in s:
            out.append(s.rstrip(".,:;"))
    return out


def exists(rel: str) -> bool:
    pattern = re.sub(r"<[^>]+>", "*", rel.rstrip("/"))
    return any(REPO.glob(pattern)) if "*" in pattern else (REPO / pattern).exists()


@lru_cache(maxsize=None)
def defined(path: Path) -> dict[str, set[str]]:
    """Top-level names of a module ({"": names}) and each class's attributes ({class: names})."""
    tree = ast.parse(path.read_text())
    out: dict[str, set[str]] = {"": set()}

    def names(body) -> set[str]:
        got = set()
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                got.add(node.name)
            elif isinstance(node, ast.Assign):
                got |= {t.id for t in node.targets if isinstance(t, ast.Name)}
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                got.add(node.target.id)
            elif isinstance(node, (ast.ImportFrom, ast.Import)):
                got |= {(a.asname or a.name).split(".")[0] for a in node.names}
        return got
    out[""] = names(tree.body)
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            out[node.name] = names(node.body)
    return out


def symbol_exists(dotted: str) -> bool:
    """`rdistill.a.b.name[.attr]`: the longest prefix that is a module or package, then a name
    it defines (or re-exports), then an attribute of that class."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        base = REPO.joinpath(*parts[:i])
        for f in (base.with_suffix(".py"), base / "__init__.py"):
            if f.exists():
                rest = parts[i:]
                if not rest:
                    return True
                mod = defined(f)
                if rest[0] not in mod[""]:
                    return (base / rest[0]).with_suffix(".py").exists() or (base / rest[0]).is_dir()
                return len(rest) == 1 or (rest[0] in mod and rest[1] in mod[rest[0]] and len(rest) == 2)
    return False


def symbols(page: Path) -> list[str]:
    """Backticked dotted names under the package (`rdistill.merge.search.rungs`, a call's
    arguments left out)."""
    return [m.group(1) for s in spans(page) if (m := re.match(r"(rdistill(?:\.\w+)+)", s))]


@lru_cache(maxsize=None)
def package_names() -> frozenset[str]:
    """Every name a module of the package defines at its top level or in a class."""
    return frozenset(n for f in (REPO / "rdistill").rglob("*.py") for names in defined(f).values() for n in names)


def bare_names(page: Path) -> list[str]:
    """Backticked code names without a module (`Stage`, `STAGE = Stage(...)`, `CONFIG_OF`):
    CamelCase or ALL_CAPS identifiers at the start of a span. Checked in ARCHITECTURE.md, whose
    spans name code; the docs' ALL_CAPS spans are mostly environment variables."""
    import builtins
    names = [m.group(1) for s in spans(page) if (m := re.match(r"([A-Z][A-Za-z0-9_]*)\b(?!/)", s))]
    return [n for n in names if not hasattr(builtins, n) and not n.startswith(("RDISTILL_", "RAY_", "HF_"))]


# config sections (not `ray`: `ray.data.llm`, `ray.train.report` are the library's names)
SECTIONS = ("toy", "teacher", "student", "generate", "verify", "train", "merge", "eval", "serve", "tracking",
            "domains")


def config_keys(page: Path) -> list[str]:
    """Backticked settings (`train.lr`, `merge.search.candidates=32`, `domains.<d>.train`)."""
    out = []
    for s in spans(page):
        m = re.match(r"\+?((?:%s)\.[\w<>.]+?)(?:\.\*)?(?:=|$)" % "|".join(SECTIONS), s.split()[0] if s.split() else s)
        if m:
            out.append(m.group(1))
    return out


def config_key_exists(key: str) -> bool:
    """A dotted key names a field of the config (a dict's key or a list's index in between)."""
    import typing

    from rdistill.config import ExperimentConfig
    tp = ExperimentConfig
    for part in key.split("."):
        while typing.get_origin(tp) is typing.Union:  # Optional[X] -> X
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if typing.get_origin(tp) in (dict, list):
            tp = typing.get_args(tp)[-1]  # this part is a key or an index
            continue
        hints = typing.get_type_hints(tp) if isinstance(tp, type) and hasattr(tp, "__dataclass_fields__") else {}
        if part not in hints:
            return False
        tp = hints[part]
    return True


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in FENCE.sub("", page.read_text()).splitlines() if line.startswith("#")}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_path_and_symbol_named_exists(page):
    missing = [p for p in repo_paths(page) if not exists(p)]
    missing += [s for s in symbols(page) if not symbol_exists(s)]
    missing += [k for k in config_keys(page) if not config_key_exists(k)]
    if page.name == "ARCHITECTURE.md":
        missing += [n for n in bare_names(page) if n not in package_names()]
    assert missing == [], f"{page.name} names what does not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_link_between_pages_resolves(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: outside the repository
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(target)
    assert broken == [], f"{page.name}: broken links {broken}"


def test_the_docs_are_linked_from_the_readme_and_the_checks_can_fail(tmp_path):
    readme = (REPO / "README.md").read_text()
    for page in sorted((REPO / "docs").glob("*.md")):
        assert f"docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"
    assert not exists("rdistill/no_such_module.py") and exists("rdistill/<stage>/stage.py")
    assert symbol_exists("rdistill.merge.search.rungs") and not symbol_exists("rdistill.merge.search.no_such")
    assert symbol_exists("rdistill.stage_api.Stage.input_stages") and not symbol_exists("rdistill.pipeline.CONFIG_OF")
    assert slug("The `rdistill` command") == "the-rdistill-command"
    assert config_key_exists("domains.<d>.train.path") and config_key_exists("merge.search.candidates")
    assert not config_key_exists("train.learning_rate") and not config_key_exists("train.lr.x")
    stale = tmp_path / "ARCHITECTURE.md"  # what ARCHITECTURE.md said before stages declared themselves
    stale.write_text("declared in `rdistill/pipeline.py` (`CONFIG_OF`, `INPUTS_OF`), a `Stage`")
    assert [n for n in bare_names(stale) if n not in package_names()] == ["CONFIG_OF", "INPUTS_OF"]
