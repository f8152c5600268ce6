"""Flax's own BatchNorm behaviours, checked against maskbn_jax's modules.

Flax's tests are not in its wheel: these are our tests of the behaviours that
google/flax tests (tests/linen/linen_test.py, linen_transforms_test.py,
linen_module_test.py, checkpoints_test.py; tests/nnx/nn/normalization_test.py,
module_test.py, nn/linear_test.py, integration_test.py), written anew. Where
every row is real, each runs Flax's BatchNorm on the same inputs and compares.
Where this layer deliberately differs, the difference is an entry of
``flax_parity_expectations.yaml`` (id -> reason); the test then asserts that
the difference is real (strict: an entry whose difference vanished fails).
"""

from __future__ import annotations

import functools
import typing as tp
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

pytest.importorskip("flax")
import flax
from flax import linen as nn
from flax import nnx

from maskbn_jax.linen import BatchNorm as LinenBN
from maskbn_jax.nnx import MaskedBatchNorm as NnxBN

KEPT = yaml.safe_load(Path(__file__).with_name("flax_parity_expectations.yaml").read_text())["kept_differences"]


def kept(key: str) -> str:
    """The reason recorded for a kept difference (KeyError if the data lacks it)."""
    return KEPT[key]["reason"]


def test_every_kept_difference_has_a_reason_and_a_test():
    here = Path(__file__).read_text()
    for key, entry in KEPT.items():
        assert entry["reason"].strip(), key
        assert here.count(f'kept("{key}")') >= 1, f"{key} is listed but no test asserts it"


# -- linen: tests/linen/linen_test.py ------------------------------------------------------------------------


@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "no-mask"])
def test_linen_batch_stats_and_ema(with_mask):
    """test_batch_norm: real rows come out with mean 0 / var 1, and the moving stats are the
    momentum-0.9 average of the masked batch statistics (NaN in padded rows changes nothing)."""
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k1, (4, 3, 2))
    m = jax.random.randint(k2, (4, 3, 1), 0, 2).astype(bool) if with_mask else None
    if with_mask:
        x = jnp.where(m, x, jnp.nan)
    layer = LinenBN(momentum=0.9, use_running_average=False)
    y, variables = layer.init_with_output(k3, x, mask=m)
    np.testing.assert_allclose(y.mean((0, 1), where=m), 0.0, atol=1e-4)
    np.testing.assert_allclose(y.var((0, 1), where=m), 1.0, rtol=1e-4)
    _, upd = layer.apply(variables, x, mutable=["batch_stats"], mask=m)
    ema = upd["batch_stats"]
    np.testing.assert_allclose(ema["mean"], 0.1 * x.mean((0, 1), where=m), atol=1e-4)
    np.testing.assert_allclose(ema["var"], 0.9 + 0.1 * x.var((0, 1), where=m), rtol=1e-4)
    stock_y, stock_upd = nn.BatchNorm(momentum=0.9, use_running_average=False).apply(
        variables, x, mutable=["batch_stats"], mask=m
    )
    real = np.ones(y.shape, bool) if m is None else np.broadcast_to(np.asarray(m), y.shape)
    np.testing.assert_allclose(np.asarray(y)[real], np.asarray(stock_y)[real], rtol=1e-5, atol=1e-5)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6), upd, stock_upd)


@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "no-mask"])
def test_linen_complex_input(with_mask):
    """test_batch_norm_complex: Flax normalizes complex64; this layer refuses it clearly."""
    x = jax.random.normal(jax.random.key(1), (4, 3, 2), dtype=jnp.complex64)
    m = jax.random.randint(jax.random.key(2), (4, 3, 1), 0, 2).astype(bool) if with_mask else None
    stock_y, _ = nn.BatchNorm(use_running_average=False, dtype=jnp.complex64).init_with_output(
        jax.random.key(3), x, mask=m
    )
    assert stock_y.dtype == jnp.complex64  # the difference is real: Flax takes it
    with pytest.raises(TypeError, match=r"complex64.*real inputs only"):
        LinenBN(use_running_average=False, dtype=jnp.complex64).init_with_output(jax.random.key(3), x, mask=m)
    assert kept("complex-input")


