"""`python -m zones` / `eldr-zones`: fit, validate, evaluate, refit, predictor-eval.

Thin shell over the pure modules: parse flags, load files, call the core, print, write.
Exit status 0 on success, 1 on a data error (message on stderr naming the field), 2 on usage.
Output tables are byte-identical for the same inputs, flags and seed, except `created_at`
(`--created-at` sets it; `--created-at none` omits it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from zones.align import refit
from zones.calibration import CalibrationError
from zones.evaluate import Evaluation, EvaluationError, evaluate, plot, summary
from zones.fit import DEFAULT_LOAD_BOUND, TOOL_VERSION, FitError, FitOptions, fit_zones
from zones.geometry import GeometryError, ModelGeometry, geometry_by_name
from zones.inputs import FORMATS, CalibrationSet, InputError, load_inputs, split_indices
from zones.kmeans import KMeansError, Progress
from zones.predictor import PredictorError
from zones.signature import SignatureError
from zones.table import (
    COMPACT_SCHEMA_VERSION,
    SCHEMA_VERSIONS,
    ZoneTable,
    ZoneTableError,
    convert,
    describe,
    load_table,
    save_table,
)

_DATA_ERRORS = (
    InputError,
    FitError,
    ZoneTableError,
    EvaluationError,
    CalibrationError,
    GeometryError,
    KMeansError,
    PredictorError,
    SignatureError,
    OSError,
)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _load_bound(text: str) -> int | str:
    """An integer >= 0, or 'none' (kept as the string: refit then drops the old bound)."""
    if text.lower() == "none":
        return "none"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0 or 'none', got {text!r}") \
            from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0 or 'none', got {text!r}")
    return value


def _add_input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", "-i", nargs="+", required=True, help="calibration input file(s)")
    p.add_argument("--format", choices=FORMATS, help="input format (default: detect)")
    p.add_argument("--model", help="known geometry name (needed for bare .npy counts)")
    p.add_argument("--num-layers", type=int)
    p.add_argument("--num-experts", type=int)
    p.add_argument("--top-k", type=int)
    p.add_argument(
        "--prefill-fraction",
        type=float,
        default=0.5,
        help="traces without a prefill/decode boundary: leading fraction of tokens that is prompt",
    )
    p.add_argument(
        "--split",
        choices=("all", "train", "test"),
        default="all",
        help="use only this part of a seeded random split of the inputs",
    )
    p.add_argument("--test-fraction", type=float, default=1 / 3)
    p.add_argument("--split-seed", type=int, default=0)


def _add_fit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tau", type=float, default=None, help="band width (default 0.1; refit: old)")
    p.add_argument("--min-candidates", type=int, default=None)
    p.add_argument(
        "--load-bound",
        type=_load_bound,
        default=None,
        help="gateway load bound: in-flight requests over the least-loaded worker beyond which "
        f"a zone leaves the band (default: {DEFAULT_LOAD_BOUND}; refit: old; 'none' removes "
        "it)",
    )
    p.add_argument("--no-mask", action="store_true", help="keep every layer (skip the rho search)")
    p.add_argument("--no-predictor", action="store_true")
    p.add_argument("--max-iter", type=int, default=50)
    p.add_argument(
        "--exact-max-points",
        type=int,
        default=2000,
        help="exact assignment up to this many signatures, scalable above",
    )
    p.add_argument(
        "--created-at",
        default=None,
        help="provenance timestamp (default: now, UTC); 'none' omits it",
    )
    p.add_argument("--out", "-o", required=True, help="zone table path to write")
    p.add_argument(
        "--table-format",
        type=int,
        choices=SCHEMA_VERSIONS,
        default=COMPACT_SCHEMA_VERSION,
        help="zone table schema version to write: 2 (default) is compact, 8-bit arrays that fit "
        "a Kubernetes ConfigMap; 1 is full-precision float32, for gateways older than schema 2",
    )
    p.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m zones", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    fit = sub.add_parser("fit", help="calibration data -> zone table")
    _add_input_args(fit)
    workers = fit.add_mutually_exclusive_group(required=True)
    workers.add_argument("--workers", help="comma-separated decode worker URLs/ids, zone k -> k-th")
    workers.add_argument("--num-workers", type=int, help="K zones for workers named decode-0..K-1")
    _add_fit_args(fit)

    val = sub.add_parser("validate", help="check a zone table and print a summary")
    val.add_argument("table")

    conv = sub.add_parser(
        "convert", help="rewrite a zone table in another schema version (2: compact)"
    )
    conv.add_argument("table")
    conv.add_argument("--out", "-o", required=True, help="zone table path to write")
    conv.add_argument("--table-format", type=int, choices=SCHEMA_VERSIONS,
                      default=COMPACT_SCHEMA_VERSION)

    ev = sub.add_parser("evaluate", help="held-out rho, zone sizes, distinct experts per step")
    ev.add_argument("--table", "-t", required=True)
    _add_input_args(ev)
    ev.add_argument("--batch-sizes", type=_int_list, default=[8, 16, 32, 64])
    ev.add_argument(
        "--worker-counts",
        type=_int_list,
        default=None,
        help="also refit on the train split for each K (needs --split test)",
    )
    ev.add_argument("--steps", type=int, default=2000)
    ev.add_argument("--bootstrap", type=int, default=100)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--plot", help="PNG path")
    ev.add_argument("--json", help="write the results as JSON here")

    rf = sub.add_parser("refit", help="refit on new data, keeping zone -> worker identity")
    rf.add_argument("--old", required=True, help="current zone table")
    _add_input_args(rf)
    rf.add_argument("--workers", help="new pool (comma-separated); default: the old pool")
    _add_fit_args(rf)

    pe = sub.add_parser("predictor-eval", help="predictor zone accuracy and latency")
    pe.add_argument("--table", "-t", required=True)
    _add_input_args(pe)
    pe.add_argument("--repeat", type=int, default=20, help="timing repetitions per prompt")
    return parser


def _geometry(args: argparse.Namespace) -> ModelGeometry | None:
    if args.model:
        return geometry_by_name(args.model)
    if args.num_layers or args.num_experts or args.top_k:
        if not (args.num_layers and args.num_experts and args.top_k):
            raise GeometryError("--num-layers, --num-experts and --top-k go together")
        return ModelGeometry("custom", args.num_layers, args.num_experts, args.top_k)
    return None


def _load(args: argparse.Namespace, part: str | None = None) -> CalibrationSet:
    calib = load_inputs(
        args.input,
        fmt=args.format,
        geometry=_geometry(args),
        prefill_fraction=args.prefill_fraction,
    )
    part = part or args.split
    if part == "all":
        return calib
    train, test = split_indices(len(calib), args.test_fraction, args.split_seed)
    chosen = calib.subset(train if part == "train" else test)
    chosen.sources = [
        dict(s, split=part, test_fraction=args.test_fraction, split_seed=args.split_seed)
        for s in calib.sources
    ]
    return chosen


def _progress(disabled: bool) -> tuple[Progress | None, Callable[[], None]]:
    if disabled:
        return None, lambda: None
    from tqdm import tqdm

    bars: dict[str, Any] = {}

    def update(stage: str, step: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=stage, unit="iter", leave=False)
        bar.update(step - bar.n)

    def close() -> None:
        for bar in bars.values():
            bar.close()

    return update, close


def _provenance(args: argparse.Namespace, calib: CalibrationSet) -> dict[str, Any]:
    prov: dict[str, Any] = {
        "tool": TOOL_VERSION,
        "inputs": calib.sources,
        "seed": args.seed,
        "signature_from": calib.signature_from,
    }
    if args.created_at is None:
        prov["created_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    elif args.created_at.lower() != "none":
        prov["created_at"] = args.created_at
    return prov


def _options(args: argparse.Namespace, old: ZoneTable | None = None) -> FitOptions:
    tau = args.tau if args.tau is not None else (old.tau if old else 0.1)
    min_c = (
        args.min_candidates
        if args.min_candidates is not None
        else (old.min_candidates if old else 2)
    )
    bound: int | None
    if args.load_bound is None:
        bound = old.load_bound if old else DEFAULT_LOAD_BOUND
    else:
        bound = None if args.load_bound == "none" else int(args.load_bound)
    return FitOptions(
        seed=args.seed,
        tau=tau,
        min_candidates=min_c,
        load_bound=bound,
        use_mask=not args.no_mask,
        predictor=not args.no_predictor,
        max_iter=args.max_iter,
        exact_max_points=args.exact_max_points,
    )


def cmd_fit(args: argparse.Namespace) -> int:
    calib = _load(args)
    if args.workers:
        workers = [w.strip() for w in args.workers.split(",") if w.strip()]
    else:
        if args.num_workers < 1:
            raise FitError("--num-workers must be >= 1")
        workers = [f"decode-{k}" for k in range(args.num_workers)]
    progress, close = _progress(args.no_progress)
    start = time.perf_counter()
    try:
        table, _ = fit_zones(
            calib, workers, _options(args), provenance=_provenance(args, calib), progress=progress
        )
    finally:
        close()
    table = convert(table, args.table_format)  # describe what was written: its checksum
    save_table(table, args.out)
    print(describe(table))
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f}s")
    return 0


# Kubernetes caps a ConfigMap's data at 1 MiB; the zone table ships as one (deploy/k8s).
CONFIGMAP_LIMIT_BYTES = 1 << 20


def cmd_validate(args: argparse.Namespace) -> int:
    table = load_table(args.table)
    print(describe(table))
    size = Path(args.table).stat().st_size
    fits = "fits" if size < CONFIGMAP_LIMIT_BYTES else "does NOT fit"
    hint = "" if size < CONFIGMAP_LIMIT_BYTES or table.schema_version != 1 else (
        "; `python -m zones convert` rewrites it in the compact schema 2")
    print(f"file       {size:,} bytes: {fits} a Kubernetes ConfigMap (1 MiB){hint}")
    print("OK")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    table = convert(load_table(args.table), args.table_format)
    save_table(table, args.out)
    print(describe(table))
    print(f"wrote {args.out}: {Path(args.out).stat().st_size:,} bytes")
    return 0


def cmd_refit(args: argparse.Namespace) -> int:
    old = load_table(args.old)
    calib = _load(args)
    workers = None
    if args.workers:
        workers = [w.strip() for w in args.workers.split(",") if w.strip()]
    progress, close = _progress(args.no_progress)
    try:
        table = refit(
            old,
            calib,
            workers,
            _options(args, old),
            provenance=_provenance(args, calib),
            progress=progress,
        )
    finally:
        close()
    table = convert(table, args.table_format)  # describe what was written: its checksum
    save_table(table, args.out)
    print(describe(table))
    stats = table.fit_stats
    print(
        f"aligned to {old.checksum}: kept {stats['kept_workers']}, added {stats['added_workers']}, "
        f"removed {stats['removed_workers']}, mean cosine old->new {stats['alignment_cosine_mean']}"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    table = load_table(args.table)
    heldout = _load(args)
    results: dict[str, Any] = {"table": table.checksum, "inputs": heldout.sources}

    def run_evaluation(candidate: ZoneTable) -> Evaluation:
        return evaluate(
            candidate,
            heldout,
            batch_sizes=args.batch_sizes,
            steps=args.steps,
            bootstrap=args.bootstrap,
            seed=args.seed,
        )

    ev = run_evaluation(table)
    print(f"== table {args.table} (K={table.num_zones})")
    print(summary(ev))
    results["table_eval"] = ev.to_dict()
    if args.plot:
        plot(ev, args.plot)
        print(f"plot: {args.plot}")
    if args.worker_counts:
        if args.split != "test":
            raise EvaluationError("--worker-counts refits on the train split: pass --split test")
        train = _load(args, "train")
        results["worker_counts"] = {}
        for k in args.worker_counts:
            opts = FitOptions(seed=args.seed, predictor=table.predictor is not None)
            fitted, _ = fit_zones(train, [f"decode-{i}" for i in range(k)], opts)
            ev_k = run_evaluation(fitted)
            print(f"\n== refit on the train split with K={k} workers")
            print(summary(ev_k))
            results["worker_counts"][str(k)] = ev_k.to_dict()
            if args.plot:
                path = Path(args.plot)
                k_path = path.with_name(f"{path.stem}_k{k}{path.suffix}")
                plot(ev_k, str(k_path))
                print(f"plot: {k_path}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


def cmd_predictor_eval(args: argparse.Namespace) -> int:
    table = load_table(args.table)
    if table.predictor is None:
        raise EvaluationError("table has no predictor (fit it from data with prompts)")
    heldout = _load(args)
    if not heldout.has_prompts:
        raise EvaluationError("held-out set has no prompt text or input_ids")
    sigs, valid = table.spec.build_many(heldout.signature_counts)
    texts = heldout.texts or [None] * len(heldout)
    ids = heldout.input_ids or [None] * len(heldout)
    exact = np.argmax(sigs @ table.centroids.T, axis=1)
    hits = total = 0
    timings = []
    for i in range(len(heldout)):
        if not valid[i] or (not texts[i] and not ids[i]):
            continue
        pred = table.predictor.predict(texts[i], ids[i])
        for _ in range(args.repeat):
            t0 = time.perf_counter_ns()
            table.predictor.predict(texts[i], ids[i])
            timings.append(time.perf_counter_ns() - t0)
        if pred is None:
            continue
        total += 1
        hits += int(np.argmax(table.centroids @ pred) == exact[i])
    if not total:
        raise EvaluationError("no held-out request has both a signature and a prompt")
    counts = np.bincount(exact[valid], minlength=table.num_zones)
    us = np.asarray(timings) / 1000.0
    print(f"held-out prompts {total}, zones {table.num_zones}")
    print(f"predictor zone accuracy {hits / total:.3f} ({hits}/{total})")
    print(
        f"chance: largest zone share {counts.max() / counts.sum():.3f}, "
        f"uniform {1 / table.num_zones:.3f}"
    )
    print(f"latency per predict: median {np.median(us):.1f} us, p99 {np.percentile(us, 99):.1f} us")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "fit": cmd_fit,
    "validate": cmd_validate,
    "convert": cmd_convert,
    "evaluate": cmd_evaluate,
    "refit": cmd_refit,
    "predictor-eval": cmd_predictor_eval,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except _DATA_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
