"""DVC stage `prepare`: scale and split the raw arrays into the training inputs, laid out for the
model (flat pixel vectors for the mlp, images for the cnn), and count images per split and class.
No Keras."""

from pathlib import Path

from optlab.core import stage
from optlab.core.errors import OptlabError
from optlab.core.outputs import atomic_dir, remove_outputs, write_json
from optlab.core.params import load_params
from optlab.data import files, prepare


def main(argv=None) -> None:
    p = stage.parser(__doc__)
    p.add_argument("--raw", type=Path, required=True, help="raw data directory (input)")
    p.add_argument("--out", type=Path, required=True, help="prepared data directory (output)")
    p.add_argument("--summary", type=Path, required=True, help="images per split and class, JSON (output)")
    args = p.parse_args(argv)

    params = load_params(args.params)
    remove_outputs(args.out, args.summary)  # a failure below must not leave last run's outputs
    raw = files.load_raw(args.raw)
    if raw.meta.dataset != params.dataset:
        raise OptlabError(
            f"{args.raw} holds {raw.meta.dataset} but {args.params} asks for {params.dataset}; "
            "run `dvc repro` (it re-runs download for the new dataset) instead of this stage alone"
        )
    prepared = prepare.prepare(raw, params.prepare, flatten=params.flat_input)
    counts = prepare.count_images(prepared)
    with atomic_dir(args.out) as tmp:
        files.save_prepared(prepared, tmp)
        write_json(args.summary, counts)  # inside: if it fails, the arrays are not published either
    sizes = "/".join(str(counts[s]["n"]) for s in files.SPLITS)
    print(f"prepare: {raw.meta.dataset} train/val/test {sizes}, {params.prepare.scale}")


if __name__ == "__main__":
    raise SystemExit(stage.run(main))
