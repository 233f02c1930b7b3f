"""Rendering of :mod:`hal.migrate`'s report: plots (PNG), Markdown and one self-contained HTML page.

The report is a list of blocks (heading, paragraph, list, table, image) rendered
twice: Markdown for GitHub (plots inline as relative links) and HTML with the plots
embedded as base64, so the page is one file.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from hal.weights import atomic_savefig

Block = tuple[Any, ...]  # ("h", level, text) | ("p", text) | ("ul", items) | ("table", header, rows) | ("img", file, alt)


def _v(fig: dict[str, Any] | None, fmt: str = ",.3g") -> str:
    """A figure as text with its kind (``12.3 (measured)``), or ``-``."""
    if not fig or fig.get("value") is None:
        return "-"
    return f"{format(fig['value'], fmt)} ({fig['kind']})"


def _text(x: Any) -> str:
    """A capability as text: ``yes``/``no``, lists comma-separated."""
    if isinstance(x, bool):
        return "yes" if x else "no"
    return ", ".join(map(str, x)) if isinstance(x, list) else str(x)


# ---------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------


def plots(data: dict[str, Any], out: Path) -> dict[str, Path]:
    """The report's PNG plots under ``out`` (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    written = {}
    for name, draw in (("latency_vs_throughput", _latency_throughput), ("energy", _energy),
                       ("ipu_grad_accum", _grad_accum), ("ipu_stages", _stages), ("ipu_generations", _generations)):
        fig = draw(plt, data)
        if fig is None:
            continue
        path = out / f"{name}.png"
        fig.tight_layout()
        atomic_savefig(fig, path, dpi=110)
        plt.close(fig)
        written[name] = path
    return written


def _marker(kind: str) -> dict[str, Any]:
    return {"marker": "o"} if kind == "measured" else {"marker": "s", "facecolors": "none"}


def _bound(fig: dict[str, Any]) -> str:
    """``estimate, upper bound`` for a roofline bound, else the figure's kind."""
    return f"{fig['kind']}, {'lower' if 'lower bound' in fig['source'] else 'upper'} bound" \
        if "bound" in fig["source"].split(":")[0] else fig["kind"]


def _latency_throughput(plt: Any, data: dict[str, Any]) -> Any:
    """Each target's latency at batch 1 against its inference throughput at its best batch."""
    points = []
    for name, t in data["per_target"].items():
        perf = t["performance"].get("inference", {})
        lat, sps = perf.get("latency_b1_ms"), perf.get("samples_per_s")
        if lat and sps and lat["value"] and sps["value"]:
            points.append((name, perf["batch"], lat, sps))
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, (name, batch, lat, sps) in enumerate(points):
        ax.scatter(lat["value"], sps["value"], edgecolors=f"C{i}", **_marker(sps["kind"]))
        rate = format(sps["value"], ",.0f" if sps["value"] >= 100 else ".3g")
        ax.annotate(f"{name}\nbatch-1 latency {lat['value']:.3g} ms ({_bound(lat)})\nbest {rate} samples/s at "
                    f"batch {batch} ({_bound(sps)})", (lat["value"], sps["value"]), fontsize=6.5, xytext=(5, 3),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.margins(x=0.6, y=0.4)
    ax.set_xlabel("latency at batch 1, ms (lower is better)")
    ax.set_ylabel("inference samples/s at the best batch (higher is better)")
    ax.set_title(f"{data['model']}: latency at batch 1 vs best throughput (circles measured, squares estimates)",
                 fontsize=8)
    return fig


def _energy(plt: Any, data: dict[str, Any]) -> Any:
    bars = []
    for name, t in data["per_target"].items():
        for mode, e in t["energy"].items():
            fig = e.get("samples_per_joule")
            if fig and fig["value"]:
                bars.append((f"{name}\n{mode}", fig))
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(bars)), 3.6))
    for i, (label, f) in enumerate(bars):
        ax.bar(i, f["value"], color="C2" if f["kind"] == "measured" else "none", edgecolor="C2",
               hatch=None if f["kind"] == "measured" else "//")
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("samples per joule (higher is better)")
    ax.set_title(f"{data['model']}: energy efficiency (filled measured, hatched estimates)", fontsize=8)
    return fig


def _ipu_series(data: dict[str, Any], key: str) -> list[dict[str, Any]]:
    return (data.get("ipu_sweeps") or {}).get(key, [])


