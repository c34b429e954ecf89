"""Shared by the three test files: the environment and the tiny test world.

Before any test module imports kernels.py: with no GPU, Triton kernels run through its interpreter, which
must be switched on before the @triton.jit decorators run. Nothing reaches the model hub.
The tiny 'test' world is built once per session by build_world.py (seconds to a minute) into a temporary
folder, or into $VLRM_TEST_WORLD_ROOT to reuse one between runs.
"""
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def world_root(tmp_path_factory):
    return Path(os.environ.get("VLRM_TEST_WORLD_ROOT") or tmp_path_factory.mktemp("worlds"))


@pytest.fixture(scope="session")
def world(world_root):
    import build_world
    return build_world.build("test", root=world_root, quiet=True)
