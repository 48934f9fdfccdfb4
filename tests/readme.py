"""README.md's examples as data: its fenced blocks (with their language and the heading
they sit under), the ``example`` column of its Commands table, the commands of a shell
or console block, and a matcher for the output samples a console block shows.

``tests/integration/test_readme_examples.py`` runs the examples and keeps the inventory
that makes every block either run or accounted for; ``tests/unit/test_readme_task_types.py``
runs the Task types blocks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"

_FENCE = re.compile(r"^(?P<indent> *)(?P<ticks>`{3,})(?P<lang>[\w+-]*)\s*$")
_HEADING = re.compile(r"^#{1,6} +(?P<title>.+?) *$")


@dataclass(frozen=True)
class Block:
    """One fenced block: ``language`` is what follows the opening fence ('' for none)."""

    heading: str
    language: str
    text: str
    line: int

    @property
    def first_line(self) -> str:
        """Its first non-blank line, stripped: with the heading, the block's key."""
        return next((line.strip() for line in self.text.splitlines() if line.strip()), "")

    @property
    def key(self) -> tuple[str, str]:
        return (self.heading, self.first_line)

    @property
    def path(self) -> str | None:
        """The file a block stands for, when its first line is a ``# path/file.py`` comment."""
        found = re.fullmatch(r"# (\S+\.\w+)", self.first_line)
        return found.group(1) if found else None


def blocks(text: str | None = None) -> list[Block]:
    """Every fenced block of the README (or of ``text``), in order."""
    lines = (README.read_text() if text is None else text).splitlines()
    found: list[Block] = []
    heading = ""
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = _FENCE.match(line)
        if fence is None:
            if title := _HEADING.match(line):
                heading = title.group("title")
            i += 1
            continue
        indent, ticks = fence.group("indent"), fence.group("ticks")
        body: list[str] = []
        j = i + 1
        while j < len(lines) and lines[j].strip() != ticks:
            body.append(lines[j].removeprefix(indent))
            j += 1
        if j == len(lines):
            raise ValueError(f"README.md line {i + 1}: the block opened here is never closed")
        found.append(Block(heading, fence.group("lang"), "\n".join(body) + "\n", i + 1))
        i = j + 1
    return found


def block(heading: str, first_line: str) -> Block:
    """The one block under ``heading`` whose first line is ``first_line``."""
    matching = [b for b in blocks() if b.key == (heading, first_line)]
    assert len(matching) == 1, f"README.md has {len(matching)} blocks {heading!r} / {first_line!r}"
    return matching[0]


def command_table_examples(text: str | None = None) -> list[str]:
    """The ``example`` column of the Commands table (``| command | same as | ... | example |``)."""
    lines = (README.read_text() if text is None else text).splitlines()
    header = "| command | same as | what it does | example |"
    start = lines.index(header)
    examples: list[str] = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cell = line.rstrip().rstrip("|").rsplit("|", 1)[1].strip()
        examples.append(cell.strip("`"))
    return examples


@dataclass
class Command:
    """One command of a shell block (continuation lines kept) and the comment lines or
    output lines that follow it."""

    text: str
    notes: list[str] = field(default_factory=list)

    @property
    def expected_status(self) -> int | None:
        """The HTTP status the first comment after it states (``# 201 Created``,
        ``# HTTP/1.1 404 Not Found``, ``# 413 {...}``), if any."""
        for note in self.notes:
            if found := re.match(r"#\s*(?:HTTP/[\d.]+\s+)?(\d{3})\b", note.strip()):
                return int(found.group(1))
        return None


def shell_commands(text: str) -> list[Command]:
    """The commands of an ``sh`` block, each with the ``#`` comment lines below it."""
    commands: list[Command] = []
    continued = False
    for line in text.splitlines():
        if continued:
            commands[-1].text += "\n" + line
        elif line.strip().startswith("#"):
            commands[-1].notes.append(line.strip())
        elif line.strip():
            commands.append(Command(line))
        continued = line.rstrip().endswith("\\")
    return commands


def console_commands(text: str) -> list[Command]:
    """The ``$ `` commands of a ``console`` block, each with the output lines shown below it."""
    commands: list[Command] = []
    continued = False
    for line in text.splitlines():
        if continued:
            commands[-1].text += "\n" + line
        elif line.startswith("$ "):
            commands.append(Command(line.removeprefix("$ ")))
        else:
            commands[-1].notes.append(line)
        continued = line.rstrip().endswith("\\")
    return commands


_WILDCARDS = re.compile(
    r"(?P<uuid>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})"
    r"|(?P<hex>[0-9a-f]{32})"
    r"|(?P<duration>(?:\d+(?:\.\d+)?(?:ms|[smhd]))+)(?![A-Za-z])"
    r"|(?P<number>\d[\d,.]*)"
    r"|(?P<spaces> {2,})"
)
_WILDCARD_PATTERNS = {
    "uuid": r"[0-9a-f-]{36}",
    "hex": r"[0-9a-f]{32}",
    "duration": r"(?:\d+(?:\.\d+)?(?:ms|[smhd]))+",  # 12m5s, 12m, 0.84s
    "number": r"\d[\d,.]*",
    "spaces": r" +",
}


def sample_pattern(line: str, literals: dict[str, str] | None = None) -> re.Pattern[str]:
    """A sample output line as a pattern: ids, numbers and column padding may differ, the
    words may not; each key of ``literals`` (a value the README's setup had, such as
    ``taskbox.tasks``) stands for the regular expression it maps to."""
    literals = literals or {}
    parts: list[str] = []
    i = 0
    while i < len(line):
        literal = next((key for key in literals if line.startswith(key, i)), None)
        if literal is not None:
            parts.append(literals[literal])
            i += len(literal)
        elif (wild := _WILDCARDS.match(line, i)) is not None and wild.lastgroup is not None:
            parts.append(_WILDCARD_PATTERNS[wild.lastgroup])
            i = wild.end()
        else:
            parts.append(re.escape(line[i]))
            i += 1
    return re.compile("".join(parts))


def mismatch(sample: list[str], output: str, literals: dict[str, str] | None = None) -> str | None:
    """Why ``output`` does not look like ``sample`` (None when it does).

    Sample lines match output lines in order, one for one; a sample line ``...`` stands
    for any number of lines, and output may go on after the sample ends."""
    lines = output.splitlines()
    position = 0
    skipping = False
    for wanted in sample:
        if wanted.strip() == "...":
            skipping = True
            continue
        pattern = sample_pattern(wanted, literals)
        while position < len(lines) and not pattern.fullmatch(lines[position]):
            if not skipping:
                return f"line {position + 1} {lines[position]!r} does not match {wanted!r}"
            position += 1
        if position == len(lines):
            return f"no line matches {wanted!r}"
        position += 1
        skipping = False
    return None
