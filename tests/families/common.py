"""The module fixtures every family test starts from: the generated checkpoint, the known
mapping, the checkpoint's tree and the meta-device target."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from matcher.mapping import Mapping
from matcher.sources import open_tree
from matcher.targets import build_target

KNOWN = Path(__file__).resolve().parents[2] / "known_mappings"


def family_fixtures(make: Callable[[Path], dict], mapping_path: Path, target_class: str):
    """(fixture, mapping, source_tree, target) pytest fixtures; assign them to those names in the test module."""

    @pytest.fixture(scope="module")
    def fixture(tmp_path_factory):
        return make(tmp_path_factory.mktemp(mapping_path.stem))

    @pytest.fixture(scope="module")
    def mapping():
        return Mapping.load(mapping_path)

    @pytest.fixture(scope="module")
    def source_tree(fixture):
        return open_tree(fixture["source"])

    @pytest.fixture(scope="module")
    def target(fixture):
        return build_target(target_class, fixture["config"])

    return fixture, mapping, source_tree, target
