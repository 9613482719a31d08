"""Build the README's "Results" section from the JSON files the benchmarks wrote.

    python benchmarks/make_results.py                      # print the Markdown
    python benchmarks/make_results.py --write README.md    # replace the text between the markers

Reads benchmarks/results/ (or --results DIR): detector.json, detector-fast-cpu.json, ablation.json, incremental.json,
protocol.json, serve.json and, when present, memory.json, scale.json, scan.json, geometry.json, synth.json and metrics.json; a missing file is
left out. Every table names the command that produced it and the machine it ran on. With --write, the
text between `<!-- results:start -->` and `<!-- results:end -->` is replaced; a file without both markers
is left unchanged (exit 1).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- results:start -->", "<!-- results:end -->"
SCRIPTS = {"detector.json": "bench_detector.py", "detector-fast-cpu.json": "bench_detector.py",
           "ablation.json": "bench_ablation.py", "tuning.json": "tune_learned.py",
           "incremental.json": "bench_incremental.py",
           "protocol.json": "bench_protocol.py", "scan.json": "bench_scan.py", "geometry.json": "bench_geometry.py",
           "synth.json": "bench_synth.py", "metrics.json": "bench_metrics.py", "serve.json": "bench_serve.py",
           "memory.json": "bench_memory.py", "scale.json": "bench_scale.py",
           "class_prediction.json": "probe_class_prediction.py", "tuning_real.json": "tune_real.py"}
# results measured with a model that has since changed; their tables say so until they are rerun
STALE = {name: ("Measured before issue #15's learned model (cross-modal mapping, masked reconstruction, "
                "expected-error scoring, 80 epochs on crops); not yet rerun with it.")
         for name in ("incremental.json", "protocol.json")}
METHOD_ORDER = ("joint", "iumad", "finetune", "memory-bank")
MOD_ORDER = ("both", "rgb", "geometry")


# ---------------------------------------------------------------------- formatting


def f3(v: Any) -> str:
    return "-" if v is None or v != v else f"{v:.3f}"


def signed(v: Any) -> str:
    return "-" if v is None or v != v else f"{v:+.3f}"


def secs(v: Any) -> str:
    return "-" if v is None else (f"{v:.0f} s" if v >= 10 else f"{v:.1f} s")


def mb(v: Any) -> str:
    return "-" if v is None else f"{v / 1e6:.1f} MB"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def machine_text(m: dict[str, Any] | None) -> str:
    if not m:
        return "machine not recorded"
    cpus = m.get("cpus") or m.get("cpu_count") or m.get("cores_available")
    cpu = m.get("cpu_model") or m.get("cpu") or m.get("processor")
    parts = [f"{cpus} CPUs" if cpus else None, cpu, m.get("platform"),
             f"Python {m['python']}" if m.get("python") else None,
             f"torch {m['torch']}" if m.get("torch") else None,
             f"{m['threads']} thread{'s' if m['threads'] != 1 else ''}" if m.get("threads") else None]
    return ", ".join(p for p in parts if p)


def provenance(name: str, doc: dict[str, Any], per_run: bool = False) -> str:
    cmd = doc.get("command")
    cmd = f"`{cmd.strip()}`" if cmd else f"`python benchmarks/{SCRIPTS.get(name, '?')}` (command not recorded)"
    if per_run:
        cmd = "one per run, listed under the table"
    return f"Command: {cmd}. Machine: {machine_text(doc.get('machine'))}. Source: `benchmarks/results/{name}`."


# ---------------------------------------------------------------------- sections


def passes_text(run: dict[str, Any]) -> str:
    """Inference rate; with several passes, the median and every pass (the first one cold)."""
    rate = run.get("inference_samples_per_s")
    if rate is None:
        return "-"
    passes = run.get("inference_passes_samples_per_s")
    each = f" (median of {', '.join(f'{p:.1f}' for p in passes)}; the first cold)" if passes else ""
    return f"{rate:.1f} samples/s{each}"


def detector(doc: dict[str, Any], name: str = "detector.json", title: str = "default config") -> str:
    out = [f"### Detector on one real class ({title})", "", provenance(name, doc), ""]
    rows = []
    for r in doc.get("cable_gland", []):
        m = r.get("metrics", {}).get("fused", {})
        rows.append([r.get("modalities", "?"), f3(m.get("i_auroc")), f3(m.get("p_auroc")), f3(m.get("aupro@0.3")),
                     secs(r.get("fit_s")), passes_text(r),
                     f"{r['peak_rss_mb']:.0f} MB" if r.get("peak_rss_mb") else "-"])
    if rows:
        out += [table(["cable_gland", "I-AUROC", "P-AUROC", "AUPRO@0.3", "fit", "inference, end to end",
                       "peak RSS (fit + inference)"], rows), ""]
    fam = doc.get("synthetic_families")
    if fam:
        keys = list(dict.fromkeys(k for v in fam.values() for k in v))
        out += ["Synthetic set, AUPRO@0.3 per defect family:", "",
                table(["model", *[k.replace("aupro@0.3 ", "") for k in keys]],
                      [[name, *[f3(v.get(k)) for k in keys]] for name, v in fam.items()]), ""]
    return "\n".join(out)


def ablation(doc: dict[str, Any]) -> str:
    rows = doc.get("rows", {})
    if not rows:
        return ""
    first = next(iter(rows.values()))
    cmds = sorted({r.get("command", "?") for r in rows.values()})
    def commit_of(r: dict) -> str:
        return r.get("commit", "?")[:12] + ("-dirty" if r.get("commit", "").endswith("-dirty") else "")

    commits = sorted({commit_of(r) for r in rows.values()})
    protos = sorted({(r.get("synthetic_6_1x4") or {}).get("commit", "")[:12] for r in rows.values()} - {""})
    proto_text = f" (the 6-1x4 columns: {', '.join(protos)})" if protos else ""
    out = ["### Ablation (issue #15)", "",
           f"Command: {', '.join(f'`{c}`' for c in cmds)}. Machine: {machine_text(first.get('machine'))}. "
           f"Commit: {', '.join(commits)}{proto_text}. Config: `{first.get('config', '?')}` with each row's overrides. "
           "Source: `benchmarks/results/ablation.json`.", "",
           "cable_gland: RGB + xyz; tire: RGB only; both fitted on train, calibrated on validation normals, "
           "reported on test. Synthetic: seed 0, 3 classes, joint fit, AUPRO@0.3 per defect family. Fit time "
           "with cached features (network, memories, calibration); inference end to end on cable_gland "
           "(files to maps, cache off). \"learned only\" is the \"full\" config scored without retrieval (the "
           "same fit when both rows run in one command). 6-1x4: the synthetic protocol's final I-AUROC and FM "
           "(`--protocol`; up to an hour per row at the default).", ""]
    header = ["row", "cable_gland I", "P", "AUPRO", "tire I", "P", "AUPRO", "synth rgb", "synth geometry",
              "synth both", "6-1x4 I-AUROC", "6-1x4 FM", "fit (cable_gland)", "inference"]
    body = []
    for name, r in rows.items():
        cg, tire = r.get("cable_gland", {}), r.get("tire", {})
        fam, proto = r.get("synthetic_families", {}), r.get("synthetic_6_1x4") or {}
        label = f"{name} (commit {commit_of(r)})" if len(commits) > 1 else name  # rows of mixed commits
        body.append([label, f3(cg.get("i_auroc")), f3(cg.get("p_auroc")), f3(cg.get("aupro@0.3")),
                     f3(tire.get("i_auroc")), f3(tire.get("p_auroc")), f3(tire.get("aupro@0.3")),
                     f3(fam.get("rgb")), f3(fam.get("geometry")), f3(fam.get("both")),
                     f3(proto.get("final_i_auroc")) if proto else "not run",
                     f3(proto.get("fm_i_auroc")) if proto else "not run",
                     secs(cg.get("fit_s")), f"{cg['inference_samples_per_s']:.1f}/s"
                     if cg.get("inference_samples_per_s") is not None and r.get("scoring") != "learned" else "-"])
    out += [table(header, body), ""]
    return "\n".join(out)


def incremental(doc: dict[str, Any]) -> str:
    data = doc.get("data", {})
    commands = {n: r.get("command") or doc.get("command") for n, r in doc.get("runs", {}).items()}
    per_run = len(set(commands.values())) > 1  # runs rerun one at a time
    out = ["### Classes one at a time (replay + distillation, without them, fine-tuning)", "",
           provenance("incremental.json", doc, per_run),
           f"Config: `{doc.get('config', '?')}`; data: {data.get('synthetic_classes', '?')} synthetic classes, "
           f"protocol {data.get('protocol', '1 x N')}.", ""]
    rows = []
    for name, r in doc.get("runs", {}).items():
        s = r.get("summary", {})
        rss = r.get("peak_rss_mb", doc.get("peak_rss_mb"))

        def g(m: str, k: str) -> Any:
            return s.get(m, {}).get(k)
        rows.append([name, f3(g("i_auroc", "final_average")), f3(g("i_auroc", "FM")), signed(g("i_auroc", "BWT")),
                     f3(g("p_auroc", "final_average")), f3(g("aupro", "final_average")), f3(g("aupro", "FM")),
                     f3(g("i_auroc_given", "final_average")), f3(g("i_auroc_given", "FM")),
                     f3(g("class_accuracy", "final_average")), secs(r.get("total_s")),
                     f"{rss:.0f} MB" if rss else "-"])
    out += [table(["run", "I-AUROC final", "FM", "BWT", "P-AUROC final", "AUPRO final", "AUPRO FM",
                   "I-AUROC (class given) final", "FM (class given)", "class accuracy", "total time",
                   "peak RSS"], rows), ""]
    if per_run:
        out += [f"Run `{n}`: `{c.strip()}`." for n, c in commands.items()] + [""]
    return "\n".join(out)


def _order(r: dict[str, Any]) -> tuple:
    m, mod = r.get("method"), r.get("modalities")
    return (METHOD_ORDER.index(m) if m in METHOD_ORDER else 9, MOD_ORDER.index(mod) if mod in MOD_ORDER else 9)


def protocol(doc: dict[str, Any]) -> str:
    runs = doc.get("runs", [])
    out = ["### Incremental protocols (issue #6)", "", provenance("protocol.json", doc), ""]
    if doc.get("notes"):
        out += [doc["notes"], ""]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r.get("sequence", "?"), r.get("protocol", "?")), []).append(r)
    for (seq, proto), rows in sorted(groups.items(), key=lambda kv: (kv[0][0] != "synthetic", kv[0][1])):
        rows.sort(key=_order)
        configs = sorted({str(r.get("config")) for r in rows})
        commands = sorted({r["command"] for r in rows if r.get("command") and r.get("command") != doc.get("command")})
        title = f"Synthetic set, protocol {proto}" if seq == "synthetic" else f"{seq} after synthetic classes, protocol {proto}"
        out += [f"#### {title}", ""]
        classes = next((r.get("classes") for r in rows if r.get("classes")), None)
        note = f"Config: {', '.join(f'`{c}`' for c in configs)}."
        if classes:
            note += f" Classes in learning order: {', '.join(classes)}."
        if commands:
            note += " Some rows come from an earlier command: " + "; ".join(f"`{c}`" for c in commands) + "."
        out += [note, ""]

        def cell(r: dict[str, Any], m: str, k: str, fmt: Callable[[Any], str] = f3) -> str:
            return fmt(r.get("summary", {}).get(m, {}).get(k))
        body = []
        for r in rows:
            if "error" in r:
                body.append([r.get("method", "?"), r.get("modalities", "?"), f"failed: {r['error'][:80]}"]
                            + [""] * 10)
                continue
            steps = r.get("seconds_per_step") or []
            body.append([r["method"], r["modalities"], cell(r, "i_auroc", "final_average"), cell(r, "i_auroc", "FM"),
                         cell(r, "i_auroc", "BWT", signed), cell(r, "p_auroc", "final_average"),
                         cell(r, "aupro", "final_average"), cell(r, "aupro", "FM"),
                         cell(r, "i_auroc_given", "final_average"), cell(r, "class_accuracy", "final_average"),
                         secs(sum(steps) / len(steps)) if steps else "-",
                         f"{r['peak_rss_mb']:.0f} MB" if r.get("peak_rss_mb") else "-",
                         f"{mb(r.get('model_bytes'))} / {mb(r.get('store_bytes'))}"])
        out += [table(["method", "modalities", "I-AUROC final", "FM", "BWT", "P-AUROC final", "AUPRO final",
                       "AUPRO FM", "I-AUROC (class given)", "class accuracy", "time per step", "peak RSS",
                       "model / store"], body), ""]
        cable = [r for r in rows if "cable_gland" in r and "error" not in r]
        if cable:
            def base(r: dict[str, Any], m: str, k: str) -> Any:
                return r.get("base_forgetting", {}).get(m, {}).get(k)
            out += [f"{seq} itself (final) and the base classes it made forget (FM over the base classes):", "",
                    table(["method", "modalities", f"{seq} I-AUROC", "P-AUROC", "AUPRO", "base I-AUROC before -> after",
                           "base FM I-AUROC", "base FM AUPRO"],
                          [[r["method"], r["modalities"], f3(r["cable_gland"].get("i_auroc")),
                            f3(r["cable_gland"].get("p_auroc")), f3(r["cable_gland"].get("aupro")),
                            f"{f3(base(r, 'i_auroc', 'base_average_before'))} -> "
                            f"{f3(base(r, 'i_auroc', 'base_average_after'))}",
                            f3(base(r, "i_auroc", "FM")), f3(base(r, "aupro", "FM"))] for r in cable]), ""]
    if doc.get("cable_gland"):
        out += [f"cable_gland sequence: {doc['cable_gland']}", ""]
    return "\n".join(out)


def serve(doc: dict[str, Any]) -> str:
    """`iumad serve` under load: one row per phase, then the batch ratio and the hot-swap checks."""
    out = ["### Serving under load (issue #18)", "", provenance("serve.json", doc), "",
           f"Store: {', '.join(doc.get('store', {}).get('classes', []))} learned one at a time "
           f"(config `{Path(str(doc.get('config', '?'))).name}`, hash {doc.get('config_hash', '?')}); "
           f"{doc.get('samples', '?')} test samples at {'x'.join(map(str, doc.get('image_size', [])))} px with rgb + "
           f"xyz, sent over loopback to `iumad serve --workers {doc.get('workers', 1)}`. Latency is the "
           f"client's, request sent to answer read. Ready {secs(doc.get('ready_s'))} after start."
           + (f" 1-minute load average {load.get('start')} at start, {load.get('end')} at end."
              if (load := doc.get("load_average_1min")) else ""), ""]
    phases = (("single_sequential", "`/v1/predict`, 1 client"),
              ("single_concurrent", f"`/v1/predict`, {doc.get('clients', '?')} clients"),
              ("batch", f"`/v1/predict/batch`, {doc.get('samples', '?')} samples per request"),
              ("hot_swap", f"`/v1/predict`, {doc.get('clients', '?')} clients, version promoted mid-run"))

    def ms(v: Any) -> str:
        return "-" if v is None else f"{v:.0f} ms"
    rows = []
    for key, what in phases:
        r = doc.get(key)
        if r:
            lat = r.get("latency_ms", {})
            rows.append([what, str(r.get("requests", "-")), f"{r.get('samples_per_s') or 0:.1f}",
                         ms(lat.get("p50")), ms(lat.get("p95")), ms(lat.get("p99")), str(r.get("failed", "-"))])
    base = doc.get("baseline_predict_records") or {}
    if base:
        rows.append(["`predict_records` in process (baseline)", f"{base.get('reps')} x {base.get('samples')}",
                     f"{base.get('samples_per_s') or 0:.1f}", "-", "-", "-", "-"])
    out += [table(["phase", "requests", "samples/s", "p50", "p95", "p99", "failed"], rows), ""]
    notes = []
    if doc.get("batch_ratio") is not None:
        server = (doc.get("batch") or {}).get("server_latency_ms_median")
        notes.append(f"HTTP batch throughput / `predict_records` (alternating, same samples): "
                     f"**{doc['batch_ratio']:.2f}** (target >= 0.90"
                     + (f"; {doc['batch_ratio_of_medians']:.2f} from the median round of each)"
                        if doc.get("batch_ratio_of_medians") is not None else ")")
                     + (f"; the server's own median batch time {server:.0f} ms" if server is not None else ""))
    swap = doc.get("hot_swap") or {}
    if swap:
        per_client = swap.get("versions_per_client") or []
        notes.append(f"hot swap {swap.get('version_before')} -> {swap.get('version_after')}: "
                     f"{swap.get('failed', '?')} failed requests, versions seen per client "
                     f"{', '.join(' -> '.join(map(str, v)) for v in per_client) or '-'}, "
                     f"{swap.get('score_mismatches', '?')} scores unlike the named version's, "
                     f"{'passed' if swap.get('ok') else 'FAILED'}")
    if notes:
        out += ["; ".join(notes) + ".", ""]
    return "\n".join(out)


def memory(doc: dict[str, Any]) -> str:
    """Peak RSS per command and resolution (bench_memory.py): one row per command, one column per data."""
    runs = doc.get("runs", [])
    if not runs:
        return ""
    datas = list(dict.fromkeys((r["data"], r.get("size", "?")) for r in runs))
    commands = list(dict.fromkeys(r["command"] for r in runs))
    cell = {(r["command"], r["data"]): r for r in runs}

    def rss(r: dict[str, Any] | None) -> str:
        if r is None:
            return "-"
        return f"failed (exit {r['exit_code']})" if r.get("exit_code") else f"{r['peak_rss_mb']:.0f} MB"

    overrides = ", ".join(f"{k}: {v}" for k, v in (doc.get("overrides") or {}).items())
    out = ["### Peak memory at two camera resolutions (issue #17)", "", provenance("memory.json", doc), "",
           f"Commit: {str(doc.get('commit', '?'))[:12]}. Config: `{doc.get('config', '?')}`"
           f"{f' with {overrides}' if overrides else ''} (hash {str(doc.get('config_hash', '?'))[:12]}). "
           f"Each command is its own process; peak RSS is its ru_maxrss. Budget: {doc.get('limit_mb', 2048)} MB. "
           "predict: the test split with overlays written at the images' size; memory-bank: `--protocol 1x2`, "
           "cable_gland (224 px, RGB + xyz) then tire.", "",
           table(["command", *[f"{d} ({size})" for d, size in datas]],
                 [[c, *[rss(cell.get((c, d))) for d, _ in datas]] for c in commands]), ""]
    return "\n".join(out)


SCALE_ROWS = (1, 10, 20, 50, 100)


def scale(doc: dict[str, Any]) -> str:
    """Issue #17's cost curve: a row per decade of K (and the last step), then the acceptance checks."""
    steps = {s["K"]: s for s in doc.get("steps", [])}
    if not steps:
        return ""
    out = ["### Cost of a step from 1 to 100 classes (issue #17)", ""]
    if doc.get("quick"):
        out += [f"**{doc.get('note') or 'Quick run: not the full curve.'}**", ""]
    d = doc.get("data", {})
    out += [provenance("scale.json", doc) + f" Commit `{str(doc.get('commit', '?'))[:12]}`, config hash "
            f"`{doc.get('config_hash')}`; {d.get('classes')} synthetic classes at {d.get('size')} px, "
            f"{d.get('train')}/{d.get('val')}/{d.get('test')} train/validation/test samples each; "
            f"evaluation budget {doc.get('config', {}).get('continual', {}).get('evaluation_budget')}, "
            f"`iumad gc --keep {doc.get('gc_keep')}` after each step. Plot: `benchmarks/results/scale.png`.", ""]
    marks = doc.get("marks", {})
    rows = []
    for k in sorted({k for k in SCALE_ROWS if k in steps} | {max(steps)}):
        s, m = steps[k], marks.get(str(k), {})
        fid = (m.get("i_auroc_abs_diff") or {}).get("recorded") or {}
        rows.append([str(k), secs(s.get("step_seconds")), mb(s.get("store_bytes")), mb(s.get("cache_bytes")),
                     f"{s['peak_rss_mb']:.0f} MB" if s.get("peak_rss_mb") else "-",
                     f"{s.get('latency_given_ms')} / {s.get('latency_auto_ms')} ms",
                     f"{f3(s.get('class_accuracy'))} / {f3(s.get('class_accuracy_lookalike'))}",
                     f"{f3(m.get('class_accuracy'))} / {f3(m.get('class_accuracy_lookalike'))}",
                     f3(s.get("fm_i_auroc")), f"{f3(fid.get('max'))} / {f3(fid.get('mean'))}"])
    out += [table(["K", "step", "store", "feature cache", "peak RSS", "latency given / auto",
                   "class acc. all / look-alike (R row)", "same, whole test sets", "FM (I-AUROC)",
                   "abs(I-AUROC subset - whole) max / mean"], rows), ""]
    checks = doc.get("acceptance", [])
    if checks:
        out += ["Acceptance (checked and recorded by the script):", ""]
        out += [f"- **{c['result']}** {c['criterion']}: {c['detail']}" for c in checks]
        out.append("")
    last = marks.get(str(max(steps)), {}).get("i_auroc_abs_diff", {})
    if last:
        out += ["R fidelity at the last step, per budget (samples per class; cells = classes measured): " +
                "; ".join(f"{k}: max {f3(v.get('max'))}, mean {f3(v.get('mean'))} ({v.get('cells')} cells)"
                          for k, v in last.items()), ""]
    return "\n".join(out)


