"""The README's runnable blocks: fenced code blocks marked by an HTML comment just before them.

    <!-- runs: by-hand -->
    ```sh
    relayq tenants create acme --name "Acme"
    ```

`runs: NAME` puts the block in the sequence NAME, in the order the README has them; `, file
PATH` after the name says the block is a file the reader saves under PATH (a later block runs
it), not commands. Only marked blocks run: the mark is the README's promise that a block runs
as written, and a mark that is not followed by a block is an error, not a silent skip.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"

# A line of its own (so prose may quote a mark in backticks).
_MARK = re.compile(r"^<!-- runs: (?P<sequence>[\w-]+)(?:, file (?P<file>[\w./-]+))? -->$",
                   re.MULTILINE)
_BLOCK = re.compile(r"\s*```(?P<lang>\w*)\n(?P<code>.*?)^```", re.DOTALL | re.MULTILINE)


@dataclass(frozen=True)
class Block:
    sequence: str
    lang: str
    code: str
    # The name the README tells the reader to save it under; None for commands to run.
    file: str | None
    # 1-based line of its mark, for messages.
    line: int


def blocks(sequence: str, text: str | None = None) -> list[Block]:
    """The blocks of one sequence, in README order."""
    text = README.read_text(encoding="utf-8") if text is None else text
    found = []
    for mark in _MARK.finditer(text):
        line = text.count("\n", 0, mark.start()) + 1
        block = _BLOCK.match(text, mark.end())
        if block is None:
            raise ValueError(f"README.md:{line}: {mark.group(0)} is not followed by a code block")
        if mark["sequence"] == sequence:
            found.append(Block(sequence, block["lang"], block["code"], mark["file"], line))
    return found
