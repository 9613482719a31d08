"""Command line: parse, call one library function, print. Errors exit with the code of their type.

Under `--json` a result is one line on stdout and an error one line on stderr, `{"error", "code",
"file", "fix"}`, bad options included, so a log holds one record per run (JSON Lines).
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from sqlalchemy.exc import DBAPIError
from typer.core import TyperGroup

from iumad import __version__
from iumad.errors import DataError, IumadError, UsageError, error_record
from iumad.eval.protocol import METHODS, MODALITY_CHOICES, PROTOCOL_METRICS
from iumad.progress import StderrProgress

Modality = StrEnum("Modality", {m: m for m in MODALITY_CHOICES})
"""rgb, geometry or both (every modality the data has): the one vocabulary of every --modalities."""
Method = StrEnum("Method", {m: m for m in METHODS})
Metric = StrEnum("Metric", {m: m for m in PROTOCOL_METRICS})
JSON_FLAG = "--json"


class JsonErrorsGroup(TyperGroup):
    """Typer's group, but a bad option or argument under --json is a JSON error line too (click raises
    it before any command runs, so `handles_errors` never sees it)."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        ctx.meta[JSON_FLAG] = JSON_FLAG in (args[:args.index("--")] if "--" in args else args)
        with _usage_errors_as_json(ctx):
            return super().parse_args(ctx, args)

    def invoke(self, ctx: typer.Context) -> Any:
        with _usage_errors_as_json(ctx):
            return super().invoke(ctx)


@contextlib.contextmanager
def _usage_errors_as_json(ctx: typer.Context) -> Iterator[None]:
    try:
        yield
    except typer.TyperException as exc:  # click's usage errors (vendored by typer) derive from it
        if not ctx.meta.get(JSON_FLAG):
            raise
        where = getattr(exc, "ctx", None)
        fix = f"see `{where.command_path} --help`" if where is not None else None
        _write_error(error_record(exc.format_message(), exc.exit_code, None, fix), as_json=True)
        raise typer.Exit(exc.exit_code) from None


