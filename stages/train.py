"""DVC stage `train`: fit the Keras model params.yaml describes (train.replicas of them, seeds
seed, seed + 1, ...) on the prepared data; log every epoch with dvclive; save the models."""

from pathlib import Path

from optlab.core import stage
from optlab.core.outputs import all_or_none
from optlab.core.params import load_params
from optlab.training.backend import configure, engine_for


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
    from optlab.training import run

    # A failure (a full disk: one error line) leaves none of the outputs, and the resume backup.
    with all_or_none(args.model, args.replicas, args.live, kept={"the resume backup": args.backup}):
        summary = run.run(params, args.data, args.model, args.live, args.backup, args.tensorboard_logs, args.replicas)
    print(", ".join(f"{k}={v}" for k, v in summary.items()))


if __name__ == "__main__":
    raise SystemExit(stage.run(main))
