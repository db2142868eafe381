"""Answer notations that math-verify does not read, rewritten as the LaTeX it does, before answers are compared
(:func:`nanotorl.reward.is_equivalent`).

- Unicode math symbols with a LaTeX equivalent (:data:`SYMBOLS`): ``45°`` -> ``45^\\circ``, ``2π`` -> ``2\\pi``,
  ``√3`` -> ``\\sqrt{3}``, ``−`` -> ``-``, ``×``, ``÷``, ``≤``, ``≥``, ``∞``, superscript digits, vulgar fractions
  (``½`` -> ``\\frac{1}{2}``; ``1½`` then reads as the mixed number ``1\\frac{1}{2}``), and a digit under a
  combining overline (``0.3̅``), which is a repeating decimal.
- Repeating decimals, exact rationals written as :func:`repeating` decimals: ``0.\\overline{3}``,
  ``0.1\\overline{6}``, ``0.\\bar{3}``, ``0.(3)``, ``0.\\dot{3}``, ``0.\\dot{1}4\\dot{2}`` (a dot over the first and
  the last repeating digit), ``0.3̅``, and an ellipsis after a block written at least twice (``0.333...``,
  ``0.1666\\ldots``, ``0.142857142857…``); each becomes ``\\frac{p}{q}``. A decimal with an ellipsis but no repeated
  block (``3.14...``) is left alone: it is not exact.
"""
import re
import unicodedata
from fractions import Fraction

SYMBOLS = {  # Unicode -> LaTeX; a command that ends in a letter gets a space, so that "πr" stays two symbols
    "°": "^\\circ", "π": "\\pi ", "×": "\\times ", "÷": "\\div ", "−": "-", "·": "\\cdot ", "⋅": "\\cdot ",
    "≤": "\\leq ", "≥": "\\geq ", "≠": "\\neq ", "≈": "\\approx ", "±": "\\pm ", "∓": "\\mp ", "∞": "\\infty ",
    "∪": "\\cup ", "∩": "\\cap ", "∈": "\\in ", "∅": "\\emptyset ", "θ": "\\theta ", "∠": "\\angle ",
    "…": "\\ldots ", "⁄": "/",
}
SUPERSCRIPTS = dict(zip("⁰¹²³⁴⁵⁶⁷⁸⁹", "0123456789"))
_ROOT = re.compile(r"([√∛∜])\s*(\d+(?:\.\d+)?|[A-Za-z]|\{[^{}]*\}|\([^()]*\))?")
_SUPER = re.compile(f"[{''.join(SUPERSCRIPTS)}]+")
_VULGAR = re.compile("[\u00bc-\u00be\u2150-\u215e]")
_OVERLINED = re.compile("(?:\\d[\u0304\u0305])+")  # digits each under a combining overline (or macron)
_DIGITS = r"(?<![\d.])(\d*)\.(\d*)"  # the integer part and the digits before the repeating block
_ELLIPSIS = r"(?:\.\.\.|\\ldots|\\dots|\\cdots|…)"
_REPEATING = [  # (pattern, the groups of its repeating block)
    (re.compile(_DIGITS + r"\\(?:overline|bar)\s*(?:\{(\d+)\}|(\d))"), lambda m: m[3] or m[4]),
    (re.compile(_DIGITS + r"\((\d+)\)"), lambda m: m[3]),
    (re.compile(_DIGITS + r"\\dot\s*\{?(\d)\}?(?:(\d*)\\dot\s*\{?(\d)\}?)?"),
     lambda m: m[3] + (m[4] or "") + (m[5] or "")),
    (re.compile(r"(?<![\d.])(\d*)\.(\d*?)(\d+?)\3+\s*" + _ELLIPSIS), lambda m: m[3]),
]


def repeating(integer: str, fixed: str, block: str) -> Fraction:
    """The exact value of ``integer.fixed(block)(block)...``: ``repeating("0", "1", "6")`` is 1/6."""
    head = Fraction(int(integer or "0")) + (Fraction(int(fixed), 10 ** len(fixed)) if fixed else 0)
    return head + Fraction(int(block), 10 ** len(fixed) * (10 ** len(block) - 1))


def _as_latex(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"\\frac{{{value.numerator}}}{{{value.denominator}}}"


def _root(m: re.Match) -> str:
    command = {"√": "\\sqrt", "∛": "\\sqrt[3]", "∜": "\\sqrt[4]"}[m[1]]
    radicand = m[2]
    if radicand is None:
        return command + " "
    return f"{command}{{{radicand[1:-1] if radicand[0] in '{(' else radicand}}}"


def _vulgar(m: re.Match) -> str:
    numerator, denominator = unicodedata.normalize("NFKC", m[0]).split("\u2044")
    return f"\\frac{{{numerator}}}{{{denominator}}}"


def plain_latex(answer: str) -> str:
    """``answer`` with the notations of the module docstring rewritten; anything else is kept as it is."""
    text = _OVERLINED.sub(lambda m: "\\overline{" + m[0][::2] + "}", answer)
    text = _VULGAR.sub(_vulgar, text)
    text = _SUPER.sub(lambda m: "^{" + "".join(SUPERSCRIPTS[c] for c in m[0]) + "}", text)
    text = _ROOT.sub(_root, text)
    text = "".join(SYMBOLS.get(c, c) for c in text)
    for pattern, block in _REPEATING:
        text = pattern.sub(lambda m: _as_latex(repeating(m[1], m[2], block(m))), text)
    return text.strip()
