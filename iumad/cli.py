"""Command line: parse, call one library function, print. Errors exit with the code of their type."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

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
            err.print(f"[red]error:[/red] {exc}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
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


if __name__ == "__main__":  # pragma: no cover
    app()
