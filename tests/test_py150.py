"""CodeXGLUE py150 normalisation: golden outputs, skipping of untokenizable files, and properties."""

from __future__ import annotations

import tokenize
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdcode.data.corpus import Document, normalise_documents
from kdcode.data.py150 import (
    DEFAULT_LITERALS,
    Literals,
    Py150Error,
    _join_split_strings,
    lines_of,
    normalise,
)

SNIPPET = '''\
#!/usr/bin/env python
# leading comment, then a blank line

def greet(name, times=3):
    """Say hello.

    Then stop.
    """
    # a comment on its own line
    for i in range(times):  # trailing comment


        if i % 2 == 0:
            print(f"hi {name}", b'\\x00', r"\\d+", "\\n", ", ")
        else:
            print('name', "hello, world", 0x1F, 1.5, 1.0, 10, 1e-3, 255)
    return None
'''

SNIPPET_NORMALISED = (
    "<s> def greet ( name , times = <NUM_LIT:3> ) : <EOL> "
    '"""<STR_LIT>""" <EOL> '
    "for i in range ( times ) : <EOL> "
    "if i % <NUM_LIT:2> == <NUM_LIT:0> : <EOL> "
    'print ( f"<STR_LIT>" , b\'<STR_LIT:\\x00>\' , r"<STR_LIT>" , "<STR_LIT:\\n>" , '
    '"<STR_LIT:U+002CU+0020>" ) <EOL> '
    "else : <EOL> "
    "print ( '<STR_LIT:name>' , \"<STR_LIT>\" , <NUM_LIT> , <NUM_LIT> , <NUM_LIT:1.0> , <NUM_LIT:10> , "
    "<NUM_LIT> , <NUM_LIT:255> ) <EOL> "
    "return None </s>"
)


def test_golden_function_with_docstring_comments_and_blank_lines():
    assert normalise(SNIPPET) == SNIPPET_NORMALISED


def test_lines_of_golden_file():
    assert lines_of(SNIPPET_NORMALISED) == [
        "def greet ( name , times = <NUM_LIT:3> ) :",
        '"""<STR_LIT>"""',
        "for i in range ( times ) :",
        "if i % <NUM_LIT:2> == <NUM_LIT:0> :",
        'print ( f"<STR_LIT>" , b\'<STR_LIT:\\x00>\' , r"<STR_LIT>" , "<STR_LIT:\\n>" , "<STR_LIT:U+002CU+0020>" )',
        "else :",
        "print ( '<STR_LIT:name>' , \"<STR_LIT>\" , <NUM_LIT> , <NUM_LIT> , <NUM_LIT:1.0> , <NUM_LIT:10> , "
        "<NUM_LIT> , <NUM_LIT:255> )",
        "return None",
    ]


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        # prefix letters (any case, as in the latest CodeXGLUE script) and quote style are kept
        ("x = b'abc'", "x = b'<STR_LIT:abc>'"),
        ("x = rb'\\d'", "x = rb'<STR_LIT>'"),
        ("x = R'a'", "x = R'<STR_LIT:a>'"),
        ('x = Rb"wb"', 'x = Rb"<STR_LIT:wb>"'),
        ("x = u'utf-8'", "x = u'<STR_LIT:utf-8>'"),
        ("x = f'{y}'", "x = f'<STR_LIT>'"),
        ("x = f'name'", "x = f'<STR_LIT:name>'"),
        ('s = f"{a!r:>{w}} {b}"', 's = f"<STR_LIT>"'),
        ("x = '''name'''", "x = '''<STR_LIT:name>'''"),
        ('x = """"""', 'x = """<STR_LIT>"""'),
        ("x = ''", "x = '<STR_LIT>'"),
        ("x = 'not-a-frequent-literal'", "x = '<STR_LIT>'"),
        # content: whitespace runs collapsed, then space -> U+0020 and comma -> U+002C
        ("x = ' '", "x = '<STR_LIT:U+0020>'"),
        ("x = '   '", "x = '<STR_LIT:U+0020>'"),
        ("x = ','", "x = '<STR_LIT:U+002C>'"),
        ('x = """\n  name\n"""', 'x = """<STR_LIT>"""'),
        # escapes stay as written
        ("x = '\\t'", "x = '<STR_LIT:\\t>'"),
        ("x = '\\\\'", "x = '<STR_LIT:\\\\>'"),
        ("x = '\"'", "x = '<STR_LIT:\">'"),
        ('x = "\'"', 'x = "<STR_LIT:\'>"'),
        # Python 2 code tokenizes too
        ('print "hello"', 'print "<STR_LIT:hello>"'),
    ],
)
def test_string_literals(source, expected):
    assert normalise(source + "\n") == f"<s> {expected} </s>"


