"""maskbn benchmarks: masked batch norm against native BN, the frameworks' existing masked
options, gather-real-rows / native BN / scatter-back, and the elementwise floor ``x * a + b``.

``python -m benchmarks`` runs each backend in its own subprocess (:mod:`benchmarks.worker`),
gathers their JSON and writes a Markdown table, the JSON and a PNG plot. Nothing here imports
a framework at module level: the parent process needs only NumPy (and matplotlib for the plot).
"""
