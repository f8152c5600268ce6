"""``python -m benchmarks``: run each backend's worker in its own subprocess, then write
``results.md`` (ratio tables), ``results.json`` and ``ratio_vs_padding.png`` under ``--out``."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.config import BACKEND_LABELS, BACKENDS, make_config
from benchmarks.report import headline, markdown, plot, worst

ROOT = Path(__file__).resolve().parent.parent

#: how the overall time limit is shared: each backend's worker gets its weight's share of what is
#: left when it starts (what one leaves unused goes to the next); the repeats adapt to 75 % of it
WEIGHTS = {"torch": 0.5, "tf": 0.3, "jax": 0.2}
#: seconds for all workers together: with ~80 s of installs, `tox -e bench` stays under 10 minutes
DEFAULT_TIME_LIMIT = 480.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--out", default="benchmarks/results", help="output folder (default: benchmarks/results)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, float32, 1-2 repeats: a smoke test")
    p.add_argument(
        "--backends", default=",".join(BACKENDS), help=f"comma-separated subset of {','.join(BACKENDS)} (default: all)"
    )
    p.add_argument(
        "--python",
        action="append",
        default=[],
        metavar="BACKEND=EXE",
        help="interpreter for a backend's worker (default: this one), e.g. --python tf=/root/venvs/tf/bin/python",
    )
    p.add_argument(
        "--headline",
        action="store_true",
        help="only the headline shape, dtype and padding (every form), with up to 31 rounds: checks the targets fast",
    )
    p.add_argument(
        "--shapes", default=None, help="reduced grid: comma-separated shape ids (e.g. 16x4096x64,32x64x32x32)"
    )
    p.add_argument("--dtypes", default=None, help="reduced grid: comma-separated dtypes (float32,bfloat16)")
    p.add_argument("--paddings", default=None, help="reduced grid: comma-separated padding fractions (e.g. 0,0.5)")
    p.add_argument(
        "--torch-compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="time the torch.compile form (default: on, off with --quick)",
    )
    p.add_argument(
        "--torch-compile-bf16",
        action="store_true",
        help="also time torch.compile in bfloat16 (adds several minutes of compiling on 2 cores)",
    )
    p.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help=f"seconds for all workers together (default {DEFAULT_TIME_LIMIT:.0f}; 300 with --quick); a worker "
        "stopped at its share keeps the groups it finished, the headline ones first",
    )
    p.add_argument(
        "--render",
        action="store_true",
        help="run nothing: rewrite results.md and the plot from the results.json already in --out",
    )
    p.add_argument("--budget", type=float, default=None, help="seconds per backend the repeats adapt to (overrides)")
    p.add_argument("--timeout", type=float, default=None, help="hard limit per backend worker in seconds (overrides)")
    return p.parse_args(argv)


def grid_kwargs(args: argparse.Namespace) -> dict:
    """make_config's reduced-grid arguments from the command line (None: the full grid)."""

    def items(value):
        return None if value is None else [v.strip() for v in value.split(",") if v.strip()]

    paddings = items(args.paddings)
    return {
        "shapes": items(args.shapes),
        "dtypes": items(args.dtypes),
        "paddings": None if paddings is None else [float(p) for p in paddings],
    }


def worker_env(backend: str) -> dict[str, str]:
    """The environment of a backend's subprocess: this tree importable, Keras on TensorFlow for tf."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if backend == "tf":
        env["KERAS_BACKEND"] = "tensorflow"
    return env


def _run_worker(backend: str, exe: str, cfg_path: Path, out_json: Path, log_path: Path, timeout: float) -> dict:
    env = worker_env(backend)
    out_json.unlink(missing_ok=True)
    cmd = [exe, "-m", "benchmarks.worker", backend, str(cfg_path), str(out_json)]
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        except OSError as exc:
            return {
                "backend": backend,
                "rows": [],
                "python": exe,
                "wall_s": 0.0,
                "status": "failed",
                "reason": f"cannot start {exe}: {exc}",
            }
        try:
            rc = proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: the worker and its compile workers
            try:
                rc = proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
            timed_out = True
    wall = time.perf_counter() - t0
    payload: dict = {}
    if out_json.exists():
        try:
            payload = json.loads(out_json.read_text())
        except json.JSONDecodeError:
            payload = {}
    payload.setdefault("backend", backend)
    payload.setdefault("rows", [])
    payload["python"] = exe
    payload["wall_s"] = round(wall, 1)
    tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
    planned = payload.get("groups_planned")
    if timed_out and planned is not None and len(payload["rows"]) >= planned:
        payload["status"] = "ok"  # every group finished; only the process exit was cut short
    elif timed_out:
        payload["status"] = "timed out"
        payload["reason"] = (
            f"stopped at its {timeout:.0f} s share of --time-limit; {len(payload['rows'])} of "
            f"{planned if planned is not None else '?'} groups finished (the compiled form first)"
        )
    elif payload.get("status") not in ("ok", "not installed"):
        payload["status"] = "failed"
        payload["reason"] = f"worker exit code {rc}: " + " / ".join(tail)[-500:]
    return payload


def git_state() -> str:
    """The commit measured, and which backend folders had uncommitted changes (they are measured too)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "impl_torch", "impl_tf", "impl_jax"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git)"
    folders = sorted({line[3:].split("/")[0] for line in dirty if line.strip()})
    return head + (f" + uncommitted changes in {', '.join(folders)}" if folders else "")


