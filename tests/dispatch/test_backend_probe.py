import torch

from moekit.dispatch.backends import _probe_grouped_mm


def test_probe_is_not_fooled_by_no_grad() -> None:
    _probe_grouped_mm.cache_clear()
    with torch.no_grad():
        under_no_grad = _probe_grouped_mm("cpu", torch.float32)
    _probe_grouped_mm.cache_clear()
    assert under_no_grad == _probe_grouped_mm("cpu", torch.float32)
