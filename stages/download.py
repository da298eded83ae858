"""DVC stage `download`: fetch the dataset named by params.dataset, check its pinned checksums,
and save it as uint8 .npy arrays plus meta.json (see optlab.datasets for the sources)."""

from __future__ import annotations

from collections.abc import Sequence

from optlab.datasets import load, write_raw
from optlab.outputs import atomic_dir
from optlab.params import load_params
from optlab.stage import parser, run


def main(argv: Sequence[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--out", required=True, help="output directory (x_train.npy ... meta.json)")
    args = p.parse_args(argv)
    params = load_params(args.params)
    data = load(params.dataset)
    with atomic_dir(args.out) as tmp:
        write_raw(data, tmp)
    n_train, n_test = len(data.x_train), len(data.x_test)
    print(f"download: {data.name} from {data.source}: {n_train} train + {n_test} test images -> {args.out}")


if __name__ == "__main__":
    raise SystemExit(run(main))