@pytest.mark.parametrize(
    ("number", "expected"),
    [
        ("0", "<NUM_LIT:0>"),
        ("255", "<NUM_LIT:255>"),
        ("1000", "<NUM_LIT:1000>"),
        ("0.5", "<NUM_LIT:0.5>"),
        ("1.", "<NUM_LIT:1.>"),
        ("0.", "<NUM_LIT:0.>"),
        ("1.0", "<NUM_LIT:1.0>"),
        ("1.00", "<NUM_LIT>"),
        ("0x1F", "<NUM_LIT>"),
        ("0xff", "<NUM_LIT>"),
        ("1e-3", "<NUM_LIT>"),
        ("3j", "<NUM_LIT>"),
        ("1_000", "<NUM_LIT>"),
        ("17", "<NUM_LIT>"),
    ],
)
def test_number_literals(number, expected):
    assert normalise(f"x = {number}\n") == f"<s> x = {expected} </s>"


def test_negative_number_is_an_operator_then_a_number():
    assert normalise("x = -1\n") == "<s> x = - <NUM_LIT:1> </s>"


def test_custom_literals_replace_the_default_list():
    lits = Literals(strings=frozenset({"zzz"}), numbers=frozenset({"7"}))
    assert normalise("x = 'zzz' + 7 + 'name' + 1\n", lits) == (
        "<s> x = '<STR_LIT:zzz>' + <NUM_LIT:7> + '<STR_LIT>' + <NUM_LIT> </s>"
    )
    assert normalise("x = 'name'\n", Literals()) == "<s> x = '<STR_LIT>' </s>"


def test_default_literals_are_codexglue_lists():
    assert len(DEFAULT_LITERALS.strings) == 200
    assert len(DEFAULT_LITERALS.numbers) == 30
    assert {"name", "\\n", "U+0020", "U+002CU+0020", '"', "'", "\\\\", "\\x00", "\\r\\n"} <= DEFAULT_LITERALS.strings
    assert {"0", "1.", "0.", "255", "0.1"} <= DEFAULT_LITERALS.numbers
    assert "\n" not in DEFAULT_LITERALS.strings  # escapes are stored as written, not decoded


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("", "<s> </s>"),
        ("\n\n\n", "<s> </s>"),
        ("# only a comment\n", "<s> </s>"),
        ("x = 1", "<s> x = <NUM_LIT:1> </s>"),
        ("x = 1\n", "<s> x = <NUM_LIT:1> </s>"),
        ("\n\n# c\n\nx = 1\n\n\n# c\n\ny = 2\n\n", "<s> x = <NUM_LIT:1> <EOL> y = <NUM_LIT:2> </s>"),
        ("x = 1\r\n\r\ny = 2\r\n", "<s> x = <NUM_LIT:1> <EOL> y = <NUM_LIT:2> </s>"),
        ("x = 1\ry = 2\r", "<s> x = <NUM_LIT:1> <EOL> y = <NUM_LIT:2> </s>"),
        ("\ufeffx = 1\n", "<s> x = <NUM_LIT:1> </s>"),
        ("# -*- coding: latin-1 -*-\nx = 1\n", "<s> x = <NUM_LIT:1> </s>"),
        ("if a:\n    if b:\n        c\nd\n", "<s> if a : <EOL> if b : <EOL> c <EOL> d </s>"),
        # an open bracket continues the logical line: NL inside it is still <EOL>, as in the script
        ("f(a,\n  b)\n", "<s> f ( a , <EOL> b ) </s>"),
        # a backslash continuation is not a token at all
        ("x = a + \\\n    b\n", "<s> x = a + b </s>"),
    ],
)
def test_line_structure(source, expected):
    assert normalise(source) == expected


UNTOKENIZABLE = [
    "def f(:\n    x = (\n",  # EOF in multi-line statement (TokenError)
    "if x:\n        a\n    b\n",  # unindent does not match (IndentationError)
    'x = """never closed\n',  # EOF in multi-line string (TokenError)
    "# coding: no-such-codec\nx = 1\n",  # unknown encoding (SyntaxError)
    "# coding: ascii\nx = 'é'\n",  # not decodable with the declared encoding
    "x = 'a \\\n<EOL> <EOL>\n",  # unterminated single-quoted string continued with a backslash
]


@pytest.mark.parametrize("source", UNTOKENIZABLE)
def test_untokenizable_raises_py150error(source):
    with pytest.raises(Py150Error):
        normalise(source)


def test_py150error_is_a_value_error():
    assert issubclass(Py150Error, ValueError)


