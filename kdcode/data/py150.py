"""CodeXGLUE py150 normalisation of Python source, for the token- and line-level completion benchmarks.

Follows CodeXGLUE's own preprocessing (microsoft/CodeXGLUE,
``Code-Code/CodeCompletion-token/dataset/py150/preprocess.py``, latest revision, and the frequent-literal
list ``literals.json`` next to it, embedded below as :data:`DEFAULT_LITERALS`). Per file:

* The text is encoded as UTF-8 and tokenized with :mod:`tokenize` exactly as ``tokenize.tokenize`` would
  (so a PEP 263 coding cookie or a UTF-8 BOM is honoured the way the script honours it). Newlines are
  first normalised to ``\\n``, as the script's ``open().read()`` did.
* Every token's text has its whitespace runs collapsed to one space (``" ".join(s.split())``).
* STRING tokens become ``<prefix><quote><STR_LIT><quote>``: the leading letters (``[a-zA-Z]+``: ``b``,
  ``f``, ``r``, ``u``, ``rb``, ``R``...) and the quotes (``'''``, ``\"\"\"``, ``'`` or ``"``, tried in that
  order) are kept; the content, with spaces written ``U+0020`` and commas ``U+002C``, is kept as
  ``<STR_LIT:content>`` when it is in the frequent-string list.
* NUMBER tokens become ``<NUM_LIT>``, or ``<NUM_LIT:text>`` when their text is in the frequent-number list.
* NEWLINE and NL become ``<EOL>``, never two in a row; COMMENT, INDENT, DEDENT, ENCODING, ENDMARKER and
  tokens left empty by the whitespace collapse are dropped. A leading and a trailing ``<EOL>`` are removed.
* The tokens are joined by single spaces and wrapped as ``<s> ... </s>``.

Where this differs from the script:

* A file that fails to tokenize raises :class:`Py150Error` (and is skipped and counted by
  :func:`normalise_documents`) instead of being written out as ``<s> </s>``.
* A file with no tokens (empty, or only comments) gives ``<s> </s>``, as in the script, without an error.
* On Python 3.11 and older, an unterminated single-quoted string continued with a backslash comes back from
  :mod:`tokenize` as one ERRORTOKEN holding the rest of the line; the script would emit it with its spaces,
  which makes the output ambiguous (``<EOL>`` inside it would read as a line break). Such a file is
  rejected instead, as Python 3.12+'s tokenizer rejects it anyway. Every output token is therefore free of
  whitespace, and ``normalised.split()`` gives the tokens back.
* Python 3.12+ splits f-strings into FSTRING_START/MIDDLE/END tokens; they are put back together into one
  STRING token, so the output matches what the script produced on the Python it was written for.

This module imports neither torch nor ``datasets``.
"""

from __future__ import annotations

import io
import re
import tokenize
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

BOS = "<s>"
EOS = "</s>"
EOL = "<EOL>"
SKIP_REASON = "py150_untokenizable"


class Py150Error(ValueError):
    """A source file that cannot be tokenized, or a string that is not a normalised file."""


@dataclass(frozen=True)
class Literals:
    """Frequent literals kept verbatim as ``<STR_LIT:x>`` / ``<NUM_LIT:v>``.

    ``strings`` holds string contents without prefix or quotes, after whitespace collapse and with spaces
    and commas written ``U+0020`` / ``U+002C``; escapes stay as written in the source (``\\n`` is two
    characters). ``numbers`` holds NUMBER token texts as written (``1.0``, ``0.``).
    """

    strings: frozenset[str] = frozenset()
    numbers: frozenset[str] = frozenset()


