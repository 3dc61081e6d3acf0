"""The README and docs/ stay honest (issue 24): what they show must be what the tree does.

- every relative link in README.md and docs/**.md resolves: the file exists and, for ``#anchor``
  links into Markdown, a heading of that file has that anchor (GitHub's slugs);
- every ``python launch.py ...`` command shown in a fenced code block parses with the current CLI
  (a dry parse with launch.py's own argparse parser: nothing runs);
- every command that ``launch.py -h`` lists has its section (``## COMMAND``) in docs/commands.md,
  which names every option of that command, and a row in the README's command table; every
  ``--hook`` and ``torture --inject`` choice is described in docs/success.md;
- the README is at most 150 lines and its first code block is exactly the two set-up commands;
- every page of docs/ starts with the question it answers (a ``# `` heading with a ``?``) and is
  reachable from the README through links.

The checkers are plain functions over text, so the self-tests at the bottom feed them a broken link,
a bogus flag and a missing command and see them complain.
"""

from __future__ import annotations

import argparse
import re
import shlex
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
COMMANDS_MD = DOCS / "commands.md"
MAX_README_LINES = 150
SETUP_COMMANDS = [
    'python -m pip install . && python launch.py run',
    'python -m pip install ".[test]" && python -m pytest -q',
]

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+).*?\1")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http:, https:, mailto:, ...


def md_files() -> list[Path]:
    return [README] + sorted(DOCS.rglob("*.md"))


def split_fences(text: str) -> tuple[list[str], list[list[str]]]:
    """(lines outside fenced code blocks, with the block lines blanked; each block's lines)."""
    prose: list[str] = []
    blocks: list[list[str]] = []
    cur: list[str] | None = None
    for line in text.splitlines():
        if FENCE.match(line):
            if cur is None:
                cur = []
            else:
                blocks.append(cur)
                cur = None
            prose.append("")
        elif cur is not None:
            cur.append(line)
            prose.append("")
        else:
            prose.append(line)
    if cur is not None:
        blocks.append(cur)  # an unclosed fence: its lines are still code
    return prose, blocks


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed (letters,
    digits, ``_``, ``-`` and spaces stay), each space a ``-``."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = re.sub(r"<[^>]+>", "", text).lower()
    out = []
    for ch in text:
        if ch in "-_ " or unicodedata.category(ch)[0] in "LN":
            out.append("-" if ch == " " else ch)
    return "".join(out)


def anchors(text: str) -> set[str]:
    prose, _ = split_fences(text)
    seen: dict[str, int] = {}
    found = set()
    for line in prose:
        m = HEADING.match(line)
        if not m:
            continue
        s = slug(m.group(2))
        n = seen.get(s, 0)
        seen[s] = n + 1
        found.add(s if n == 0 else f"{s}-{n}")
    return found


def links(text: str) -> list[str]:
    """Link targets in the prose (not in code blocks or inline code)."""
    prose, _ = split_fences(text)
    out = []
    for line in prose:
        out += LINK.findall(INLINE_CODE.sub("", line))
    return out


def broken_links(path: Path, text: str, root: Path = ROOT) -> list[str]:
    """Every relative link of ``text`` (the file at ``path``) that does not resolve, as one line each."""
    bad = []
    for target in links(text):
        if EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(root)}: ({target})"
        if not dest.exists():
            bad.append(f"{where}: no such file")
            continue
        try:
            dest.relative_to(root)
        except ValueError:
            bad.append(f"{where}: outside the repository")
            continue
        if anchor:
            if dest.suffix != ".md":
                bad.append(f"{where}: an anchor into a file that is not Markdown")
            elif anchor not in anchors(dest.read_text() if dest != path else text):
                bad.append(f"{where}: no heading with anchor #{anchor}")
    return bad


def shown_commands(text: str) -> list[str]:
    """Every ``python launch.py ...`` command in the fenced code blocks (``&&`` / ``;`` chains split,
    a ``$ `` prompt and trailing ``# comments`` dropped)."""
    _, blocks = split_fences(text)
    cmds = []
    for block in blocks:
        for line in block:
            for part in re.split(r"&&|;|\|\|?", line):
                part = part.strip()
                if part.startswith("$ "):
                    part = part[2:].strip()
                if part.startswith("python launch.py"):
                    cmds.append(part)
    return cmds


