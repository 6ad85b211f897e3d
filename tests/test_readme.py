"""The README and docs/ stay true: their commands parse, their links resolve, the daily loop runs.

Every ``selfment-label`` command in a shell block of README.md or docs/*.md must name a
subcommand that accepts every option shown (parsed by the CLI's own click command, without
running it); every ``python benchmarks/...`` command must name a script that exists, runs in
the form shown and declares the options shown. The README's block marked
``<!-- runs in tests/test_readme.py -->`` is run for real on three ecssd-dev images with the
real backbone (``review`` with ``--no-launch``, so no App is started), and what it shows as
output must be what the commands print (counts and plain lines; timings aside). FiftyOne
is touched: run this module under the shared lock (``flock /work/wt/fiftyone.lock``).
"""

from __future__ import annotations

import ast
import importlib
import json
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
from selfment_label_cli.main import app
from typer.main import get_command
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
RUNS_MARK = "<!-- runs in tests/test_readme.py -->"
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
MAX_README_LINES = 250
LOOP_IMAGES = ("0001.jpg", "0002.jpg", "0003.jpg")
WEIGHTS_NAME = "dinov2_vits14.safetensors"


@dataclass(frozen=True)
class Block:
    """A fenced code block of a Markdown page."""

    page: Path
    line: int
    language: str
    text: str
    runs: bool


@dataclass(frozen=True)
class Command:
    """One shell command of a block, with the output the page shows after it (console only)."""

    where: str
    argv: tuple[str, ...]
    shown_output: str


def code_blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a page, each marked whether the page asks for it to be run."""
    blocks: list[Block] = []
    lines = page.read_text().splitlines()
    start = None
    for number, line in enumerate(lines):
        if start is None and line.startswith("```"):
            start = number
        elif start is not None and line.strip() == "```":
            before = [text for text in lines[:start] if text.strip()]
            blocks.append(
                Block(
                    page=page,
                    line=start + 1,
                    language=lines[start][3:].strip(),
                    text="\n".join(lines[start + 1 : number]),
                    runs=bool(before) and before[-1].strip() == RUNS_MARK,
                )
            )
            start = None
    assert start is None, f"{page.name}:{start + 1}: a code block is not closed"
    return blocks


def shell_commands(block: Block) -> list[Command]:
    """The commands of a shell block: ``$ `` lines of a console block, else every line."""
    where = f"{block.page.relative_to(ROOT)}:{block.line}"
    if block.language == "console":
        commands = []
        for chunk in re.split(r"^\$ ", block.text, flags=re.M)[1:]:
            command, _, output = chunk.partition("\n")
            commands.append(Command(where, tuple(shlex.split(command)), output))
        return commands
    joined = block.text.replace("\\\n", " ")
    return [
        Command(where, tuple(shlex.split(line, comments=True)), "")
        for line in joined.splitlines()
        if shlex.split(line, comments=True)
    ]


def all_commands(program: str) -> list[Command]:
    """Every command of the pages' shell blocks whose first word is ``program``."""
    return [
        command
        for page in PAGES
        for block in code_blocks(page)
        if block.language in SHELL_LANGUAGES
        for command in shell_commands(block)
        if command.argv[0] == program
    ]


CLI_COMMANDS = all_commands("selfment-label")
BENCHMARK_COMMANDS = [
    command
    for command in all_commands("python")
    if re.match(r"-m benchmarks\.|benchmarks/", " ".join(command.argv[1:3]))
]


def test_every_code_block_names_its_language():
    blocks = [block for page in PAGES for block in code_blocks(page)]
    unnamed = [f"{block.page.name}:{block.line}" for block in blocks if not block.language]
    assert not unnamed, f"code blocks without a language (bash, console, python, text): {unnamed}"


def test_the_pages_show_commands_to_check():
    assert len(CLI_COMMANDS) >= 20
    assert {command.argv[1] for command in CLI_COMMANDS} >= {
        "run",
        "review",
        "export",
        "train",
        "apply",
        "eval",
    }
    assert len(BENCHMARK_COMMANDS) >= 5


@pytest.mark.parametrize(
    "command", CLI_COMMANDS, ids=[f"{c.where} {' '.join(c.argv[1:3])}" for c in CLI_COMMANDS]
)
def test_every_cli_command_parses(command: Command):
    group = get_command(app)
    name, *args = command.argv[1:]
    if name.startswith("-"):
        options = {option for param in group.params for option in param.opts}
        assert name in options, f"{command.where}: selfment-label has no option {name}"
        return
    assert name in group.commands, f"{command.where}: no subcommand {name!r}"
    try:
        group.commands[name].make_context(name, list(args))
    except Exception as error:  # a usage error, of click or of the click that typer vendors
        pytest.fail(f"{command.where}: `{shlex.join(command.argv)}`: {error}")