app = typer.Typer(
    name="iumad",
    help="Incremental unified multimodal anomaly detection: learns product classes one after another.",
    cls=JsonErrorsGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(width=None if sys.stdout.isatty() else 160)  # logs and pipes get full table rows
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def _version(value: bool) -> None:
    if value:
        print(f"iumad {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """iumad: one model for every product class, RGB and 3D."""


def _write_error(record: Mapping[str, Any], as_json: bool) -> None:
    if as_json:
        sys.stderr.write(json.dumps(record) + "\n")
        sys.stderr.flush()
    else:
        err.print(f"[red]error:[/red] {escape(record['error'])}", highlight=False, markup=True, soft_wrap=True)


def handles_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn project errors into one stderr line (a JSON object under --json) and their documented exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json = bool(kwargs.get("as_json"))
        try:
            return fn(*args, **kwargs)
        except IumadError as exc:
            record = exc.to_json()
        except DBAPIError as exc:  # e.g. "database or disk is full", "readonly database": rolled back
            reason = str(getattr(exc, "orig", exc)).splitlines()[0]
            record = error_record(f"the store's database refused a write ({reason}); the transaction was rolled "
                                  "back, nothing changed; fix the cause and run the command again", 1,
                                  fix="fix the cause and run the command again")
        except BrokenPipeError:
            raise  # typer's own handling: the reader went away
        except OSError as exc:  # e.g. --store under a file: one line, not a traceback
            where = None if exc.filename is None else str(exc.filename)
            record = error_record(str(exc) if where is None else f"{where}: {exc.strerror}", 1, where)
        except KeyboardInterrupt:
            record = error_record("interrupted", 130)
        _write_error(record, as_json)
        raise typer.Exit(record["code"]) from None

    return wrapper


JSON_OPTION = typer.Option(False, JSON_FLAG, help="Print the result as one line of JSON; an error as one "
                           "JSON line on stderr.")


def _print_json(data: Any) -> None:
    """One line (JSON Lines): a log that appends every run's output holds one record per run."""
    sys.stdout.write(json.dumps(data) + "\n")


def _refuse_early(*, names: Sequence[str] = (), paths: Mapping[str, Optional[Path]] | None = None,
                  config: Optional[Path] = None, database: bool = False, store: Optional[Path] = None) -> None:
    """Check what can be checked before any store or output folder exists, so that a refused command
    creates nothing: class names, input paths (by option), the config file, and (`database`) that the
    store's database answers when it is not the store's own SQLite file."""
    from iumad.store.repository import validate_class_name

    for name in names:
        validate_class_name(name)
    for option, path in (paths or {}).items():
        if path is not None and not Path(path).exists():
            raise DataError(f"{path}: does not exist; check {option}", file=path, fix=f"check {option}")
    if config is not None:
        from iumad.config import load_config

        load_config(config)
    if database:
        _database_answers(store)


def _database_answers(store: Optional[Path]) -> None:
    from iumad.store.db import ENV_DB_URL, display_url, make_engine, resolve_root, resolve_url, sqlite_file

    url = resolve_url(resolve_root(store))
    if sqlite_file(url) is not None:
        return  # the store's own file: made with its folder
    engine = make_engine(url)
    try:
        with engine.connect():
            pass
    except DBAPIError as exc:
        reason = str(getattr(exc, "orig", exc)).splitlines()[0]
        raise IumadError(f"{display_url(url)}: cannot connect to the store's database ({reason}); check "
                         f"{ENV_DB_URL} and that the server runs", fix=f"check {ENV_DB_URL} and that the server runs"
                         ) from None
    finally:
        engine.dispose()


@app.command()
@handles_errors
def synth(
    out_dir: Path = typer.Option(Path("data/synth"), "--out", help="Folder to write (must be empty or absent)."),
    classes: int = typer.Option(10, "--classes", min=1, help="Number of object classes."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives byte-identical files."),
    size: int = typer.Option(224, "--size", min=32, max=1024, help="Image side in pixels."),
    train: int = typer.Option(60, "--train", min=1, help="Good training samples per class."),
    validation: int = typer.Option(10, "--validation", min=0, help="Good validation samples per class."),
    test: int = typer.Option(40, "--test", min=1, help="Test samples per class (good and defective)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty folder that is not a synth output."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Generate the synthetic multimodal dataset (MVTec 3D-AD layout)."""
    from iumad.data.synth import generate_dataset

    with StderrProgress() as progress:
        manifest = generate_dataset(out_dir, n_classes=classes, seed=seed, size=size, n_train=train,
                                    n_val=validation, n_test=test, progress=progress, overwrite=overwrite)
    if as_json:
        _print_json(manifest)
    else:
        out.print(f"wrote {len(manifest['classes'])} classes to {out_dir}")


@app.command()
@handles_errors
def inspect(
    path: Path = typer.Argument(..., help="Dataset root or one class folder."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Show what a dataset folder holds: layout, classes, splits, modalities, sizes, missing points."""
    from iumad.data.inspect import inspect_path

    with StderrProgress() as progress:
        report = inspect_path(path, progress=progress)
    if as_json:
        _print_json(report)
        return
    table = Table(title=f"{report['path']} ({report['layout']})")
    for col in ("class", "layout", "splits", "modalities", "sizes", "missing 3D", "defect types"):
        table.add_column(col)
    for c in report["classes"]:
        splits = ", ".join(f"{s} {sum(labels.values())}" + (f" ({labels['good']} good)" if s == "test" and
                           "good" in labels else "") for s, labels in c["splits"].items() if labels)
        miss = "-" if c["missing_geometry_share"] is None else f"{100 * c['missing_geometry_share']:.1f}%"
        kinds = "; " + ", ".join(f"{n} {k}" for k, n in c["defect_kinds"].items()) if c["defect_kinds"] else ""
        bare = f" ({c['defects_without_mask']} without mask)" if c["defects_without_mask"] else ""
        table.add_row(c["name"], c["layout"], splits, ", ".join(c["modalities"]), ", ".join(c["image_sizes"]), miss,
                      (", ".join(c["defect_types"]) or "-") + kinds + bare)
    out.print(table)


db_app = typer.Typer(help="The task store's schema: upgrade, current revision, consistency check.",
                     no_args_is_help=True)
app.add_typer(db_app, name="db")
STORE_OPTION = typer.Option(None, "--store", help="Store folder (default: $IUMAD_STORE or ./store).")


@db_app.command("upgrade")
@handles_errors
def db_upgrade(
    store: Optional[Path] = STORE_OPTION,
    wait: float = typer.Option(0.0, "--wait", min=0, help="Seconds to wait for a running writer."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Migrate the store's tables to this version of iumad (SQLite files are backed up first)."""
    from iumad.store.db import upgrade

    _refuse_early(database=True, store=store)
    result = upgrade(store, wait=wait)
    if as_json:
        _print_json(result)
    else:
        backup = f" (backup: {result['backup']})" if result.get("backup") else ""
        out.print(f"{result['url']}: {result['from'] or 'empty'} -> {result['to']}{backup}", highlight=False)


@db_app.command("current")
@handles_errors
def db_current(
    store: Optional[Path] = STORE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Print the store's schema revision and whether it is up to date."""
    from iumad.store.db import current

    result = current(store)
    if as_json:
        _print_json(result)
    else:
        state = "up to date" if result["up_to_date"] else f"needs upgrade to {result['head']}"
        out.print(f"{result['url']}: revision {result['revision'] or 'none'} ({state})", highlight=False)


@db_app.command("check")
@handles_errors
def db_check(
    store: Optional[Path] = STORE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Check foreign keys, checkpoints and their sha256, the production alias and stale running steps."""
    from iumad.store.check import check_store
    from iumad.store.db import Store

    with Store.open(store, create=False) as opened:
        report = check_store(opened)
    if as_json:
        _print_json(report)
    else:
        for p in report["problems"]:
            err.print(f"{p['severity']}: [{p['code']}] {p['message']}", highlight=False)
        out.print(f"{report['url']}: {'ok' if report['ok'] else 'problems found'}", highlight=False)
    if not report["ok"]:
        raise typer.Exit(1)


cache_app = typer.Typer(help="The store's feature cache: size, limit, and clearing it.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@cache_app.command("stats")
@handles_errors
def cache_stats_cmd(
    store: Optional[Path] = STORE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Entries and bytes of the feature cache, and its limit (least recently used entries go first)."""
    from iumad.continual.cache import cache_stats

    with _open_store(store, create=False) as opened:
        report = cache_stats(opened)
    if as_json:
        _print_json(report)
        return
    limit = report["limit_bytes"]
    out.print(f"{report['folder']}: {report['entries']} entries, {report['bytes'] / 2 ** 20:.1f} MiB of "
              f"{'no limit' if limit is None else f'{limit / 2 ** 30:g} GiB'}", highlight=False)


@cache_app.command("clear")
@handles_errors
def cache_clear_cmd(
    store: Optional[Path] = STORE_OPTION,
    wait: float = typer.Option(0.0, "--wait", min=0, help="Seconds to wait for a running writer (else exit 5)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Remove every cached feature (they are recomputed from the files when needed)."""
    from iumad.continual.cache import clear_cache

    with _open_store(store, create=False) as opened:
        report = clear_cache(opened, wait)
    if as_json:
        _print_json(report)
    else:
        out.print(f"removed {report['removed_entries']} entries ({report['freed_bytes'] / 2 ** 20:.1f} MiB)",
                  highlight=False)


# ---------------------------------------------------------------------- learning and serving

WAIT_OPTION = typer.Option(0.0, "--wait", min=0, help="Seconds to wait for a running writer (else exit 5).")


def _device(value: Optional[str]) -> Optional[str]:
    """--device, checked while parsing (exit 2 before anything is created): the device every model of
    this run uses, over the config's train.device."""
    from iumad.model.device import resolve_device, set_process_device

    if value is not None:
        try:
            set_process_device(value)
            resolve_device()
        except IumadError as exc:
            set_process_device(None)
            raise typer.BadParameter(str(exc)) from None
    return value


def _cache_limit(value: Optional[float]) -> Optional[float]:
    """--cache-limit: the feature-cache bound of this run, over the config's backbone.cache_limit_gb."""
    from iumad.model.feature_cache import set_process_limit

    if value is not None:
        set_process_limit(value)
    return value


CACHE_LIMIT_OPTION = typer.Option(None, "--cache-limit", min=0, callback=_cache_limit, help="GB of cached "
                                  "features to keep, least recently used out (0: no limit; default: the "
                                  "config's backbone.cache_limit_gb, 4).")
DEVICE_OPTION = typer.Option(None, "--device", callback=_device, help="auto, cpu, cuda or cuda:N: where the "
                             "backbone, network and retrieval run (default: the config's train.device, auto).")


def _open_store(store: Optional[Path], create: bool = True):
    from iumad.store.db import Store

    return Store.open(store, create=create)


def _modalities(choice: Modality) -> tuple[str, ...] | None:
    """The --modalities choice as a step's modalities; None (both) lets the data decide."""
    return None if choice == Modality.both else (choice.value,)


def _fmt(v: Any) -> str:
    return "-" if v is None or v != v else f"{100 * v:.1f}"


@app.command("add-class")
@handles_errors
def add_class(
    name: str = typer.Argument(..., help="Class name: lowercase letters, digits, '_' and '-'."),
    data: Optional[Path] = typer.Option(None, "--data", help="The class folder (or a dataset folder holding it)."),
    normal: Optional[Path] = typer.Option(None, "--normal", help="Instead of --data: folder of normal training "
                                          "images."),
    abnormal: Optional[Path] = typer.Option(None, "--abnormal", help="With --normal: folder of defective test images."),
    masks: Optional[Path] = typer.Option(None, "--masks", help="With --abnormal: their masks (<id>.png or "
                                         "<id>_mask.png)."),
    normal_test: Optional[Path] = typer.Option(None, "--normal-test", help="With --abnormal: folder of normal test "
                                               "images."),
    image_labels: bool = typer.Option(False, "--image-labels", help="Evaluate on image-level labels only (defect "
                                      "masks not needed; P-AUROC and AUPRO are not measured)."),
    test: Optional[Path] = typer.Option(None, "--test", help="Labelled evaluation set (a class folder; its test split)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Description of the product for the text adaptor."),
    modalities: Modality = typer.Option(Modality.both, "--modalities", help="Modalities to learn; both: every "
                                        "modality the data has (an --update keeps the class's own)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config (the first class fixes the network)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Training epochs of this step."),
    update: bool = typer.Option(False, "--update", help="Train an already learned class on new data."),
    max_forgetting: Optional[float] = typer.Option(None, "--max-forgetting", min=0, help="Refuse to promote if FM on I-AUROC exceeds this many points (exit 6)."),
    store: Optional[Path] = STORE_OPTION,
    wait: float = WAIT_OPTION,
    cache_limit: Optional[float] = CACHE_LIMIT_OPTION,
    device: Optional[str] = DEVICE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Learn a new product class (or --update one) without forgetting the others."""
    from iumad import distributed
    from iumad.continual.classdata import list_class
    from iumad.continual.step import StepRequest, learn
    from iumad.data.described import make_spec

    described = {"normal": normal, "abnormal": abnormal, "masks": masks, "normal_test": normal_test}
    if (data is None) == (normal is None) or (normal is None and any(described.values())):
        raise UsageError("give the class's data with --data DIR, or describe it with --normal DIR [--abnormal DIR "
                         "--masks DIR --normal-test DIR]", fix="give --data or --normal")
    paths = {"--data": data, "--test": test, "--normal": normal, "--abnormal": abnormal, "--masks": masks,
             "--normal-test": normal_test}
    _refuse_early(names=[name], paths=paths, config=config, database=True, store=store)
    folders = make_spec(described) if normal is not None else None
    list_class(name, data or normal, test=test, folders=folders, image_labels=image_labels)  # refuse before the store
    distributed.init_from_env()  # under torchrun: rank 0 runs the step, the others help train
    if distributed.rank() > 0:
        distributed.follow()
        return
    req = StepRequest(name, data or normal, test=test, prompt=prompt, modalities=_modalities(modalities),
                      config=config, epochs=epochs, update=update, max_forgetting=max_forgetting,
                      folders=folders, image_labels=image_labels)
    try:
        with _open_store(store) as opened, StderrProgress() as progress:
            summary = learn(opened, req, progress=progress, wait=wait)
    finally:
        distributed.release_followers()
    if as_json:
        _print_json(summary)
        return
    table = Table(title=f"step {summary['step']} ({summary['kind']} {summary['class']}): model version "
                        f"{summary['model_version']} is production")
    for col in ("class", "I-AUROC", "P-AUROC", "AUPRO@0.3", "I-AUROC (class given)", "class accuracy",
                "threshold", "method"):
        table.add_column(col)
    for r in summary["results"]:
        thr = "-" if r["threshold"] is None else f"{r['threshold']:.3f}"
        pixel = ["n/m" if k in r["not_measured"] else _fmt(r.get(k)) for k in ("p_auroc", "aupro")]  # not measured
        table.add_row(r["class"], _fmt(r.get("i_auroc")), *pixel,
                      _fmt(r.get("i_auroc_given")), _fmt(r.get("class_accuracy")), thr, r["threshold_method"] or "-")
    out.print(table)
    for r in summary["results"]:
        if r["warning"]:
            err.print(f"warning: {r['warning']}", highlight=False)
    for why in summary["exemplars_skipped"]:
        err.print(f"warning: exemplar skipped: {why}", highlight=False)
    out.print(f"{summary['seconds']:.0f} s; FM on I-AUROC so far: {_fmt(summary['fm_i_auroc'])} points", highlight=False)


@app.command("forgetting-report")
@handles_errors
def forgetting_report_cmd(
    metric: Metric = typer.Option(Metric.i_auroc, "--metric", help="i_auroc, p_auroc, aupro: the class "
                                  "predicted (the unified protocol); *_given: the class given."),
    csv_path: Optional[Path] = typer.Option(None, "--csv", help="Write R and the forgetting rows as CSV."),
    plot_path: Optional[Path] = typer.Option(None, "--plot", help="Write a heat map of R and per-class curves (PNG)."),
    store: Optional[Path] = STORE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """R (steps x classes), per-class forgetting, FM, BWT and a label-free drift check."""
    from iumad.continual.report import drift_text, forgetting, forgetting_json
    from iumad.eval.forgetting import plot, render_text, write_csv

    with _open_store(store, create=False) as opened:
        report, drift = forgetting(opened, metric.value)
    if csv_path:
        write_csv(report, csv_path)
    if plot_path:
        plot(report, plot_path)
    if as_json:
        _print_json(forgetting_json(report, drift))
    else:
        sys.stdout.write(render_text(report) + drift_text(drift))


@app.command()
@handles_errors
def predict(
    path: Path = typer.Argument(..., help="An image, a folder of images, a dataset split or a class folder."),
    class_name: str = typer.Option("auto", "--class", help="Class of the samples, or auto to predict it."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Write overlays (PNG) and predictions.csv/.json here."),
    store: Optional[Path] = STORE_OPTION,
    device: Optional[str] = DEVICE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Score samples with the production model: anomaly score, class, decision at the stored threshold."""
    from iumad.eval.predict import predict_path

    with _open_store(store, create=False) as opened, StderrProgress() as progress:
        rows = predict_path(opened, path, None if class_name == "auto" else class_name, out_dir,
                            progress=progress)
    if as_json:
        _print_json(rows)
        return
    table = Table()
    for col in ("path", "class", "p(class)", "score", "threshold", "decision"):
        table.add_column(col)
    for r in rows:
        thr = "-" if r["threshold"] is None else f"{r['threshold']:.3f}"
        table.add_row(r["path"], r["class"], f"{r['class_probability']:.2f}", f"{r['score']:.3f}", thr, r["decision"])
    out.print(table)


@app.command()
@handles_errors
def classes(store: Optional[Path] = STORE_OPTION, as_json: bool = JSON_OPTION) -> None:
    """Learned classes in arrival order."""
    from iumad.continual.report import classes as list_classes

    with _open_store(store, create=False) as opened:
        rows = list_classes(opened)
    if as_json:
        _print_json(rows)
        return
    table = Table()
    for col in ("#", "class", "modalities", "in production", "threshold", "eval samples", "exemplars"):
        table.add_column(col)
    for r in rows:
        thr = "-" if r["threshold"] is None else f"{r['threshold']:.3f} ({r['threshold_method']})"
        table.add_row(str(r["arrival_order"]), r["name"], ",".join(r["modalities"]),
                      "yes" if r["in_production"] else "no", thr, str(r["evaluation_samples"]), str(r["exemplars"]))
    out.print(table)


@app.command()
@handles_errors
def history(store: Optional[Path] = STORE_OPTION, as_json: bool = JSON_OPTION) -> None:
    """Every step with its status, the model version it made, and which version serves."""
    from iumad.continual.report import history as list_history

    with _open_store(store, create=False) as opened:
        rows = list_history(opened)
    if as_json:
        _print_json(rows)
        return
    table = Table()
    for col in ("step", "kind", "classes", "status", "started", "version", "quarantine", "error"):
        table.add_column(col)
    for r in rows:
        version = "-" if r["result_version"] is None else str(r["result_version"]) + (" (production)" if r["production"] else "")
        table.add_row(str(r["step"]), r["kind"], ",".join(r["classes"]), r["status"], r["started_at"][:19],
                      version, _quarantine_cell(r), (r["error"] or "")[:80])
    out.print(table)


def _quarantine_cell(row: dict) -> str:
    """`held 2 (#4 accept, #5 open); learned #1`: the history table's view of quarantine review."""
    parts = []
    if row["quarantined"]:
        parts.append(f"held {len(row['quarantined'])} (" + ", ".join(
            f"#{q['id']} {q['decision'] or 'open'}" for q in row["quarantined"]) + ")")
    if row["learned_accepted"]:
        parts.append("learned " + ", ".join(f"#{i}" for i in row["learned_accepted"]))
    return "; ".join(parts) or "-"


@app.command()
@handles_errors
def evaluate(
    class_name: Optional[str] = typer.Option(None, "--class", help="Only this class."),
    store: Optional[Path] = STORE_OPTION,
    device: Optional[str] = DEVICE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Evaluate the production model on the registered evaluation sets (records nothing)."""
    from iumad.continual.report import evaluate_production

    with _open_store(store, create=False) as opened, StderrProgress() as progress:
        rows = evaluate_production(opened, class_name, progress=progress)
    if as_json:
        _print_json(rows)
        return
    table = Table(title=f"model version {rows[0]['model_version']}" if rows else None)
    for col in ("class", "n", "I-AUROC", "P-AUROC", "AUPRO@0.3"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["class"], str(r["n"]), _fmt(r.get("i_auroc")), _fmt(r.get("p_auroc")), _fmt(r.get("aupro")))
    out.print(table)


@app.command()
@handles_errors
def rollback(
    to: Optional[int] = typer.Option(None, "--to", help="Model version id (default: the one production came from)."),
    store: Optional[Path] = STORE_OPTION,
    wait: float = WAIT_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Move the production alias back to an earlier model version (recorded as a step)."""
    from iumad.continual.versions import rollback as do_rollback

    with _open_store(store, create=False) as opened:
        result = do_rollback(opened, to, wait=wait)
    if as_json:
        _print_json(result)
    else:
        out.print(f"production: version {result['from_version']} -> {result['to_version']} "
                  f"(classes: {', '.join(result['classes'])})", highlight=False)


@app.command()
@handles_errors
def gc(
    keep: int = typer.Option(5, "--keep", min=1, help="Newest model versions whose files are kept."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only say what would be removed."),
    store: Optional[Path] = STORE_OPTION,
    wait: float = WAIT_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Remove the files of old model versions (not production, candidate or pinned) and unused class blobs."""
    from iumad.continual.retention import gc as run_gc

    with _open_store(store, create=False) as opened:
        report = run_gc(opened, keep, dry_run, wait)
    if as_json:
        _print_json(report)
        return
    verb = "would remove" if dry_run else "removed"
    out.print(f"{verb} versions {report['removed_versions'] or 'none'} and {report['removed_blobs']} class blob(s), "
              f"{report['freed_bytes'] / 2 ** 20:.1f} MiB; kept {report['kept_versions']}", highlight=False)


@app.command()
@handles_errors
def pin(
    version: int = typer.Argument(..., help="Model version id (see `iumad history`)."),
    unpin: bool = typer.Option(False, "--unpin", help="Let gc remove it again."),
    store: Optional[Path] = STORE_OPTION,
    wait: float = WAIT_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Keep a model version's files through `iumad gc` (a rollback target)."""
    from iumad.continual.retention import pin as run_pin

    with _open_store(store, create=False) as opened:
        report = run_pin(opened, version, not unpin, wait)
    if as_json:
        _print_json(report)
    else:
        out.print(f"version {version} {'pinned' if report['pinned'] else 'unpinned'}", highlight=False)


@app.command()
@handles_errors
def nightly(
    inbox: Path = typer.Option(..., "--inbox", help="Folder with one sub-folder of new normal samples per class."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only say what would be learned and quarantined."),
    max_forgetting: Optional[float] = typer.Option(None, "--max-forgetting", min=0, help="Refuse to promote a step whose FM on I-AUROC exceeds this many points (exit 6)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config for the steps."),
    store: Optional[Path] = STORE_OPTION,
    wait: float = WAIT_OPTION,
    cache_limit: Optional[float] = CACHE_LIMIT_OPTION,
    device: Optional[str] = DEVICE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Fold newly delivered data into the model: update known classes, add new ones, quarantine outliers."""
    from iumad.continual.nightly import nightly as run_nightly

    _refuse_early(paths={"--inbox": inbox}, config=config, database=True, store=store)
    with _open_store(store) as opened, StderrProgress() as progress:
        report = run_nightly(opened, inbox, dry_run=dry_run, max_forgetting=max_forgetting, config=config,
                             wait=wait, progress=progress)
    if as_json:
        _print_json(report)
    else:
        for p in report["problems"]:
            err.print(f"warning: {p}", highlight=False)
        if report.get("message"):
            out.print(report["message"], highlight=False)
        for c in report["classes"]:
            what = f"step {c['step']['step']}" if "step" in c else ("planned" if report["dry_run"] else "")
            accepted = f", {c['accepted_samples']} accepted from quarantine" if c.get("accepted_samples") else ""
            line = f"{c['class']}: {c['action']} with {c['new_samples']} new samples{accepted}, " \
                   f"{len(c.get('quarantined', []))} quarantined; {what}"
            if "error" in c:
                line += f" FAILED (exit {c['exit_code']}): {c['error']}"
            out.print(line, highlight=False)
    if report.get("exit_code"):  # a class failed: the report (the run's one JSON record) says which and why
        raise typer.Exit(report["exit_code"])


quarantine_app = typer.Typer(help="Review the samples `nightly` quarantined: list, accept (learned at the "
                             "next nightly run) or reject (kept out for good).", no_args_is_help=True)
app.add_typer(quarantine_app, name="quarantine")


@quarantine_app.command("list")
@handles_errors
def quarantine_list_cmd(
    class_name: Optional[str] = typer.Option(None, "--class", help="Only this class."),
    undecided: bool = typer.Option(False, "--undecided", help="Only samples nobody has decided on yet."),
    store: Optional[Path] = STORE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Quarantined samples, oldest first, with their z-score, where their files lie and the decision."""
    from iumad.continual.quarantine import list_samples

    with _open_store(store, create=False) as opened:
        rows = list_samples(opened, class_name=class_name, undecided=undecided)
    if as_json:
        _print_json(rows)
        return
    table = Table()
    for col in ("id", "class", "step", "z", "score", "file", "decision", "learned in step"):
        table.add_column(col)
    for r in rows:
        table.add_row(str(r["id"]), r["class"], "-" if r["step"] is None else str(r["step"]), f"{r['z']:.1f}",
                      f"{r['score']:.3f}", r["files"]["rgb"] or r["files"]["geometry"] or "-", r["decision"] or "open",
                      "-" if r["learned_step"] is None else str(r["learned_step"]))
    out.print(table)


def _decide(sample_id: int, decision: str, store: Optional[Path], as_json: bool) -> None:
    import getpass
    import socket

    from iumad.continual.quarantine import decide

    with _open_store(store, create=False) as opened:
        row = decide(opened, sample_id, decision, decided_by=f"cli {getpass.getuser()}@{socket.gethostname()}")
    if as_json:
        _print_json(row)
    else:
        what = "learned at the next nightly run" if decision == "accept" else "kept out for good"
        out.print(f"sample {sample_id} ({row['class']}) {row['decision']}ed{'' if row['created'] else ' already'}: "
                  f"{what}", highlight=False)


SAMPLE_ARGUMENT = typer.Argument(..., min=1, help="Quarantined sample id (see `iumad quarantine list`).")


@quarantine_app.command("accept")
@handles_errors
def quarantine_accept_cmd(sample_id: int = SAMPLE_ARGUMENT, store: Optional[Path] = STORE_OPTION,
                          as_json: bool = JSON_OPTION) -> None:
    """Accept a quarantined sample: the next `nightly` learns it without screening it again."""
    _decide(sample_id, "accept", store, as_json)


@quarantine_app.command("reject")
@handles_errors
def quarantine_reject_cmd(sample_id: int = SAMPLE_ARGUMENT, store: Optional[Path] = STORE_OPTION,
                          as_json: bool = JSON_OPTION) -> None:
    """Reject a quarantined sample: it is never learned (decisions are final)."""
    _decide(sample_id, "reject", store, as_json)


@app.command()
@handles_errors
def demo(
    out_dir: Path = typer.Option(Path("out/demo"), "--out", help="Where the synthetic data, store and report go."),
    classes_n: int = typer.Option(4, "--classes", min=2, max=12, help="Synthetic classes to learn one after another."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config (configs/fast-cpu.yaml is the quick one)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the synthetic data."),
    device: Optional[str] = DEVICE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Generate synthetic data, learn its classes one at a time, print the forgetting report."""
    from iumad.continual.demo import run_demo

    _refuse_early(config=config)
    with StderrProgress() as progress:
        result = run_demo(out_dir, n_classes=classes_n, seed=seed, config=config, progress=progress)
    if as_json:
        _print_json({k: v for k, v in result.items() if k != "text"})
    else:
        sys.stdout.write(result["text"])
        out.print(f"store: {result['store']}; plot: {result['plot']}; report: {result['report']}", highlight=False)


@app.command()
@handles_errors
def benchmark(
    data: Path = typer.Option(..., "--data", help="Dataset folder with one sub-folder per class."),
    protocol: str = typer.Option(..., "--protocol", help="Steps: 10-0, 9-1, 6-4, 6-1x4, 1x10 (B-SxN: a base of B "
                                 "classes, then N steps of S); must add up to the number of classes."),
    modalities: Modality = typer.Option(Modality.both, "--modalities", help="Modalities to learn; both: every "
                                        "modality the data has."),
    method: Method = typer.Option(Method.iumad, "--method", help="iumad; finetune (no replay, distillation or "
                                  "memories); joint (all classes in one step); memory-bank (per-class banks, no "
                                  "training)."),
    classes_opt: Optional[str] = typer.Option(None, "--classes", help="Comma-separated classes in the order to "
                                              "learn them (default: all, alphabetical)."),
    seed: int = typer.Option(0, "--seed", help="Training seed (train.seed)."),
    out_dir: Path = typer.Option(Path("out/benchmark"), "--out", help="Where the store, config, plots and "
                                 "protocol.json go (its store/ is replaced only if a benchmark made it)."),
    config: Optional[Path] = typer.Option(None, "--config", help="Base YAML config (the method's overrides apply on top)."),
    cache_limit: Optional[float] = CACHE_LIMIT_OPTION,
    device: Optional[str] = DEVICE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Run an incremental protocol in a fresh store: R, FM, BWT and final averages; thresholds from normals only."""
    from iumad.eval.protocol import run_protocol, summary_text

    names = [c.strip() for c in classes_opt.split(",") if c.strip()] if classes_opt is not None else None
    with StderrProgress() as progress:
        result = run_protocol(data, protocol, method.value, modalities.value, classes=names, seed=seed,
                              out=out_dir, config=config, progress=progress)
    if as_json:
        _print_json(result)
    else:
        sys.stdout.write(summary_text(result))


@app.command()
@handles_errors
def serve(
    store: Optional[Path] = STORE_OPTION,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; a non-loopback one needs a token."),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="TCP port."),
    token_file: Optional[Path] = typer.Option(None, "--token-file", help="File whose first line is the bearer "
                                              "token /v1/ requests must send (else $IUMAD_SERVE_TOKEN)."),
    max_upload_mb: float = typer.Option(64, "--max-upload-mb", min=0.001, help="Largest request body (413 above)."),
    poll: float = typer.Option(2.0, "--poll", min=0.1, help="Seconds between checks of the production alias."),
    workers: int = typer.Option(1, "--workers", min=1, max=64, help="Worker processes (uvicorn). Each loads the "
                                "model (N times the memory) and swaps it on its own; /metrics then sums every "
                                "worker's counters (prometheus-client multiprocess mode, in $PROMETHEUS_MULTIPROC_DIR "
                                "or a temporary folder) and lists the serving version per worker."),
    device: Optional[str] = DEVICE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Serve the production model over HTTP (see /docs); swaps in a newly promoted version without a restart.
    Logs go to stderr, as one JSON object per line with the JSON flag."""
    import logging.config
    import os

    from iumad.serve.security import check_bind, read_token

    token = read_token(token_file)
    check_bind(host, token)
    import uvicorn

    from iumad.serve.app import create_app

    with _open_store(store, create=False):  # refuses a missing or old store before binding (exit 2/3)
        pass
    from iumad.serve.logs import log_config

    logs = log_config(as_json)
    logging.config.dictConfig(logs)
    max_bytes = int(max_upload_mb * 2 ** 20)
    from iumad.serve.app import ENV_MAX_UPLOAD, ENV_POLL
    from iumad.serve.metrics import MULTIPROC_ENV, multiprocess_dir
    from iumad.serve.security import TOKEN_ENV

    shared_metrics = workers > 1 or bool(os.environ.get(MULTIPROC_ENV))
    with multiprocess_dir() if shared_metrics else contextlib.nullcontext():
        if workers == 1:
            uvicorn.run(create_app(store, token=token, max_upload_bytes=max_bytes, poll_s=poll),
                        host=host, port=port, log_level="info", log_config=logs)
            return
        # uvicorn spawns each worker from an import string: the options travel in the environment
        env = {ENV_MAX_UPLOAD: str(max_bytes), ENV_POLL: str(poll)}
        env |= {"IUMAD_STORE": str(store.resolve())} if store is not None else {}
        env |= {TOKEN_ENV: token} if token is not None else {}
        env |= {"IUMAD_DEVICE": device} if device is not None else {}
        os.environ.update(env)
        uvicorn.run("iumad.serve.app:app_from_env", factory=True, workers=workers, host=host, port=port,
                    log_level="info", log_config=logs)

if __name__ == "__main__":  # pragma: no cover
    app()
