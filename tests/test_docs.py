"""The README and the house keep their promises: its commands parse, its config keys exist, defaults follow one
rule, no import circle."""
import ast
import dataclasses
import glob
import os
import re
import shlex
import sys
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
    and every convolution of the path it pins runs in fp32: bf16 is several times slower on CPUs without native
    bf16 (fast.auto, off here, times bf16 only where it is native: tests/test_speedpath.py). A compile switch goes
    through a backend that runs dynamo's graphs as they are."""
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
            "training.snapshot_grid=0", "model.ngf=4", "model.num_classes=4", f"data.root={fake_mnist}",
            "fast.auto=false", "training.max_minutes=0"]  # no budget: on a busy machine quick.yml's would end at step 1
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


# ----------------------------------------------------------------------------------------------------------
# Links, anchors and pointers: every place the docs send a reader exists.
#
# Pages (README.md, docs/*.md) link with Markdown links, relative to the page: [text](docs/design.md#anchor).
# Config comments and the docstrings and comments of the modules (*.py, bench/) point with a path from the
# repository's root, optionally with an anchor: README.md#install, docs/results.md#the-learning-rate. A bare
# "README" (as in "(README)") names no place and is refused; "the README's" (talk about it) is fine.

PAGES = ["README.md"] + sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))
POINTER_FILES = sorted(
    [os.path.relpath(p, REPO) for pattern in ("*.py", "bench/*.py", "bench/*.sh", "configs/*.yml")
     for p in glob.glob(os.path.join(REPO, pattern))] + ["config.yml"])
FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
POINTER = re.compile(r"(?<![\w/.-])((?:README|docs/[\w.-]+)\.md)(?:#([\w-]+))?")
BARE_README = re.compile(r"\bREADME\b(?!\.md|'s)")
HTML_ANCHOR = re.compile(r"<a\s+(?:[^>]*\s)?(?:id|name)=[\"']([^\"']+)[\"']", re.I)


def read(relpath):
    with open(os.path.join(REPO, relpath)) as f:
        return f.read()


def without_code(text):
    """The page without its fenced code blocks and inline code: links and headings in code are not links."""
    text = FENCE.sub("", text)
    return re.sub(r"`[^`\n]*`", "", text)


def github_slug(heading):
    """The anchor GitHub gives a heading: its text (links as their text, no markup), lowercased, every character
    but letters, digits, spaces, '-' and '_' removed, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](url) -> text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(relpath):
    """Every anchor of a page: its headings' slugs (the n-th repeat of a slug gets -n) and explicit <a id=...>."""
    text = FENCE.sub("", read(relpath))
    found, seen = set(), {}
    for heading in re.findall(r"^ {0,3}#{1,6}[ \t]+(.+?)[ \t#]*$", text, re.M):
        slug = github_slug(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        found.add(slug if n == 0 else f"{slug}-{n}")
    return found | set(HTML_ANCHOR.findall(text))


def link_problem(page, target):
    """Why the relative link `target` on `page` leads nowhere, or None."""
    if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http(s), mailto: not fetched
        return None
    path, _, anchor = target.partition("#")
    dest = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
    if dest.startswith(".."):
        return f"{target}: outside the repository"
    if not os.path.exists(os.path.join(REPO, dest)):
        return f"{target}: no file {dest}"
    if anchor and not dest.endswith(".md"):
        return f"{target}: an anchor into {dest}, which is not a page"
    if anchor and anchor not in anchors(dest):
        return f"{target}: {dest} has no heading or <a id> with the anchor #{anchor}"
    return None


@pytest.mark.parametrize("page", PAGES)
def test_every_link_and_anchor_of_a_page_resolves(page):
    targets = LINK.findall(without_code(read(page)))
    assert targets or page != "README.md", "the README links to its docs"
    broken = [p for p in (link_problem(page, t) for t in targets) if p]
    assert not broken, f"{page}: {broken}"


def test_the_link_checker_sees_a_broken_file_and_anchor():
    assert link_problem("README.md", "docs/design.md#seed-streams") is None
    assert link_problem("docs/design.md", "results.md") is None
    assert link_problem("README.md", "docs/nothing.md") is not None
    assert link_problem("README.md", "docs/design.md#no-such-heading") is not None
    assert link_problem("docs/design.md", "#seed-streams") is None
    assert link_problem("README.md", "https://example.org/x#y") is None


def test_heading_slugs_follow_githubs_rules():
    assert github_slug("The `fast.compile` switch: 2x?") == "the-fastcompile-switch-2x"
    assert github_slug("The recipe as shipped: seeds 1, 2, 3 and 1234") == "the-recipe-as-shipped-seeds-1-2-3-and-1234"
    assert github_slug("bf16 against fp32 (step_lr 1.7e-5)") == "bf16-against-fp32-step_lr-17e-5"
    assert github_slug("See [the paper](https://arxiv.org)") == "see-the-paper"


def test_repeated_headings_and_html_anchors_are_anchors(tmp_path, monkeypatch):
    (tmp_path / "p.md").write_text("# Notes\n\n## Run\n\n```\n## Run\n```\n\n## Run\n\n<a id=\"here\"></a>\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", str(tmp_path))
    assert anchors("p.md") == {"notes", "run", "run-1", "here"}


def pointer_problems(relpath):
    """Pointers of one config or module (comments, docstrings and messages alike) that lead nowhere."""
    text, problems = read(relpath), []
    for m in BARE_README.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        problems.append(f"{relpath}:{line}: a bare README names no place (write README.md#anchor)")
    for m in POINTER.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        problem = link_problem("x", m.group(1) + (f"#{m.group(2)}" if m.group(2) else ""))
        if problem:
            problems.append(f"{relpath}:{line}: {problem}")
    return problems


@pytest.mark.parametrize("relpath", POINTER_FILES)
def test_every_pointer_in_a_config_or_module_resolves(relpath):
    problems = pointer_problems(relpath)
    assert not problems, problems


def test_the_pointer_checker_sees_a_stale_pointer(tmp_path, monkeypatch):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Its section\n")
    (tmp_path / "README.md").write_text("# Title\n")
    (tmp_path / "x.yml").write_text("a: 1  # (README)\nb: 2  # docs/a.md#its-section\nc: 3  # docs/a.md#gone\n"
                                    "d: 4  # README.md#title; the README's pictures\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", str(tmp_path))
    problems = pointer_problems("x.yml")
    assert len(problems) == 2 and "x.yml:1:" in problems[0] and "x.yml:3:" in problems[1], problems


WORDS_ABOUT_THE_MAKING = re.compile(r"\bissues?\b|\bthis session\b|\bproject's (machines?|kind)\b", re.I)


@pytest.mark.parametrize("page", PAGES)
def test_no_page_speaks_of_how_the_repository_was_made(page):
    """The pages speak to users about the repository, not of the tracker's issues or the machines it was built
    on."""
    found = [f"{page}:{read(page).count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}"
             for m in WORDS_ABOUT_THE_MAKING.finditer(read(page))]
    assert not found, found


def test_the_readme_reads_in_a_few_screens():
    assert len(readme().splitlines()) < 300
