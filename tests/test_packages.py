"""The torch this suite runs is in pyproject.toml's tested range (`make test-gpu` checks the GPU host's)."""

from __future__ import annotations

from conftest import outside_tested_range


def test_the_installed_torch_is_in_the_tested_range():
    assert not outside_tested_range("torch", "torchvision", "timm", "numpy", "tritonclient")
