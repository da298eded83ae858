"""The ``optlab`` command: ``optlab compare`` (the seed-aware experiment report), ``optlab gate``
(the CI regression gate), ``optlab sweep`` (a grid of experiments on DVC's queue or a Ray cluster),
``optlab study`` (a tuned comparison of optimizers or schedules: each tuned on the same budget),
``optlab lr-find`` (the learning-rate range test of the experiment in
params.yaml), ``optlab landscape`` (the loss along lines and on planes through a trained model's
weights) and ``optlab params`` (params.yaml from conf/, as ``dvc exp run`` composes it).
User errors print ``error: ...`` and exit 2; a gate that finds a regression exits 1."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from optlab.core.errors import OptlabError
from optlab.study import blobio, compare, gate

EXIT_GATE_FAILED = 1
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # what a shell reports for a command ended by Ctrl-C (128 + SIGINT)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="optlab", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_compare_args, _gate_args, _sweep_args, _study_args, _lr_find_args, _landscape_args, _params_args):
        add(sub)
    return p


def _compare_args(sub) -> None:
    c = sub.add_parser("compare", help="report which variants beat the baseline by more than seed noise")
    c.add_argument("--repo", default=".", help="the DVC repository (default: .)")
    c.add_argument(
        "--out",
        default="reports/compare.md",
        help="the Markdown report, relative to --repo; figures go beside it (default: reports/compare.md)",
    )
    c.add_argument("--baseline", help="experiment name, commit or branch of the baseline (default: HEAD)")
    c.add_argument("--all-commits", action="store_true", help="read the experiments of every commit, not only HEAD's")
    c.add_argument(
        "--metric",
        default=compare.METRIC,
        help="the test metric variants are ranked and tested by (default: %(default)s; e.g. loss, f1_macro)",
    )
    c.add_argument(
        "--threshold",
        type=float,
        default=compare.THRESHOLD_FRACTION,
        help="time-to-reach threshold: this fraction of the best variant's best mean validation accuracy "
        "(default: %(default)s)",
    )


def _gate_args(sub) -> None:
    g = sub.add_parser("gate", help="fail when a test metric (accuracy by default) got worse than the baseline's")
    g.add_argument("--baseline", required=True, help="the git revision to compare the workspace with, e.g. origin/main")
    g.add_argument(
        "--max-drop",
        type=float,
        default=gate.MAX_DROP,
        help="largest allowed worsening of the metric, absolute (default: %(default)s: one point of accuracy)",
    )
    g.add_argument(
        "--max-relative-drop",
        type=float,
        help="largest allowed worsening as a fraction of the baseline's value, e.g. 0.02; the smaller limit applies",
    )
    g.add_argument("--metric", default=gate.METRIC_KEY, help="the test metric to judge (default: %(default)s)")
    g.add_argument("--repo", default=".", help="the DVC repository (default: .)")


def _sweep_args(sub) -> None:
    w = sub.add_parser("sweep", help="run a grid of experiments on DVC's queue here, or on a Ray cluster")
    w.add_argument(
        "-S", "--set-param", dest="sets", action="append", default=[], metavar="[<file>:]<key>=<values>",
        help="as for dvc exp run --queue -S: 'optimizer=adam,sgd', 'seed=range(0,3)' (repeatable)",
    )  # fmt: skip
    _executor_args(w)
    w.add_argument("--compare", action="store_true", help="then run optlab compare --all-commits on the results")
    w.add_argument("--repo", default=".", help="the DVC repository (default: .)")


def _executor_args(w) -> None:
    """Where and how many experiments run: optlab sweep's and optlab study run's options."""
    w.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: DVC's queue on this machine (default); ray: one Ray task per experiment")  # fmt: skip
    w.add_argument("--address", help="the Ray cluster (default: $RAY_ADDRESS, else a local Ray instance)")
    w.add_argument("-j", "--jobs", type=int, default=2,
                   help="local: experiments at a time, one DVC queue worker each (default: %(default)s)")  # fmt: skip
    w.add_argument("--cpus-per-run", type=int, default=1, help="CPUs (and OPTLAB_THREADS) per experiment (default: 1)")
    w.add_argument("--gpus-per-run", type=float, default=0, help="ray: GPUs per experiment (default: 0)")
    w.add_argument(
        "--git-remote", default="origin", help="ray: the git remote tasks clone and push to (default: origin)"
    )
    w.add_argument("--retries", type=int, default=2,
                   help="tries again of a point that failed or whose worker died (default: %(default)s)")  # fmt: skip
    w.add_argument("--logs", help="ray: a directory (on a filesystem the nodes share) for each task's log")


def _executor_options(args) -> dict:
    return {"address": args.address, "jobs": args.jobs, "cpus_per_run": args.cpus_per_run,
            "gpus_per_run": args.gpus_per_run, "git_remote": args.git_remote, "retries": args.retries,
            "log_dir": args.logs}  # fmt: skip


def _study_args(sub) -> None:
    s = sub.add_parser("study", help="a tuned comparison of optimizers or schedules (a file of conf/study/)")
    verbs = s.add_subparsers(dest="verb", required=True)
    run = verbs.add_parser("run", help="run the study: the trials, then each contender's best on the final seeds")
    run.add_argument("name", help="the study: conf/study/<name>.yaml")
    _executor_args(run)
    run.add_argument("--no-groups", action="store_true",
                     help="one experiment per trial, even where trials differ only in their learning rate")  # fmt: skip
    run.add_argument("--report", action="store_true", help="then write its report (optlab study report)")
    run.add_argument("--repo", default=".", help="the DVC repository (default: .)")
    report = verbs.add_parser("report", help="write reports/study/<name>.md and its figures")
    report.add_argument("name", help="the study: conf/study/<name>.yaml")
    report.add_argument("--out", default="reports/study", help="the report's directory, relative to --repo")
    report.add_argument("--repo", default=".", help="the DVC repository (default: .)")


def _lr_find_args(sub) -> None:
    f = sub.add_parser("lr-find", help="the learning-rate range test of the experiment in params.yaml")
    f.add_argument(
        "overrides", nargs="*", help="a variant, as for dvc exp run -S (composed from conf/): optimizer=sgd seed=1"
    )
    f.add_argument("--repo", default=".", help="the DVC repository (default: .); reads its prepared data")
    f.add_argument("--params", default="params.yaml", help="the params file, relative to --repo (default: %(default)s)")
    f.add_argument(
        "--out",
        default="reports/lr_find",
        help="writes <out>.json and <out>.png, relative to --repo (default: %(default)s)",
    )
    f.add_argument("--start", type=float, default=1e-7, help="first learning rate (default: %(default)s)")
    f.add_argument("--end", type=float, default=10.0, help="last learning rate (default: %(default)s)")
    f.add_argument("--steps", type=int, default=200, help="batches at most, one rate each (default: %(default)s)")


def _landscape_args(sub) -> None:
    f = sub.add_parser("landscape", help="the loss along the line from the initial to the final weights, between "
                       "two experiments, and on a plane through the final weights")  # fmt: skip
    f.add_argument("--exp", help="the experiment (or git revision) whose model to look at (default: the workspace's)")
    f.add_argument("--against", help="a second experiment: the line between its final weights and --exp's")
    f.add_argument("--repo", default=".", help="the DVC repository (default: .); reads its prepared data")
    f.add_argument("--out", default="reports/landscape", help="its PNGs and landscape.json, relative to --repo "
                   "(default: %(default)s)")  # fmt: skip
    # The defaults are optlab.study.landscape's (POINTS, SPAN, TRAIN_IMAGES): a module that imports Keras.
    f.add_argument("--points", type=int, help="points per side of a plane (default: 25)")
    f.add_argument("--span", type=float, help="the random plane's half-width, in filter-normalized steps (default: 1)")
    f.add_argument("--train-images", type=int, help="training images each point is evaluated on (default: 10000)")
    f.add_argument("--seed", type=int, default=0, help="of the plane's random directions (default: %(default)s)")


def _params_args(sub) -> None:
    c = sub.add_parser(
        "params",
        help="write params.yaml from conf/ with DVC's Hydra composition, as `dvc exp run` does before it runs "
        "(for `dvc repro` after editing conf/)",
    )
    c.add_argument("overrides", nargs="*", help="Hydra overrides, as for dvc exp run -S: optimizer=sgd seed=3")
    c.add_argument("--repo", default=".", help="the DVC repository (default: .)")
    c.add_argument(
        "--all",
        action="store_true",
        help="also list every knob params.yaml leaves at its default, and how to set one (-S +key=value)",
    )


def _defaults_listing(params_file) -> str:
    """The knobs ``params_file`` leaves to the schema's defaults, one per line, as -S would set them."""
    from optlab.core.params import defaulted_knobs, read_raw
    from optlab.study.experiments import flatten

    knobs = defaulted_knobs(flatten(read_raw(params_file)))
    width = max(map(len, knobs), default=0)
    lines = [f"  {key:<{width}}  {json.dumps(value)}" for key, value in knobs.items()]
    return "\n".join(
        [
            f"{len(knobs)} more knobs take their default (not in params.yaml, so not dvc exp show columns);",
            "set one for a run with: dvc exp run -S +<key>=<value>   (e.g. -S +train.keep_best=true)",
            *lines,
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    blobio.install()  # every command here reads git revisions through DVC
    try:
        if args.command == "sweep":
            return _sweep(args)
        if args.command == "lr-find":
            return _lr_find(args)
        if args.command == "landscape":
            return _landscape(args)
        if args.command == "study":
            return _study(args)
        if args.command == "params":
            from optlab.core.params import compose, load_params

            written = compose(args.repo, overrides=tuple(args.overrides))
            load_params(written)  # what the stages will check first
            print(f"wrote {written} from conf/" + (f" with {' '.join(args.overrides)}" if args.overrides else ""))
            if args.all:
                print(_defaults_listing(written))
            return 0
        if args.command == "compare":
            result = compare.compare(args.repo, args.out, args.baseline, args.all_commits, args.threshold, args.metric)
            print(f"wrote {args.out}: {len(result.ranked)} comparable variants, {len(result.excluded)} excluded")
            return 0
        result, summary = gate.gate(args.baseline, args.max_drop, args.repo, args.metric, args.max_relative_drop)
        print(summary)
        if not result.passed:
            print(f"gate failed: {result.reason}", file=sys.stderr)
            return EXIT_GATE_FAILED
        return 0
    except OptlabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:  # Ctrl-C: what is kept, and how to go on, not a traceback
        kept = (
            " Experiments that finished are kept (DVC's queue workers finish the ones they run, then stop). Run the "
            "same command again: it runs only what is missing."
            if args.command in ("sweep", "study")
            else ""
        )
        print(f"\noptlab {args.command}: interrupted.{kept}", file=sys.stderr)
        return EXIT_INTERRUPTED


def _sweep(args) -> int:
    from optlab.study import sweep

    account = sweep.sweep(args.repo, args.sets, args.executor, **_executor_options(args))
    print(account.table())
    print(account.summary())
    if args.compare:
        result = compare.compare(args.repo, all_commits=True)
        print(f"wrote reports/compare.md: {len(result.ranked)} comparable variants")
    return EXIT_GATE_FAILED if account.failed else 0


def _study(args) -> int:
    import time
    from pathlib import Path

    from optlab.study import tuning, tuning_report, tuning_run

    repo = Path(args.repo).resolve()
    study = tuning.load(repo, args.name)
    failed, wall = [], None
    if args.verb == "run":
        started = time.perf_counter()
        accounts = tuning_run.run(study, repo, args.executor, groups=not args.no_groups, **_executor_options(args))
        wall = time.perf_counter() - started
        for phase, account in zip(("trials", "final seeds"), accounts, strict=True):
            if account is not None:
                print(f"{phase}: {account.summary()}")
                failed += account.failed
        print(f"study {study.name}: {wall:.0f} s")
        if failed:
            print("\n".join(a.table() for a in accounts if a is not None and a.failed))
        if not args.report:
            return EXIT_GATE_FAILED if failed else 0
    out = repo / (getattr(args, "out", None) or "reports/study")
    report = tuning_report.write(study, tuning_run.gather(study, repo), out, wall)
    print(f"wrote {report}")
    return EXIT_GATE_FAILED if failed else 0


def _lr_find(args) -> int:
    from pathlib import Path

    from optlab.core.params import load_params, load_variant
    from optlab.study.pipeline import Pipeline
    from optlab.training.backend import configure

    repo = Path(args.repo)
    params = load_variant(repo, args.overrides) if args.overrides else load_params(repo / args.params)
    data = repo / Pipeline.load(repo).prepared_data
    if not data.is_dir():
        raise OptlabError(f"{data} not found: run `dvc repro prepare` first (the range test trains on it)")
    configure("jax")  # the compiled loop, whatever train.backend says: a few seconds, not a run
    from optlab.study import lr_find

    result = lr_find.run(params, data, args.start, args.end, args.steps)
    out = Path(args.out) if Path(args.out).is_absolute() else repo / args.out
    json_path, png_path = lr_find.save(result, out)
    s = result.suggestions
    print(
        f"{params.optimizer.name}: {len(result.rates)} steps from {result.rates[0]:.2g} to {result.rates[-1]:.2g}"
        f"{'; ' + result.stopped if result.stopped else ''}\n"
        f"suggested learning rate {s['min_over_10']:.2g} (a tenth of the lowest loss's), steepest fall at "
        f"{s['steepest']:.2g}\nwrote {json_path} and {png_path}\n"
        + (result.command() if result.conclusive else "no command: the test was inconclusive (see above)")
    )
    return 0


def _landscape(args) -> int:
    from pathlib import Path

    from optlab.study.pipeline import Pipeline
    from optlab.training.backend import configure

    if (args.points or 2) < 2 or (args.span or 1) <= 0 or (args.train_images or 1) < 1:
        raise OptlabError("optlab landscape: --points must be 2 or more, --span above 0, --train-images 1 or more")
    repo = Path(args.repo)
    pipeline = Pipeline.load(repo)
    data = repo / pipeline.prepared_data
    if not data.is_dir():
        raise OptlabError(f"{data} not found: run `dvc repro` first (the landscape evaluates its model on it)")
    configure("jax")  # compiled inference, whatever train.backend says
    from optlab.study import landscape

    out = Path(args.out) if Path(args.out).is_absolute() else repo / args.out
    where = landscape.Where(repo, data, pipeline.option("train", "--model"),
                            repo / pipeline.option("train", "--tensorboard-logs"), out)  # fmt: skip
    given = {"points": args.points, "span": args.span, "train_images": args.train_images}
    found = landscape.run(where, args.exp, args.against, seed=args.seed, **{k: v for k, v in given.items() if v})
    print(landscape.summary(found))
    print(f"wrote {', '.join(found['figures'])} and landscape.json in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
