"""The tensor-memory tracker against hand-counted allocations."""

import torch

from profilers.memory import TensorMemoryTracker


def test_counts_live_storages_once_and_releases_them() -> None:
    with TensorMemoryTracker() as mt:
        a = torch.empty(1000)  # 4000 B
        view = a.view(10, 100)  # same storage: not counted again
        b = torch.empty(500, dtype=torch.float64)  # 4000 B
        assert mt.current_bytes == 8000
        del a, view
        assert mt.current_bytes == 4000
        c = torch.empty(250)  # 1000 B, after the peak
    assert mt.peak_bytes == 8000
    assert mt.current_bytes == 5000
    del b, c


def test_existing_tensors_form_the_baseline() -> None:
    w = torch.zeros(100, 10)  # 4000 B
    g = torch.zeros(100, 10)
    with TensorMemoryTracker(existing=[w, g, w]) as mt:
        x = torch.ones(100, 10)
        y = x * 2  # 4000 B more while x lives
        del x, y
    assert mt.baseline_bytes == 8000
    assert mt.peak_bytes == 16000


def test_activations_saved_for_backward_are_counted() -> None:
    lin = torch.nn.Linear(64, 256, bias=False)
    x = torch.randn(128, 64)
    with TensorMemoryTracker(existing=list(lin.parameters())) as mt:
        h = lin(x)  # 128 x 256 fp32 = 131072 B
        out = h.relu()  # another 131072 B, saved for backward
        del h
        out.sum().backward()
    assert mt.baseline_bytes == 64 * 256 * 4
    # At its peak: weight, h, and relu's output alive together (x predates the tracker).
    assert mt.peak_bytes >= 64 * 256 * 4 + 2 * 131072


def test_wrapper_subclasses_count_their_local_storage() -> None:
    from torch.testing._internal.two_tensor import TwoTensor

    a, b = torch.zeros(100), torch.zeros(100)  # 400 B + 400 B inside one wrapper
    with TensorMemoryTracker(existing=[TwoTensor(a, b)]) as mt:
        pass
    assert mt.baseline_bytes == 800
