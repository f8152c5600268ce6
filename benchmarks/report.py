"""From the workers' JSON to the ratio tables (Markdown), the combined JSON and the plot (PNG)."""

from __future__ import annotations

from benchmarks.config import (
    BACKEND_LABELS,
    FORMS,
    IMPL_DETAILS,
    IMPL_LABELS,
    IMPLS,
    MEMORY_TARGET,
    MODE_LABELS,
    TARGETS,
    mask_mb,
    target_for,
)

COMPETITORS = [i for i in IMPLS if i != "ours"]
SHORT = {"native": "native", "masked": "masked", "gather_scatter": "gather-scatter", "floor": "x*a+b"}


def ratio(row: dict, competitor: str) -> float | None:
    ours, other = row["impls"].get("ours", {}), row["impls"].get(competitor, {})
    if "median_ms" in ours and other.get("median_ms"):
        return ours["median_ms"] / other["median_ms"]
    return None


def ratio_of_mins(row: dict, competitor: str) -> float | None:
    """ours / competitor on the fastest round of each: less sensitive to other processes' load."""
    ours, other = row["impls"].get("ours", {}), row["impls"].get(competitor, {})
    if "min_ms" in ours and other.get("min_ms"):
        return ours["min_ms"] / other["min_ms"]
    return None


def verdict(value: float | None, bound: float | None) -> str:
    if value is None or bound is None:
        return ""
    return "pass" if value <= bound else "MISS"


def _ms(cell: dict | None) -> str:
    if not cell:
        return ""
    if "median_ms" in cell:
        v = cell["median_ms"]
        return f"{v:.3g}" if v < 100 else f"{v:.0f}"
    if "na" in cell:
        return "n/a"
    if "error" in cell:
        return "error"
    return ""


