"""Every module of the package imports (catches import errors in files no other test touches)."""

import importlib
import pkgutil

import pytest

import piggy_lightning

MODULES = [m.name for m in pkgutil.walk_packages(piggy_lightning.__path__, prefix="piggy_lightning.")]


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name):
    importlib.import_module(name)


def test_core_imports_no_plugin_package():
    """The core (module, forward, sites, reference, losses, drift) is a leaf: importing it loads no plugin package."""
    import subprocess
    import sys

    code = (
        "import sys, piggy_lightning.module, piggy_lightning.forward, piggy_lightning.sites, piggy_lightning.drift; "
        "bad = sorted(m for m in sys.modules if m.split('.')[:2] in ("
        "['piggy_lightning', 'regularizers'], ['piggy_lightning', 'interventions'], "
        "['piggy_lightning', 'evaluation'], ['piggy_lightning', 'callbacks'])); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, f"the core imports plugin packages: {out.stdout.strip()} {out.stderr[-2000:]}"
