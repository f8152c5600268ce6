"""Module plumbing: state dicts shared with nn.BatchNorm, conversion, serialization, devices."""

from __future__ import annotations

import copy
import io
import json

import pytest
import torch
from torch import nn
from torch_helpers import prefix_mask

from maskbn_torch import MaskedBatchNorm, convert_batchnorm, load_portable, save_portable

STOCK = {
    "BatchNorm1d-ncl": (nn.BatchNorm1d, (4, 5, 7)),
    "BatchNorm1d-nc": (nn.BatchNorm1d, (6, 5)),
    "BatchNorm2d": (nn.BatchNorm2d, (2, 5, 3, 4)),
    "BatchNorm3d": (nn.BatchNorm3d, (2, 5, 2, 3, 2)),
}


def _trained_stock(cls, shape, gen):
    stock = cls(5)
    with torch.no_grad():
        stock.weight.copy_(torch.rand(5, generator=gen) + 0.5)
        stock.bias.copy_(torch.randn(5, generator=gen))
    for _ in range(3):
        stock(torch.randn(shape, generator=gen) * 2 + 1)
    return stock


@pytest.mark.parametrize("stock_case", STOCK.values(), ids=STOCK.keys())
def test_stock_state_dict_loads_unchanged_and_computes_the_same(stock_case, gen):
    cls, shape = stock_case
    stock = _trained_stock(cls, shape, gen)
    masked = MaskedBatchNorm(5)
    assert list(masked.state_dict()) == list(stock.state_dict())
    masked.load_state_dict(stock.state_dict())  # strict
    for key, value in stock.state_dict().items():
        assert torch.equal(masked.state_dict()[key], value), key
    x = torch.randn(shape, generator=gen)
    stock.eval(), masked.eval()
    torch.testing.assert_close(masked(x), stock(x))
    # and back: the masked layer's state dict loads into the stock layer
    stock.load_state_dict(masked.state_dict())


def test_state_dict_without_num_batches_tracked_loads_like_stock(gen):
    old = MaskedBatchNorm(5).state_dict()
    del old["num_batches_tracked"]
    old._metadata[""]["version"] = 1  # saved before num_batches_tracked existed
    masked = MaskedBatchNorm(5)
    masked.load_state_dict(old)
    assert masked.num_batches_tracked.item() == 0


class _Reshape(nn.Module):
    def forward(self, x):
        return x.unsqueeze(-1)


def test_convert_batchnorm_replaces_every_batch_norm_keeping_weights(gen):
    model = nn.Sequential(nn.Conv1d(3, 5, 1), nn.BatchNorm1d(5, eps=1e-3), nn.ReLU(), _Reshape())
    model.append(nn.Sequential(nn.Conv2d(5, 4, 1), nn.BatchNorm2d(4, affine=False, momentum=None)))
    x = torch.randn(4, 3, 6, generator=gen)
    model(x)  # train once so the running stats are not the initial ones
    model.eval()
    want = model(x)
    weight = model[1].weight
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert convert_batchnorm(model) is model
    assert isinstance(model[1], MaskedBatchNorm) and isinstance(model[4][1], MaskedBatchNorm)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert model[1].eps == 1e-3 and model[4][1].momentum is None and not model[4][1].affine
    assert model[1].weight is weight  # the optimizer still holds the live parameter
    assert not model[1].training
    # same maths; rounding differs (torch folds (x - mean) * scale into x * a + b)
    torch.testing.assert_close(model(x), want)
    model.train()
    model(x).sum().backward()
    optimizer.step()
    assert model[4][1].num_batches_tracked.item() == 2


def test_convert_batchnorm_keeps_a_shared_batch_norm_shared():
    shared = nn.BatchNorm1d(3)
    model = nn.ModuleDict({"a": nn.Sequential(shared), "b": nn.Sequential(nn.ReLU(), shared)})
    convert_batchnorm(model)
    assert isinstance(model["a"][0], MaskedBatchNorm) and model["a"][0] is model["b"][1]


def test_convert_batchnorm_of_a_batch_norm_returns_the_new_layer():
    bn = nn.BatchNorm2d(3)
    new = convert_batchnorm(bn, padded_output="zero")
    assert isinstance(new, MaskedBatchNorm) and new.padded_output == "zero" and new.weight is bn.weight


def test_convert_batchnorm_refuses_a_default_group_sync_batch_norm_without_distributed():
    model = nn.Sequential(nn.BatchNorm1d(3), nn.SyncBatchNorm(3))
    with pytest.raises(ValueError, match="SyncBatchNorm"):
        convert_batchnorm(model)
    # nothing converted: a refusal leaves the model as it was
    assert type(model[0]) is nn.BatchNorm1d and type(model[1]) is nn.SyncBatchNorm


def test_convert_batchnorm_refuses_an_uninitialized_lazy_batch_norm():
    with pytest.raises(ValueError, match="uninitialized lazy"):
        convert_batchnorm(nn.Sequential(nn.LazyBatchNorm1d()))


