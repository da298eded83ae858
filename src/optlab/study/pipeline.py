"""Where the pipeline's artifacts are, read from ``dvc.yaml``: the one file that names paths.

Each stage gets its paths as options on its command line (``--live metrics/train``); the tools
that read results afterwards (``optlab compare``, ``optlab gate``) find them the same way.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from optlab.core.errors import OptlabError

DVC_YAML = "dvc.yaml"


@dataclass(frozen=True)
class Pipeline:
    stages: dict[str, dict[str, Any]]
    source: Path

    @classmethod
    def load(cls, repo: str | Path = ".") -> Pipeline:
        path = Path(repo) / DVC_YAML
        if not path.is_file():
            raise OptlabError(f"{path} not found: run optlab from the root of a DVC project (or pass --repo)")
        stages = (yaml.safe_load(path.read_text()) or {}).get("stages") or {}
        return cls(stages, path)

    def option(self, stage: str, flag: str) -> str:
        """The value of ``flag`` on ``stage``'s command line in dvc.yaml."""
        if stage not in self.stages:
            raise OptlabError(f"{self.source} has no stage {stage!r} (stages: {', '.join(self.stages) or 'none'})")
        words = shlex.split(str(self.stages[stage].get("cmd", "")))
        for i, word in enumerate(words[:-1]):
            if word == flag:
                return words[i + 1]
            if word.startswith(flag + "="):
                return word.split("=", 1)[1]
        raise OptlabError(f"the {stage} stage's cmd in {self.source} has no {flag} option")

    # What `optlab compare` and `optlab gate` read (the stage scripts define these options).
    @property
    def test_metrics(self) -> str:
        return self.option("evaluate", "--metrics")

    @property
    def live_dir(self) -> str:
        return self.option("train", "--live")

    @property
    def prepared_data(self) -> str:
        return self.option("train", "--data")
