"""PyTorch competitors: maskbn_torch vs nn.BatchNorm, gather/BN/scatter and x * a + b; eager and torch.compile."""

from __future__ import annotations

from importlib.metadata import version

import torch
from torch import nn

import maskbn_torch
from benchmarks.common import NotApplicable, Step

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def profile_peak_bytes(run) -> int:
    """Peak of the running sum of the CPU allocator's allocations / frees during one call.

    torch.profiler(profile_memory=True) records every allocation event of the CPU allocator,
    eager ops and the buffers of compiled (inductor) code alike; the peak is measured on top
    of what was allocated before the call.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    events = [n for n in walk(prof.profiler.kineto_results.experimental_event_tree()) if n.tag == _EventType.Allocation]
    events.sort(key=lambda n: n.start_time_ns)
    current = peak = 0
    for ev in events:
        current += ev.extra_fields.alloc_size
        peak = max(peak, current)
    return peak


class Backend:
    memory_method = (
        "torch.profiler(profile_memory=True): peak of the running sum of the CPU allocator's "
        "allocation/free events during one training step, on top of what existed before it "
        "(activations, temporaries, output, gradients)"
    )

    def __init__(self) -> None:
        cfg = torch._dynamo.config
        for name in (
            "recompile_limit",
            "cache_size_limit",
            "accumulated_recompile_limit",
            "accumulated_cache_size_limit",
        ):
            if hasattr(cfg, name):
                setattr(cfg, name, 256)

    def info(self) -> dict:
        return {
            "torch": torch.__version__,
            "maskbn_torch": version("maskbn-torch"),
            "threads": torch.get_num_threads(),
            "device": "cpu",
        }

    def teardown_group(self) -> None:
        torch._dynamo.reset()

    def setup_group(self, spec: dict, dtype: str, mode: str, form: str, x_np, g_np) -> dict:
        torch._dynamo.reset()
        dt = _DTYPES[dtype]
        shape = tuple(spec["shape"])
        axis = spec["channel_axis"] % len(shape)
        channels = shape[axis]
        channels_last = axis == len(shape) - 1
        train = mode == "train"
        compiled = form == "compiled"
        bshape = tuple(channels if i == axis else 1 for i in range(len(shape)))

        x = torch.from_numpy(x_np).to(dt).requires_grad_(train)
        g = torch.from_numpy(g_np).to(dt)

        ours = maskbn_torch.MaskedBatchNorm(channels, channel_axis=axis).train(train)
        if channels_last:
            native = nn.BatchNorm1d(channels).train(train)
        else:
            native = {3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)](channels).train(train)
        gs_bn = nn.BatchNorm1d(channels).train(train)
        # the floor computes in float32, as every batch norm here does, and returns x's dtype
        fw = nn.Parameter(torch.ones(channels))
        fb = nn.Parameter(torch.zeros(channels))

        def ours_fn(x, m):
            return ours(x, m)

        def native_fn(x, m):
            if channels_last:
                return native(x.reshape(-1, channels)).reshape(x.shape)
            return native(x)

        def floor_fn(x, m):
            y = torch.addcmul(fb.view(bshape), x, fw.view(bshape))  # one pass
            return y if y.dtype == x.dtype else y.to(x.dtype)

        def gs_core(x, idx):
            xt = x if channels_last else x.movedim(axis, -1)
            xf = xt.reshape(-1, channels)
            yr = gs_bn(xf.index_select(0, idx))
            y = torch.zeros_like(xf).index_copy(0, idx, yr.to(xf.dtype)).reshape(xt.shape)
            return y if channels_last else y.movedim(-1, axis)

        if compiled:
            ours_fn = torch.compile(ours_fn, fullgraph=True, dynamic=False)
            native_fn = torch.compile(native_fn, fullgraph=True, dynamic=False)
            floor_fn = torch.compile(floor_fn, fullgraph=True, dynamic=False)
            # the real-row count changes with the mask: one graph, dynamic in that count
            gs_core = torch.compile(gs_core, fullgraph=True)

        def gs_fn(x, m):
            idx = m.reshape(-1).nonzero().squeeze(1)
            if compiled:
                torch._dynamo.mark_dynamic(idx, 0)
            return gs_core(x, idx)

        params = {
            "ours": [ours.weight, ours.bias],
            "native": [native.weight, native.bias],
            "gather_scatter": [gs_bn.weight, gs_bn.bias],
            "floor": [fw, fb],
        }
        fns = {"ours": ours_fn, "native": native_fn, "gather_scatter": gs_fn, "floor": floor_fn}

        def factory(impl):
            fn, ps = fns[impl], params[impl]

            def make(mask_np):
                m = torch.from_numpy(mask_np)
                if train:

                    def run():
                        y = fn(x, m)
                        y.backward(g)
                        x.grad = None
                        for p in ps:
                            p.grad = None

                else:

                    def run():
                        with torch.no_grad():
                            fn(x, m)

                return Step(run, (lambda: profile_peak_bytes(run)) if train else None)

            return make

        out = {impl: factory(impl) for impl in fns}
        out["masked"] = NotApplicable("PyTorch has no masked batch norm")
        return out