def test_linen_axis_name_is_ignored_while_initializing():
    """test_batch_norm_multi_init: init outside any mapped axis works with axis_name set, and
    one module called twice gives (nearly) the same output."""

    class Twice(nn.Module):
        @nn.compact
        def __call__(self, x):
            norm = LinenBN(name="norm", use_running_average=False, axis_name="batch")
            x = norm(x)
            return x, norm(x)

    (y1, y2), variables = Twice().init_with_output(jax.random.key(0), jax.random.normal(jax.random.key(1), (2, 4)))
    np.testing.assert_allclose(y1, y2, rtol=0.005)
    assert set(variables) == {"params", "batch_stats"}


@pytest.mark.parametrize("layer", [LinenBN, nn.BatchNorm], ids=["ours", "flax"])
def test_linen_vmap_with_axis_name_equals_the_flat_batch(layer):
    """linen_transforms_test (vmap of an MLP with BatchNorm(axis_name)): the statistics over
    the vmapped axis are those of the flattened batch."""

    class MlpBn(nn.Module):
        axis_name: tp.Any = None

        @nn.compact
        def __call__(self, x):
            return layer(axis_name=self.axis_name, use_running_average=False)(nn.Dense(3)(x))

    x = jax.random.normal(jax.random.key(0), (5, 4, 2))
    vmapped = nn.vmap(
        MlpBn,
        in_axes=(0,),
        variable_axes={"params": None, "batch_stats": None},
        split_rngs={"params": False},
        axis_name="batch",
    )(axis_name="batch")
    variables = MlpBn().init(jax.random.key(1), x.reshape(-1, 2))
    flat = MlpBn().apply(variables, x.reshape(-1, 2), mutable=["batch_stats"])[0].reshape(5, 4, 3)
    mapped = vmapped.apply(variables, x, mutable=["batch_stats"])[0]
    np.testing.assert_allclose(flat, mapped, atol=1e-5)


def test_linen_use_running_average_is_the_first_positional_field():
    """checkpoints_test builds ``nn.normalization.BatchNorm(True)``: same field order here."""

    class Net(nn.Module):
        bn: type

        @nn.compact
        def __call__(self, x):
            return self.bn(True)(nn.Dense(4)(x))

    x = jax.random.normal(jax.random.key(0), (3, 2))
    ours, stock = Net(LinenBN), Net(nn.BatchNorm)
    variables = stock.init(jax.random.key(1), x)
    np.testing.assert_allclose(ours.apply(variables, x), stock.apply(variables, x), rtol=1e-6, atol=1e-6)


def test_linen_bound_module_updates_batch_stats_like_apply():
    """linen_module_test test_bind_stateful: bind(mutable='batch_stats') and nn.apply agree."""

    class Foo(nn.Module):
        def setup(self):
            self.a = nn.Dense(3)
            self.bn = LinenBN()
            self.b = nn.Dense(1)

    def f(foo, x):
        return foo.b(foo.bn(foo.a(x), use_running_average=False))

    x = jax.random.normal(jax.random.key(0), (4, 2))
    y1, variables = nn.init_with_output(f, Foo())(jax.random.key(0), x)
    bound = Foo().bind(variables, mutable="batch_stats")
    y2 = f(bound, x)
    y3, new_state = nn.apply(f, Foo(), mutable="batch_stats")(variables, x)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(y2, y3)
    jax.tree.map(np.testing.assert_array_equal, new_state["batch_stats"], bound.variables["batch_stats"])


