"""Command line: parse, call one library function, print. Errors exit with the code of their type."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from sqlalchemy.exc import DBAPIError

from iumad import __version__
from iumad.errors import IumadError
from iumad.progress import StderrProgress

app = typer.Typer(
    name="iumad",
    help="Incremental unified multimodal anomaly detection: learns product classes one after another.",
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


def handles_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn project errors into one stderr line and their documented exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except IumadError as exc:
            err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except DBAPIError as exc:  # e.g. "database or disk is full", "readonly database": rolled back
            reason = str(getattr(exc, "orig", exc)).splitlines()[0]
            err.print(f"[red]error:[/red] the store's database refused a write ({escape(reason)}); the "
                      "transaction was rolled back, nothing changed; fix the cause and run the command again",
                      highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("interrupted", highlight=False)
            raise typer.Exit(130) from None

    return wrapper


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False) + "\n")


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
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Generate the synthetic multimodal dataset (MVTec 3D-AD layout)."""
    from iumad.data.synth import generate_dataset

    manifest = generate_dataset(out_dir, n_classes=classes, seed=seed, size=size, n_train=train,
                                n_val=validation, n_test=test, progress=StderrProgress(), overwrite=overwrite)
    if as_json:
        _print_json(manifest)
    else:
        out.print(f"wrote {len(manifest['classes'])} classes to {out_dir}")


