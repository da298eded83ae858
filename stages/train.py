"""DVC stage `train`: fit the model that params.yaml describes on the prepared data."""

from __future__ import annotations

from optlab.backend import configure
from optlab.params import load_params
from optlab.stage import parser, run


def main(argv=None) -> None:
    p = parser(__doc__)
    p.add_argument("--data", required=True, help="prepared data directory")
    p.add_argument("--model", required=True, help="where to write the trained .keras model")
    p.add_argument("--live", required=True, help="dvclive directory: per-epoch history and summary metrics")
    args = p.parse_args(argv)

    params = load_params(args.params)  # validates everything before any work
    configure(params.train.backend)  # must precede the first Keras import
    from optlab import train

    summary = train.run(params, args.data, args.model, args.live)
    print(", ".join(f"{k}={v}" for k, v in summary.items()))


if __name__ == "__main__":
    raise SystemExit(run(main))
