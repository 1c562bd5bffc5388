"""Shared test setup: the torchvision shim must be in place before any model library imports."""

from matcher.compat import install_torchvision_shim

install_torchvision_shim()
