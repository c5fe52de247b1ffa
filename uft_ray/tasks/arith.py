"""Arithmetic from model output, evaluated without `eval`: parsed with `ast`, exact, bounded.

Only numbers (non-negative integers or decimals), `+ - * /`, unary signs and parentheses are accepted; names,
calls, attributes, comparisons and everything else are rejected before anything is computed. With
`python_ops=True` (the paper's Countdown rule, whose reference code hands the answer to Python's `eval`) `**` and
`//` are accepted too, with Python's meaning. Values are `fractions.Fraction`s, so `6 / 4 * 2 == 3` exactly.
Bounds keep hostile output cheap: the text's length, the number of operations, the nesting depth and the size of
every intermediate value (checked before a power is computed, so `9**9**9**9` is refused, not attempted).
Anything outside them is an `ArithError`, never a crash or a hang.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from fractions import Fraction

MAX_CHARS = 512  # a Countdown equation is a few dozen characters
MAX_NODES = 64
MAX_DEPTH = 24
MAX_DIGITS = 64  # of any intermediate numerator or denominator

_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b}
_BASIC_CHARS = frozenset("0123456789.+-*/() \t")
# Python's own whitespace may sit between tokens; the parser, not this filter, decides where it is legal.
_PYTHON_CHARS = _BASIC_CHARS | frozenset("\n\r\x0b\x0c")


@dataclass(frozen=True)
class Bounds:
    """How much text and work one expression may cost."""

    chars: int = MAX_CHARS
    nodes: int = MAX_NODES
    depth: int = MAX_DEPTH
    bits: int = int(MAX_DIGITS * 3.33)  # of any intermediate numerator or denominator


STRICT = Bounds()
# Roomier, so an answer Python's `eval` computes in well under a millisecond is computed here too (`99**99 / 99**98`,
# a few dozen redundant signs); beyond them `eval` itself would hang, overflow or hit its parser's limits.
GENEROUS = Bounds(chars=4096, nodes=512, depth=100, bits=4096)


class ArithError(ValueError):
    """Not an arithmetic expression within the bounds; the message says why."""


def _check_size(v: Fraction, bounds: Bounds) -> Fraction:
    if max(abs(v.numerator), v.denominator).bit_length() > bounds.bits:
        raise ArithError("intermediate value too large")
    return v


def _power(a: Fraction, b: Fraction, bounds: Bounds) -> Fraction:
    if a == 0 and b < 0:
        raise ArithError("zero to a negative power")
    if b.denominator == 1:
        size = max(abs(a.numerator), a.denominator).bit_length()
        if abs(a) != 1 and a != 0 and size * abs(b.numerator) > bounds.bits:  # estimated before it is computed
            raise ArithError("power too large")
        return a**b.numerator
    if a < 0:  # Python's answer is a complex number, never the integer target
        raise ArithError("a negative number to a fractional power")
    try:
        value = float(a) ** float(b)
    except OverflowError:
        raise ArithError("power too large") from None
    return Fraction(value)


def _eval(node: ast.AST, depth: int, numbers: list[Fraction], bounds: Bounds, python_ops: bool) -> Fraction:
    if depth > bounds.depth:
        raise ArithError("nested too deeply")
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        if isinstance(node.value, float) and not math.isfinite(node.value):  # a literal of 400 digits and a point
            raise ArithError("number too large")
        v = Fraction(str(node.value)) if isinstance(node.value, float) else Fraction(node.value)
        numbers.append(v)
        return _check_size(v, bounds)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _eval(node.operand, depth + 1, numbers, bounds, python_ops)
        return -v if isinstance(node.op, ast.USub) else v
    extra = (ast.Pow, ast.FloorDiv) if python_ops else ()
    if isinstance(node, ast.BinOp) and type(node.op) in (*_OPS, ast.Div, *extra):
        a = _eval(node.left, depth + 1, numbers, bounds, python_ops)
        b = _eval(node.right, depth + 1, numbers, bounds, python_ops)
        if isinstance(node.op, (ast.Div, ast.FloorDiv)):
            if b == 0:
                raise ArithError("division by zero")
            return _check_size(a / b if isinstance(node.op, ast.Div) else Fraction(a // b), bounds)
        if isinstance(node.op, ast.Pow):
            return _check_size(_power(a, b, bounds), bounds)
        return _check_size(_OPS[type(node.op)](a, b), bounds)
    raise ArithError(f"not allowed: {type(node).__name__}")


def evaluate(text: str, *, python_ops: bool = False, bounds: Bounds = STRICT) -> tuple[Fraction, list[Fraction]]:
    """The exact value of an arithmetic expression, and the numbers it uses (in order of appearance).

    `python_ops` also accepts `**` and `//` (and Python's whitespace between tokens); `bounds` caps the work.
    """
    if not isinstance(text, str) or len(text) > bounds.chars:
        raise ArithError(f"not a string of at most {bounds.chars} characters")
    if any(c not in (_PYTHON_CHARS if python_ops else _BASIC_CHARS) for c in text):  # before the parser sees names
        raise ArithError("characters other than digits, + - * / ( ) and spaces")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, RecursionError, MemoryError, ValueError) as e:
        raise ArithError(f"does not parse: {type(e).__name__}") from None
    if sum(1 for _ in ast.walk(tree)) > bounds.nodes:
        raise ArithError("too many operations")
    numbers: list[Fraction] = []
    return _eval(tree.body, 0, numbers, bounds, python_ops), numbers
