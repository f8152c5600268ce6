"""Flax modules: the linen and nnx wrappers follow Flax BatchNorm conventions and
agree with the functional core."""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxbn_helpers import make_mask

pytest.importorskip("flax")
from flax import linen as nn
from flax import nnx

import maskbn_jax
from maskbn_jax import masked_batch_norm
from maskbn_jax.linen import BatchNorm as LinenDropIn
from maskbn_jax.linen import MaskedBatchNorm as LinenMBN
from maskbn_jax.nnx import MaskedBatchNorm as NnxMBN


def shapes(tree):
    return jax.tree.map(lambda a: (a.shape, jnp.dtype(a.dtype).name), tree)


@pytest.fixture
def batch(rng):
    x = jnp.asarray(rng.normal(1.0, 2.0, size=(4, 6, 5)), jnp.float32)
    return x, make_mask("random", (4, 6))


# -- linen ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("use_scale", "use_bias"), [(True, True), (False, True), (True, False)])
def test_linen_variables_match_flax_batchnorm(batch, use_scale, use_bias):
    x, _ = batch
    kw = {"use_scale": use_scale, "use_bias": use_bias, "use_running_average": False}
    ours = LinenMBN(**kw).init(jax.random.key(0), x)
    stock = nn.BatchNorm(**kw).init(jax.random.key(0), x)
    assert shapes(ours) == shapes(stock)


@pytest.mark.parametrize("padded_output", ["normalize", "zero"])
def test_linen_train_and_eval_agree_with_the_core(batch, padded_output):
    x, m = batch
    layer = LinenMBN(momentum=0.9, epsilon=1e-3, padded_output=padded_output)
    variables = layer.init(jax.random.key(0), x, use_running_average=False, mask=m)
    # as in nn.BatchNorm, init does not move the stats
    np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(5))
    y, updated = layer.apply(variables, x, use_running_average=False, mask=m, mutable=["batch_stats"])
    core = functools.partial(masked_batch_norm, momentum=0.9, epsilon=1e-3, padded_output=padded_output)
    y_ref, new_ref = core(x, m, variables["params"], variables["batch_stats"], training=True)
    np.testing.assert_array_equal(y, y_ref)
    jax.tree.map(np.testing.assert_array_equal, dict(updated["batch_stats"]), new_ref)
    trained = {"params": variables["params"], "batch_stats": updated["batch_stats"]}
    y_eval = layer.apply(trained, x, use_running_average=True, mask=m)
    np.testing.assert_array_equal(y_eval, core(x, m, trained["params"], new_ref, training=False)[0])


def test_linen_stock_checkpoint_loads_and_matches_without_mask(batch):
    x, _ = batch
    stock = nn.BatchNorm(use_running_average=False, momentum=0.9, use_fast_variance=False)
    variables = stock.init(jax.random.key(0), x)
    y_stock, upd_stock = stock.apply(variables, x, mutable=["batch_stats"])
    y_ours, upd_ours = LinenMBN(use_running_average=False, momentum=0.9).apply(variables, x, mutable=["batch_stats"])
    np.testing.assert_allclose(y_ours, y_stock, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), upd_ours, upd_stock)


class Block(nn.Module):
    """A model written for nn.BatchNorm; ``norm`` is the one line that changes."""

    norm: type = nn.BatchNorm

    @nn.compact
    def __call__(self, x, train: bool, **norm_kw):
        x = nn.Dense(4)(x)
        x = self.norm(use_running_average=not train, momentum=0.9)(x, **norm_kw)
        return nn.relu(x)


@pytest.mark.parametrize(
    ("norm", "name"),
    [(LinenDropIn, "BatchNorm_0"), (LinenMBN, "MaskedBatchNorm_0")],
    ids=["BatchNorm", "MaskedBatchNorm"],
)
def test_linen_one_line_swap_in_a_model(batch, norm, name):
    x, m = batch
    stock_vars = Block().init(jax.random.key(0), x, train=False)
    ours = Block(norm=norm)
    our_vars = ours.init(jax.random.key(0), x, train=False)
    assert set(our_vars["params"]) == {"Dense_0", name}
    if norm is LinenDropIn:
        # same class name, same auto-generated variable paths: the stock checkpoint loads as is
        assert shapes(our_vars) == shapes(stock_vars)
        our_vars = stock_vars
    y, upd = ours.apply(our_vars, x, train=True, mask=m, mutable=["batch_stats"])
    assert y.shape == (4, 6, 4)
    h = nn.Dense(4).apply({"params": our_vars["params"]["Dense_0"]}, x)
    expected = 0.1 * np.asarray(h)[m].mean(0)
    np.testing.assert_allclose(upd["batch_stats"][name]["mean"], expected, rtol=1e-5, atol=1e-7)


def test_linen_channel_mismatch_names_both_counts(batch):
    x, _ = batch
    variables = LinenMBN().init(jax.random.key(0), x[..., :3], use_running_average=True)
    with pytest.raises(ValueError, match=r"x has 5 channels .* the layer has 3"):
        LinenMBN().apply(variables, x, use_running_average=True)


def test_linen_dtype_and_half_input(batch):
    x, m = batch
    layer = LinenMBN(use_running_average=False)
    variables = layer.init(jax.random.key(0), x)
    y16, upd = layer.apply(variables, x.astype(jnp.bfloat16), mask=m, mutable=["batch_stats"])
    # Flax's rule: the output dtype is inferred from x and the (float32) params
    stock = nn.BatchNorm(use_running_average=False).apply(variables, x.astype(jnp.bfloat16), mutable=["batch_stats"])[0]
    assert y16.dtype == stock.dtype == jnp.float32 and upd["batch_stats"]["mean"].dtype == jnp.float32
    y32 = LinenMBN(use_running_average=False, dtype=jnp.float32).apply(
        variables, x.astype(jnp.bfloat16), mask=m, mutable=["batch_stats"]
    )[0]
    assert y32.dtype == jnp.float32