@pytest.mark.parametrize("force_float32_reductions", [True, False])
@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("dtype", [None, "float32", "bfloat16"])
@pytest.mark.parametrize("x_dtype", ["float32", "bfloat16"])
def test_linen_dtype_arguments_mean_what_flax_means(x_dtype, dtype, param_dtype, force_float32_reductions):
    """dtype, param_dtype and force_float32_reductions give Flax's variable and output dtypes,
    and values within the input precision of Flax's."""
    kw = {"dtype": dtype, "param_dtype": param_dtype, "force_float32_reductions": force_float32_reductions}
    x = jax.random.normal(jax.random.key(0), (6, 8, 3), jnp.float32).astype(x_dtype) * 2 + 1
    ours, stock = LinenBN(use_running_average=False, **kw), nn.BatchNorm(use_running_average=False, **kw)
    v_ours, v_stock = ours.init(jax.random.key(1), x), stock.init(jax.random.key(1), x)
    as_dtypes = functools.partial(jax.tree.map, lambda a: jnp.dtype(a.dtype).name)
    assert as_dtypes(v_ours) == as_dtypes(v_stock)
    (y_ours, upd_ours), (y_stock, upd_stock) = (m.apply(v_stock, x, mutable=["batch_stats"]) for m in (ours, stock))
    assert y_ours.dtype == y_stock.dtype
    stats_dtype = jnp.dtype(v_stock["batch_stats"]["mean"].dtype).name
    if as_dtypes(upd_ours) != as_dtypes(upd_stock):
        # Flax's update promotes a low-precision variable to the statistics' float32
        assert as_dtypes(upd_ours)["batch_stats"]["mean"] == stats_dtype != as_dtypes(upd_stock)["batch_stats"]["mean"]
        assert kept("batch-stats-dtype-drift")
    low = "bfloat16" in (x_dtype, dtype, param_dtype) or not force_float32_reductions
    tol = {"atol": 5e-2, "rtol": 5e-2} if low else {"atol": 1e-5, "rtol": 1e-5}
    np.testing.assert_allclose(np.asarray(y_ours, np.float32), np.asarray(y_stock, np.float32), **tol)
    # inference with the updated moving stats
    trained = {
        "params": v_stock["params"],
        "batch_stats": jax.tree.map(lambda a: a.astype(stats_dtype), upd_stock["batch_stats"]),
    }
    e_ours, e_stock = (m(use_running_average=True, **kw).apply(trained, x) for m in (LinenBN, nn.BatchNorm))
    assert e_ours.dtype == e_stock.dtype
    np.testing.assert_allclose(np.asarray(e_ours, np.float32), np.asarray(e_stock, np.float32), **tol)


def test_linen_reductions_stay_float32_without_force():
    """force_float32_reductions=False: Flax then reduces in bfloat16; this layer keeps float32
    reductions (the contract's accuracy) and only the variable dtypes follow the flag."""
    x = (jax.random.normal(jax.random.key(0), (64, 256, 2)) * 4 + 300).astype(jnp.bfloat16)
    kw = {"use_running_average": False, "param_dtype": jnp.bfloat16, "force_float32_reductions": False, "momentum": 0.0}
    variables = nn.BatchNorm(**kw).init(jax.random.key(1), x)
    exact = np.asarray(x, np.float64).reshape(-1, 2).var(0)
    got = {
        name: np.asarray(layer.apply(variables, x, mutable=["batch_stats"])[1]["batch_stats"]["var"], np.float64)
        for name, layer in (("ours", LinenBN(**kw)), ("flax", nn.BatchNorm(**kw)))
    }
    assert np.all(np.abs(got["ours"] / exact - 1) < 1e-2)
    assert np.all(np.abs(got["flax"] / exact - 1) > 1e-2)  # the difference is real
    assert kept("half-precision-reductions")


# -- nnx: tests/nnx/nn/normalization_test.py -----------------------------------------------------------------