def class_prediction(doc: dict[str, Any]) -> str:
    """The look-alike probe (probe_class_prediction.py): one row per way of naming a sample's class."""
    rows = doc.get("rows", [])
    if not rows:
        return ""
    d = doc.get("data", {})
    out = ["### Naming the class among many, look-alikes included (issue #17)", "", provenance("class_prediction.json", doc),
           "", f"Commit `{str(doc.get('commit', '?'))[:12]}`; the production model of the store that "
           f"`bench_scale.py --work {d.get('work', '?')}` left ({d.get('classes')} classes, "
           f"{d.get('train_per_class')} training samples each); every class's whole test split "
           f"({d.get('test_samples')} samples, a quarter good). Look-alike family: {', '.join(d.get('lookalike', []))}. "
           "Time: the class decision alone, from cached features.", "",
           table(["variant", "accuracy, all classes", "look-alike family", "ms per sample"],
                 [[r["variant"], f3(r.get("accuracy")), f3(r.get("accuracy_lookalike")), f"{r.get('ms_per_sample')}"]
                  for r in rows]), ""]
    return "\n".join(out)


def tuning_real(doc: dict[str, Any]) -> str:
    """The choices for real photographs (tune_real.py): painted defects on tire's held-out training normals."""
    runs = doc.get("runs", {})
    if not runs:
        return ""
    first = next(iter(runs.values()))
    commands = sorted({f"`{r['command']}`" for r in runs.values() if r.get("command")})
    commits = sorted({str(r.get("commit", "?"))[:12] for r in runs.values()})
    out = ["### Choices for real photographs: painted defects on held-out tire normals", "",
           f"Commands: {', '.join(commands) or 'not recorded'}. Machine: {machine_text(first.get('machine'))}. "
           f"Commit: {', '.join(commits)}. Source: `benchmarks/results/tuning_real.json`.", "",
           f"Data: {first.get('data')}. Fitted on the rest of tire's train split, calibrated on its validation "
           "normals; tire's test split is not read. These numbers choose the config; they are not results.", "",
           "Object region: RGB-only scoring inside the region where the class's normals have texture "
           "(`score.object_region`; runs made before it existed had none). The painted defects are centred in "
           "that textured region, so the region's gain here leans high. Backbone: `backbone.precision` (runs "
           "made before it existed computed features in float32).", "",
           table(["variant", "input", "lr", "epochs", "batch", "region", "backbone", "blocks", "learned I",
                  "learned AUPRO", "full I", "full P", "full AUPRO", "fit"],
                 [[name, *(str(r.get("settings", {}).get(k, "?")) for k in
                           ("backbone.input_size", "train.lr", "train.epochs", "train.batch_size")),
                   "on" if r.get("settings", {}).get("score.object_region") else "off",
                   r.get("settings", {}).get("backbone.precision", "float32"),  # float32 before the setting
                   str(r.get("settings", {}).get("model.depth", 2)),  # 2 VSS blocks before it was recorded
                   f3(r.get("learned", {}).get("i_auroc")), f3(r.get("learned", {}).get("aupro@0.3")),
                   f3(r["full"].get("i_auroc")), f3(r["full"].get("p_auroc")), f3(r["full"].get("aupro@0.3")),
                   secs(r.get("fit_s"))] for name, r in runs.items()]), ""]
    return "\n".join(out)


