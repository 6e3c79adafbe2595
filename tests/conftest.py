"""Session-wide test setup: an isolated RAGTUNE_HOME and the prepared base model."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def ragtune_home(tmp_path_factory):
    """Each test session writes stores, jobs and adapters under its own folder."""
    home = tmp_path_factory.mktemp("ragtune-home")
    os.environ["RAGTUNE_HOME"] = str(home)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    return home