def _grad_accum(plt: Any, data: dict[str, Any]) -> Any:
    pts = _ipu_series(data, "grad_accum")
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for s in dict.fromkeys(p["stages"] for p in pts):
        ps = [p for p in pts if p["stages"] == s]
        ax.plot([p["grad_accum"] for p in ps], [p["samples_per_s"]["value"] for p in ps], "s--",
                label=f"{s} stage(s)" + ("" if all(p["fits"] for p in ps) else " (does not fit)"), fillstyle="none")
    base = data["ipu_sweeps"]["base"]
    ax.set_xscale("log", base=2)
    ax.set_xlabel("gradient accumulation G")
    ax.set_ylabel("training samples/s (estimate)")
    ax.set_title(f"{data['model']} on {base['ipu']}: micro-batch {base['micro_batch']}, {base['precision']} "
                 "(estimates)", fontsize=8)
    ax.legend(fontsize=7)
    return fig


def _stages(plt: Any, data: dict[str, Any]) -> Any:
    pts = _ipu_series(data, "stages")
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [p["stages"] for p in pts]
    ax.plot(xs, [p["samples_per_s"]["value"] for p in pts], "s--", fillstyle="none", label="samples/s (estimate)")
    for p in pts:
        ax.annotate(f"G={p['grad_accum']}, eff {p['efficiency']:.0%}" + ("" if p["fits"] else ", does not fit"),
                    (p["stages"], p["samples_per_s"]["value"]), fontsize=7, xytext=(4, -10),
                    textcoords="offset points")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("pipeline stages (IPUs per replica)")
    ax.set_ylabel("training samples/s (estimate)")
    ax.set_title(f"{data['model']} on {data['ipu_sweeps']['base']['ipu']}: throughput vs pipeline stages "
                 "(bubble G/(G+S-1))", fontsize=8)
    return fig


def _generations(plt: Any, data: dict[str, Any]) -> Any:
    pts = _ipu_series(data, "generations")
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.bar(range(len(pts)), [p["samples_per_s"]["value"] for p in pts], color="none", edgecolor="C1", hatch="//")
    ax.set_xticks(range(len(pts)), [p["ipu"] + ("" if p["fits"] else "\n(does not fit)") for p in pts])
    base = data["ipu_sweeps"]["base"]
    ax.set_ylabel("training samples/s (estimate)")
    ax.set_title(f"{data['model']}: same plan ({base['stages']} stage(s), G={base['grad_accum']}) on GC2, Mk2, Bow",
                 fontsize=8)
    return fig


# ---------------------------------------------------------------------------
# blocks
# ---------------------------------------------------------------------------


def blocks(data: dict[str, Any]) -> list[Block]:
    """The report's content, in order."""
    names = list(data["per_target"])
    per = data["per_target"]
    out: list[Block] = [
        ("h", 1, f"Migrating {data['model']}: {' -> '.join(names)}"),
        ("p", f"Model {data['model']} (input {tuple(data['input_shape'])}, {data['num_params']:,} parameters, spec "
              f"{data['spec_hash'][:12]}), generated {data['date']}. Every figure is labelled measured (timed, "
              "counted or read from a power counter on this machine) or estimate (planner bound, calibrated "
              "estimate, rated power x time). Targets not available here have estimates only."),
        ("table", ["target", "available here", "why not"],
         [[n, "yes" if t["available"] else "no", t["reason"] or "-"] for n, t in per.items()]),
        ("h", 2, "Coverage"),
        ("table", ["target", "unsupported nodes", "training", "precisions", "pipelining", "replication"],
         [[n, "; ".join(f"{k}: {v}" for k, v in t["coverage"]["unsupported"].items()) or "none",
           *(_text(t["coverage"]["capabilities"].get(k, "-")) for k in ("training", "precisions", "pipelining",
                                                                       "replication"))] for n, t in per.items()]),
    ]
    for n, t in per.items():
        if "batchnorm" in t["coverage"]:
            out.append(("p", f"{n}: BatchNorm {t['coverage']['batchnorm']}."))
    out.append(("h", 2, "What changes"))
    for n, t in per.items():
        out += [("h", 3, n), ("ul", t["changes"])]
    out += [("h", 2, "Effort (counted)"),
            ("p", "Non-blank code lines (docstrings and comments excluded) and distinct framework APIs (dotted names "
                  "rooted at a framework import), counted in the native baseline (bench/native/: only the functions "
                  "that run to build this model, predict and train one step, their classes and the imports and "
                  "constants they use), in the IPU SDK calls hal's backend makes, and in the hal code that replaces "
                  "them.")]
    rows = []
    for n, e in data["effort"].items():
        nat, sdk, hal = e["native"], e.get("ipu_sdk"), e["hal"]
        rows.append([n, nat.get("what", "-"), _v(nat.get("lines"), ",d"), _v(nat.get("framework_apis"), ",d"),
                     _v(sdk["framework_apis"], ",d") if sdk else "-", _v(hal["lines"], ",d"),
                     _v(hal["framework_apis"], ",d")])
    out.append(("table", ["target", "native code", "native lines", "native APIs", "IPU SDK APIs hal calls",
                          "hal lines", "hal framework APIs"], rows))
    out.append(("p", "The hal code, for every target (only the target string changes):"))
    out.append(("code", next(iter(data["effort"].values()))["hal"]["code"]))
    out += _numerics_blocks(data)
    out += _performance_blocks(data)
    out += _energy_blocks(data)
    return out