def small(results: Path) -> str:
    """One table for the data and metrics benchmarks that are present."""
    rows = []
    g = _load(results / "geometry.json")
    if g:
        for r in g.get("results", []):
            rows.append([f"geometry image, {r.get('case')}", "`python benchmarks/bench_geometry.py`",
                         f"{r.get('wall_median_ms', 0):.0f} ms median", machine_text(g.get("machine"))])
    s = _load(results / "synth.json")
    if s:
        rows.append([f"synthetic set, {s.get('classes')} classes x {s.get('samples', 0) // max(1, s.get('classes', 1))} "
                     f"samples at {s.get('size')} px", "`python benchmarks/bench_synth.py`",
                     f"{s.get('wall_s')} s (target {s.get('target_s')} s)", machine_text(s.get("machine"))])
    m = _load(results / "metrics.json")
    if m:
        for k, v in m.get("seconds_median", {}).items():
            rows.append([f"metrics: {k}", "`python benchmarks/bench_metrics.py`", f"{v:.2f} s median",
                         machine_text(m.get("machine"))])
    sc = _load(results / "scan.json")
    if sc:
        for case in sc.get("scan", [])[:1]:
            for backend in ("cpp", "torch_fallback", "reference"):
                t = case.get(backend, {})
                if t:
                    shape = ", ".join(f"{k} {v}" for k, v in (case.get("shape") or {}).items())
                    rows.append([f"selective scan ({backend}), {shape}", f"`{(sc.get('command') or '').strip()}`",
                                 ", ".join(f"{k} {v['median_s'] * 1000:.1f} ms" for k, v in t.items()
                                           if isinstance(v, dict) and "median_s" in v),
                                 machine_text(sc.get("machine"))])
    if not rows:
        return ""
    return "\n".join(["### Data, metrics and the scan kernel", "",
                      table(["what", "command", "result", "machine"], rows), ""])


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        print(f"warning: {path}: unreadable ({exc}); left out", file=sys.stderr)
        return None


