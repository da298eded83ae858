"""The CI workflow passes zizmor's static analysis of GitHub Actions (no finding of medium
severity or above), and every action it uses is pinned to a commit with the release in a comment."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import REPO

WORKFLOW = REPO / ".github" / "workflows" / "ci.yml"
FAILING = {"Medium", "High"}  # zizmor's severities: Informational, Low, Medium, High
# `uses: actions/checkout@<40 hex> # v4.4.0`: a commit cannot move as a tag can; the comment says
# which release it is, for the reader and for Dependabot or Renovate, which update both together.
PINNED = re.compile(r"^\s*(?:-\s+)?uses:\s*(?P<action>[\w.-]+/[\w./-]+)@(?P<sha>[0-9a-f]{40})\s+#\s*v\d+(\.\d+)*\s*$")


def _zizmor(*args: str) -> subprocess.CompletedProcess:
    zizmor = shutil.which("zizmor", path=str(Path(sys.executable).parent))
    assert zizmor, "zizmor is not installed in the test environment (pyproject.toml's test extra); run `make test`"
    # --offline: no GitHub API (online audits need a token and the network); --no-exit-codes: the
    # exit status says only whether zizmor ran, the findings are read from its JSON.
    return subprocess.run([zizmor, "--offline", "--no-exit-codes", "--format", "json", *args, str(WORKFLOW)],
                          cwd=REPO, capture_output=True, text=True)  # fmt: skip


def test_zizmor_finds_nothing_of_medium_severity_or_above():
    done = _zizmor()
    assert done.returncode == 0, done.stderr
    findings = json.loads(done.stdout)
    serious = [
        f"{f['ident']} ({f['determinations']['severity']}): {f['desc']} at line "
        f"{f['locations'][0]['concrete']['location']['start_point']['row'] + 1}"
        for f in findings
        if f["determinations"]["severity"] in FAILING and not f.get("ignored")
    ]
    assert not serious, "zizmor --offline .github/workflows/ci.yml:\n" + "\n".join(serious)


def test_every_action_is_pinned_to_a_commit_with_its_version_in_a_comment():
    lines = [line for line in WORKFLOW.read_text().splitlines() if re.match(r"^\s*(-\s+)?uses:", line)]
    steps = [s for job in yaml.safe_load(WORKFLOW.read_text())["jobs"].values() for s in job.get("steps", [])]
    assert len(lines) == sum("uses" in s for s in steps) > 0  # every `uses:` key is on a line of its own
    unpinned = [line.strip() for line in lines if not PINNED.match(line)]
    assert not unpinned, f"pin to a full commit SHA with `# vX.Y.Z` after it: {unpinned}"
    checkout = next(s for s in steps if s.get("uses", "").startswith("actions/checkout@"))
    assert checkout["with"]["persist-credentials"] is False  # no token in .git/config for the code under test
