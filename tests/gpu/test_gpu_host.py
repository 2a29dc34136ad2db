"""The GPU host's torch is in pyproject.toml's tested range: the range the project states is what ran here."""

from __future__ import annotations

import pytest

from conftest import outside_tested_range

pytestmark = pytest.mark.gpu


def test_the_gpu_hosts_torch_is_in_the_tested_range():
    import torch

    assert torch.cuda.is_available() and torch.cuda.device_count() >= 1
    assert not outside_tested_range("torch", "torchvision", "timm")
