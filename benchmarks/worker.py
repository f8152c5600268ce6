"""One backend's benchmarks, in a process of its own: ``python -m benchmarks.worker BACKEND CONFIG OUT``.

Times every competitor of a group (shape, dtype, form, mode, padding) in this one process,
interleaved: after warm-up, each timed round calls every competitor once, in an order that
rotates from round to round, and the medians of the rounds are reported. The JSON at OUT is
rewritten after every group, so a crash still leaves the groups that finished.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

from benchmarks.common import NotApplicable
from benchmarks.config import IMPLS, make_data, make_mask


def _err(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    first = lines[0] if lines else ""
    return f"{type(exc).__name__}: {first[:300]}"


def _write(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)


def _quantiles(ts: list[float]) -> tuple[float, float]:
    if len(ts) < 2:
        return ts[0], ts[0]
    q = statistics.quantiles(ts, n=4, method="inclusive")
    return q[0], q[2]


def run(backend_name: str, cfg: dict, out: Path) -> dict:
    payload: dict = {"backend": backend_name, "status": "running", "rows": [], "python": sys.executable}
    start = time.perf_counter()
    try:
        module = importlib.import_module(f"benchmarks.backend_{backend_name}")
        backend = module.Backend()
    except ImportError as exc:
        payload.update(status="not installed", reason=_err(exc))
        _write(out, payload)
        return payload
    payload["info"] = {**backend.info(), "platform": platform.platform(), "processor": platform.machine()}
    payload["memory_method"] = backend.memory_method
    payload["forms"] = cfg["forms"][backend_name]
    _write(out, payload)

    # priority order, so that a run stopped at its time limit has the headline first: the compiled
    # form before the others, float32 before bfloat16
    forms = sorted(cfg["forms"][backend_name], key=lambda f: f != "compiled")
    compiled_dtypes = cfg.get("compiled_dtypes", {}).get(backend_name, cfg["dtypes"])
    groups = [
        (form, dtype, spec, mode)
        for form in forms
        for dtype in cfg["dtypes"]
        if form != "compiled" or dtype in compiled_dtypes
        for spec in cfg["shapes"]
        for mode in cfg["modes"]
    ]
    paddings = cfg["paddings"]
    payload["groups_planned"] = len(groups) * len(paddings)
    payload["loadavg_start"] = [round(v, 2) for v in os.getloadavg()]
    data: dict = {}
    done = 0
    for form, dtype, spec, mode in groups:
        if spec["id"] not in data:
            data[spec["id"]] = make_data(spec["shape"], cfg["seed"])
        x_np, g_np = data[spec["id"]]
        try:
            factories = backend.setup_group(spec, dtype, mode, form, x_np, g_np)
        except Exception as exc:  # the whole group is broken: say so, go on
            traceback.print_exc()
            factories = {impl: exc for impl in IMPLS}
        for padding in paddings:
            mask = make_mask(spec["shape"], spec["channel_axis"], padding, cfg["seed"])
            remaining = max(cfg["budget_s"] - (time.perf_counter() - start), 0.0)
            row = _time_group(
                factories,
                mask,
                cfg,
                remaining / (payload["groups_planned"] - done),
                warmup=1 if form == "eager" else cfg["warmup"],  # eager: nothing to compile
                memory=mode == "train" and cfg.get("memory") and padding == cfg["headline"]["padding"],
            )
            row.update(
                shape=spec["id"],
                dtype=dtype,
                form=form,
                mode=mode,
                padding=padding,
                real_fraction=round(float(mask.mean()), 4),
            )
            payload["rows"].append(row)
            done += 1
            payload["elapsed_s"] = round(time.perf_counter() - start, 1)
            payload["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
            _write(out, payload)
        del factories
        backend.teardown_group()
        gc.collect()
    payload["status"] = "ok"
    payload["elapsed_s"] = round(time.perf_counter() - start, 1)
    _write(out, payload)
    return payload


def _time_group(factories: dict, mask, cfg: dict, group_budget_s: float, *, warmup: int, memory: bool) -> dict:
    results: dict = {}
    steps: dict = {}
    for impl in IMPLS:
        fac = factories.get(impl)
        if fac is None:
            continue
        if isinstance(fac, NotApplicable):
            results[impl] = {"na": fac.reason}
            continue
        if isinstance(fac, BaseException):
            results[impl] = {"error": _err(fac)}
            continue
        try:
            steps[impl] = fac(mask)
        except Exception as exc:
            results[impl] = {"error": _err(exc)}
            traceback.print_exc()

    # warm-up: the first call compiles; the last one estimates the steady-state time
    t_group = time.perf_counter()
    warm: dict[str, float] = {}
    for impl, step in list(steps.items()):
        try:
            for i in range(warmup):
                t0 = time.perf_counter()
                step.run()
                dt = (time.perf_counter() - t0) * 1e3
                if i == 0:
                    results[impl] = {"first_call_ms": round(dt, 3)}
                warm[impl] = dt
        except Exception as exc:
            results[impl] = {"error": _err(exc)}
            traceback.print_exc()
            del steps[impl]
            warm.pop(impl, None)

    left_s = group_budget_s - (time.perf_counter() - t_group)
    round_s = sum(warm.values()) / 1e3
    repeats = int(left_s / round_s) if round_s > 0 else cfg["max_repeats"]
    repeats = max(cfg["min_repeats"], min(cfg["max_repeats"], repeats))

    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    gc.collect()
    gc.disable()
    try:
        for r in range(repeats):
            for k in range(len(names)):
                impl = names[(r + k) % len(names)]
                t0 = time.perf_counter()
                steps[impl].run()
                times[impl].append((time.perf_counter() - t0) * 1e3)
    finally:
        gc.enable()
    for impl in names:
        ts = times[impl]
        q1, q3 = _quantiles(ts)
        results[impl].update(
            median_ms=round(statistics.median(ts), 4),
            min_ms=round(min(ts), 4),
            q1_ms=round(q1, 4),
            q3_ms=round(q3, 4),
        )
        if memory:
            try:
                peak = steps[impl].peak_bytes()
            except Exception as exc:
                peak = None
                results[impl]["memory_error"] = _err(exc)
            if peak is not None:
                results[impl]["peak_mb"] = round(peak / 2**20, 2)
    steps.clear()
    return {"repeats": repeats, "impls": results}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3:
        print("usage: python -m benchmarks.worker BACKEND CONFIG_JSON OUT_JSON", file=sys.stderr)
        return 2
    backend_name, cfg_path, out = argv
    cfg = json.loads(Path(cfg_path).read_text())
    payload = run(backend_name, cfg, Path(out))
    return 0 if payload["status"] in ("ok", "not installed") else 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # the JSON is written: skip the frameworks' slow interpreter teardown (seconds for TF and JAX)
    os._exit(code)
