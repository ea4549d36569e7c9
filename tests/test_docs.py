"""The README and the house keep their promises: its commands parse, its config keys exist, defaults follow one
rule, no import circle."""
import ast
import dataclasses
import glob
import os
import re
import shlex
import typing

import pytest
import yaml

import main
import schema
from conftest import REPO

SECTIONS = typing.get_type_hints(schema.Config)
KEY = re.compile(r"\b(" + "|".join(SECTIONS) + r")\.([a-z][a-z_0-9]*)\b")


def readme():
    with open(os.path.join(REPO, "README.md")) as f:
        return f.read()


def main_commands(text):
    """The argument lists of every `main.py` command in the text's ```bash blocks (comments and line
    continuations handled)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if "main.py" in words:
                out.append(words[words.index("main.py") + 1:])
    return out


def test_every_readme_command_parses_with_todays_flags():
    commands = main_commands(readme())
    assert len(commands) >= 10, "the README shows each command once"
    for argv in commands:
        try:
            main.parse_args(argv)
        except SystemExit as e:
            pytest.fail(f"README command `main.py {' '.join(argv)}` does not parse (exit {e.code})")


def test_command_extraction_sees_a_bad_flag():
    bad = "```bash\npython main.py --doc q --sampel   # a typo\n```\n"
    (argv,) = main_commands(bad)
    with pytest.raises(SystemExit):
        main.parse_args(argv)


@pytest.mark.parametrize("doc", ["README.md", "docs/design.md", "docs/results.md"])
def test_every_config_key_the_docs_name_exists(doc):
    path = os.path.join(REPO, doc)
    if not os.path.exists(path):
        pytest.skip(f"no {doc}")
    with open(path) as f:
        text = f.read()
    fields = {s: {f.name for f in dataclasses.fields(cls)} for s, cls in SECTIONS.items()}
    named = set(KEY.findall(text))
    assert named, f"{doc} names no config key"
    unknown = sorted(f"{s}.{k}" for s, k in named if k not in fields[s] and not text_is_a_file(s, k))
    assert not unknown, f"{doc} names config keys the schema does not have: {unknown}"


def text_is_a_file(section, key):
    """`data.py`, `model.py`: module names, not keys."""
    return key in ("py", "pth", "yml", "md", "json", "png", "gif", "pt", "txt")


def test_schema_defaults_equal_config_yml():
    """One rule for defaults: every key config.yml states that has a default in schema.py has that value there,
    so a config that leaves a key out gets what config.yml would give it."""
    with open(os.path.join(REPO, "config.yml")) as f:
        raw = yaml.safe_load(f)
    differ = []
    for section, cls in SECTIONS.items():
        for field in dataclasses.fields(cls):
            if field.default is dataclasses.MISSING or field.name not in raw.get(section, {}):
                continue
            if raw[section][field.name] != field.default:
                differ.append(f"{section}.{field.name}: schema {field.default!r}, config.yml "
                              f"{raw[section][field.name]!r}")
    assert not differ, differ


@pytest.mark.parametrize("shipped", sorted(glob.glob(os.path.join(REPO, "configs", "*.yml"))) +
                         [os.path.join(REPO, "config.yml")], ids=os.path.basename)
def test_every_shipped_config_validates_and_runs_fp32(shipped, tmp_path, fake_mnist, monkeypatch):
    """Each shipped config, its fast switches as they are, trains two steps on the CPU at a tiny size (--set)
    and every convolution of its network runs in fp32: bf16 is several times slower on CPUs without native
    bf16. A compile switch goes through a backend that runs dynamo's graphs as they are."""
    import torch

    from conftest import CPU, graph_counter
    from model import CondRefineNetDilated

    config = schema.load_config(shipped)
    assert config.fast.bf16 is False, f"{shipped}: bf16 is several times slower on CPUs without native bf16"
    backend, graphs = graph_counter()
    compile_norms, compile_module = CondRefineNetDilated.compile_norms, torch.nn.Module.compile
    monkeypatch.setattr(CondRefineNetDilated, "compile_norms",
                        lambda self, **options: compile_norms(self, **{**options, "backend": backend}))
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, *args, **options: compile_module(self, *args, **{**options, "backend": backend}))
    dtypes = set()

    def conv_output(module, args, out):
        if isinstance(module, torch.nn.Conv2d):
            dtypes.add(out.dtype)

    tiny = ["training.n_iters=2", "training.snapshot_freq=2", "training.test_freq=2", "training.batch_size=8",
            "training.snapshot_grid=0", "model.ngf=4", "model.num_classes=4", f"data.root={fake_mnist}"]
    hook = torch.nn.modules.module.register_module_forward_hook(conv_output)
    try:
        assert main.main([*CPU, "--config", shipped, "--run", str(tmp_path / "run"), "--doc", "c",
                          *[w for s in tiny for w in ("--set", s)]]) == 0
    finally:
        hook.remove()
        torch._dynamo.reset()
    assert torch.load(tmp_path / "run" / "logs" / "c" / "checkpoint.pth", weights_only=True)["step"] == 2
    assert dtypes == {torch.float32}, f"{shipped}: the convolutions ran in {dtypes}"
    assert bool(graphs) == (config.fast.compile or config.fast.compile_norms)


def repo_modules():
    return {os.path.basename(p)[:-3]: p for p in glob.glob(os.path.join(REPO, "*.py"))}


def imports_of(path, names):
    """The repository modules a file imports anywhere in it (top level or inside functions)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & names


def find_cycle(graph):
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state:
                cycle = visit(n)
                if cycle:
                    return cycle
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            if cycle:
                return cycle
    return None


def test_no_module_imports_one_that_imports_it_back():
    mods = repo_modules()
    graph = {m: imports_of(p, set(mods)) - {m} for m, p in mods.items()}
    cycle = find_cycle(graph)
    assert cycle is None, f"import circle: {' -> '.join(cycle)}"


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