def test_normalise_documents_skips_and_counts_untokenizable():
    docs = [
        Document("a.py", "x = 1\n"),
        Document("bad1.py", UNTOKENIZABLE[0]),
        Document("b.py", "def f():\n    return 'name'\n"),
        Document("bad2.py", UNTOKENIZABLE[1]),
        Document("empty.py", ""),
    ]
    skipped: Counter = Counter({"non_utf8": 2})
    out = normalise_documents(docs, skipped)
    assert out == [
        Document("a.py", "<s> x = <NUM_LIT:1> </s>"),
        Document("b.py", "<s> def f ( ) : <EOL> return '<STR_LIT:name>' </s>"),
        Document("empty.py", "<s> </s>"),
    ]
    assert skipped == Counter({"non_utf8": 2, "py150_untokenizable": 2})


def test_normalise_documents_passes_literals():
    out = normalise_documents([Document("k", "x = 'name'\n")], Counter(), Literals())
    assert out == [Document("k", "<s> x = '<STR_LIT>' </s>")]


def test_lines_of():
    assert lines_of("<s> </s>") == []
    assert lines_of("<s> import json <EOL> json . load ( f ) </s>\n") == ["import json", "json . load ( f )"]
    with pytest.raises(Py150Error):
        lines_of("import json")
    with pytest.raises(Py150Error):
        lines_of("")


def _tok(type_: int, string: str, start: tuple[int, int], end: tuple[int, int]) -> tokenize.TokenInfo:
    return tokenize.TokenInfo(type_, string, start, end, "")


def test_join_split_strings_rebuilds_python312_fstrings():
    # Python 3.12+ token stream for: y = f"""a\n{f"{z}"}b""" + 1, with stand-in START/END type numbers
    start, end, middle = 9001, 9002, 9003
    lines = ['y = f"""a\n', '{f"{z}"}b""" + 1\n']
    tokens = [
        _tok(tokenize.NAME, "y", (1, 0), (1, 1)),
        _tok(tokenize.OP, "=", (1, 2), (1, 3)),
        _tok(start, 'f"""', (1, 4), (1, 8)),
        _tok(middle, "a\n", (1, 8), (2, 0)),
        _tok(tokenize.OP, "{", (2, 0), (2, 1)),
        _tok(start, 'f"', (2, 1), (2, 3)),
        _tok(tokenize.OP, "{", (2, 3), (2, 4)),
        _tok(tokenize.NAME, "z", (2, 4), (2, 5)),
        _tok(tokenize.OP, "}", (2, 5), (2, 6)),
        _tok(end, '"', (2, 6), (2, 7)),
        _tok(tokenize.OP, "}", (2, 7), (2, 8)),
        _tok(middle, "b", (2, 8), (2, 9)),
        _tok(end, '"""', (2, 9), (2, 12)),
        _tok(tokenize.OP, "+", (2, 13), (2, 14)),
        _tok(tokenize.NUMBER, "1", (2, 15), (2, 16)),
    ]
    out = list(_join_split_strings(tokens, lines, frozenset({start}), frozenset({end})))
    assert [(t.type, t.string) for t in out] == [
        (tokenize.NAME, "y"),
        (tokenize.OP, "="),
        (tokenize.STRING, 'f"""a\n{f"{z}"}b"""'),
        (tokenize.OP, "+"),
        (tokenize.NUMBER, "1"),
    ]
    assert out[2].start == (1, 4) and out[2].end == (2, 12)
    with pytest.raises(Py150Error):
        list(_join_split_strings(tokens[:4], lines, frozenset({start}), frozenset({end})))


def test_fstrings_are_one_string_token_on_every_python():
    # 3.12+ tokenizes f-strings as several tokens; the output must not depend on the Python version
    assert normalise("x = f\"a{b:>{w}}c\" + f'name'\n") == "<s> x = f\"<STR_LIT>\" + f'<STR_LIT:name>' </s>"


def _check_valid_output(out: str) -> None:
    assert out.startswith("<s>") and out.endswith("</s>")
    assert "<EOL> <EOL>" not in out
    assert not out.startswith("<s> <EOL>") and not out.endswith("<EOL> </s>")
    assert " ".join(out.split()) == out  # tokens are whitespace-free and joined by single spaces
    lines_of(out)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_normalise_never_raises_anything_but_py150error(text):
    try:
        out = normalise(text)
    except Py150Error:
        return
    _check_valid_output(out)


_PYTHONISH = st.lists(
    st.sampled_from(
        ["x", "1", "1.", " ", "\t", "\n", "\r\n", "\\", "'", '"', "'''", "#", "(", ")", ":", "f", "rb", "<EOL>"]
        + ["    ", "if a:\n", "\ufeff", "# coding: latin-1\n", "0x1F", "'name'", "é"]
    ),
    max_size=40,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(_PYTHONISH)
def test_normalise_properties_on_python_like_text(text):
    try:
        out = normalise(text)
    except Py150Error:
        return
    _check_valid_output(out)