def _nnx_model(layer_cls, dtype, param_dtype, use_fast_variance):
    class Model(nnx.Module):
        def __init__(self, rngs):
            self.norm_layer = layer_cls(
                5,
                use_running_average=False,
                dtype=dtype,
                param_dtype=param_dtype,
                use_fast_variance=use_fast_variance,
                promote_dtype=lambda x, **kwargs: x,  # the stock test's "same behaviour as linen"
                rngs=rngs,
            )
            self.linear = nnx.Linear(5, 4, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        def __call__(self, x, *, mask=None):
            return self.linear(self.norm_layer(x, mask=mask))

    return Model(nnx.Rngs(42))


def _linen_model(layer_cls, dtype, param_dtype, use_fast_variance):
    class Model(nn.Module):
        def setup(self):
            self.norm_layer = layer_cls(
                use_running_average=False, dtype=dtype, param_dtype=param_dtype, use_fast_variance=use_fast_variance
            )
            self.linear = nn.Dense(4, dtype=dtype, param_dtype=param_dtype)

        def __call__(self, x, *, mask=None):
            return self.linear(self.norm_layer(x, mask=mask))

    return Model()


def _nnx_linen_run(nnx_cls, linen_cls, dtype, param_dtype, use_fast_variance, mask):
    x = jax.random.normal(jax.random.key(0), (10, 5))
    linen_model = _linen_model(linen_cls, dtype, param_dtype, use_fast_variance)
    variables = dict(linen_model.init(jax.random.key(1), x))
    nnx_model = _nnx_model(nnx_cls, dtype, param_dtype, use_fast_variance)
    nnx_model.linear.kernel[...] = variables["params"]["linear"]["kernel"]
    nnx_model.linear.bias[...] = variables["params"]["linear"]["bias"]
    linen_out, updates = linen_model.apply(variables, x, mask=mask, mutable=["batch_stats"])
    variables.update(updates)
    nnx_out = nnx_model(x, mask=mask)
    return linen_out, variables, nnx_out, nnx_model


NNX_LINEN_GRID = pytest.mark.parametrize(
    ("dtype", "param_dtype", "use_fast_variance"),
    [(d, p, f) for d in ("float32", "float16") for p in ("float32", "float16") for f in (True, False)],
)
CHANNEL_MASK = np.array([True, False, True, False, True])  # the stock test's (C,)-shaped mask


@NNX_LINEN_GRID
@pytest.mark.parametrize("mask", [None, CHANNEL_MASK], ids=["no-mask", "channel-mask"])
def test_nnx_and_linen_agree_exactly(dtype, param_dtype, use_fast_variance, mask):
    """test_nnx_linen_batchnorm_equivalence: the nnx and linen modules give bit-identical
    outputs, params and batch stats (mask: a (C,) mask that broadcasts over the batch)."""
    linen_out, variables, nnx_out, nnx_model = _nnx_linen_run(
        NnxBN, LinenBN, dtype, param_dtype, use_fast_variance, mask
    )
    np.testing.assert_array_equal(linen_out, nnx_out)
    for collection, name in (("params", "scale"), ("params", "bias"), ("batch_stats", "mean"), ("batch_stats", "var")):
        np.testing.assert_array_equal(
            variables[collection]["norm_layer"][name], getattr(nnx_model.norm_layer, name)[...]
        )


@NNX_LINEN_GRID
def test_nnx_matches_flax_where_every_row_is_real(dtype, param_dtype, use_fast_variance):
    """The same runs against Flax's own modules (no mask): same dtypes, values to the dtype's
    precision (Flax's fast variance is E[x^2] - E[x]^2; this layer's is the shifted one)."""
    ours = _nnx_linen_run(NnxBN, LinenBN, dtype, param_dtype, use_fast_variance, None)
    stock = _nnx_linen_run(nnx.BatchNorm, nn.BatchNorm, dtype, param_dtype, use_fast_variance, None)
    tol = {"atol": 1e-5, "rtol": 1e-5} if "float16" not in (dtype, param_dtype) else {"atol": 2e-2, "rtol": 2e-2}
    for a, b in ((ours[0], stock[0]), (ours[2], stock[2])):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **tol)
    for name in ("mean", "var"):
        a, b = ours[1]["batch_stats"]["norm_layer"][name], stock[1]["batch_stats"]["norm_layer"][name]
        assert a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **tol)