def benchmark_script(command: Command) -> tuple[Path, list[str]]:
    """The script a ``python benchmarks/X.py`` or ``python -m benchmarks.X`` runs, and its args."""
    if command.argv[1] == "-m":
        return ROOT / (command.argv[2].replace(".", "/") + ".py"), list(command.argv[3:])
    return ROOT / command.argv[1], list(command.argv[2:])


def declares_option(source: str, option: str) -> bool:
    """Whether an argparse or Typer script declares ``option``."""
    name = option.split("=")[0]
    parameter = name.removeprefix("--").removeprefix("no-").replace("-", "_")
    return f'"{name}"' in source or re.search(rf"^\s+{parameter}\s*:", source, re.M) is not None


def imported_siblings(script: Path, source: str) -> list[Path]:
    """The benchmark modules ``script`` imports from (where shared options are declared)."""
    names = re.findall(r"^from (?:benchmarks\.)?(\w+) import", source, re.M)
    paths = (script.parent / f"{name}.py" for name in names)
    return [path for path in paths if path.is_file()]


@pytest.mark.parametrize(
    "command", BENCHMARK_COMMANDS, ids=[f"{c.where} {c.argv[-1]}" for c in BENCHMARK_COMMANDS]
)
def test_every_benchmark_command_names_a_script_and_its_options(command: Command):
    script, args = benchmark_script(command)
    assert script.is_file(), f"{command.where}: {script.relative_to(ROOT)} does not exist"
    source = script.read_text()
    declared = source + "".join(
        sibling.read_text() for sibling in imported_siblings(script, source)
    )
    if command.argv[1] == "-m":
        siblings = {path.stem for path in script.parent.glob("*.py")}
        bare = set(re.findall(r"^from (\w+) import", source, re.M)) & siblings
        assert not bare, f"{command.where}: run as a module, {script.name} cannot import {bare}"
    else:
        assert "from benchmarks." not in source or "sys.path.insert" in source, (
            f"{command.where}: {script.name} imports the benchmarks package: run it with -m"
        )
    for option in (arg for arg in args if arg.startswith("--")):
        assert declares_option(declared, option), f"{command.where}: {script.name} has no {option}"


PYTHON_BLOCKS = [
    block for page in PAGES for block in code_blocks(page) if block.language == "python"
]


def provides(module: ModuleType, name: str) -> bool:
    """Whether a module has ``name``; the package's public names, imported on first use, are
    read from its ``__all__`` so that none is imported (FiftyOne, Ray)."""
    if module.__name__ == "selfment_label":
        return name in module.__all__
    return hasattr(module, name)


