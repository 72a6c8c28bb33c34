"""Every module of the package imports (catches import errors in files no other test touches)."""

import importlib
import pkgutil

import pytest

import piggy_lightning

MODULES = [m.name for m in pkgutil.walk_packages(piggy_lightning.__path__, prefix="piggy_lightning.")]


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name):
    importlib.import_module(name)