SECTIONS = (("detector.json", detector),
            ("detector-fast-cpu.json", lambda d: detector(d, "detector-fast-cpu.json", "`configs/fast-cpu.yaml`")),
            ("ablation.json", ablation), ("incremental.json", incremental), ("protocol.json", protocol),
            ("serve.json", serve), ("memory.json", memory), ("scale.json", scale),
            ("class_prediction.json", class_prediction), ("tuning_real.json", tuning_real))
"""Results file -> its README section, in README order (the data and metrics files share `small`'s table)."""


def build(results: Path) -> str:
    parts = ["## Results", "",
             "Generated by `python benchmarks/make_results.py` from `benchmarks/results/*.json`; every table names "
             "the command and the machine that produced it. Metrics are fractions in [0, 1]; FM and BWT as in "
             "`iumad/eval/forgetting.py` (FM: higher = more forgetting; BWT: negative = forgetting).", ""]
    for name, fn in SECTIONS:
        doc = _load(results / name)
        if doc is not None:
            text = fn(doc)
            if name in STALE and text:
                title, rest = text.split("\n", 1)
                text = f"{title}\n\n**{STALE[name]}**\n{rest}"
            parts.append(text)
    parts.append(small(results))
    return "\n".join(p for p in parts if p is not None).rstrip() + "\n"


def replace_between_markers(text: str, section: str) -> str | None:
    """`text` with everything between the markers replaced by `section`; None without both markers."""
    start = text.find(START)
    end = text.find(END, start + len(START)) if start >= 0 else -1
    if start < 0 or end < 0:
        return None
    return text[:start + len(START)] + "\n" + section + text[end:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--write", type=Path, default=None, help="a Markdown file with the results markers")
    args = ap.parse_args(argv)
    section = build(args.results)
    if args.write is None:
        sys.stdout.write(section)
        return 0
    text = args.write.read_text(encoding="utf-8")
    new = replace_between_markers(text, section)
    if new is None:
        print(f"{args.write}: no '{START}' ... '{END}' markers; nothing written (add them where the "
              "section belongs)", file=sys.stderr)
        return 1
    if new != text:
        tmp = args.write.with_name(f".{args.write.name}.tmp")
        tmp.write_text(new, encoding="utf-8")
        tmp.replace(args.write)
    print(f"{args.write}: results section {'updated' if new != text else 'unchanged'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
