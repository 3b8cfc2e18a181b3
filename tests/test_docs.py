"""
The README and docs/ against the code: links and anchors resolve, the code map lists every module, code
examples run, and the reference tables (parameters, summary keys, retried or failed at once, the changed-only
promises' tests) name what the code has.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PACKAGE = ROOT / "airflow_provider_looker_segment"
PAGES = [README, *sorted(DOCS.glob("*.md"))]


def text_outside_code(path: Path) -> str:
    return re.sub(r"```.*?```", "", path.read_text(), flags=re.S)


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower-cased, punctuation dropped, spaces as hyphens, repeats -1, -2."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} (.*)$", text_outside_code(path), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return found


def section(path: Path, heading: str) -> str:
    """The text under ``heading`` up to the next heading of the same or a higher level."""
    level = heading.split(" ", 1)[0]
    text = path.read_text()
    start = text.index(f"\n{heading}\n")
    rest = text[start + len(heading) + 2 :]
    following = re.search(rf"^#{{1,{len(level)}}} ", rest, flags=re.M)
    return rest[: following.start()] if following else rest


def table_rows(text: str) -> list[list[str]]:
    """The body rows of the Markdown tables in ``text`` (headers left out), split into cells."""
    lines = text.splitlines()
    rows = []
    for number, line in enumerate(lines):
        separator = re.fullmatch(r"\|[-:| ]+\|", line.strip())
        header = number + 1 < len(lines) and re.fullmatch(r"\|[-:| ]+\|", lines[number + 1].strip())
        if line.startswith("| ") and not separator and not header:
            rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
    return rows


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_relative_links_and_anchors_resolve(page: Path):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text_outside_code(page)):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists() or (anchor and anchor not in anchors(linked)):
            broken.append(target)
    assert broken == []


def test_the_readme_stays_short():
    assert len(README.read_text().splitlines()) <= 400


def test_the_code_map_lists_every_module_and_data_file():
    code_map = section(README, "## Code map")
    shipped = [
        path.relative_to(PACKAGE).as_posix()
        for path in sorted(PACKAGE.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    ]
    assert shipped
    assert [name for name in shipped if not re.search(rf"^  {re.escape(name)} ", code_map, flags=re.M)] == []
    listed = re.findall(r"^  (\S+) ", code_map, flags=re.M)
    assert [name for name in listed if not (PACKAGE / name).is_file()] == []


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_python_examples_run(page: Path):
    for number, example in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)):
        exec(compile(example, f"{page.name}, example {number + 1}", "exec"), {"__name__": "docs_example"})


def test_the_parameter_reference_is_the_operators_signature():
    from airflow_provider_looker_segment.operators.looker_to_segment import LookerToSegmentOperator

    rows = table_rows(section(DOCS / "parameters.md", "## Operator parameters"))
    documented = {row[0].strip("`"): row for row in rows}
    parameters = {
        name: parameter
        for name, parameter in inspect.signature(LookerToSegmentOperator.__init__).parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    }
    assert sorted(documented) == sorted(parameters)
    for name, (_name, default, templated, _meaning) in documented.items():
        assert (templated == "yes") is (name in LookerToSegmentOperator.template_fields), name
        try:
            value = ast.literal_eval(default.strip("`"))
        except (SyntaxError, ValueError):
            continue  # a default read from the configuration, e.g. deferrable
        assert value == parameters[name].default, name


def test_the_summary_reference_has_every_key():
    from airflow_provider_looker_segment.summary import CohortSummary, SyncSummary

    fields = [*dataclasses.fields(SyncSummary), *dataclasses.fields(CohortSummary)]
    keys = {field.name for field in fields} - {"cohort"}
    documented = {
        key for row in table_rows((DOCS / "summary.md").read_text()) for key in re.findall(r"`(\w+)`", row[0])
    }
    assert sorted(keys - documented) == []
    assert sorted(documented - keys) == []


def test_the_retried_or_failed_at_once_table_is_what_is_retryable_says():
    from airflow_provider_looker_segment import exceptions
    from airflow_provider_looker_segment.exceptions import is_retryable

    rows = table_rows(section(DOCS / "troubleshooting.md", "## Retried or failed at once"))
    retried = {name for row in rows for name in re.findall(r"`(\w+Error)`", row[0])}
    failed_at_once = {name for row in rows for name in re.findall(r"`(\w+Error)`", row[1])}
    assert retried & failed_at_once == set()
    verdicts = {**dict.fromkeys(retried, True), **dict.fromkeys(failed_at_once, False)}
    assert len(verdicts) >= 20
    for name, verdict in verdicts.items():
        cls = getattr(exceptions, name)
        assert is_retryable(cls.__new__(cls)) is verdict, name


def test_every_changed_only_promise_names_tests_that_exist():
    rows = table_rows(section(DOCS / "changed-only.md", "## What changed-only syncs guarantee"))
    named = {name for row in rows for name in re.findall(r"`(test_\w+)`", row[-1])}
    defined = {
        node.name
        for path in (ROOT / "tests").glob("test_*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    }
    assert len(rows) == 10
    assert sorted(named - defined) == []


def test_the_documented_rejection_reasons_are_the_codes():
    from airflow_provider_looker_segment.batching import Rejection

    assert Rejection.OVERSIZE.value in (DOCS / "troubleshooting.md").read_text()
