"""The house keeps its shape: runner.py holds the method, the loop and sampling in a bounded room, train() reads in
a screen, no function runs past a screen, and the command line stays in main.py."""
import ast
import glob
import os

import main
from conftest import REPO

# runner.py is the method (its equations in the docstrings), the training loop, resume and sampling; what is none of
# these lives elsewhere (noise.py, build.py, bookkeeping.py, rundir.py, checkpoint.py, data.py, main.py). A change
# that needs more room moves a piece out.
RUNNER_MAX_LINES = 450
TRAIN_MAX_LINES = 50  # train(): the paper's loop, a screen
FUNCTION_MAX_LINES = 60  # any function of a top-level module
LONG_ALLOWED = {("main.py", "parse_args")}  # the argument parser: one add_argument after another


def top_level_modules():
    return sorted(glob.glob(os.path.join(REPO, "*.py")))


def parse(path):
    with open(path) as f:
        return ast.parse(f.read(), path)


def functions(tree):
    """(name, lines from `def` to its last line) of every function and method in the tree, nested ones too."""
    return [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_runner_is_the_method_the_loop_and_sampling_in_a_bounded_room():
    with open(os.path.join(REPO, "runner.py")) as f:
        n = len(f.read().splitlines())
    assert n <= RUNNER_MAX_LINES, (f"runner.py has {n} lines (at most {RUNNER_MAX_LINES}): move what is not the "
                                   f"method, the loop, resume or sampling out of it")


def test_train_reads_in_a_screen():
    (lines,) = [n for name, n in functions(parse(os.path.join(REPO, "runner.py"))) if name == "train"]
    assert lines <= TRAIN_MAX_LINES, f"runner.train has {lines} lines (at most {TRAIN_MAX_LINES})"


def test_no_function_runs_past_a_screen():
    long = [f"{os.path.basename(p)}: {name} ({n} lines)" for p in top_level_modules()
            for name, n in functions(parse(p))
            if n > FUNCTION_MAX_LINES and (os.path.basename(p), name) not in LONG_ALLOWED]
    assert not long, f"functions over {FUNCTION_MAX_LINES} lines: {long}"


# ----------------------------------------------------------------------------------------------------------
# The command line stays in main.py

def flag_names():
    """The attribute names of main.py's argparse namespace that nothing else in the repository defines (no class,
    field, module name or attribute assignment of a module other than main.py, and no torch object has them):
    reading one is reading the command line."""
    flags = set(vars(main.parse_args(["--doc", "x"])))
    defined = set()
    for path in top_level_modules():
        if os.path.basename(path) != "main.py":
            defined |= defined_names(parse(path))
    import subprocess

    import torch
    library = set(dir(torch.nn.Module)) | set(dir(torch.Tensor)) | set(dir(torch.Generator)) | set(dir(subprocess))
    return flags - defined - library


def defined_names(tree):
    """Names that other code may read as attributes of what a module defines: its functions, classes and globals,
    the members of its classes, the attributes it assigns (self.x = ...), and the names it imports."""
    names = set()
    bodies = [tree.body] + [n.body for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    for node in (n for body in bodies for n in body):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def command_line_reads(tree, flags):
    """Where a module reads a command line: it imports argparse, builds a namespace by hand, takes a parameter named
    `args` (a `*args` catch-all aside), or reads an attribute that only main.py's namespace has (`x.image_folder`,
    getattr(x, "ckpt")). Returns "line: what" for each, in the order of the source."""
    found = []  # (line, column, what)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name == "argparse" for a in node.names) or \
                isinstance(node, ast.ImportFrom) and node.module == "argparse":
            found.append((node.lineno, node.col_offset, "imports argparse"))
        elif isinstance(node, ast.arguments):
            named = node.posonlyargs + node.args + node.kwonlyargs
            found += [(a.lineno, a.col_offset, "a parameter named args") for a in named if a.arg == "args"]
        elif isinstance(node, ast.Attribute) and node.attr in flags:
            found.append((node.lineno, node.col_offset, f"reads .{node.attr}"))
        elif isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute)):
            name = node.func.id if isinstance(node.func, ast.Name) else node.func.attr
            if name in ("Namespace", "SimpleNamespace"):
                found.append((node.lineno, node.col_offset, f"builds a {name}"))
            elif name in ("getattr", "hasattr") and len(node.args) > 1 and \
                    isinstance(node.args[1], ast.Constant) and node.args[1].value in flags:
                found.append((node.lineno, node.col_offset, f"{name}(..., {node.args[1].value!r})"))
    return [f"{line}: {what}" for line, _, what in sorted(found)]


def test_the_flags_only_main_py_has_are_known():
    assert {"image_folder", "ckpt", "resume_training", "overwrite"} <= flag_names()


def test_only_main_py_reads_the_command_line():
    flags = flag_names()
    found = [f"{os.path.basename(p)}:{where}" for p in top_level_modules() if os.path.basename(p) != "main.py"
             for where in command_line_reads(parse(p), flags)]
    assert not found, f"modules below main.py read a command line (give them the values instead): {found}"


def test_tests_and_benchmarks_build_no_namespace():
    found = [f"{os.path.relpath(p, REPO)}:{where}"
             for p in glob.glob(os.path.join(REPO, "tests", "*.py")) + glob.glob(os.path.join(REPO, "bench", "*.py"))
             for where in command_line_reads(parse(p), set()) if "builds a" in where]
    assert not found, f"call the functions with plain values, not a faked command line: {found}"


def test_the_command_line_rule_sees_a_namespace():
    planted = ast.parse("import argparse\n"
                        "def sample(args, config):\n"
                        "    return args.image_folder, getattr(args, 'ckpt', None)\n"
                        "def writer(*args, **kwargs):\n"  # a catch-all is no namespace
                        "    return argparse.Namespace(doc='x')\n")
    found = command_line_reads(planted, flag_names())
    assert [f.split(": ", 1)[1] for f in found] == [
        "imports argparse", "a parameter named args", "reads .image_folder", "getattr(..., 'ckpt')",
        "builds a Namespace"], found
