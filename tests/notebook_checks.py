"""What nbval runs is also checked for what a reader sees, not only that it executes (a pytest plugin the
repository's conftest.py loads, kept out of the notebooks folder students open):

- a cell that draws (`show_images`, `plot_*`, `pipeline_diagram`, pyplot) produces an image;
- no output holds "Error displaying widget" (a widget view left behind without its model);
- every Markdown table a cell prints has as many cells in each row as in its header (an unescaped `|`
  inside a value splits a cell and shifts the columns after it).

Widget cells (sliders, the editing panel) draw into their widget, which a headless run does not render.
"""

from __future__ import annotations

import re

import pytest

DRAWS = re.compile(r"show_images\(|plot_\w+\(|pipeline_diagram\(|plt\.|\.savefig\(")
WIDGETS = re.compile(r"_slider\(|_panel\(")


def _cells(line: str) -> int:
    return len(re.findall(r"(?<!\\)\|", line.strip())) - 1


def broken_table_rows(markdown: str) -> list[str]:
    """Rows of Markdown tables whose cell count differs from their header's."""
    broken, header = [], None
    for line in markdown.splitlines():
        if not line.lstrip().startswith("|"):
            header = None
            continue
        if header is None:
            header = _cells(line)
        elif _cells(line) != header:
            broken.append(line)
    return broken


def check_rendered(source: str, outputs) -> list[str]:
    problems = []
    images = sum("image/png" in out.get("data", {}) for out in outputs)
    if DRAWS.search(source) and not WIDGETS.search(source) and not images:
        problems.append("the cell draws but produced no image")
    for out in outputs:
        texts = [out.get("text", "")] + [str(v) for v in out.get("data", {}).values()]
        if any("Error displaying widget" in t for t in texts):
            problems.append("an output holds 'Error displaying widget'")
        markdown = out.get("data", {}).get("text/markdown")
        if markdown:
            problems += [f"broken Markdown table row: {row}" for row in broken_table_rows(markdown)]
    return problems


def pytest_collection_modifyitems(items):
    for item in items:
        if type(item).__name__ != "IPyNbCell":
            continue

        def runtest(item=item, original=item.runtest):
            original()
            problems = check_rendered(item.cell.source, item.test_outputs or [])
            if problems:
                pytest.fail(f"{item.name}: " + "; ".join(problems), pytrace=False)

        item.runtest = runtest
