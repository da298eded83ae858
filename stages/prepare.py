"""DVC stage `prepare`: scale, flatten and split the raw arrays into the training inputs, and
count images per split and class (see optlab.prepare)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from optlab.errors import OptlabError
from optlab.outputs import atomic_dir, remove_outputs, write_json
from optlab.params import load_params
from optlab.prepare import load_raw, prepare, summarize
from optlab.stage import parser, run


def main(argv: Sequence[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--raw", type=Path, required=True, help="the download stage's output directory")
    p.add_argument("--out", type=Path, required=True, help="directory for the prepared arrays and meta.json")
    p.add_argument("--summary", type=Path, required=True, help="JSON metrics file: images per split and class")
    args = p.parse_args(argv)

    params = load_params(args.params)
    # A failure below must not leave last run's outputs looking like this run's.
    remove_outputs(args.out, args.summary)
    raw = load_raw(args.raw)
    if raw.meta["dataset"] != params.dataset:
        raise OptlabError(
            f"{args.raw} holds {raw.meta['dataset']} but {args.params} asks for {params.dataset}; "
            "run `dvc repro` (it re-runs download for the new dataset) instead of this stage alone"
        )
    prepared = prepare(raw, params.prepare)

    with atomic_dir(args.out) as tmp:
        for name, array in prepared.arrays.items():
            np.save(tmp / f"{name}.npy", array)
        write_json(tmp / "meta.json", prepared.meta)
        # Inside the block: if the summary cannot be written, the arrays are not published either.
        write_json(args.summary, summarize(prepared))
    sizes = "/".join(str(len(prepared.arrays[f"y_{s}"])) for s in ("train", "val", "test"))
    print(f"prepare: {raw.meta['dataset']} train/val/test {sizes}, {params.prepare.scale} -> {args.out}")


if __name__ == "__main__":
    raise SystemExit(run(main))
