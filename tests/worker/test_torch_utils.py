"""worker.torch_utils: the interface wrapper, batched prediction, the layers that produce the outputs."""

from __future__ import annotations

import numpy as np

from tests import factories_train as f
from worker import torch_utils
from worker.core import ArrayDataset, WorkingModel


def test_output_layers_finds_the_classifier() -> None:
    import torch

    module = f.residual_cnn()
    found = torch_utils.output_layers(module, (torch.zeros(2, 1, 8, 8),))
    assert found == [module.fc]


def test_predict_leaves_every_submodule_in_its_mode() -> None:
    """A frozen teacher in eval mode must stay there (BatchNorm running stats, dropout) after predict."""
    import torch

    inner = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.5)).eval()
    inner[0].train()  # a mixed state is restored as it was, module by module
    model = WorkingModel(form="torch", origin="onnx", input_names=["x"], output_names=["y"], module=inner)
    wrapper = torch_utils.interface(model)
    assert wrapper.training is False  # a fresh wrapper reports the mode of what it wraps
    x = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    first = torch_utils.predict(wrapper, ArrayDataset({"x": x}), ["x"], "cpu")
    assert [m.training for m in inner] == [True, False, False]
    second = torch_utils.predict(torch_utils.interface(model), ArrayDataset({"x": x}), ["x"], "cpu")
    np.testing.assert_array_equal(first, second)  # eval mode during predict: deterministic
    assert inner.training is False and [m.training for m in inner] == [True, False, False]


def test_to_tensors_orders_by_name_and_names_missing_arrays() -> None:
    import pytest

    from worker.core import StepFailed

    data = ArrayDataset({"b": np.ones((3, 2), np.float32), "a": np.zeros((3, 1), np.int64)})
    a, b = torch_utils.to_tensors(data, ["a", "b"], "cpu", slice(0, 2))
    assert tuple(a.shape) == (2, 1) and tuple(b.shape) == (2, 2) and float(b.sum()) == 4.0
    with pytest.raises(StepFailed) as err:
        torch_utils.to_tensors(data, ["a", "c"], "cpu")
    assert err.value.code == "dataset_mismatch" and "'c'" in err.value.message


def test_module_device_and_count_params() -> None:
    import torch

    module = torch.nn.Linear(3, 2)
    assert torch_utils.count_params(module) == 3 * 2 + 2
    assert torch_utils.module_device(module) == "cpu" and torch_utils.module_device(torch.nn.ReLU()) == "cpu"
