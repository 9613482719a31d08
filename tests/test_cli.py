"""CLI conventions (issue #16): help lists choices and shows flags as flags, bad values fail at parse time
(exit 2), a refused command creates nothing, and under --json every result is one line on stdout and
every error one JSON object on stderr with the documented exit code."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path
from typing import Iterator, get_type_hints

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from iumad import cli
from iumad.cli import app
from iumad.data.dataset import find_classes
from iumad.store.db import Store
from tests.tiny import tiny_config, tiny_data

ERROR_FIELDS = {"error", "code", "file", "fix"}
WIDE = {"COLUMNS": "240", "TERMINAL_WIDTH": "240"}  # help on one line per option, whatever the terminal


def invoke(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, list(args), env=env)


def json_error(res) -> dict:
    """The one JSON error line of a --json run (progress lines may precede it, nothing may follow it)."""
    assert res.stdout == "", res.stdout
    lines = res.stderr.splitlines()
    records = [line for line in lines if line.startswith("{")]
    assert len(records) == 1 and lines[-1] == records[0], res.stderr
    record = json.loads(records[0])
    assert set(record) == ERROR_FIELDS and isinstance(record["error"], str) and record["error"]
    assert record["code"] == res.exit_code
    assert record["file"] is None or isinstance(record["file"], str)
    assert record["fix"] is None or isinstance(record["fix"], str)
    return record


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tiny synthetic classes."""
    return tiny_data(tmp_path_factory.mktemp("cli") / "synth", seed=4, n_classes=2)


def _commands() -> Iterator[tuple[str, ...]]:
    root = get_command(app)
    for name, cmd in root.commands.items():
        if hasattr(cmd, "commands"):
            yield from ((name, sub) for sub in cmd.commands)
        else:
            yield (name,)


# ---------------------------------------------------------------------- help and typed options


@pytest.mark.parametrize("command", list(_commands()), ids=" ".join)
def test_help_shows_flags_as_flags(command: tuple[str, ...]) -> None:
    res = invoke(*command, "--help", env=WIDE)
    assert res.exit_code == 0, res.output
    assert "<bool>" not in res.output and "--json" in res.output
    flag = next(line for line in res.output.splitlines() if "--json" in line)
    assert re.search(r"--json\s+Print the result", flag), flag  # no type or metavar between flag and help


def test_add_class_help_lists_the_choices() -> None:
    res = invoke("add-class", "--help", env=WIDE)
    assert res.exit_code == 0, res.output
    assert "<rgb|geometry|both>" in res.output and "<bool>" not in res.output
    assert re.search(r"--update\s+Train an already learned class", res.output)
    bench = invoke("benchmark", "--help", env=WIDE).output
    assert "<rgb|geometry|both>" in bench and "<iumad|finetune|joint|memory-bank>" in bench
    report = invoke("forgetting-report", "--help", env=WIDE).output
    assert "<i_auroc|p_auroc|aupro|i_auroc_given|p_auroc_given|aupro_given|class_accuracy>" in report


def test_one_modality_vocabulary_and_metric_list() -> None:
    from iumad.continual.evaluation import REPORT_METRICS
    from iumad.eval.protocol import MODALITY_CHOICES

    assert [m.value for m in cli.Metric] == list(REPORT_METRICS)  # what forgetting() accepts, no more
    assert get_type_hints(cli.add_class)["modalities"] is get_type_hints(cli.benchmark)["modalities"] is cli.Modality
    assert [m.value for m in cli.Modality] == list(MODALITY_CHOICES) == ["rgb", "geometry", "both"]
    assert cli._modalities(cli.Modality.both) is None  # both: whatever the data has, as in the protocols
    assert cli._modalities(cli.Modality.rgb) == ("rgb",)


@pytest.mark.parametrize("args,option", [
    (["add-class", "disc", "--data", "{missing}", "--modalities", "foo", "--store", "{target}"], "--modalities"),
    (["add-class", "disc", "--data", "{missing}", "--modalities", "rgb,geometry", "--store", "{target}"],
     "--modalities"),
    (["forgetting-report", "--metric", "nope", "--store", "{target}"], "--metric"),
    (["benchmark", "--data", "{missing}", "--protocol", "1", "--method", "nope", "--out", "{target}"], "--method"),
    (["benchmark", "--data", "{missing}", "--protocol", "1", "--modalities", "depth", "--out", "{target}"],
     "--modalities"),
])
def test_bad_choices_fail_at_parse_time(args: list[str], option: str, tmp_path: Path) -> None:
    target = tmp_path / "target"
    res = invoke(*(a.format(missing=tmp_path / "missing", target=target) for a in args))
    # exit 2 naming the option: the missing --data (exit 4) or store (exit 2, another message) was never looked at
    assert res.exit_code == 2, res.output
    assert f"Invalid value for '{option}'" in res.stderr
    assert not target.exists()