# literals.json of CodeXGLUE py150, in its order (most frequent first): 200 strings, 30 numbers.
# fmt: off
_CODEXGLUE_STRINGS = (
    "name", "\\n", "U+0020", "True", "a", "type", "__main__", "id", "/", ".", "w", "utf-8", "b", "foo", "1",
    "r", "default", "U+002C", "-", "data", "0", "%s", "x", "blank", ":", "value", "max_length", "c", "_",
    "test", "A", "store_true", "description", "*", "null", "title", "y", "U+002CU+0020", "true", "key",
    "bar", "=", "string", "status", "2", "rb", "to", "B", "url", "d", '"', "version", "str", "abc", "int",
    "GET", "text", "error", "user", "C", ")", "wb", "\\t", "+", "\\\\", "#", ">", "f", ";", "path", "ascii",
    "POST", "?", "3", "False", "D", "|", "label", "s", "(", "message", "'", "i", "primary_key", "<", "Meta",
    "N", "e", "object_name", "password", "index", "..", "code", "class", "username", "F", "size", "}", "n",
    "X", "Y", "file", "z", "[", "store", "none", "html", "]", "utf8", "p", "strict", "\\r\\n", "end", "all",
    "Name", "state", "produces", "m", "t", "I", "result", "bool", "date", "{}", "\\x00", "hello", "start",
    "left", "email", "ignore", "S", "@", "L", "false", "action", "{", "related_name", "time", "count", "v",
    "4", "relu", "win32", "port", "h", "#pop", "source", "Content-Type", "application/json", "&", "src", "O",
    "-c", "H", "o", "g", "None", "E", "M", "host", "body", "%", "info", "image", "float", "root", "l", "T",
    "replace", "k", "\\ufffe", "100", "5", "$", "right", "content", "q", "args", "u", "address", "\\r",
    "list", "target", "http", "P", "object", "yes", "1.0", "R", "width", "localhost", "127.0.0.1", "train",
    "[?]", "OK", "location", "filename", "!", "success", "input",
)
_CODEXGLUE_NUMBERS = (
    "0", "1", "2", "3", "4", "5", "10", "6", "8", "1.0", "0.0", "7", "100", "9", "255", "16", "0.5", "20",
    "12", "32", "11", "200", "1000", "30", "1.", "15", "64", "0.1", "50", "0.",
)
# fmt: on

DEFAULT_LITERALS = Literals(strings=frozenset(_CODEXGLUE_STRINGS), numbers=frozenset(_CODEXGLUE_NUMBERS))

_DROPPED = frozenset({tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING, tokenize.ENDMARKER})
_PREFIX = re.compile(r"[a-zA-Z]+")
_QUOTES = ("'''", '"""', "'", '"')
_SPECIAL = ((" ", "U+0020"), (",", "U+002C"))
# Python 3.12+ (f-strings) and 3.14+ (t-strings) tokenize these as several tokens.
_SPLIT_STRING_START = frozenset(
    getattr(tokenize, name) for name in ("FSTRING_START", "TSTRING_START") if hasattr(tokenize, name)
)
_SPLIT_STRING_END = frozenset(
    getattr(tokenize, name) for name in ("FSTRING_END", "TSTRING_END") if hasattr(tokenize, name)
)


def normalise(source: str, literals: Literals = DEFAULT_LITERALS) -> str:
    """One source file as a CodeXGLUE py150 line: ``<s> tok tok <EOL> tok ... </s>``.

    Raises :class:`Py150Error` when the file cannot be tokenized, whatever the underlying exception.
    """
    try:
        tokens = _normalised_tokens(source, literals)
    except Py150Error:
        raise
    except Exception as exc:  # tokenize raises TokenError, IndentationError, SyntaxError, Unicode errors...
        raise Py150Error(f"cannot tokenize: {type(exc).__name__}: {exc}") from exc
    return " ".join([BOS, *tokens, EOS])


def is_normalised(text: str) -> bool:
    """True for one normalised file (``<s> ... </s>`` on one line), e.g. a CodeXGLUE record.

    Python source never starts with ``<s>`` (it is a syntax error), so this never mistakes a source file.
    """
    text = text.strip()
    return text.startswith(BOS + " ") and text.endswith(" " + EOS) and "\n" not in text


