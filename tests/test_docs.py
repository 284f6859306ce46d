"""The examples of the documentation pages run (each page's python blocks, in order, in one
namespace), so the docs cannot drift from the code."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

import torchgmm

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = ["many-series.md", "choosing-k.md", "layer.md"]


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


@pytest.mark.parametrize("page", PAGES)
def test_the_pages_examples_run(page, capsys):
    blocks = python_blocks(DOCS / page)
    assert blocks, f"{page} has no python example"
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torchgmm.FitWarning)  # the pages show fits, not warnings
        for block in blocks:
            exec(compile(block, str(DOCS / page), "exec"), namespace)


def test_choosing_k_page_reports_what_it_measures(capsys):
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torchgmm.FitWarning)
        for block in python_blocks(DOCS / "choosing-k.md"):
            exec(block, namespace)
    out = capsys.readouterr().out
    assert float(out.split("chosen K matches:")[1]) >= 0.95
