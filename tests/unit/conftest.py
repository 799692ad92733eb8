"""Fixtures shared by several unit test files."""

import random
from pathlib import Path

import pytest

from tests.support.vmdk_images import SIZE, source_pieces, to_vmdk, write_scattered

# -- VMDK images, used by tests/unit/test_vmdk.py and tests/unit/test_vmdk_hostile.py: made
# once for each module that asks for them, from the scattered source disk by qemu-img


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vmdk")


@pytest.fixture(scope="module")
def source(workdir: Path) -> Path:
    raw = workdir / "source.raw"
    write_scattered(raw, SIZE, source_pieces(random.Random(1), SIZE))
    return raw


@pytest.fixture(scope="module")
def sparse(workdir: Path, source: Path) -> Path:
    return to_vmdk(source, workdir / "sparse.vmdk", "monolithicSparse")


@pytest.fixture(scope="module")
def stream(workdir: Path, source: Path) -> Path:
    return to_vmdk(source, workdir / "stream.vmdk", "streamOptimized")
