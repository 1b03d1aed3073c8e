"""Generated arithmetic worksheets: the corpus's third, perfectly clean domain.

Arithmetic text has an exact answer after every "=", so it probes whether a model (and
which experts) learn an algorithm rather than style. Each document is a worksheet of mixed
problems:

- sums and differences of 1-6 digit numbers, biased towards long carry chains;
- products of up to 3x3 digits, and division with remainder;
- expressions with 2-4 operators and parentheses, reduced one operation per step:
  ``(17 + 4) * 3 - 8 = 21 * 3 - 8 = 63 - 8 = 55``;
- column addition spelled out digit by digit with its carries;
- short word problems from a few templates.

Document `k` is drawn from `np.random.default_rng((seed, k))`: deterministic, independent
of every other document, and a smaller byte cap yields a prefix of a larger one.
"""

from __future__ import annotations

from typing import NamedTuple, Union

import numpy as np

_NAMES = ("Ada", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas")
_ITEMS = ("apples", "marbles", "books", "coins", "stamps", "pencils", "shells", "cards")


def _number(rng: np.random.Generator, max_digits: int) -> int:
    """A number with a random count of digits in [1, max_digits] (small numbers as common
    as large ones, unlike a uniform draw)."""
    digits = int(rng.integers(1, max_digits + 1))
    return int(rng.integers(0 if digits == 1 else 10 ** (digits - 1), 10**digits))


def _carry_pair(rng: np.random.Generator, digits: int) -> tuple[int, int]:
    """Two `digits`-digit numbers whose sum carries at most columns (digit sums >= 9)."""
    a = b = 0
    for i in range(digits):
        x = int(rng.integers(1 if i == digits - 1 else 0, 10))
        y = int(rng.integers(max(0, 9 - x), 10))
        a, b = a + x * 10**i, b + y * 10**i
    return a, b


def _add_sub(rng: np.random.Generator) -> str:
    a, b = (
        _carry_pair(rng, int(rng.integers(2, 7)))
        if rng.random() < 0.4
        else (_number(rng, 6), _number(rng, 6))
    )
    if rng.random() < 0.5:
        return f"{a} + {b} = {a + b}"
    return f"{a} - {b} = {a - b}"


def _mul_div(rng: np.random.Generator) -> str:
    a, b = _number(rng, 3), _number(rng, 3)
    if rng.random() < 0.6:
        return f"{a} * {b} = {a * b}"
    b = max(b, 1)
    return _division(a, b, int(rng.integers(0, b)))


def _division(quotient: int, divisor: int, remainder: int) -> str:
    dividend = quotient * divisor + remainder
    if remainder:
        return f"{dividend} / {divisor} = {quotient} remainder {remainder}"
    return f"{dividend} / {divisor} = {quotient}"


class _Op(NamedTuple):
    op: str
    left: "_Expr"
    right: "_Expr"


_Expr = Union[int, _Op]
_PRECEDENCE = {"+": 1, "-": 1, "*": 2}


def _random_expr(rng: np.random.Generator, num_ops: int) -> _Expr:
    if num_ops == 0:
        return int(rng.integers(1, 20 if rng.random() < 0.7 else 100))
    left_ops = int(rng.integers(0, num_ops))
    op = ("+", "-", "*")[int(rng.integers(0, 3))]
    return _Op(op, _random_expr(rng, left_ops), _random_expr(rng, num_ops - 1 - left_ops))


def _render(e: _Expr, parent: int = 0, right_side: bool = False) -> str:
    """Infix text; the reduction steps follow the tree, so its grouping must be visible.

    Parentheses go around a lower-precedence child, and around a same-precedence right
    child (`a - (b + c)`, `a * (b * c)`): without them a reader would evaluate left to right
    and the next step shown would look wrong.
    """
    if isinstance(e, int):
        return f"({e})" if e < 0 and right_side else str(e)  # "3 - (-5)", never "3 - -5"
    p = _PRECEDENCE[e.op]
    text = f"{_render(e.left, p)} {e.op} {_render(e.right, p, right_side=True)}"
    return f"({text})" if p < parent or (right_side and p == parent) else text


def _reduce_once(e: _Expr) -> _Expr:
    """Evaluates the leftmost operation whose operands are both numbers."""
    if isinstance(e, int):
        return e
    if isinstance(e.left, int) and isinstance(e.right, int):
        return {"+": e.left + e.right, "-": e.left - e.right, "*": e.left * e.right}[e.op]
    if not isinstance(e.left, int):
        return _Op(e.op, _reduce_once(e.left), e.right)
    return _Op(e.op, e.left, _reduce_once(e.right))


def _expression(rng: np.random.Generator) -> str:
    e = _random_expr(rng, int(rng.integers(2, 5)))
    steps = [_render(e)]
    while not isinstance(e, int):
        e = _reduce_once(e)
        steps.append(_render(e))
    return " = ".join(steps)


def _column_addition(rng: np.random.Generator) -> str:
    a, b = _carry_pair(rng, int(rng.integers(2, 5)))
    parts, carry = [], 0
    da, db = str(a)[::-1], str(b)[::-1]
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        term = f"{x} + {y}" + (f" + {carry}" if carry else "")
        parts.append(f"{term} = {s}, write {s % 10}" + (", carry 1" if s >= 10 else ""))
        carry = s // 10
    if carry:
        parts.append("write the final carry 1")
    return f"Add {a} and {b} by columns: " + "; ".join(parts) + f". So {a} + {b} = {a + b}."


def _word_problem(rng: np.random.Generator) -> str:
    name = _NAMES[int(rng.integers(0, len(_NAMES)))]
    item = _ITEMS[int(rng.integers(0, len(_ITEMS)))]
    a, b = int(rng.integers(2, 100)), int(rng.integers(2, 50))
    kind = int(rng.integers(0, 4))
    if kind == 0:
        return (
            f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have "
            f"now? {a} + {b} = {a + b}. Answer: {a + b}."
        )
    if kind == 1:
        a = a + b
        return (
            f"{name} has {a} {item} and gives away {b}. How many {item} are left? "
            f"{a} - {b} = {a - b}. Answer: {a - b}."
        )
    if kind == 2:
        a = a % 12 + 2
        return (
            f"There are {a} boxes with {b} {item} in each. How many {item} are there in "
            f"all? {a} * {b} = {a * b}. Answer: {a * b}."
        )
    k = int(rng.integers(2, 10))
    return (
        f"{name} shares {k * b} {item} equally among {k} friends. How many {item} does "
        f"each friend get? {k * b} / {k} = {b}. Answer: {b}."
    )


_KINDS = (_add_sub, _add_sub, _mul_div, _expression, _expression, _column_addition, _word_problem)


def worksheet(seed: int, index: int, max_bytes: int) -> str:
    """Document `index`: 10-60 problems, one per line, at most `max_bytes` UTF-8 bytes."""
    rng = np.random.default_rng((seed, index))
    lines, size = [], 0
    for _ in range(int(rng.integers(10, 61))):
        line = _KINDS[int(rng.integers(0, len(_KINDS)))](rng) + "\n"
        if size + len(line) > max_bytes:  # ASCII only: characters are bytes
            break
        lines.append(line)
        size += len(line)
    return "".join(lines)
