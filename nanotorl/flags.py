"""A config field's flag in one place, beside the field: its default, the values it takes, and its help line.

    group_size: int = option(8, "responses per prompt (G), whose rewards are compared", at_least(2))

:func:`option` is a ``dataclasses.field`` whose metadata holds the help (with its unit) and a :class:`Valid`, the
values the field takes (:func:`at_least`, :func:`above`, :func:`between`, :func:`one_of`, or one written out).
A config dataclass that derives from :class:`Checked` refuses a value outside them when it is made, with one line
that names the flag ("--group-size must be at least 2, got 1; see --help"), wherever the value came from: a flag,
a preset, code. ``train.py --help`` prints each flag's help and default from the same metadata
(:mod:`nanotorl.config`), so the help, the check and the field cannot drift apart. A bool or free-text field
(a path) needs no Valid: its type says it all; tests/test_config.py checks that every other field has one.
"""
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Valid:
    """The values a field takes: ``text`` in words ("at least 2"), ``ok(value)`` the test, and ``outside`` a value
    it refuses (tests/test_config.py tries it on every flag)."""
    text: str
    ok: Callable[[Any], bool]
    outside: Any


def at_least(lo, text: str = "") -> Valid:
    return Valid(text or f"at least {lo}", lambda v: v >= lo, lo - 1)


def above(lo, text: str = "") -> Valid:
    return Valid(text or f"above {lo}", lambda v: v > lo, lo)


def between(lo, hi, text: str = "") -> Valid:
    """lo <= value <= hi."""
    return Valid(text or f"from {lo} to {hi}", lambda v: lo <= v <= hi, hi + 1)


def one_of(*choices: str) -> Valid:
    names = [repr(c) for c in choices]
    text = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
    return Valid(text, lambda v: v in choices, "none-of-these")


def option(default, help: str, valid: Valid | None = None, unit: str = ""):
    """A dataclass field with its help line (``unit`` follows the default there: "5.0 seconds") and its values."""
    return field(default=default, metadata={"help": help, "valid": valid, "unit": unit})


def flag_name(name: str) -> str:
    """The flag of field ``name``: ``clip_high`` -> ``--clip-high``."""
    return "--" + name.replace("_", "-")


def help_line(f) -> str | None:
    """The ``--help`` line of dataclass field ``f``: its help, its values and its default (None without help)."""
    meta = f.metadata
    if "help" not in meta:
        return None
    valid = f"; {meta['valid'].text}" if meta["valid"] is not None else ""
    default = f"{f.default!r}" if isinstance(f.default, str) else f"{f.default}"
    unit = f" {meta['unit']}" if meta["unit"] else ""
    return f"{meta['help']}{valid} (default: {default}{unit})".replace("%", "%%")


class Checked:
    """Base of the config dataclasses: each field with a :class:`Valid` is checked when an instance is made."""

    def __post_init__(self):
        for f in fields(self):
            valid, value = f.metadata.get("valid"), getattr(self, f.name)
            if valid is not None and not is_dataclass(value) and not valid.ok(value):
                raise ValueError(f"{flag_name(f.name)} must be {valid.text}, got {value!r}; see --help")