def lines_of(normalised: str) -> list[str]:
    """The code lines of a normalised file: the token runs between ``<EOL>`` markers, ``<s>``/``</s>`` left out.

    Accepts a line of CodeXGLUE's own ``train.txt`` too (a trailing newline is ignored). Empty runs, which
    :func:`normalise` never produces, are left out.
    """
    tokens = normalised.split()
    if len(tokens) < 2 or tokens[0] != BOS or tokens[-1] != EOS:
        raise Py150Error(f"not a normalised py150 file (must start with {BOS} and end with {EOS})")
    lines: list[str] = []
    current: list[str] = []
    for token in tokens[1:-1]:
        if token == EOL:
            if current:
                lines.append(" ".join(current))
            current = []
        else:
            current.append(token)
    if current:
        lines.append(" ".join(current))
    return lines


def _normalised_tokens(source: str, literals: Literals) -> list[str]:
    # The script read files with open().read(): universal newlines.
    source = source.replace("\r\n", "\n").replace("\r", "\n")
    raw = source.encode("utf-8")
    # What tokenize.tokenize does with the script's BytesIO(bytes(code, "utf8")): honour a BOM or a coding
    # cookie, then tokenize the decoded text.
    encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
    text = raw.decode(encoding)
    physical_lines = io.StringIO(text).readlines()
    tokens = tokenize.generate_tokens(io.StringIO(text).readline)

    out: list[str] = []
    prev_eol = False
    for tok in _join_split_strings(tokens, physical_lines):
        value = " ".join(tok.string.split())
        if tok.type == tokenize.STRING:
            out.append(_string_literal(value, literals))
            prev_eol = False
        elif tok.type == tokenize.NUMBER:
            out.append(f"<NUM_LIT:{value}>" if value in literals.numbers else "<NUM_LIT>")
            prev_eol = False
        elif tok.type in (tokenize.NEWLINE, tokenize.NL):
            if not prev_eol:
                out.append(EOL)
                prev_eol = True
        elif tok.type in _DROPPED or not value:
            continue
        elif " " in value:
            raise Py150Error(f"unterminated string at line {tok.start[0]}")
        else:
            out.append(value)
            prev_eol = False
    if out and out[0] == EOL:
        out = out[1:]
    if out and out[-1] == EOL:
        out = out[:-1]
    return out


def _string_literal(value: str, literals: Literals) -> str:
    """``rb'<STR_LIT>'``-style replacement of one (whitespace-collapsed) STRING token."""
    match = _PREFIX.match(value)
    prefix = match.group(0) if match else ""
    quoted = value[len(prefix) :]
    opening = closing = ""
    content = quoted
    for quote in _QUOTES:
        if quoted.startswith(quote):
            opening = quote
            content = content[len(quote) :]
            if quoted.endswith(quote):
                closing = quote
                content = content[: -len(quote)]
            break
    for char, code in _SPECIAL:
        content = content.replace(char, code)
    inner = f"<STR_LIT:{content}>" if content in literals.strings else "<STR_LIT>"
    return f"{prefix}{opening}{inner}{closing}"


def _join_split_strings(
    tokens: Iterable[tokenize.TokenInfo],
    physical_lines: list[str],
    starts: frozenset[int] = _SPLIT_STRING_START,
    ends: frozenset[int] = _SPLIT_STRING_END,
) -> Iterator[tokenize.TokenInfo]:
    """Turn each (possibly nested) FSTRING_START ... FSTRING_END run back into one STRING token."""
    depth = 0
    start = (0, 0)
    for tok in tokens:
        if depth:
            if tok.type in starts:
                depth += 1
            elif tok.type in ends:
                depth -= 1
                if not depth:
                    text = _source_span(physical_lines, start, tok.end)
                    yield tok._replace(type=tokenize.STRING, string=text, start=start)
        elif tok.type in starts:
            depth = 1
            start = tok.start
        else:
            yield tok
    if depth:
        raise Py150Error(f"unterminated f-string at line {start[0]}")


def _source_span(physical_lines: list[str], start: tuple[int, int], end: tuple[int, int]) -> str:
    """The source text from ``start`` to ``end``: tokenize's (1-based row, 0-based column) positions."""
    (row0, col0), (row1, col1) = start, end
    if row0 == row1:
        return physical_lines[row0 - 1][col0:col1]
    middle = "".join(physical_lines[row0 : row1 - 1])
    return physical_lines[row0 - 1][col0:] + middle + physical_lines[row1 - 1][:col1]