@pytest.mark.parametrize(
    "block", PYTHON_BLOCKS, ids=[f"{b.page.relative_to(ROOT)}:{b.line}" for b in PYTHON_BLOCKS]
)
def test_every_python_block_compiles_and_imports_what_exists(block: Block):
    tree = ast.parse(block.text, filename=f"{block.page.name}:{block.line}")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module.split(".")[0] == "selfment_label":
            try:
                module = importlib.import_module(node.module)
            except ModuleNotFoundError as error:
                if error.name.startswith("selfment_label"):
                    raise
                pytest.skip(f"{node.module} needs {error.name}, not installed")
            missing = [alias.name for alias in node.names if not provides(module, alias.name)]
            assert not missing, f"{block.page.name}:{block.line}: {node.module} has no {missing}"


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a page (GitHub numbers repeated ones)."""
    seen: dict[str, int] = {}
    result = set()
    for line in without_code_blocks(page).splitlines():
        if match := re.match(r"#{1,6} (.+)", line):
            anchor = github_anchor(match.group(1))
            count = seen.get(anchor, 0)
            seen[anchor] = count + 1
            result.add(anchor if count == 0 else f"{anchor}-{count}")
    return result


def without_code_blocks(page: Path) -> str:
    """A page without its fenced code blocks."""
    return re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)


LINKS = [
    (page, target)
    for page in PAGES
    for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"`[^`]*`", "", without_code_blocks(page)))
    if not re.match(r"[a-z]+:", target)
]


@pytest.mark.parametrize(
    ("page", "target"), LINKS, ids=[f"{p.relative_to(ROOT)}->{t}" for p, t in LINKS]
)
def test_every_relative_link_resolves(page: Path, target: str):
    path, _, anchor = target.partition("#")
    linked = (page.parent / path).resolve() if path else page
    assert linked.exists(), f"{page.relative_to(ROOT)}: {path} does not exist"
    if anchor:
        assert linked.suffix == ".md", f"{page.relative_to(ROOT)}: #{anchor} on a non-page"
        assert anchor in anchors(linked), f"{page.relative_to(ROOT)}: no #{anchor} in {path}"


def test_the_readme_is_a_front_door():
    text = README.read_text()
    assert len(text.splitlines()) <= MAX_README_LINES
    for page in PAGES[1:]:
        assert f"(docs/{page.name}" in text, f"README.md does not link docs/{page.name}"
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    ci = [shlex.split(line) for line in ci_lines if line.startswith(("pip ", "python "))]
    readme = [c.argv for c in all_commands("pip") + all_commands("python") if "README" in c.where]
    assert [command[:2] for command in readme] == [("pip", "install"), ("python", "-m")]
    assert all(list(command) in ci for command in readme), "README's install or tests are not CI's"


def shown_facts(output: str) -> set[tuple[str, ...]]:
    """What an output says that does not change from run to run.

    Table rows whose value is a count, and lines that start at the first column (printed
    sentences), with the dataset name's hash of the run folder's path masked.
    """
    facts: set[tuple[str, ...]] = set()
    for line in output.splitlines():
        if line.startswith("│"):
            cells = tuple(cell.strip() for cell in line.strip("│").split("│"))
            if len(cells) == 2 and cells[1].isdigit():
                facts.add(cells)
        elif line and not line[0].isspace() and line[0] not in "┌└├" and line[:3] != "...":
            facts.add((re.sub(r"-[0-9a-f]{6}\b", "-<hash>", line.rstrip()),))
    return facts


# what `review` prints only once the App runs (the test adds --no-launch)
APP_LINE = re.compile(r"https?://|Tag samples")


def marked_blocks(language: str) -> list[Block]:
    """The README's blocks of ``language`` marked to be run."""
    return [b for b in code_blocks(README) if b.runs and b.language == language]


@pytest.fixture
def loop_folder(tmp_path: Path, ecssd_dir: Path, weights_path: Path, monkeypatch) -> Path:
    """A folder laid out as the README's daily loop expects, made the working directory."""
    (tmp_path / "images").mkdir()
    for name in LOOP_IMAGES:
        shutil.copy(ecssd_dir / "images" / name, tmp_path / "images" / name)
    (tmp_path / WEIGHTS_NAME).symlink_to(weights_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_as_shown(command: Command) -> None:
    """Run one README command in this process and compare its output with what is shown."""
    args = list(command.argv[1:])
    shown = shown_facts(command.shown_output)
    if args[0] == "review" and not {"--no-launch", "--status"} & set(args):
        args.append("--no-launch")
        shown = {fact for fact in shown if not APP_LINE.match(fact[0])}
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, f"`{shlex.join(command.argv)}` failed:\n{result.output}"
    missing = shown - shown_facts(result.output)
    assert not missing, f"`{shlex.join(command.argv)}` did not print {missing}:\n{result.output}"


def delete_review_datasets(run_dir: Path) -> None:
    """Delete the FiftyOne datasets that ``review`` recorded for a run."""
    import fiftyone as fo

    record = run_dir / "review.json"
    names = json.loads(record.read_text())["datasets"] if record.is_file() else []
    for name in set(names) & set(fo.list_datasets()):
        fo.delete_dataset(name)


def test_the_readme_daily_loop_and_python_example_run_as_shown(loop_folder: Path, capsys):
    pytest.importorskip("fiftyone")
    commands = [c for block in marked_blocks("console") for c in shell_commands(block)]
    assert [c.argv[1] for c in commands] == ["run", "review", "export"]
    try:
        for command in commands:
            run_as_shown(command)
    finally:
        delete_review_datasets(loop_folder / "labels")
    assert (loop_folder / "dataset" / "annotations" / "instances_train.json").is_file()

    (example,) = marked_blocks("python")
    capsys.readouterr()
    exec(compile(example.text, f"README.md:{example.line}", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"0 {len(LOOP_IMAGES)} {{}}"
    assert [line.split()[0] for line in printed[1:]] == list(LOOP_IMAGES)
