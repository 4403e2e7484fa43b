"""One definition per option of `python -m ref.unlearn`: a `Settings` field (ref/run/plan.py) declared with
`option(...)` carries the option's help text, its default in words, its check, where it applies, whether a sweep may
vary it and whether a resume may change it. The command line (`add_arguments`), the value checks (`check_values`,
`check_applies`), the sweep's grid keys and values (`grid_keys`, `parse_value`), the resume rule (`resumable`) and
the options table of docs/usage.md (`options_table`) are read off the fields: adding an option is adding a field.
"""

from __future__ import annotations

import argparse
import typing
from collections.abc import Callable
from dataclasses import Field, dataclass, field, fields
from typing import Any

from ref.io.errors import RefError
from ref.io.tables import markdown_table


@dataclass(frozen=True)
class Option:
    help: str  # what the option does, for --help and the options table
    shown: str = ""  # the default in words; "": the field's own default
    choices: tuple[str, ...] | None = None
    check: Callable[[str, Any], None] | None = None  # (flag, value): a RefError when the value is wrong
    applies: Callable[[Any], bool] | None = None  # (settings): whether the option applies to the method and goal
    where: str = ""  # where it applies, in words ("--method rmu")
    sweep: bool = False  # a sweep's grid may vary it (it shapes the run)
    resume: bool = False  # a resumed run may change it
    flag: str | None = None  # the command-line flag when it is not --the-field-name (a default-True bool: --no-...)
    parse: Callable[[str], Any] | None = None  # the value from its text, where the type alone does not say


def option(value: Any, help: str, **kw: Any) -> Any:
    """A Settings field that is a command-line option, `value` its default (see `Option` for the keywords)."""
    return field(default=value, metadata={"option": Option(help, **kw)})


def options(cls: type) -> list[tuple[Field, Option]]:
    """The option fields of a settings dataclass, in declaration order."""
    return [(f, f.metadata["option"]) for f in fields(cls) if "option" in f.metadata]


def flag(f: Field, opt: Option | None = None) -> str:
    opt = opt or f.metadata["option"]
    return opt.flag or f"--{f.name.replace('_', '-')}"


def _kind(cls: type, name: str) -> tuple[type, bool]:
    """(item type, is a list) of a field: `int | None` -> (int, False), `list[int] | None` -> (int, True)."""
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    (kind,) = args
    if typing.get_origin(kind) is list:
        return typing.get_args(kind)[0], True
    return kind, False


def span(item: str) -> list[int]:
    """`5` -> [5]; `5-7` -> [5, 6, 7]; `7-5` is refused (a RefError naming the range)."""
    lo, _, hi = item.partition("-")
    if hi and int(hi) < int(lo):
        raise RefError(f"{item} is a descending range; write it from low to high ({hi}-{lo})")
    return list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]


def parse_text(cls: type, f: Field, text: str, sep: str = ",") -> Any:
    """A field's value from its text: list items joined by `sep` (whole numbers may be ranges a-b), true / false for
    a bool, the option's own parser, else the type's. ValueError or KeyError when the text is not a value."""
    opt: Option = f.metadata["option"]
    kind, many = _kind(cls, f.name)
    if opt.parse is not None:
        return opt.parse(text)
    if many:
        items = [x.strip() for x in text.split(sep) if x.strip()]
        if not items:
            raise ValueError(text)
        return [i for item in items for i in span(item)] if kind is int else items
    if kind is bool:
        return {"true": True, "false": False}[text.lower()]
    value = kind(text)
    if opt.choices is not None and value not in opt.choices:
        raise ValueError(text)
    return value


def accepted(cls: type, f: Field, sep: str = ",") -> str:
    """What a field's text may be, in words (for the error of a bad value)."""
    opt: Option = f.metadata["option"]
    kind, many = _kind(cls, f.name)
    if opt.choices is not None:
        return " or ".join(opt.choices)
    if many:
        return f"whole numbers joined by {sep} (a-b a range)" if kind is int else f"names joined by {sep}"
    return {bool: "true or false", int: "a whole number", float: "a number"}.get(kind, "a text")


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One argument per option field, named, typed, checked for choices and documented from the field."""
    for f, opt in options(cls):
        kind, _ = _kind(cls, f.name)
        shown = f" (default: {opt.shown})" if opt.shown else ""
        if kind is bool:
            action = "store_false" if f.default else "store_true"
            parser.add_argument(flag(f, opt), dest=f.name, action=action, help=opt.help + shown)
            continue

        def typed(text: str, f: Field = f) -> Any:
            try:
                return parse_text(cls, f, text)
            except (ValueError, KeyError):
                raise argparse.ArgumentTypeError(f"{text!r} is not {accepted(cls, f)}") from None
            except RefError as e:
                raise argparse.ArgumentTypeError(str(e)) from None

        metavar = "{" + ",".join(opt.choices) + "}" if opt.choices else None
        parser.add_argument(
            flag(f, opt), dest=f.name, type=typed, default=f.default, metavar=metavar, help=opt.help + shown
        )


def check_values(settings: Any) -> None:
    """Each given value alone: its choices and its own check (None, and False for a flag, mean not given)."""
    for f, opt in options(type(settings)):
        value = getattr(settings, f.name)
        if value is None or value is False:
            continue
        if opt.choices is not None and value not in opt.choices:
            raise RefError(f"{flag(f, opt)} is {value!r}; use one of {', '.join(opt.choices)}")
        if opt.check is not None:
            opt.check(flag(f, opt), value)


def check_applies(settings: Any) -> None:
    """An option given where the method and goal would ignore it is refused, naming where it applies."""
    for f, opt in options(type(settings)):
        value = getattr(settings, f.name)
        if value is not None and value is not False and opt.applies is not None and not opt.applies(settings):
            raise RefError(
                f"{flag(f, opt)} applies to {opt.where} only; leave it out for --method {settings.method} "
                f"--goal {settings.goal}"
            )


def grid_keys(cls: type) -> tuple[str, ...]:
    """The fields a sweep's grid may vary."""
    return tuple(f.name for f, opt in options(cls) if opt.sweep)


def resumable(cls: type) -> frozenset[str]:
    """The fields a resumed run may change."""
    return frozenset(f.name for f, opt in options(cls) if opt.resume)


def options_table(cls: type) -> str:
    """The markdown table of every option: flag, default, where it applies, what it does, whether a sweep's grid may
    vary it and whether a resume may change it."""
    rows = []
    for f, opt in options(cls):
        default = opt.shown or ("off" if f.default is False else "on" if f.default is True else f"`{f.default}`")
        choices = f" (one of {', '.join(opt.choices)})" if opt.choices else ""
        sweep, resume = ("yes" if b else "" for b in (opt.sweep, opt.resume))
        rows.append([f"`{flag(f, opt)}`", default, opt.where or "all", opt.help + choices, sweep, resume])
    return markdown_table(["option", "default", "applies to", "meaning", "sweep", "resume"], rows) + "\n"