@app.command()
@handles_errors
def inspect(
    path: Path = typer.Argument(..., help="Dataset root or one class folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Show what a dataset folder holds: layout, classes, splits, modalities, sizes, missing points."""
    from iumad.data.inspect import inspect_path

    report = inspect_path(path, progress=StderrProgress())
    if as_json:
        _print_json(report)
        return
    table = Table(title=f"{report['path']} ({report['layout']})")
    for col in ("class", "splits", "modalities", "sizes", "missing 3D", "defect types"):
        table.add_column(col)
    for c in report["classes"]:
        splits = ", ".join(f"{s} {sum(labels.values())}" + (f" ({labels['good']} good)" if s == "test" and
                           "good" in labels else "") for s, labels in c["splits"].items() if labels)
        miss = "-" if c["missing_geometry_share"] is None else f"{100 * c['missing_geometry_share']:.1f}%"
        table.add_row(c["name"], splits, ", ".join(c["modalities"]), ", ".join(c["image_sizes"]), miss,
                      ", ".join(c["defect_types"]) or "-")
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
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Migrate the store's tables to this version of iumad (SQLite files are backed up first)."""
    from iumad.store.db import upgrade

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
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
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
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
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


# ---------------------------------------------------------------------- learning and serving

WAIT_OPTION = typer.Option(0.0, "--wait", min=0, help="Seconds to wait for a running writer (else exit 5).")
JSON_OPTION = typer.Option(False, "--json", help="Print the result as JSON.")


def _open_store(store: Optional[Path], create: bool = True):
    from iumad.store.db import Store

    return Store.open(store, create=create)


def _fmt(v: Any) -> str:
    return "-" if v is None or v != v else f"{100 * v:.1f}"


@app.command("add-class")
@handles_errors
def add_class(
    name: str = typer.Argument(..., help="Class name: lowercase letters, digits, '_' and '-'."),
    data: Path = typer.Option(..., "--data", help="The class folder (or a dataset folder holding it)."),
    test: Optional[Path] = typer.Option(None, "--test", help="Labelled evaluation set (a class folder; its test split)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Description of the product for the text adaptor."),
    modalities: Optional[str] = typer.Option(None, "--modalities", help="rgb, geometry or rgb,geometry (default: what the data has)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config (the first class fixes the network)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Training epochs of this step."),
    update: bool = typer.Option(False, "--update", help="Train an already learned class on new data."),
    max_forgetting: Optional[float] = typer.Option(None, "--max-forgetting", min=0, help="Refuse to promote if FM on I-AUROC exceeds this many points (exit 6)."),
    store: Optional[Path] = STORE_OPTION,
    wait: float = WAIT_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Learn a new product class (or --update one) without forgetting the others."""
    from iumad import distributed
    from iumad.continual.classdata import parse_modalities
    from iumad.continual.step import StepRequest, learn

    distributed.init_from_env()  # under torchrun: rank 0 runs the step, the others help train
    if distributed.rank() > 0:
        distributed.follow()
        return
    req = StepRequest(name, data, test=test, prompt=prompt, modalities=parse_modalities(modalities),
                      config=config, epochs=epochs, update=update, max_forgetting=max_forgetting)
    try:
        with _open_store(store) as opened:
            summary = learn(opened, req, progress=StderrProgress(), wait=wait)
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
        table.add_row(r["class"], _fmt(r.get("i_auroc")), _fmt(r.get("p_auroc")), _fmt(r.get("aupro")),
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
    metric: str = typer.Option("i_auroc", "--metric", help="i_auroc, p_auroc, aupro (class predicted, the "
                               "unified protocol), the same with _given (class given), or class_accuracy."),
    csv_path: Optional[Path] = typer.Option(None, "--csv", help="Write R and the forgetting rows as CSV."),
    plot_path: Optional[Path] = typer.Option(None, "--plot", help="Write a heat map of R and per-class curves (PNG)."),
    store: Optional[Path] = STORE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """R (steps x classes), per-class forgetting, FM, BWT and a label-free drift check."""
    from iumad.continual.report import drift_text, forgetting, forgetting_json
    from iumad.eval.forgetting import plot, render_text, write_csv

    with _open_store(store, create=False) as opened:
        report, drift = forgetting(opened, metric)
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
    as_json: bool = JSON_OPTION,
) -> None:
    """Score samples with the production model: anomaly score, class, decision at the stored threshold."""
    from iumad.eval.predict import predict_path

    with _open_store(store, create=False) as opened:
        rows = predict_path(opened, path, None if class_name == "auto" else class_name, out_dir,
                            progress=StderrProgress())
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
    for col in ("step", "kind", "classes", "status", "started", "version", "error"):
        table.add_column(col)
    for r in rows:
        version = "-" if r["result_version"] is None else str(r["result_version"]) + (" (production)" if r["production"] else "")
        table.add_row(str(r["step"]), r["kind"], ",".join(r["classes"]), r["status"], r["started_at"][:19],
                      version, (r["error"] or "")[:80])
    out.print(table)


@app.command()
@handles_errors
def evaluate(
    class_name: Optional[str] = typer.Option(None, "--class", help="Only this class."),
    store: Optional[Path] = STORE_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Evaluate the production model on the registered evaluation sets (records nothing)."""
    from iumad.continual.report import evaluate_production

    with _open_store(store, create=False) as opened:
        rows = evaluate_production(opened, class_name, progress=StderrProgress())
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
def nightly(
    inbox: Path = typer.Option(..., "--inbox", help="Folder with one sub-folder of new normal samples per class."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only say what would be learned and quarantined."),
    max_forgetting: Optional[float] = typer.Option(None, "--max-forgetting", min=0, help="Refuse to promote a step whose FM on I-AUROC exceeds this many points (exit 6)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config for the steps."),
    store: Optional[Path] = STORE_OPTION,
    wait: float = WAIT_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Fold newly delivered data into the model: update known classes, add new ones, quarantine outliers."""
    from iumad.continual.nightly import nightly as run_nightly

    with _open_store(store) as opened:
        report = run_nightly(opened, inbox, dry_run=dry_run, max_forgetting=max_forgetting, config=config,
                             wait=wait, progress=StderrProgress())
    if as_json:
        _print_json(report)
    else:
        for p in report["problems"]:
            err.print(f"warning: {p}", highlight=False)
        if report.get("message"):
            out.print(report["message"], highlight=False)
        for c in report["classes"]:
            what = f"step {c['step']['step']}" if "step" in c else ("planned" if report["dry_run"] else "")
            line = f"{c['class']}: {c['action']} with {c['new_samples']} new samples, " \
                   f"{len(c.get('quarantined', []))} quarantined; {what}"
            if "error" in c:
                line += f" FAILED (exit {c['exit_code']}): {c['error']}"
            out.print(line, highlight=False)
    if report.get("exit_code"):
        raise typer.Exit(report["exit_code"])


@app.command()
@handles_errors
def demo(
    out_dir: Path = typer.Option(Path("out/demo"), "--out", help="Where the synthetic data, store and report go."),
    classes_n: int = typer.Option(4, "--classes", min=2, max=12, help="Synthetic classes to learn one after another."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config (configs/fast-cpu.yaml is the quick one)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the synthetic data."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Generate synthetic data, learn its classes one at a time, print the forgetting report."""
    from iumad.continual.demo import run_demo

    result = run_demo(out_dir, n_classes=classes_n, seed=seed, config=config, progress=StderrProgress())
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
    modalities: str = typer.Option("both", "--modalities", help="rgb, geometry or both."),
    method: str = typer.Option("iumad", "--method", help="iumad, finetune (no replay, distillation or memories), joint "
                               "(all classes in one step) or memory-bank (per-class banks, no training)."),
    classes_opt: Optional[str] = typer.Option(None, "--classes", help="Comma-separated classes in the order to "
                                              "learn them (default: all, alphabetical)."),
    seed: int = typer.Option(0, "--seed", help="Training seed (train.seed)."),
    out_dir: Path = typer.Option(Path("out/benchmark"), "--out", help="Where the store, config, plots and "
                                 "protocol.json go (its store/ is replaced only if a benchmark made it)."),
    config: Optional[Path] = typer.Option(None, "--config", help="Base YAML config (the method's overrides apply on top)."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Run an incremental protocol in a fresh store: R, FM, BWT and final averages; thresholds from normals only."""
    from iumad.eval.protocol import run_protocol, summary_text

    names = [c.strip() for c in classes_opt.split(",") if c.strip()] if classes_opt is not None else None
    result = run_protocol(data, protocol, method, modalities, classes=names, seed=seed, out=out_dir,
                          config=config, progress=StderrProgress())
    if as_json:
        _print_json(result)
    else:
        sys.stdout.write(summary_text(result))


if __name__ == "__main__":  # pragma: no cover
    app()