def _numerics_blocks(data: dict[str, Any]) -> list[Block]:
    num = data["numerics"]
    out: list[Block] = [("h", 2, "Numerics")]
    if num.get("per_target"):
        out.append(("p", f"Against the float64 reference, batch {num['batch']} (normalised max error; the "
                         "tolerance is 16x the float32 rounding floor measured on the spot, hal.parity)."))
        out.append(("table", ["target", "check", "error", "tolerance", "result"],
                    [[t, c, _v(r["error"], ".2e"), "-" if r["tolerance"] is None else f"{r['tolerance']:.1e}",
                      r["status"] + (f" ({r['note']})" if r["note"] else "")]
                     for t, checks in num["per_target"].items() for c, r in checks.items()]))
    else:
        out.append(("p", num.get("note", "nothing measured")))
    pair = num.get("pair")
    if pair and "error" in pair:
        out.append(("p", f"{' vs '.join(pair['targets'])}: {pair['error']}"))
    elif pair:
        out.append(("p", f"{pair['targets'][0]} against {pair['targets'][1]} directly (inference forward, same "
                         f"weights and batch): {_v(pair['forward'], '.2e')}, tolerance {pair['tolerance']:.1e} "
                         f"(twice each target's): {'PASS' if pair['passed'] else 'FAIL'}."))
    unmeasured = [n for n, t in data["per_target"].items() if not t["available"]]
    if unmeasured:
        out.append(("p", f"Not measured here (not available): {', '.join(unmeasured)}."))
    out.append(("p", "Known sources of difference:"))
    out.append(("ul", [f"{k}: {d}" for k, ds in num["known_differences"].items() for d in ds]))
    return out


def _performance_blocks(data: dict[str, Any]) -> list[Block]:
    out: list[Block] = [("h", 2, "Performance")]
    rows = []
    for n, t in data["per_target"].items():
        for mode, p in t["performance"].items():
            if "error" in p:
                rows.append([n, mode, "-", "-", "-", "-", p["error"]])
                continue
            rows.append([n, mode, p["batch"], _v(p.get("samples_per_s"), ",.1f"), _v(p.get("latency_b1_ms"), ".3g"),
                         _v(p.get("roofline_bound"), ",.0f"), p["samples_per_s"]["source"]])
    out.append(("p", "Training at the report's batch (the micro-batch on IPUs); inference at the best of the batches "
                     f"{', '.join(map(str, data['settings']['batches']))} (highest samples/s; on IPUs the best that "
                     "fits), with the latency at batch 1 beside it. A roofline bound counts FLOPs and memory "
                     "traffic only (no host transfer, launch or synchronisation), so for a small model or batch it "
                     "is far above the throughput (below the latency) hardware reaches; IPU inference has no "
                     "calibrated estimate (Graphcore's training figures calibrate training only)."))
    out.append(("table", ["target", "mode", "batch", "samples/s", "batch-1 latency ms", "roofline bound samples/s",
                          "how"], rows))
    sweep_rows = [[n, s["batch"], "error: " + s["error"] if "error" in s else _v(s["samples_per_s"], ",.1f")
                   + ("" if s.get("fits", True) else " (does not fit)")]
                  for n, t in data["per_target"].items()
                  for s in t["performance"].get("inference", {}).get("sweep", [])]
    if sweep_rows:
        out += [("p", "Inference throughput per batch:"), ("table", ["target", "batch", "samples/s"], sweep_rows)]
    env = data.get("env")
    if env:
        out.append(("p", "Measured on: " + ", ".join(f"{k} {v}" for k, v in env.items())
                    + ". Timings on a shared machine: see the load averages."))
    out.append(("img", "latency_vs_throughput.png", "latency at batch 1 against throughput"))
    sweeps = data.get("ipu_sweeps")
    if sweeps:
        plan = next((t["plan"] for t in data["per_target"].values() if "plan" in t), None)
        if plan:
            out.append(("p", f"IPU plan ({sweeps['framework']} rules): {plan['verdict']} "
                             f"{plan['batch']['explanation']}"))
        out += [("p", "Throughput against gradient accumulation (the pipeline bubble shrinks as G grows), against "
                      "pipeline stages, and across IPU generations for the same plan, all estimates:"),
                ("img", "ipu_grad_accum.png", "throughput vs gradient accumulation"),
                ("img", "ipu_stages.png", "throughput vs pipeline stages"),
                ("img", "ipu_generations.png", "Bow vs Mk2 vs GC2"),
                ("table", ["IPU", "stages", "G", "fits", "samples/s", "roofline bound"],
                 [[p["ipu"], p["stages"], p["grad_accum"], "yes" if p["fits"] else "no", _v(p["samples_per_s"], ",.0f"),
                   _v(p["roofline_bound"], ",.0f")] for p in sweeps["generations"]])]
    return out


