"""DVC stage `train`: fit the model that params.yaml describes on the prepared data."""

from __future__ import annotations

from pathlib import Path

from optlab import stage
from optlab.backend import configure, engine_for
from optlab.params import load_params


def main(argv=None) -> None:
    p = stage.parser(__doc__)
    p.add_argument("--data", type=Path, required=True, help="prepared data directory (input)")
    p.add_argument("--model", type=Path, required=True, help="the trained .keras model: replica 0's (output)")
    p.add_argument("--replicas", type=Path, required=True, help="every replica's model, <r>.keras (output)")
    p.add_argument("--live", type=Path, required=True, help="dvclive directory: history, summary, run.json (output)")
    p.add_argument("--backup", type=Path, required=True, help="per-epoch resume state (not a DVC output)")
    p.add_argument("--tensorboard-logs", type=Path, required=True, help="TensorBoard logs, if train.tensorboard")
    args = p.parse_args(argv)

    params = load_params(args.params)  # validates everything before any work
    configure(engine_for(params).backend)  # before anything imports Keras
    from optlab import train

    summary = train.run(params, args.data, args.model, args.live, args.backup, args.tensorboard_logs, args.replicas)
    print(", ".join(f"{k}={v}" for k, v in summary.items()))


if __name__ == "__main__":
    raise SystemExit(stage.run(main))