# ---------------------------------------------------------------------- refused commands create nothing


def _bad_config(tmp: Path) -> Path:
    path = tmp / "bad.yaml"
    path.write_text("train: {nope: 1}\n")
    return path


UNREACHABLE = "postgresql+psycopg://nobody@/iumad?host=/nonexistent-iumad-socket-dir"


@pytest.mark.parametrize("case", [
    "add-class bad name", "add-class missing data", "add-class missing test", "add-class bad config",
    "add-class database down", "nightly missing inbox", "nightly bad config", "nightly database down",
    "benchmark bad protocol", "benchmark missing data", "benchmark bad config", "benchmark unknown class",
    "db upgrade database down", "db upgrade bad url",
])
def test_refused_commands_leave_no_folder(case: str, data: Path, tmp_path: Path) -> None:
    target = tmp_path / "target"  # the store, or benchmark's output folder
    ok_class = find_classes(data)[0].name
    env: dict[str, str] = {}
    if case.endswith("database down"):
        pytest.importorskip("psycopg")
        env["IUMAD_DB_URL"] = UNREACHABLE
    store = ["--store", str(target)]
    argv, code = {
        "add-class bad name": (["add-class", "Bad Name", "--data", str(data), *store], 2),
        "add-class missing data": (["add-class", ok_class, "--data", str(tmp_path / "nope"), *store], 4),
        "add-class missing test": (["add-class", ok_class, "--data", str(data), "--test", str(tmp_path / "nope"),
                                    *store], 4),
        "add-class bad config": (["add-class", ok_class, "--data", str(data), "--config", str(_bad_config(tmp_path)),
                                  *store], 2),
        "add-class database down": (["add-class", ok_class, "--data", str(data), *store], 1),
        "nightly missing inbox": (["nightly", "--inbox", str(tmp_path / "nope"), *store], 4),
        "nightly bad config": (["nightly", "--inbox", str(data), "--config", str(_bad_config(tmp_path)), *store], 2),
        "nightly database down": (["nightly", "--inbox", str(data), *store], 1),
        "benchmark bad protocol": (["benchmark", "--data", str(data), "--protocol", "2-2", "--out", str(target)], 2),
        "benchmark missing data": (["benchmark", "--data", str(tmp_path / "nope"), "--protocol", "1",
                                    "--out", str(target)], 4),
        "benchmark bad config": (["benchmark", "--data", str(data), "--protocol", "2", "--config",
                                  str(_bad_config(tmp_path)), "--out", str(target)], 2),
        "benchmark unknown class": (["benchmark", "--data", str(data), "--protocol", "1", "--classes", "nope",
                                     "--out", str(target)], 2),
        "db upgrade database down": (["db", "upgrade", *store], 1),
        "db upgrade bad url": (["db", "upgrade", *store], 2),
    }[case]
    if case == "db upgrade bad url":
        env["IUMAD_DB_URL"] = "not a url"
    res = invoke(*argv, env=env)
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output and res.stderr.strip().startswith("error:")
    assert not target.exists(), sorted(p.name for p in target.iterdir())


# ---------------------------------------------------------------------- --json: one line per result and per error


@pytest.fixture
def stores(tmp_path: Path) -> dict[str, Path]:
    """Stores in the states that make commands fail: old (empty database), foreign (not iumad), fresh."""
    old = tmp_path / "old"
    old.mkdir()
    sqlite3.connect(old / "iumad.sqlite").close()  # a database without iumad's schema: needs `db upgrade`
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    con = sqlite3.connect(foreign / "iumad.sqlite")
    con.execute("CREATE TABLE something (x INTEGER)")
    con.commit()
    con.close()
    Store.open(tmp_path / "fresh").close()
    (tmp_path / "a-file").write_text("")
    return {"old": old, "foreign": foreign, "fresh": tmp_path / "fresh", "file": tmp_path / "a-file",
            "none": tmp_path / "none"}


