"""Makes this Python look like one where some packages are not installed: with this folder on PYTHONPATH, every
Python process (and each one it starts, which inherits PYTHONPATH) imports this file at start-up, and the
top-level modules named in HIDE_MODULES (comma-separated) cannot be imported from the interpreter's own
site-packages. A copy of them elsewhere on sys.path still imports: that is how bench/gpu_check.sh's rehearsal
shows that the carried tensorboardX wheel, installed with pip --target, is what the check uses.

    PYTHONPATH=tests/hide_modules HIDE_MODULES=tensorboardX,nbclient,nbformat python -c "import nbclient"
    # ModuleNotFoundError: No module named 'nbclient' (hidden by tests/hide_modules)
"""
import importlib.machinery
import os
import site
import sys
import sysconfig

HIDDEN = {name.strip() for name in os.environ.get("HIDE_MODULES", "").split(",") if name.strip()}


def _site_dirs():
    dirs = list(site.getsitepackages()) + [site.getusersitepackages()]
    dirs += [sysconfig.get_paths()[key] for key in ("purelib", "platlib")]
    return {os.path.realpath(d) for d in dirs}


class HideInstalled:
    """A meta path finder ahead of Python's own: a hidden top-level module is looked up on sys.path without the
    site-packages folders; not found there, it is a ModuleNotFoundError, as if it were not installed."""

    site_dirs = _site_dirs()

    def find_spec(self, name, path=None, target=None):
        if name not in HIDDEN:  # submodules follow their package, found (or not) already
            return None
        elsewhere = [p for p in sys.path if os.path.realpath(p or os.getcwd()) not in self.site_dirs]
        spec = importlib.machinery.PathFinder.find_spec(name, elsewhere)
        if spec is None:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by tests/hide_modules)", name=name)
        return spec


if HIDDEN:
    sys.meta_path.insert(0, HideInstalled())