def parse_error(parser: argparse.ArgumentParser, command: str) -> str | None:
    """None if ``command`` parses with ``parser`` (nothing is run), else why not."""
    from ipc.errors import UsageError

    try:
        argv = shlex.split(command, comments=True)[2:]
    except ValueError as e:
        return f"not a shell command: {e}"
    if any(a in ("-h", "--help", "--version") for a in argv):
        return None  # they print and exit: nothing to check beyond the command name
    try:
        ns = parser.parse_args(argv)
    except UsageError as e:
        return str(e)
    except SystemExit as e:
        return f"argparse exit {e.code}"
    if getattr(ns, "command", None) is None:
        return "no command"
    return None


def cli_commands(parser: argparse.ArgumentParser) -> list[str]:
    """The commands ``launch.py -h`` lists."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return [a.dest for a in action._choices_actions]
    return []


def undocumented_commands(commands: list[str], commands_md: str) -> list[str]:
    prose, _ = split_fences(commands_md)
    sections = {m.group(2).strip("` ") for line in prose if (m := HEADING.match(line)) and m.group(1) == "##"}
    return [c for c in commands if c not in sections]


def command_section(commands_md: str, command: str) -> str:
    """The text of ``## COMMAND`` in docs/commands.md, up to the next ``## `` heading ('' if none)."""
    m = re.search(rf"^## `?{re.escape(command)}`?\s*$(.*?)(?=^## |\Z)", commands_md, re.M | re.S)
    return m.group(1) if m else ""


def undocumented_options(parser: argparse.ArgumentParser, commands_md: str) -> list[str]:
    """``COMMAND --option`` for every long option its docs/commands.md section does not name."""
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                section = command_section(commands_md, name)
                for opt in (o for a in sub._actions for o in a.option_strings):
                    if opt.startswith("--") and opt != "--help" and not re.search(
                            re.escape(opt) + r"(?![\w-])", section):
                        missing.append(f"{name} {opt}")
    return missing


def choices_of(parser: argparse.ArgumentParser, command: str, option: str) -> list[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for a in action.choices[command]._actions:
                if option in a.option_strings:
                    return list(a.choices or [])
    return []


def missing_from_readme_table(commands: list[str], readme: str) -> list[str]:
    rows = [line for line in split_fences(readme)[0] if line.startswith("|")]
    return [c for c in commands if not any(f"`python launch.py {c}" in r for r in rows)]


def first_code_block(text: str) -> list[str] | None:
    _, blocks = split_fences(text)
    return [line.rstrip() for line in blocks[0] if line.strip()] if blocks else None


def opening_question(text: str) -> str | None:
    """The page's first line if it is a ``# `` heading asking a question, else None."""
    first = text.lstrip("\ufeff").splitlines()[0] if text.strip() else ""
    return first if first.startswith("# ") and "?" in first else None


@pytest.fixture(scope="module")
def parser():
    import launch

    return launch.build_parser()


# --- the tree -------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", md_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    assert broken_links(path, path.read_text()) == []


@pytest.mark.parametrize("path", md_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_shown_launch_commands_parse(path, parser):
    bad = [f"{c}  ->  {err}" for c in shown_commands(path.read_text()) if (err := parse_error(parser, c))]
    assert bad == []


def test_there_are_commands_to_check():
    assert len([c for p in md_files() for c in shown_commands(p.read_text())]) >= 20


def test_every_cli_command_is_documented(parser):
    commands = cli_commands(parser)
    assert len(commands) >= 10
    assert undocumented_commands(commands, COMMANDS_MD.read_text()) == []
    assert missing_from_readme_table(commands, README.read_text()) == []


def test_every_option_is_documented(parser):
    assert undocumented_options(parser, COMMANDS_MD.read_text()) == []


def test_every_hook_and_inject_is_described(parser):
    names = choices_of(parser, "run", "--hook") + choices_of(parser, "torture", "--inject")
    assert len(names) >= 10
    text = (DOCS / "success.md").read_text()
    assert [n for n in names if f"`{n}`" not in text] == []


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES}): move detail to docs/"


def test_readme_starts_with_the_setup_commands():
    assert first_code_block(README.read_text()) == SETUP_COMMANDS


@pytest.mark.parametrize("path", sorted(DOCS.rglob("*.md")), ids=lambda p: str(p.relative_to(ROOT)))
def test_each_page_starts_with_its_question(path):
    assert opening_question(path.read_text()), f"{path.relative_to(ROOT)}: first line is not '# ...?'"