def _energy_blocks(data: dict[str, Any]) -> list[Block]:
    rows = []
    for n, t in data["per_target"].items():
        for mode, e in t["energy"].items():
            if "error" in e:
                rows.append([n, mode, "n/a", "n/a", e["error"]])
            else:
                rows.append([n, mode, _v(e["joules_per_sample"], ".3g"), _v(e["samples_per_joule"], ".3g"),
                             e["joules_per_sample"]["source"]])
    return [("h", 2, "Energy"),
            ("p", "Joules per sample: measured through NVML (NVIDIA GPUs) or RAPL powercap (Linux CPUs) where the "
                  "hardware exposes it, otherwise rated power x time, labelled estimate (an upper bound for a busy "
                  "chip)."),
            ("table", ["target", "mode", "J/sample", "samples/J", "how"], rows),
            ("img", "energy.png", "samples per joule")]


# ---------------------------------------------------------------------------
# Markdown and HTML
# ---------------------------------------------------------------------------


def _cell(x: Any) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def markdown(content: list[Block], images: set[str] | None = None) -> str:
    """GitHub Markdown; an image block is kept only if its file is in ``images`` (None: all)."""
    out = []
    for b in content:
        if b[0] == "h":
            out.append(f"{'#' * b[1]} {b[2]}")
        elif b[0] == "p":
            out.append(b[1])
        elif b[0] == "ul":
            out.append("\n".join(f"- {i}" for i in b[1]))
        elif b[0] == "code":
            out.append(f"```python\n{b[1]}```")
        elif b[0] == "table":
            out.append("\n".join([f"| {' | '.join(map(_cell, b[1]))} |", "|" + "---|" * len(b[1]),
                                  *(f"| {' | '.join(map(_cell, r))} |" for r in b[2])]))
        elif b[0] == "img" and (images is None or b[1] in images):
            out.append(f"![{b[2]}]({b[1]})")
    return "\n\n".join(out) + "\n"


def html_page(content: list[Block], folder: Path, title: str) -> str:
    """One self-contained HTML page: plots from ``folder`` embedded as base64 PNG."""
    e = html.escape
    body = []
    for b in content:
        if b[0] == "h":
            body.append(f"<h{b[1]}>{e(b[2])}</h{b[1]}>")
        elif b[0] == "p":
            body.append(f"<p>{e(b[1])}</p>")
        elif b[0] == "ul":
            body.append("<ul>" + "".join(f"<li>{e(str(i))}</li>" for i in b[1]) + "</ul>")
        elif b[0] == "code":
            body.append(f"<pre><code>{e(b[1])}</code></pre>")
        elif b[0] == "table":
            head = "".join(f"<th>{e(str(h))}</th>" for h in b[1])
            rows = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in b[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif b[0] == "img" and (folder / b[1]).is_file():
            data = base64.b64encode((folder / b[1]).read_bytes()).decode()
            body.append(f'<p><img alt="{e(b[2])}" src="data:image/png;base64,{data}"></p>')
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
             "table{border-collapse:collapse;font-size:0.85em}td,th{border:1px solid #ccc;padding:3px 6px}"
             "img{max-width:100%}pre{background:#f4f4f4;padding:8px}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{e(title)}</title><style>{style}</style>"
            f"</head><body>\n" + "\n".join(body) + "\n</body></html>\n")
