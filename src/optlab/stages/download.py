"""DVC stage `download`: fetch the dataset named by params.dataset, check its pinned checksums,
and save it as uint8 .npy arrays plus meta.json (see optlab.datasets for the sources)."""

from __future__ import annotations

from pathlib import Path

from optlab import artifacts, datasets, stage
from optlab.outputs import atomic_dir
from optlab.params import load_params


def main(argv=None) -> None:
    p = stage.parser(__doc__)
    p.add_argument("--out", type=Path, required=True, help="raw data directory (output)")
    args = p.parse_args(argv)

    params = load_params(args.params)
    data = datasets.load(params.dataset)
    with atomic_dir(args.out) as tmp:
        artifacts.save_raw(data.raw, tmp)
    raw = data.raw
    print(f"download: {raw.meta.dataset} from {data.source}: {len(raw.y_train)} train + {len(raw.y_test)} test images")


if __name__ == "__main__":
    raise SystemExit(stage.run(main))