def _json_cases(data: Path, s: dict[str, Path], tmp: Path) -> list[tuple[list[str], int]]:
    name = find_classes(data)[0].name
    png = tmp / "broken" / "good"
    png.mkdir(parents=True, exist_ok=True)
    (png / "000.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)  # a truncated PNG
    return [
        # 1: error
        (["db", "upgrade", "--store", str(s["foreign"])], 1),
        (["add-class", name, "--data", str(data), "--store", str(s["foreign"])], 1),
        (["classes", "--store", str(s["foreign"])], 1),
        (["db", "upgrade", "--store", str(s["file"] / "store")], 1),  # a store folder under a file
        # 2: usage, at parse time and from the library
        (["add-class", name, "--data", str(data), "--modalities", "foo"], 2),
        (["add-class", "Bad Name", "--data", str(data), "--store", str(s["none"])], 2),
        (["synth", "--size", "5", "--out", str(tmp / "synth")], 2),
        (["inspect"], 2),
        (["forgetting-report", "--metric", "nope"], 2),
        (["predict", str(data), "--store", str(s["none"])], 2),
        (["history", "--store", str(s["none"])], 2),
        (["rollback", "--to", "one"], 2),
        (["rollback", "--store", str(s["fresh"])], 2),
        (["demo", "--classes", "1"], 2),
        (["benchmark", "--data", str(data), "--protocol", "2-2", "--out", str(tmp / "b")], 2),
        (["db", "check", "--store", str(s["none"])], 2),
        (["db", "current", "--bogus"], 2),
        # 3: the store needs migration
        (["classes", "--store", str(s["old"])], 3),
        (["history", "--store", str(s["old"])], 3),
        (["evaluate", "--store", str(s["old"])], 3),
        (["forgetting-report", "--store", str(s["old"])], 3),
        (["predict", str(data), "--store", str(s["old"])], 3),
        (["rollback", "--store", str(s["old"])], 3),
        (["db", "check", "--store", str(s["old"])], 3),
        # 4: bad data
        (["add-class", name, "--data", str(tmp / "nope"), "--store", str(s["none"])], 4),
        (["inspect", str(tmp / "nope")], 4),
        (["inspect", str(tmp / "broken")], 4),
        (["nightly", "--inbox", str(tmp / "nope"), "--store", str(s["none"])], 4),
        (["benchmark", "--data", str(tmp / "nope"), "--protocol", "1", "--out", str(tmp / "b")], 4),
    ]


def test_json_errors_are_one_object_with_the_documented_fields(data: Path, stores: dict[str, Path],
                                                               tmp_path: Path) -> None:
    seen = set()
    for args, code in _json_cases(data, stores, tmp_path):
        res = invoke(*args, "--json")
        assert res.exit_code == code, (args, res.output)
        record = json_error(res)
        seen.add(code)
        if code == 3:
            assert "iumad db upgrade" in record["fix"] and record["file"].endswith("iumad.sqlite")
    assert seen == {1, 2, 3, 4}
    # a file and its fix, where the raising code knows them
    res = invoke("add-class", "disc", "--data", str(tmp_path / "nope"), "--store", str(stores["none"]), "--json")
    assert json_error(res)["file"] == str(tmp_path / "nope") and json_error(res)["fix"] == "check --data"
    res = invoke("inspect", str(tmp_path / "broken"), "--json")
    assert json_error(res)["file"].endswith("000.png")
    # the same errors without --json stay one human line
    res = invoke("classes", "--store", str(stores["old"]))
    assert res.exit_code == 3 and res.stderr.startswith("error: ") and len(res.stderr.strip().splitlines()) == 1


def test_json_error_when_the_store_is_locked(data: Path, stores: dict[str, Path]) -> None:
    root = stores["fresh"]
    name = find_classes(data)[0].name
    with Store.open(root) as store, store.writer_lock():
        for args in (["add-class", name, "--data", str(data)], ["rollback"], ["nightly", "--inbox", str(data)],
                     ["db", "upgrade"]):
            res = invoke(*args, "--store", str(root), "--json")
            assert res.exit_code == 5, (args, res.output)
            record = json_error(res)
            assert record["file"] == str(root) and "--wait" in record["fix"]


def test_json_error_when_forgetting_exceeds_the_limit(data: Path, tmp_path: Path, monkeypatch) -> None:
    from iumad.continual import step as step_module

    monkeypatch.setattr(step_module, "_forgetting_with", lambda *a: 0.25)  # as if FM were 25 points
    name = find_classes(data)[0].name
    res = invoke("add-class", name, "--data", str(data), "--config", str(tiny_config(tmp_path / "tiny.yaml")),
                 "--max-forgetting", "3", "--store", str(tmp_path / "s"), "--json")
    assert res.exit_code == 6, res.output
    record = json_error(res)
    assert "--max-forgetting" in record["error"]


def test_json_results_are_one_line(data: Path, tmp_path: Path) -> None:
    root = tmp_path / "s"
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for args in (["db", "upgrade", "--store", str(root)], ["db", "current", "--store", str(root)],
                 ["db", "check", "--store", str(root)], ["classes", "--store", str(root)],
                 ["inspect", str(data)], ["nightly", "--inbox", str(inbox), "--store", str(root)]):
        res = invoke(*args, "--json")
        assert res.exit_code == 0, (args, res.output)
        assert res.stdout.endswith("\n") and res.stdout.count("\n") == 1, res.stdout
        json.loads(res.stdout)


def test_os_errors_are_one_line_not_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    res = invoke("db", "upgrade", "--store", str(tmp_path / "a-file" / "store"))
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.stderr.startswith(f"error: {tmp_path / 'a-file' / 'store'}: Not a directory")