# -- nnx ------------------------------------------------------------------------------------------------------


def test_nnx_state_matches_nnx_batchnorm():
    ours = NnxMBN(5, rngs=nnx.Rngs(0))
    stock = nnx.BatchNorm(5, rngs=nnx.Rngs(0))
    assert shapes(nnx.to_pure_dict(nnx.state(ours))) == shapes(nnx.to_pure_dict(nnx.state(stock)))
    assert shapes(nnx.to_pure_dict(nnx.state(ours, nnx.BatchStat))) == {
        "mean": ((5,), "float32"),
        "var": ((5,), "float32"),
    }


def test_nnx_train_eval_and_view_agree_with_the_core(batch):
    x, m = batch
    layer = NnxMBN(5, momentum=0.9, epsilon=1e-3)
    params = {"scale": layer.scale[...], "bias": layer.bias[...]}
    state0 = {"mean": layer.mean[...], "var": layer.var[...]}
    core = functools.partial(masked_batch_norm, momentum=0.9, epsilon=1e-3)
    y_ref, state1 = core(x, m, params, state0, training=True)
    np.testing.assert_array_equal(layer(x, mask=m), y_ref)
    np.testing.assert_array_equal(layer.mean[...], state1["mean"])
    layer.eval()
    np.testing.assert_array_equal(layer(x, mask=m), core(x, m, params, state1, training=False)[0])
    np.testing.assert_array_equal(layer.var[...], state1["var"])
    layer.train()
    training_view = nnx.view(layer, use_running_average=True)
    training_view(x, mask=m)
    np.testing.assert_array_equal(layer.var[...], state1["var"])
    layer(x, mask=m)
    assert not np.array_equal(layer.var[...], state1["var"])


class Net(nnx.Module):
    """A model written for nnx.BatchNorm, with the norm class as the one changed line."""

    def __init__(self, norm, rngs):
        self.linear = nnx.Linear(5, 4, rngs=rngs)
        self.norm = norm(4, momentum=0.9, rngs=rngs)

    def __call__(self, x, **norm_kw):
        return nnx.relu(self.norm(self.linear(x), **norm_kw))


def test_nnx_training_step_under_nnx_jit(batch, rng):
    x, m = batch
    model = Net(NnxMBN, nnx.Rngs(0))
    assert shapes(nnx.to_pure_dict(nnx.state(model))) == shapes(
        nnx.to_pure_dict(nnx.state(Net(nnx.BatchNorm, nnx.Rngs(0))))
    )
    target = jnp.asarray(rng.normal(size=(4, 6, 4)), jnp.float32)
    optimizer_lr = 0.05

    @nnx.jit
    def step(model, x, m):
        def loss_fn(model):
            y = model(x, mask=m)
            return jnp.mean(jnp.where(m[..., None], (y - target) ** 2, 0))

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        params = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree.map(lambda p, g: p - optimizer_lr * g, params, grads))
        return loss

    losses = [float(step(model, x, m)) for _ in range(4)]
    assert losses[-1] < losses[0]
    assert not np.allclose(model.norm.mean[...], 0)


def test_nnx_bad_call_leaves_state_unchanged(batch):
    x, _ = batch
    layer = NnxMBN(5)
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(layer)))
    with pytest.raises(ValueError, match=r"mask shape \(4, 5\) does not fit x shape \(4, 6, 5\)"):
        layer(x, mask=np.ones((4, 5), bool))
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(layer)), before)


def test_nnx_stock_state_loads_unchanged(batch):
    x, _ = batch
    stock = nnx.BatchNorm(5, momentum=0.9, use_fast_variance=False, rngs=nnx.Rngs(0))
    stock(x)
    ours = NnxMBN(5, momentum=0.9)
    nnx.update(ours, nnx.state(stock))
    np.testing.assert_array_equal(ours.mean[...], stock.mean[...])
    stock.eval()
    ours.eval()
    np.testing.assert_allclose(ours(x), stock(x), rtol=1e-6, atol=1e-6)


def test_nnx_needs_a_mode():
    layer = NnxMBN(2, use_running_average=None)
    with pytest.raises(ValueError, match="use_running_average"):
        layer(jnp.zeros((3, 2)))


def test_modules_are_reachable_lazily_from_the_package():
    assert maskbn_jax.nnx.MaskedBatchNorm is NnxMBN
    assert maskbn_jax.linen.MaskedBatchNorm is LinenMBN


def _arguments(module_class) -> set[str]:
    # nnx modules hide __init__'s signature behind their metaclass's (*args, **kwargs)
    target = module_class.__init__ if issubclass(module_class, nnx.Module) else module_class
    return set(inspect.signature(target).parameters) - {"self", "parent", "name"}


@pytest.mark.parametrize(
    ("ours", "stock", "not_taken"),
    [
        (LinenMBN, nn.BatchNorm, set()),
        (NnxMBN, nnx.BatchNorm, set()),
    ],
    ids=["linen", "nnx"],
)
def test_every_flax_batchnorm_argument_carries_over(ours, stock, not_taken):
    """Swapping the class keeps the call site valid: each constructor argument of Flax's
    BatchNorm is accepted (not_taken lists any this layer refuses; none today)."""
    assert _arguments(stock) - _arguments(ours) == not_taken
    assert _arguments(ours) - _arguments(stock) == {"padded_output", "unbiased_var"}