@pytest.mark.parametrize("padded_output", ["normalize", "zero"])
def test_torch_save_load_round_trip_of_a_model(padded_output, gen):
    model = nn.Sequential(nn.Linear(4, 6), MaskedBatchNorm(6, channel_axis=-1, padded_output=padded_output))
    x = torch.randn(3, 5, 4, generator=gen)
    mask = prefix_mask(3, 5, [5, 2, 3])
    model[1](model[0](x), mask)
    model.eval()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    # the safe unpickler loads it once the classes are allowlisted
    with torch.serialization.safe_globals([nn.Sequential, nn.Linear, MaskedBatchNorm]):
        loaded = torch.load(buffer, weights_only=True)
    assert loaded[1].padded_output == padded_output and loaded[1].channel_axis == -1
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    torch.testing.assert_close(loaded[1](loaded[0](x), mask), model[1](model[0](x), mask), rtol=0, atol=0)


def test_deepcopy_and_repr():
    bn = MaskedBatchNorm(4, channel_axis=-1, padded_output="zero")
    clone = copy.deepcopy(bn)
    assert clone.running_mean is not bn.running_mean and torch.equal(clone.running_mean, bn.running_mean)
    assert repr(bn) == (
        "MaskedBatchNorm(4, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True, "
        "channel_axis=-1, padded_output='zero')"
    )


def test_factory_kwargs_and_module_casts(gen):
    bn = MaskedBatchNorm(3, device="cpu", dtype=torch.float64)
    assert bn.weight.dtype == bn.running_var.dtype == torch.float64
    assert bn.num_batches_tracked.dtype == torch.long
    bn.float()
    assert bn.running_var.dtype == torch.float32 and bn.num_batches_tracked.dtype == torch.long
    y = bn(torch.randn(2, 3, 4, generator=gen, dtype=torch.float64), prefix_mask(2, 4, [4, 1]))
    assert y.dtype == torch.float64 and bn.running_var.dtype == torch.float32


def test_meta_device_shapes():
    bn = MaskedBatchNorm(3, device="meta")
    y = bn(torch.empty(2, 3, 4, device="meta"), torch.ones(2, 4, dtype=torch.bool, device="meta"))
    assert y.shape == (2, 3, 4) and y.device.type == "meta"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"channel_axis": -1},
        {"channel_axis": 1, "padded_output": "zero", "bias": False, "momentum": 0.25, "eps": 0.01},
        {"affine": False, "dtype": torch.float64},
    ],
    ids=["default", "every-knob", "no-affine-float64"],
)
def test_portable_format_round_trip(kwargs, tmp_path, gen):
    layer = MaskedBatchNorm(4, **kwargs)
    dtype = kwargs.get("dtype", torch.float32)
    shape = (3, 6, 4) if layer.channel_axis == -1 else (3, 4, 6)
    x = torch.randn(shape, generator=gen, dtype=dtype)
    mask = prefix_mask(3, 6, [6, 2, 0])
    if layer.weight is not None:
        with torch.no_grad():
            layer.weight.uniform_(0.5, 2.0, generator=gen)
    layer(x, mask)
    save_portable(layer, tmp_path)
    config = json.loads((tmp_path / "maskbn.json").read_text())
    assert config["format"] == "maskbn-portable" and config["decay"] == pytest.approx(1 - layer.momentum)
    loaded = load_portable(tmp_path).eval()
    layer.eval()
    assert loaded.running_var.dtype == dtype and loaded.padded_output == layer.padded_output
    for key, value in layer.state_dict().items():
        if key != "num_batches_tracked":  # not part of the neutral format
            assert torch.equal(loaded.state_dict()[key], value), key
    torch.testing.assert_close(loaded(x, mask), layer(x, mask), rtol=0, atol=0)


@pytest.mark.parametrize("unbiased", [True, False], ids=["unbiased", "population"])
def test_portable_format_records_the_running_var_convention(unbiased, tmp_path, gen):
    layer = MaskedBatchNorm(3, momentum=1.0, unbiased_running_var=unbiased)
    layer(torch.randn(2, 3, 4, generator=gen), prefix_mask(2, 4, [4, 1]))
    save_portable(layer, tmp_path)
    config = json.loads((tmp_path / "maskbn.json").read_text())
    assert config["moving_var"] == ("unbiased" if unbiased else "population")
    loaded = load_portable(tmp_path)
    assert loaded.unbiased_running_var == unbiased
    assert torch.equal(loaded.running_var, layer.running_var)


def test_portable_file_without_moving_var_is_population(tmp_path):
    save_portable(MaskedBatchNorm(3), tmp_path)
    config = json.loads((tmp_path / "maskbn.json").read_text())
    del config["moving_var"]  # as written before the key existed
    (tmp_path / "maskbn.json").write_text(json.dumps(config))
    assert load_portable(tmp_path).unbiased_running_var is False


def test_portable_file_with_an_unknown_moving_var_is_refused(tmp_path):
    save_portable(MaskedBatchNorm(3), tmp_path)
    config = json.loads((tmp_path / "maskbn.json").read_text())
    config["moving_var"] = "sample"
    (tmp_path / "maskbn.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"moving_var must be one of .* got 'sample'"):
        load_portable(tmp_path)


@pytest.mark.parametrize(
    "kwargs",
    [{"momentum": None}, {"track_running_stats": False}],
    ids=["cumulative-average", "no-running-stats"],
)
def test_portable_format_refuses_what_it_cannot_express(kwargs, tmp_path):
    with pytest.raises(ValueError):
        save_portable(MaskedBatchNorm(4, **kwargs), tmp_path)
    assert not (tmp_path / "maskbn.json").exists()
