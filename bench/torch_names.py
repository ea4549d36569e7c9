"""Does every torch name the code uses exist in the torch of this Python? Reads the given files (default: the
top-level modules, bench/*.py and tests/test_cuda.py) without running them, collects each `torch.*` name they use
(attribute chains on `torch` and on its imported submodules, `from torch... import ...`), and resolves it in the
installed torch. For an older torch, such as the GPU machine's (docs/gpu.md):

    /path/to/other/python bench/torch_names.py

Prints the torch version, the number of names and those that do not resolve; exits 1 if any does not.
"""
import ast
import glob
import importlib
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_files():
    return (sorted(glob.glob(os.path.join(REPO, "*.py"))) + sorted(glob.glob(os.path.join(REPO, "bench", "*.py")))
            + [os.path.join(REPO, "tests", "test_cuda.py")])


def dotted(node):
    """'a.b.c' for an attribute chain on a plain name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else None


def torch_names(path):
    """Every torch name the file uses, spelled from `torch` (an alias such as F is written out)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    aliases, names = {"torch": "torch"}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update({a.asname or a.name: a.name for a in node.names if a.name.split(".")[0] == "torch"})
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch":
            names.update(f"{node.module}.{a.name}" for a in node.names)
    for node in ast.walk(tree):
        name = dotted(node) if isinstance(node, ast.Attribute) else None
        head = name and name.split(".")[0]
        if head in aliases:
            names.add(aliases[head] + name[len(head):])
    return names


def resolves(name):
    """Whether `name` is an attribute (or a submodule) path that exists in the installed torch."""
    parts = name.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], 1):
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        try:
            obj = importlib.import_module(".".join(parts[:i + 1]))
        except ImportError:
            return False
    return True


def main(argv=None):
    import torch
    paths = (sys.argv[1:] if argv is None else argv) or default_files()
    names = set().union(*(torch_names(p) for p in paths))
    missing = sorted(n for n in names if not resolves(n))
    print(f"torch {torch.__version__}: {len(names)} names used by {len(paths)} files; "
          f"{'all resolve' if not missing else 'missing: ' + ', '.join(missing)}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