def _r(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _pad(p: float) -> str:
    return f"{round(p * 100)} %"


def find_row(payload: dict, shape: str, dtype: str, form: str, mode: str, padding: float) -> dict | None:
    for row in payload.get("rows", []):
        if (row["shape"], row["dtype"], row["form"], row["mode"]) == (shape, dtype, form, mode) and abs(
            row["padding"] - padding
        ) < 1e-9:
            return row
    return None


def headline(results: dict, cfg: dict) -> list[dict]:
    """One entry per backend and mode: the headline configuration's ratios and verdicts."""
    h = cfg["headline"]
    out = []
    for backend, payload in results.items():
        for mode in cfg["modes"]:
            entry: dict = {"backend": backend, "mode": mode, "status": payload.get("status")}
            form = h["form"] if h["form"] in cfg["forms"].get(backend, []) else None
            entry["form"] = form
            row = None
            if payload.get("status") in ("ok", "timed out", "failed") and form is not None:
                row = find_row(payload, h["shape"], h["dtype"], form, mode, h["padding"])
            if row is None:
                if form is None:
                    entry["status"] = "compiled form not run"
                out.append(entry)
                continue
            entry["ms"] = {k: v.get("median_ms") for k, v in row["impls"].items() if "median_ms" in v}
            # the compile happens in the group's first padding
            first = find_row(payload, h["shape"], h["dtype"], form, mode, cfg["paddings"][0]) or row
            entry["first_call_ms"] = {k: v.get("first_call_ms") for k, v in first["impls"].items()}
            entry["peak_mb"] = {k: v["peak_mb"] for k, v in row["impls"].items() if "peak_mb" in v}
            entry["ratios"] = {}
            for comp in COMPETITORS:
                value, bound = ratio(row, comp), target_for(comp, mode, h["padding"])
                reason = row["impls"].get(comp, {}).get("na") or row["impls"].get(comp, {}).get("error")
                by_min = ratio_of_mins(row, comp)
                entry["ratios"][comp] = {
                    "ratio": None if value is None else round(value, 4),
                    "ratio_of_mins": None if by_min is None else round(by_min, 4),
                    "target": bound,
                    "verdict": verdict(value, bound) or None,
                    "note": reason,
                }
            # the fastest native form, for backends whose compiled native BN is slower than another form
            natives = []
            for f in cfg["forms"].get(backend, []):
                r = find_row(payload, h["shape"], h["dtype"], f, mode, h["padding"])
                if r and "median_ms" in r["impls"].get("native", {}):
                    natives.append((r["impls"]["native"]["median_ms"], f))
            if natives and "median_ms" in row["impls"].get("ours", {}):
                best_ms, best_form = min(natives)
                entry["vs_fastest_native"] = {
                    "form": best_form,
                    "native_ms": best_ms,
                    "ratio": round(row["impls"]["ours"]["median_ms"] / best_ms, 4),
                }
            entry["repeats"] = row.get("repeats")
            out.append(entry)
    return out


def targets_line() -> str:
    """The issue's targets, in words (one place: config.TARGETS)."""

    def one(t):
        where = "" if t["max_padding"] >= 1.0 else f" at <= {_pad(t['max_padding'])} padding"
        return f"ours / {SHORT[t['competitor']]} <= {t['bound']}{where}"

    parts = [
        f"{MODE_LABELS[mode]}: " + ", ".join(one(t) for t in TARGETS if t["mode"] == mode)
        for mode in ("train", "infer")
    ]
    return (
        "Targets (issue 13, contract 1a), same form, every grid row: "
        + "; ".join(parts)
        + f"; peak memory of a training step: {MEMORY_TARGET}."
    )


def _row_label(row: dict, shape_labels: dict) -> str:
    return f"{shape_labels.get(row['shape'], row['shape'])} {row['dtype']} {_pad(row['padding'])}"


def worst(results: dict, cfg: dict) -> list[dict]:
    """Per backend, form and mode: the WORST ours / competitor over the grid for every target
    (rows the target applies to), where it occurs, and the verdict; and the worst peak-memory
    excess over native + one mask-sized buffer (training)."""
    shape_labels = {s["id"]: s["label"] for s in cfg["shapes"]}
    specs = {s["id"]: s for s in cfg["shapes"]}
    out = []
    for backend, payload in results.items():
        for form in cfg["forms"].get(backend, []):
            for mode in cfg["modes"]:
                rows = [r for r in payload.get("rows", []) if r["form"] == form and r["mode"] == mode]
                if not rows:
                    continue
                entry: dict = {"backend": backend, "form": form, "mode": mode, "rows": len(rows), "ratios": {}}
                for t in (t for t in TARGETS if t["mode"] == mode):
                    comp = t["competitor"]
                    cands = [
                        (value, r)
                        for r in rows
                        if r["padding"] <= t["max_padding"] + 1e-9 and (value := ratio(r, comp)) is not None
                    ]
                    if not cands:
                        entry["ratios"][comp] = {"ratio": None, "target": t["bound"], "verdict": None, "at": None}
                        continue
                    value, r = max(cands, key=lambda c: c[0])
                    entry["ratios"][comp] = {
                        "ratio": round(value, 4),
                        "target": t["bound"],
                        "verdict": verdict(value, t["bound"]),
                        "at": _row_label(r, shape_labels),
                        "of": len(cands),
                    }
                if mode == "train":
                    excess = []
                    for r in rows:
                        pk = {k: v["peak_mb"] for k, v in r["impls"].items() if "peak_mb" in v}
                        if "ours" in pk and "native" in pk and r["shape"] in specs:
                            spec = specs[r["shape"]]
                            allowed = pk["native"] + mask_mb(spec["shape"], spec["channel_axis"])
                            excess.append((pk["ours"] - allowed, pk["ours"], pk["native"], r))
                    if excess:
                        e, ours_mb, native_mb, r = max(excess, key=lambda c: c[0])
                        entry["memory"] = {
                            "excess_mb": round(e, 3),
                            "ours_mb": ours_mb,
                            "native_mb": native_mb,
                            "verdict": "pass" if e <= 1e-9 else "MISS",
                            "at": _row_label(r, shape_labels),
                        }
                out.append(entry)
    return out


def summary_lines(results: dict, cfg: dict) -> list[str]:
    """The summary table: per backend and form, the worst same-form ratio over the grid."""
    lines = [
        "## Summary: worst same-form ratio over the grid",
        "",
        "Per backend, form and mode, the largest ours / competitor over every grid row the target applies "
        "to (shapes, dtypes, paddings of this run; gather-scatter at <= 50 % padding), where it occurs, "
        "and the verdict; memory: the largest excess of ours' training-step peak over native's + one "
        "mask-sized buffer (measured at the headline padding).",
        "",
        "| backend | form | mode | worst ours/native | worst ours/gather-scatter | worst ours/x*a+b "
        "| peak memory vs native + mask | rows |",
        "|---|---|---|---|---|---|---|--:|",
    ]

    def cell(r):
        if not r or r["ratio"] is None:
            return "n/a"
        return f"{r['ratio']:.2f} **{r['verdict']}** (<= {r['target']}) at {r['at']}"

    for e in worst(results, cfg):
        mem = e.get("memory")
        mem_cell = (
            f"{mem['ours_mb']:.3g} / {mem['native_mb']:.3g} MB: **{mem['verdict']}** at {mem['at']}" if mem else ""
        )
        comps = e["ratios"]
        lines.append(
            f"| {e['backend']} | {FORMS.get(e['backend'], {}).get(e['form'], e['form'])} | {e['mode']} | "
            f"{cell(comps.get('native'))} | {cell(comps.get('gather_scatter'))} | "
            f"{cell(comps.get('floor')) if e['mode'] == 'train' else ''} | {mem_cell} | {e['rows']} |"
        )
    lines.append("")
    return lines


def markdown(results: dict, cfg: dict, meta: dict) -> str:
    h = cfg["headline"]
    shape_labels = {s["id"]: s["label"] for s in cfg["shapes"]}
    lines = ["# maskbn benchmarks", ""]
    lines += [
        f"Run {meta['date']} on {meta['machine']}, code at {meta.get('git', '?')}; "
        f"wall time {meta['elapsed_s']:.0f} s"
        + (" (**--quick**: tiny shapes, 1-2 repeats; the numbers mean nothing)" if cfg.get("quick") else "")
        + (
            " (**reduced grid**: "
            + ", ".join(s["id"] for s in cfg["shapes"])
            + "; "
            + ", ".join(cfg["dtypes"])
            + "; padding "
            + ", ".join(_pad(p) for p in cfg["paddings"])
            + ")"
            if cfg.get("reduced")
            else ""
        )
        + ".",
        "",
        "Each backend runs in its own process. Within a group (backend, form, mode, shape, dtype, padding) "
        "every competitor is timed on the same tensors in the same process, interleaved (each round calls "
        "each competitor once, in a rotating order), after warm-up (the first call compiles); the figures "
        f"are medians of {cfg['min_repeats']}-{cfg['max_repeats']} rounds (the count per group fits a "
        "time budget; column n). Ratio = ours / competitor: below 1 means ours is faster. The machine is "
        "shared (load averages below): the headline also gives the ratio of the fastest rounds, which "
        "other processes disturb least.",
        "",
    ]
    for backend, payload in results.items():
        status = payload.get("status")
        info = ", ".join(f"{k} {v}" for k, v in payload.get("info", {}).items() if k not in ("platform", "processor"))
        load = payload.get("loadavg_start"), payload.get("loadavg_end")
        if all(load):
            info += f"; 1-min load average {load[0][0]:.1f} -> {load[1][0]:.1f} (2 cores shared)"
        if status == "ok":
            lines.append(f"- **{backend}**: {info}; {payload.get('elapsed_s', 0):.0f} s")
        else:
            reason = payload.get("reason", "")
            lines.append(
                f"- **{backend}**: **{status}**" + (f" ({reason})" if reason else "") + (f"; {info}" if info else "")
            )
    lines.append("")

    # -- headline -----------------------------------------------------------------------------
    lines += [
        f"## Headline: compiled form, {h['dtype']}, {shape_labels.get(h['shape'], h['shape'])}, "
        f"{_pad(h['padding'])} padding",
        "",
        targets_line(),
        "",
        "| backend | form | mode | ours ms | native ms | ours/native | ours/masked | ours/gather-scatter "
        "| ours/x*a+b | ours/native, fastest rounds | peak MB ours / native | n |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for e in headline(results, cfg):
        form = FORMS.get(e["backend"], {}).get(e["form"], e["form"] or "-")
        if "ratios" not in e:
            why = e["status"] if e["status"] not in ("ok", None) else "no result"
            form = form if e["form"] else "-"
            lines.append(f"| {e['backend']} | {form} | {e['mode']} | {why} | | | | | | | | |")
            continue
        cells = []
        for comp in COMPETITORS:
            r = e["ratios"][comp]
            if r["ratio"] is None:
                cells.append("n/a" if r["note"] else "")
            else:
                v = r["verdict"]
                cells.append(f"{r['ratio']:.2f}" + (f" **{v}** (<= {r['target']})" if v else ""))
        pk = e.get("peak_mb", {})
        mem = f"{pk['ours']:.3g} / {pk['native']:.3g}" if "ours" in pk and "native" in pk else "n/a"
        ms = e["ms"]
        lines.append(
            f"| {e['backend']} | {form} | {e['mode']} | {ms.get('ours', float('nan')):.2f} | "
            f"{ms.get('native', float('nan')):.2f} | "
            + " | ".join(cells)
            + f" | {_r(e['ratios']['native']['ratio_of_mins'])} | {mem} | {e.get('repeats')} |"
        )
    lines.append("")
    extra = []
    for e in headline(results, cfg):
        fast = e.get("vs_fastest_native")
        if fast and fast["form"] != e["form"]:
            extra.append(
                f"- {e['backend']} {e['mode']}: the fastest native BN here is the "
                f"{FORMS[e['backend']][fast['form']]} form ({fast['native_ms']:.2f} ms); "
                f"ours compiled / that = {fast['ratio']:.2f}"
            )
        first = e.get("first_call_ms") or {}
        if first.get("ours") is not None and first.get("native") is not None:
            extra.append(
                f"- {e['backend']} {e['mode']}: first call (includes compiling) ours {first['ours'] / 1e3:.1f} s, "
                f"native {first['native'] / 1e3:.1f} s"
            )
    if extra:
        lines += [*extra, ""]

    lines += summary_lines(results, cfg)

    # -- every group --------------------------------------------------------------------------
    for backend, payload in results.items():
        lines += [f"## {backend}: {BACKEND_LABELS[backend]}", ""]
        if payload.get("status") == "not installed":
            lines += [f"Not installed: {payload.get('reason', '')}", ""]
            continue
        if payload.get("status") != "ok":
            lines += [f"**{payload.get('status')}**: {payload.get('reason', '')} (rows below are what finished)", ""]
        details = IMPL_DETAILS[backend]
        lines += [f"- {IMPL_LABELS[i]}: {details[i]}" for i in IMPLS if details.get(i)]
        lines += [f"- peak memory: {payload.get('memory_method', 'n/a')}", ""]
        lines += [
            "| form | mode | shape | dtype | pad | ours ms | native | masked | gather-scatter | x*a+b "
            "| /native | /masked | /gather-scatter | /x*a+b | peak MB ours / native | n |",
            "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        notes: dict[str, str] = {}
        for row in payload.get("rows", []):
            cells = [_ms(row["impls"].get(i)) for i in IMPLS]
            rats = []
            for comp in COMPETITORS:
                value = ratio(row, comp)
                v = verdict(value, target_for(comp, row["mode"], row["padding"]))
                na = "na" in row["impls"].get(comp, {})
                rats.append("n/a" if na else _r(value) + (" x" if v == "MISS" else ""))
            for impl, cell in row["impls"].items():
                for key in ("na", "error"):
                    if key in cell:
                        notes.setdefault(f"{impl}: {cell[key]}", "")
            pk = {k: v["peak_mb"] for k, v in row["impls"].items() if "peak_mb" in v}
            mem = f"{pk['ours']:.3g} / {pk['native']:.3g}" if "ours" in pk and "native" in pk else ""
            lines.append(
                f"| {FORMS[backend].get(row['form'], row['form'])} | {row['mode']} | "
                f"{shape_labels.get(row['shape'], row['shape'])} | {row['dtype']} | {_pad(row['padding'])} | "
                + " | ".join(cells)
                + " | "
                + " | ".join(rats)
                + f" | {mem} | {row['repeats']} |"
            )
        lines.append("")
        lines.append("Ratios marked x miss the issue's target for that mode (the targets apply to every row here).")
        if notes:
            lines += ["", "Notes:", *[f"- {n}" for n in notes]]
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, cfg: dict, path) -> str | None:
    """Ratio ours / native (solid) and ours / existing masked option (dashed) against the padding
    fraction, compiled form, float32, one column per backend; returns None or why there is no plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FormatStrFormatter
    except ImportError:
        return "matplotlib is not installed: no plot"
    backends = [b for b, p in results.items() if p.get("rows")]
    if not backends:
        return "no results to plot"
    modes = cfg["modes"]
    fig, axes = plt.subplots(
        len(modes), len(backends), figsize=(4.2 * len(backends), 3.2 * len(modes)), squeeze=False, sharey="row"
    )
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    dtype = cfg["headline"]["dtype"]
    for j, backend in enumerate(backends):
        payload = results[backend]
        form = cfg["headline"]["form"] if cfg["headline"]["form"] in cfg["forms"][backend] else cfg["forms"][backend][0]
        for i, mode in enumerate(modes):
            ax = axes[i][j]
            for k, spec in enumerate(cfg["shapes"]):
                for comp, style in (("native", "-"), ("masked", "--")):
                    xs, ys = [], []
                    for pad in cfg["paddings"]:
                        row = find_row(payload, spec["id"], dtype, form, mode, pad)
                        value = None if row is None else ratio(row, comp)
                        if value is not None:
                            xs.append(pad * 100)
                            ys.append(value)
                    if xs:
                        label = spec["label"] if comp == "native" else f"{spec['label']} vs masked"
                        ax.plot(xs, ys, style, marker="o", color=colors[k % len(colors)], label=label)
            bound = target_for("native", mode)
            if bound:
                ax.axhline(bound, color="k", lw=0.8, ls=":", label=f"target vs native ({bound})")
            ax.axhline(1.0, color="grey", lw=0.5)
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FormatStrFormatter("%.2g"))
            ax.yaxis.set_minor_formatter(FormatStrFormatter("%.2g"))
            ax.tick_params(axis="y", which="minor", labelsize=7)
            ax.set_title(f"{backend}: {FORMS[backend].get(form, form)}\n{MODE_LABELS[mode]}, {dtype}", fontsize=9)
            ax.set_xlabel("padding (%)")
            if j == 0:
                ax.set_ylabel("ours / competitor (median time)")
            ax.grid(True, which="both", alpha=0.3)
    handles, labels = [], []
    for row in axes:
        for ax in row:
            for hnd, lab in zip(*ax.get_legend_handles_labels()):
                if lab not in labels:
                    handles.append(hnd)
                    labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return None
