"""How a setting is declared, once, beside the code that reads it: its default, its help and its
check. The CLI builds its flags from these declarations (cli.py), the config validates with them and
the checkpoint records them. Nothing here imports more than the standard library, so the CLI can
parse and print help before torch loads.

Two kinds:
- `setting(...)`: a field of a settings dataclass (PlanSettings, CalibrationSettings) that the CLI
  offers as a flag. The field's default is the one default there is.
- `Option`: a strength of one method part (registry.MethodSpec.options), which only the runs that
  choose that part read. It is no dataclass field, so a part registered later (a plugin, a test)
  brings its options with it.
"""
import argparse
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import LorapError


def setting(default, help: str, *, flag: str | None = None, short: str | None = None, parse: Callable | None = None,
            choices: tuple | None = None):
    """A dataclass field the CLI offers as `--field-name` (or `flag`), parsed by `parse` (default: the
    type of `default`)."""
    return field(default=default, metadata=dict(help=help, flag=flag, short=short, parse=parse, choices=choices))


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def csv_of(kind: Callable) -> Callable:
    """A parser of comma-separated values of `kind` (argparse type)."""

    def parse(text: str) -> list:
        try:
            return [kind(item) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None

    return parse


def require_positive_int(name: str, value) -> None:
    """The one check of a count or length: a positive integer (a bool is no count)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise LorapError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class Option:
    """A strength of a method part: the keyword argument its per-layer function takes."""

    name: str  # the keyword argument, the config's key and (as --name-with-dashes) the CLI flag
    default: Any
    help: str
    valid: Callable[[Any], bool]
    requirement: str  # what `valid` asks, in the words the error message uses
    type: Callable = float

    @property
    def flag(self) -> str:
        return flag_of(self.name)

    def check(self, value) -> None:
        if not self.valid(value):
            raise LorapError(f"{self.flag} must be {self.requirement}, got {value}")