def unreachable_pages(start: Path, pages: list[Path]) -> list[Path]:
    """The Markdown ``pages`` no chain of relative links from ``start`` leads to."""
    seen, todo = {start.resolve()}, [start.resolve()]
    while todo:
        page = todo.pop()
        for target in links(page.read_text()):
            file_part = target.partition("#")[0]
            if EXTERNAL.match(target) or not file_part.endswith(".md"):
                continue
            dest = (page.parent / file_part).resolve()
            if dest.exists() and dest not in seen:
                seen.add(dest)
                todo.append(dest)
    return [p for p in pages if p.resolve() not in seen]


def test_every_docs_page_is_reachable_from_the_readme():
    assert [str(p.relative_to(ROOT)) for p in unreachable_pages(README, sorted(DOCS.rglob("*.md")))] == []


# --- the checkers catch what they are for -----------------------------------------------------------

def test_link_checker_finds_a_missing_file_and_a_missing_anchor(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A?\n\n## Time dilation (`--dilate`)\n")
    page = tmp_path / "README.md"
    good = "[a](docs/a.md) [d](docs/a.md#time-dilation---dilate) [w](https://example.org/x) `[no](nope.md)`\n"
    assert broken_links(page, good, tmp_path) == []
    bad = good + "[gone](docs/b.md) [anchor](docs/a.md#dilation)\n```\n[in code](nope.md)\n```\n"
    found = broken_links(page, bad, tmp_path)
    assert len(found) == 2 and "no such file" in found[0] and "#dilation" in found[1]


def test_slugs_follow_github():
    assert slug("The kaboom, every variant × design") == "the-kaboom-every-variant--design"
    assert slug("Measured (2026-12-07, this 2-CPU shared machine)") == "measured-2026-12-07-this-2-cpu-shared-machine"
    assert anchors("# T?\n## run\n## run\n```\n## not a heading\n```\n") == {"t", "run", "run-1"}


def test_command_checker_finds_a_bogus_flag_and_a_bad_choice(parser):
    text = ("```\npython launch.py run --design rcu-list   # fine\n"
            "python -m pip install . && python launch.py run --bogus-flag\n"
            "$ python launch.py explore kaboom --strategy nope\n"
            "python launch.py frobnicate\n```\n")
    cmds = shown_commands(text)
    assert len(cmds) == 4
    errors = [parse_error(parser, c) for c in cmds]
    assert errors[0] is None
    assert all(errors[1:]), errors
    assert "--bogus-flag" in errors[1]


def test_command_coverage_checker_finds_a_missing_section():
    md = "# Commands?\n## run\n## `clean`\n```\n## sweep\n```\n"
    assert undocumented_commands(["run", "clean", "sweep"], md) == ["sweep"]
    assert missing_from_readme_table(["run", "sweep"], "| `python launch.py run` | x |\n") == ["sweep"]


def test_reachability_checker_finds_an_orphan_page(tmp_path):
    (tmp_path / "docs").mkdir()
    for name, text in {"a.md": "# A?\n[b](b.md)\n", "b.md": "# B?\n", "c.md": "# C?\n[a](a.md)\n"}.items():
        (tmp_path / "docs" / name).write_text(text)
    (tmp_path / "README.md").write_text("[a](docs/a.md#x)\n")
    pages = sorted((tmp_path / "docs").glob("*.md"))
    assert [p.name for p in unreachable_pages(tmp_path / "README.md", pages)] == ["c.md"]


def test_option_checker_finds_an_undocumented_option():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    r = sub.add_parser("run")
    r.add_argument("--vcpus")
    r.add_argument("--fuzz")
    sub.add_parser("clean").add_argument("--dry-run")
    md = "# C?\n## run\n`--vcpus N`, `--fuzz-level`\n## clean\n`--dry-run`, and run's --fuzz is not here\n"
    assert undocumented_options(p, md) == ["run --fuzz"]
    assert choices_of(p, "run", "--vcpus") == []


def test_setup_and_question_checkers():
    assert first_code_block("# x\n```\n" + "\n".join(SETUP_COMMANDS) + "\n```\n") == SETUP_COMMANDS
    assert first_code_block("# x\n```\npython -m pip install .\n```\n") != SETUP_COMMANDS
    assert opening_question("# Why is it so?\n") and not opening_question("# Commands\nwhat?\n")