def test_nnx_channels_without_a_real_row_keep_their_moving_stats():
    """With the stock test's (C,) mask, channels 1 and 3 have no real entry: Flax's statistics
    there are NaN (0/0) and so are its outputs and moving stats; this layer keeps the moving
    stats of those channels and normalizes them with those (contract 1a)."""
    ours = _nnx_linen_run(NnxBN, LinenBN, "float32", "float32", False, CHANNEL_MASK)
    stock = _nnx_linen_run(nnx.BatchNorm, nn.BatchNorm, "float32", "float32", False, CHANNEL_MASK)
    real, empty = CHANNEL_MASK, ~CHANNEL_MASK
    stats_ours, stats_stock = ours[1]["batch_stats"]["norm_layer"], stock[1]["batch_stats"]["norm_layer"]
    for name, initial in (("mean", 0.0), ("var", 1.0)):
        np.testing.assert_allclose(stats_ours[name][real], stats_stock[name][real], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(stats_ours[name][empty], initial)
        assert np.all(np.isnan(stats_stock[name][empty]))  # the difference is real
    assert np.all(np.isfinite(ours[0])) and np.all(np.isnan(stock[0]))
    assert kept("empty-channel")


def test_nnx_spectral_norm_over_a_sequential_with_batchnorm():
    """test_nnx_linen_spectralnorm_equivalence: the layer works inside nnx.Sequential wrapped by
    nnx.SpectralNorm (its batch stats live in the wrapped module) and matches Flax's."""

    def run(layer_cls):
        seq = nnx.Sequential(
            nnx.Linear(5, 4, rngs=nnx.Rngs(0)), nnx.relu, layer_cls(4, use_running_average=False, rngs=nnx.Rngs(1))
        )
        model = nnx.SpectralNorm(seq, n_steps=1, update_stats=True, rngs=nnx.Rngs(2))
        x = jax.random.normal(jax.random.key(0), (10, 5))
        return model(x), seq.layers[2].mean[...], seq.layers[2].var[...]

    for a, b in zip(run(NnxBN), run(nnx.BatchNorm), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# -- nnx: module_test.py, nn/linear_test.py, integration_test.py, the BatchNorm docstring ---------------------


class _Block(nnx.Module):
    def __init__(self, layer_cls, rngs):
        self.linear = nnx.Linear(2, 5, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, deterministic=False, rngs=rngs)
        self.batch_norm = layer_cls(10, use_running_average=False, rngs=rngs)


def test_nnx_set_attributes_and_view_switch_the_mode():
    """test_set_attributes / test_view: use_running_average is an attribute Flax's tree
    tools set, filtered by type."""
    block = _Block(NnxBN, nnx.Rngs(0))
    block.set_attributes(deterministic=True, use_running_average=True)
    assert block.batch_norm.use_running_average is True
    block = _Block(NnxBN, nnx.Rngs(0))
    block.set_attributes(nnx.Dropout, deterministic=True)
    assert block.batch_norm.use_running_average is False
    view = nnx.view(_Block(NnxBN, nnx.Rngs(0)), deterministic=True, use_running_average=True)
    assert view.batch_norm.use_running_average is True


@pytest.mark.skipif(
    not hasattr(nnx, "with_attributes"), reason=f"flax {flax.__version__} has no nnx.with_attributes (added later)"
)
def test_nnx_with_attributes_switches_the_mode_of_a_copy():
    """test_with_attributes: a copy with use_running_average set, the original unchanged."""
    original = _Block(NnxBN, nnx.Rngs(0))
    changed = nnx.with_attributes(original, use_running_average=True)
    assert changed.batch_norm.use_running_average is True and original.batch_norm.use_running_average is False


def test_nnx_graphdef_does_not_depend_on_the_initializers():
    """nn/linear_test: two layers built with different scale_init/bias_init share a graphdef."""
    zeros, ones = nnx.initializers.zeros, nnx.initializers.ones
    a = NnxBN(3, scale_init=zeros, bias_init=zeros, rngs=nnx.Rngs(0))
    b = NnxBN(3, scale_init=ones, bias_init=ones, rngs=nnx.Rngs(0))
    assert nnx.graphdef(a) == nnx.graphdef(b)


def test_nnx_param_metadata_is_carried_as_flax_carries_it():
    """nn/linear_test TestLayersParamsMetadata: scale_metadata / bias_metadata reach the Params."""
    meta = {"scale_metadata": {"tag": "s"}, "bias_metadata": {"tag": "b"}}
    ours, stock = NnxBN(3, rngs=nnx.Rngs(0), **meta), nnx.BatchNorm(3, rngs=nnx.Rngs(0), **meta)
    for name in ("scale", "bias"):
        assert getattr(ours, name).get_metadata()["tag"] == getattr(stock, name).get_metadata()["tag"]


def test_nnx_train_updates_and_eval_freezes_the_batch_stats():
    """nnx.BatchNorm's docstring example: train() calls move mean/var, eval() calls do not."""
    x = jax.random.normal(jax.random.key(0), (5, 6))
    layer = NnxBN(num_features=6, momentum=0.9, epsilon=1e-5, dtype=jnp.float32, rngs=nnx.Rngs(0))
    layer.train()
    layer(x)
    first = nnx.clone(nnx.state(layer, nnx.BatchStat))
    layer(x)
    second = nnx.state(layer, nnx.BatchStat)
    assert (first["mean"][...] != second["mean"][...]).all() and (first["var"][...] != second["var"][...]).all()
    layer.eval()
    layer(x)
    third = nnx.state(layer, nnx.BatchStat)
    assert (second["mean"][...] == third["mean"][...]).all() and (second["var"][...] == third["var"][...]).all()


def test_nnx_training_loop_under_nnx_jit_matches_flax():
    """integration_test (train step under nnx.jit with an optimizer over Params): the loss
    trajectory and the batch stats match Flax's BatchNorm when every row is real."""
    optax = pytest.importorskip("optax")

    class Model(nnx.Module):
        def __init__(self, layer_cls, rngs):
            self.linear = nnx.Linear(2, 8, rngs=rngs)
            self.bn = layer_cls(8, use_running_average=False, rngs=rngs)
            self.linear_out = nnx.Linear(8, 3, rngs=rngs)

        def __call__(self, x):
            return self.linear_out(nnx.relu(self.bn(self.linear(x))))

    x = jax.random.normal(jax.random.key(0), (8, 2))
    y = jax.random.normal(jax.random.key(1), (8, 3))

    def train(layer_cls):
        model = Model(layer_cls, nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

        @nnx.jit
        def step(model, optimizer, x, y):
            loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
            optimizer.update(model, grads)
            return loss

        losses = [float(step(model, optimizer, x, y)) for _ in range(5)]
        return np.array(losses), model.bn.mean[...], model.bn.var[...]

    for a, b in zip(train(NnxBN), train(nnx.BatchNorm), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_nnx_split_merge_round_trip():
    """graph_utils_test: split/merge keeps the module (its BatchStats included)."""
    layer = NnxBN(3, use_running_average=False, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (4, 3)) + 2
    layer(x)
    graphdef, state = nnx.split(layer)
    again = nnx.merge(graphdef, state)
    np.testing.assert_array_equal(again.mean[...], layer.mean[...])
    again.eval()
    layer.eval()
    np.testing.assert_array_equal(again(x), layer(x))


# -- first contact (issue 14) ---------------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["nnx", "linen"])
def test_a_torch_style_positional_mask_is_caught(module):
    """``bn(x, mask)``: the second positional is use_running_average; an array there is an error
    that says to pass ``mask=``, and the state does not change."""
    x = jnp.ones((4, 3))
    mask = np.array([True, True, False, True])
    if module == "nnx":
        layer = NnxBN(3, rngs=nnx.Rngs(0))
        before = nnx.clone(nnx.state(layer))
        with pytest.raises(TypeError, match=r"use_running_average.*shape \(4,\).*mask=mask"):
            layer(x, mask)
        jax.tree.map(np.testing.assert_array_equal, nnx.state(layer), before)
    else:
        layer = LinenBN()
        variables = layer.init(jax.random.key(0), x, use_running_average=True)
        with pytest.raises(TypeError, match=r"use_running_average.*mask=mask"):
            layer.apply(variables, x, mask, mutable=["batch_stats"])
