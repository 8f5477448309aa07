"""Suite-wide settings."""

from __future__ import annotations

import gc

import pytest


@pytest.fixture(autouse=True)
def _automatic_garbage_collection(request):
    """The viewer switches Python's automatic collection off in favour of a GUI-thread timer
    (app/gui_gc.py); tests outside tests/app run after them in the same process and need it back on."""
    if "tests/app/" not in str(request.node.path).replace("\\", "/"):
        gc.enable()
    yield
