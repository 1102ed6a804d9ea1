"""The layers and their rules, checked by parsing the code (no imports run).

- `ops/` never imports ray; `model/` imports neither ray nor pipelines nor ops.
- No stage or command module of `pipelines/` imports another one (pipelines/registry.py
  STAGE_MODULES): what stages share lives in lower modules (common, context, lake).
- Lines of `model/`, `ops/` and `pipelines/` are at most 110 characters.
"""
from __future__ import annotations

import ast
import pathlib
import re

import pytest

from pipelines.registry import STAGE_MODULES, STAGES

pytestmark = pytest.mark.fast

ROOT = pathlib.Path(__file__).resolve().parent.parent
MAX_LINE = 110


def imported_modules(path: pathlib.Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            if node.module == "pipelines":  # from pipelines import caption, embed
                out |= {f"pipelines.{a.name}" for a in node.names}
    return out


def test_registry_stages_have_their_function():
    for stage in STAGES.values():
        tree = ast.parse((ROOT / "pipelines" / f"{stage.module}.py").read_text())
        names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert stage.function in names, f"{stage.name}: pipelines/{stage.module}.py has no {stage.function}()"


@pytest.mark.parametrize("module", STAGE_MODULES)
def test_no_stage_module_imports_another(module):
    imports = imported_modules(ROOT / "pipelines" / f"{module}.py")
    others = {f"pipelines.{m}" for m in STAGE_MODULES if m != module}
    assert not imports & others, f"pipelines/{module}.py imports {sorted(imports & others)}"


def test_the_check_sees_a_stage_import(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("def f():\n    from pipelines import rank\n    from pipelines.ingest import run\n")
    assert {"pipelines.rank", "pipelines.ingest"} <= imported_modules(bad)


@pytest.mark.parametrize("folder, banned", [("ops", ("ray", "pipelines")), ("model", ("ray", "pipelines", "ops"))])
def test_lower_layers_do_not_import_upper_ones(folder, banned):
    for path in sorted((ROOT / folder).glob("*.py")):
        bad = {m for m in imported_modules(path) if m.split(".")[0] in banned}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_lines_fit():
    long = [f"{p.relative_to(ROOT)}:{n}" for folder in ("model", "ops", "pipelines")
            for p in sorted((ROOT / folder).glob("*.py"))
            for n, line in enumerate(p.read_text().splitlines(), 1) if len(line) > MAX_LINE]
    assert not long, f"{len(long)} lines over {MAX_LINE} characters: {long[:10]}"


# Code, conf and README say why, not what was measured when: history lives in git. A
# commit hash is 7 to 40 hex digits with a digit and a letter among them, not part of a
# longer word or path; an issue number is "issue 12", "issues 3 and 4" or "(#12)".
COMMIT_HASH = re.compile(r"(?<![0-9A-Za-z_./-])(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}(?![0-9A-Za-z_])")
ISSUE_NUMBER = re.compile(r"(?i)\bissues?\s*#?\d+|(?<=[\s(])#\d+\b")
HISTORY_FREE = ("model", "ops", "pipelines", "bench", "infra", "tests")


def history_in(text: str) -> list[str]:
    return [m.group(0) for rx in (COMMIT_HASH, ISSUE_NUMBER) for m in rx.finditer(text)]


def history_free_files() -> list[pathlib.Path]:
    files = [ROOT / "README.md", ROOT / "Makefile", ROOT / "pyproject.toml"]
    for folder in HISTORY_FREE:
        files += [p for p in sorted((ROOT / folder).rglob("*"))
                  if (p.suffix in (".py", ".yaml", ".yml", ".md", ".toml") or p.name == "Dockerfile")
                  and p != pathlib.Path(__file__)]  # this file plants examples
    return files


def test_no_commit_hash_or_issue_number_in_code_conf_or_readme():
    found = [f"{p.relative_to(ROOT)}:{n}: {hit}" for p in history_free_files()
             for n, line in enumerate(p.read_text().splitlines(), 1) for hit in history_in(line)]
    assert not found, f"history belongs in git, not here: {found[:10]}"


def test_the_history_check_sees_a_planted_hash_and_issue_number():
    assert history_in("the table at 4bfef90 (see issue 14)") == ["4bfef90", "issue 14"]
    assert history_in("fixed in (#42), README line 3") == ["#42"]
    # Not history: CSS colours, sha256 fields, words, paths, ray-project/ray#65129-like links.
    assert history_in("color:#222 sha256 deadbeef-like abcdef0 run_20261207T101500Z x/a1b2c3d4") == ["abcdef0"]