def write_report(out: Path, results: dict, cfg: dict, meta: dict) -> tuple[str, str | None]:
    """results.md and ratio_vs_padding.png under ``out``; returns the Markdown and why there is no plot."""
    png = out / "ratio_vs_padding.png"
    plot_note = plot(results, cfg, png)
    md = markdown(results, cfg, meta)
    md += f"\n\nPlot: {plot_note}\n" if plot_note else f"\n\n![ours / native BN vs padding]({png.name})\n"
    (out / "results.md").write_text(md)
    return md, plot_note


def render(out: Path) -> int:
    """``--render``: the Markdown and the plot again, from a saved results.json."""
    path = out / "results.json"
    if not path.exists():
        print(f"no {path} to render", file=sys.stderr)
        return 2
    data = json.loads(path.read_text())
    _, plot_note = write_report(out, data["backends"], data["config"], data["meta"])
    print(
        f"[bench] wrote {out / 'results.md'}"
        + (f" ({plot_note})" if plot_note else f", {out / 'ratio_vs_padding.png'}")
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        print(f"unknown backend(s) {unknown}; choose from {list(BACKENDS)}", file=sys.stderr)
        return 2
    pythons = {}
    for item in args.python:
        name, _, exe = item.partition("=")
        if name not in BACKENDS or not exe:
            print(f"--python takes BACKEND=EXE with BACKEND in {list(BACKENDS)}, got {item!r}", file=sys.stderr)
            return 2
        pythons[name] = exe

    try:
        grid = grid_kwargs(args)
        make_config(quick=args.quick, **grid)
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    out = Path(args.out)
    if args.render:
        return render(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results: dict = {}
    cfgs: dict = {}
    limit = args.time_limit
    if limit is None:
        limit = 300.0 if args.quick or args.headline else DEFAULT_TIME_LIMIT
    for i, backend in enumerate(backends):
        left = limit - (time.perf_counter() - t0)
        share = max(left * WEIGHTS[backend] / sum(WEIGHTS[b] for b in backends[i:]), 30.0)
        budget = args.budget if args.budget is not None else (1.0 if args.quick else 0.75 * share)
        timeout = args.timeout if args.timeout is not None else share
        cfg = make_config(
            quick=args.quick,
            torch_compile=args.torch_compile,
            budget_s=budget,
            torch_compile_bf16=args.torch_compile_bf16,
            headline_only=args.headline,
            **grid,
        )
        cfgs[backend] = cfg
        cfg_path = out / f"config_{backend}.json"
        cfg_path.write_text(json.dumps(cfg, indent=1))
        exe = pythons.get(backend, sys.executable)
        print(f"[bench] {backend}: {BACKEND_LABELS[backend]} with {exe}, up to {timeout:.0f} s ...", flush=True)
        payload = _run_worker(
            backend, exe, cfg_path, out / f"raw_{backend}.json", out / f"worker_{backend}.log", timeout
        )
        results[backend] = payload
        print(
            f"[bench] {backend}: {payload['status']} in {payload['wall_s']:.0f} s, {len(payload['rows'])} groups"
            + (f" ({payload.get('reason')})" if payload["status"] != "ok" else ""),
            flush=True,
        )

    cfg = make_config(
        quick=args.quick,
        torch_compile=args.torch_compile,
        torch_compile_bf16=args.torch_compile_bf16,
        headline_only=args.headline,
        **grid,
    )
    cfg["forms"] = {b: c["forms"][b] for b, c in cfgs.items()} | {b: [] for b in BACKENDS if b not in cfgs}
    meta = {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} (no GPU)",
        "elapsed_s": time.perf_counter() - t0,
        "python": sys.version.split()[0],
        "git": git_state(),
    }
    meta["elapsed_s"] = time.perf_counter() - t0
    md, plot_note = write_report(out, results, cfg, meta)
    combined = {
        "meta": meta,
        "config": cfg,
        "time_limit_s": limit,
        "budgets": {b: c["budget_s"] for b, c in cfgs.items()},
        "headline": headline(results, cfg),
        "worst": worst(results, cfg),
        "backends": results,
    }
    (out / "results.json").write_text(json.dumps(combined, indent=1))
    print(md)
    png = out / "ratio_vs_padding.png"
    print(f"[bench] wrote {out / 'results.md'}, {out / 'results.json'}" + ("" if plot_note else f", {png}"))
    # a backend cut short by the time limit is reported (partial rows), not an error; a crash is
    return 0 if all(p["status"] in ("ok", "not installed", "timed out") for p in results.values()) else 1
