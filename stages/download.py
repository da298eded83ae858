"""DVC stage `download`: fetch the dataset params.yaml names, check its pinned checksums, and save
it as uint8 .npy arrays plus meta.json (the sources: optlab/data/datasets.py). No Keras."""

from pathlib import Path

from optlab.core import stage
from optlab.core.outputs import atomic_dir
from optlab.core.params import load_params
from optlab.data import datasets, files


def main(argv=None) -> None:
    p = stage.parser(__doc__)
    p.add_argument("--out", type=Path, required=True, help="raw data directory (output)")
    args = p.parse_args(argv)

    params = load_params(args.params)
    data = datasets.load(params.dataset)
    with atomic_dir(args.out) as tmp:
        files.save_raw(data.raw, tmp)
    raw = data.raw
    print(f"download: {raw.meta.dataset} from {data.source}: {len(raw.y_train)} train + {len(raw.y_test)} test images")


if __name__ == "__main__":
    raise SystemExit(stage.run(main))
