"""Arithmetic from model output, evaluated without `eval`: parsed with `ast`, exact, bounded.

Only numbers (non-negative integers or decimals), `+ - * /`, unary minus and parentheses are accepted; names,
calls, attributes, `**`, comparisons and everything else are rejected before anything is computed. Values are
`fractions.Fraction`s, so `6 / 4 * 2 == 3` exactly. Bounds keep hostile output cheap: the text's length, the
number of operations, the nesting depth and the size of every intermediate value (a chain of multiplications
cannot build a million-digit number). Anything outside them is an `ArithError`, never a crash or a hang.
"""

from __future__ import annotations

import ast
from fractions import Fraction

MAX_CHARS = 512  # a Countdown equation is a few dozen characters
MAX_NODES = 64
MAX_DEPTH = 24
MAX_DIGITS = 64  # of any intermediate numerator or denominator

_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b}


class ArithError(ValueError):
    """Not an arithmetic expression within the bounds; the message says why."""


def _check_size(v: Fraction) -> Fraction:
    if max(abs(v.numerator), v.denominator).bit_length() > MAX_DIGITS * 3.33:
        raise ArithError("intermediate value too large")
    return v


def _eval(node: ast.AST, depth: int, numbers: list[Fraction]) -> Fraction:
    if depth > MAX_DEPTH:
        raise ArithError("nested too deeply")
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        v = Fraction(str(node.value)) if isinstance(node.value, float) else Fraction(node.value)
        numbers.append(v)
        return _check_size(v)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _eval(node.operand, depth + 1, numbers)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and type(node.op) in (*_OPS, ast.Div):
        a = _eval(node.left, depth + 1, numbers)
        b = _eval(node.right, depth + 1, numbers)
        if isinstance(node.op, ast.Div):
            if b == 0:
                raise ArithError("division by zero")
            return _check_size(a / b)
        return _check_size(_OPS[type(node.op)](a, b))
    raise ArithError(f"not allowed: {type(node).__name__}")


def evaluate(text: str) -> tuple[Fraction, list[Fraction]]:
    """The exact value of an arithmetic expression, and the numbers it uses (in order of appearance)."""
    if not isinstance(text, str) or len(text) > MAX_CHARS:
        raise ArithError(f"not a string of at most {MAX_CHARS} characters")
    if any(c not in "0123456789.+-*/() \t" for c in text):  # before the parser sees names, `**` is still checked
        raise ArithError("characters other than digits, + - * / ( ) and spaces")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, RecursionError, MemoryError, ValueError) as e:
        raise ArithError(f"does not parse: {type(e).__name__}") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise ArithError("too many operations")
    numbers: list[Fraction] = []
    return _eval(tree.body, 0, numbers), numbers
