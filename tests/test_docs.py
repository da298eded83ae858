"""The README and the guides in docs/ tell the truth: every shell block a user is meant to run is
run here, in a private copy of the baseline project (tests/project.py: this repository on digits,
shrunken), and must exit 0; a block that cannot run on a test machine is marked on the line before
it with ``<!-- not run: why -->``. The README stays a front page (at most 200 lines, linking every
guide), every guide links back, and every test the docs name exists."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
NOT_RUN = re.compile(r"<!--\s*not run:\s*(.+?)\s*-->")
PLACEHOLDER = re.compile(r"<[a-z][a-z0-9_-]*>")  # <exp-name>, <head>: a value the reader fills in
BLOCK_TIMEOUT_S = 900


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, from 1
    text: str
    not_run: str  # why it is not run; empty when it is

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def shell_blocks(path: Path, text: str | None = None) -> list[Block]:
    """The ```bash (or ```sh) blocks of a Markdown file, with the reason each is not run, if marked."""
    lines = (text if text is not None else path.read_text()).splitlines()
    found, i = [], 0
    while i < len(lines):
        if lines[i].strip() in ("```bash", "```sh", "```shell"):
            start = i
            i += 1
            body = []
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
            mark = NOT_RUN.search(before)
            found.append(Block(path, start + 1, "\n".join(body), mark.group(1) if mark else ""))
        i += 1
    return found


def run_block(block: Block, project) -> subprocess.CompletedProcess:
    """Run a block with bash in the project, as a reader would paste it (stopping at the first
    command that fails)."""
    return subprocess.run(["bash", "-euo", "pipefail", "-c", block.text], cwd=project.root, env=project.env,
                          capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)  # fmt: skip


@pytest.fixture
def docs_project(baseline_project, tmp_path):
    """A fresh copy of the baseline project, with the `origin/main` a CI checkout has."""
    from project import copy_project

    p = copy_project(baseline_project, tmp_path / "optlab")
    p.git("update-ref", "refs/remotes/origin/main", "HEAD")
    return p


@pytest.mark.slow
@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_shell_block_of_the_docs_runs(doc, docs_project):
    blocks = [b for b in shell_blocks(doc) if not b.not_run]
    for block in blocks:
        assert not PLACEHOLDER.search(block.text), (
            f"{block.where}: a block to run holds a placeholder ({PLACEHOLDER.search(block.text).group()}); write a "
            "real value, or mark the block <!-- not run: why --> on the line before it"
        )
        done = run_block(block, docs_project)
        assert done.returncode == 0, f"{block.where} failed ({done.returncode}):\n{block.text}\n{done.stdout[-3000:]}" \
            f"\n{done.stderr[-3000:]}"  # fmt: skip
    print(
        f"\n[record] {doc.name}: ran {len(blocks)} shell blocks, {len(shell_blocks(doc)) - len(blocks)} marked not run"
    )


@pytest.mark.slow
def test_a_renamed_param_in_a_doc_block_fails(docs_project):
    # What the test above would report if a guide still said `optimizer.learning_rate` after a rename.
    doc = "Try a rate:\n\n```bash\ndvc exp run -S optimizer.learnin_rate=0.05\n```\n"
    (block,) = shell_blocks(REPO / "docs" / "variants.md", doc)
    done = run_block(block, docs_project)
    assert done.returncode != 0 and "optimizer.learnin_rate" in done.stdout + done.stderr


def test_the_block_collector_sees_marks_and_placeholders():
    doc = "a\n\n<!-- not run: a cloud remote -->\n```bash\ndvc push\n```\n\n```bash\necho <exp-name>\n```\n"
    first, second = shell_blocks(REPO / "README.md", doc)
    assert (first.not_run, first.text, first.line) == ("a cloud remote", "dvc push", 4)
    assert not second.not_run and PLACEHOLDER.search(second.text)


def test_the_readme_is_a_front_page_that_links_every_guide():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200, len(readme.splitlines())
    for guide in sorted((REPO / "docs").glob("*.md")):
        assert f"(docs/{guide.name}" in readme, f"the README does not link docs/{guide.name}"
        assert "(../README.md)" in guide.read_text(), f"docs/{guide.name} does not link back to the README"
    assert "make test" in readme and "make test" in (REPO / ".ci" / "run").read_text()  # CI runs what it says


def test_every_test_the_docs_name_exists():
    named = set()
    for doc in DOCS:
        named |= set(re.findall(r"tests/(test_\w+\.py)::(test_\w+)", doc.read_text()))
    assert named, "the docs name the tests that prove their promises"
    defined = {f: (REPO / "tests" / f).read_text() if (REPO / "tests" / f).is_file() else "" for f, _ in named}
    missing = [f"{f}::{t}" for f, t in sorted(named) if f"def {t}(" not in defined[f]]
    assert not missing, f"the docs name tests that do not exist: {missing}"
