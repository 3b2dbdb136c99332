"""Elements of a top-level JSON array that may hold broken elements, read in chunks (the fallback of the manifest
reader when ``ijson`` meets invalid JSON).

Element boundaries are found by a string-aware bracket scan (commas at depth 0, the array's closing ``]``), so an
element with a JSON syntax error becomes one error row and the elements after it are still read. A broken element
whose brackets or quotes do not balance can swallow the elements after it (the scan cannot tell where it ends);
the rest of the file then becomes that one error row.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

_OUTSIDE = re.compile(r'["{}\[\],]')
_INSIDE = re.compile(r'["\\]')
_CHUNK = 1 << 20


class _Buffer:
    """A sliding text window over a file: ``text[pos:]`` is unread; :meth:`more` appends a chunk."""

    def __init__(self, f: TextIO) -> None:
        self.f, self.text, self.eof = f, "", False

    def more(self, keep_from: int) -> int:
        """Drop ``text[:keep_from]``, read a chunk; returns how far positions shifted (0 at EOF: nothing read)."""
        chunk = self.f.read(_CHUNK)
        if not chunk:
            self.eof = True
            return 0
        self.text = self.text[keep_from:] + chunk
        return keep_from


def scan_array(path: Path, start: int = 0) -> Iterator[tuple[int, Any, str | None]]:
    """``(index, element or None, error or None)`` for each element of the array in ``path``, from ``start`` on.

    Elements before ``start`` are skipped without being parsed.
    """
    with path.open(encoding="utf-8-sig") as f:
        buf = _Buffer(f)
        pos = _skip_open(buf)
        index = 0
        while True:
            pos = _skip_separators(buf, pos)
            if pos is None:
                return
            end, closed, shift = _element_end(buf, pos)
            pos -= shift
            text = buf.text[pos:end].strip()
            if index >= start and text:
                try:
                    yield index, json.loads(text), None
                except json.JSONDecodeError as err:
                    where = "the array ends inside it" if end == len(buf.text) and buf.eof else str(err)
                    yield index, None, f"row {index} is not valid JSON: {where}"
            index += 1 if text else 0
            if closed:
                return
            pos = end


def _skip_open(buf: _Buffer) -> int:
    while not buf.text.lstrip() and not buf.eof:
        buf.more(0)
    text = buf.text.lstrip()
    if not text.startswith("["):
        raise ValueError("not a JSON array")
    return len(buf.text) - len(text) + 1


def _skip_separators(buf: _Buffer, pos: int) -> int | None:
    """Past whitespace and one comma; ``None`` at the array's end (``]`` or end of file)."""
    while True:
        while pos < len(buf.text) and buf.text[pos] in " \t\r\n,":
            pos += 1
        if pos < len(buf.text):
            return None if buf.text[pos] == "]" else pos
        pos -= buf.more(pos)
        if buf.eof:
            return None


def _element_end(buf: _Buffer, start: int) -> tuple[int, bool, int]:
    """``(end, the array closed there, shift of start)``: the element is ``text[start - shift:end]``."""
    depth, in_string, i, shift = 0, False, start, 0
    while True:
        match = (_INSIDE if in_string else _OUTSIDE).search(buf.text, i)
        if match is None:  # the element goes on past the window: slide it (an escape's character may be next)
            moved = buf.more(start)
            if buf.eof:
                return len(buf.text), True, shift
            start, i, shift = start - moved, i - moved, shift + moved
            continue
        char, i = match.group(), match.end()
        if in_string:
            if char == "\\":
                i += 1  # the escaped character
            else:
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth < 0:  # the array's own ']'
                return match.start(), True, shift
        elif depth == 0:  # a comma between elements
            return match.start(), False, shift
