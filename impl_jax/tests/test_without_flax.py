"""maskbn_jax works without Flax: the core, serialization and adapter never import it eagerly."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["flax"] = None  # any `import flax...` now raises ImportError

    import jax.numpy as jnp
    import numpy as np
    import maskbn_jax

    params, state = maskbn_jax.init(3)
    y, new = maskbn_jax.masked_batch_norm(jnp.ones((4, 3)), np.array([1, 1, 0, 1]), params, state, training=True)
    assert y.shape == (4, 3) and new["var"].shape == (3,)

    from maskbn_jax import conformance_adapter
    assert not conformance_adapter._flax_available()
    for name in ("nnx", "linen"):
        try:
            getattr(maskbn_jax, name)
        except ImportError as exc:
            # first contact: the error says what to install, not only "No module named 'flax'"
            assert "pip install 'maskbn-jax[flax]'" in str(exc), str(exc)
        else:
            raise AssertionError(f"maskbn_jax.{name} imported without flax")
    assert not any(m.startswith("flax") for m, mod in sys.modules.items() if mod is not None)
    print("ok")
    """
)


def test_core_and_adapter_import_and_run_without_flax():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")
