"""Typed configuration sections: the machinery the method's sections (``config.py``) and every
task's own sections (``data``, ``model``, ...) are declared with.

A section is a frozen dataclass deriving ``Section``. Each field states its constraint once,
where it is declared (``option(default, ge=..., choices=...)``); a value outside it, or of the
wrong type, is refused when the section is built (``validate``), naming the key, the value and
what is allowed. A section is changed only by rebuilding it (``Section.updated``), which checks it
again; only keys that exist can be set, so a typo is an error rather than an ignored option. A
``--set`` value (``CommandLineValue``) is read as the type its key declares.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import yaml

from topdown.errors import ConfigError


@dataclass(frozen=True)
class Check:
    """A field's allowed values: bounds (for numbers, and for each item of a list) or a set of choices.

    Numbers must also be finite (no NaN or infinity)."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    choices: tuple[Any, ...] | None = None

    def allowed(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        parts = [
            f"{op} {bound:g}"
            for op, bound in ((">", self.gt), (">=", self.ge), ("<", self.lt), ("<=", self.le))
            if bound is not None
        ]
        return "a finite number" + (" " + " and ".join(parts) if parts else "")

    def accepts(self, value: Any) -> bool:
        if self.choices is not None:
            return value in self.choices
        if value is None:
            return True
        if isinstance(value, list):
            return all(self.accepts(v) for v in value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return True  # the type check speaks for non-numbers
        x = float(value)
        return math.isfinite(x) and (
            (self.gt is None or x > self.gt)
            and (self.ge is None or x >= self.ge)
            and (self.lt is None or x < self.lt)
            and (self.le is None or x <= self.le)
        )


def option(
    default: Any = dataclasses.MISSING,
    *,
    gt=None,
    ge=None,
    lt=None,
    le=None,
    choices=None,
    default_factory=dataclasses.MISSING,
):
    """A dataclass field with its constraint (see ``Check``)."""
    check = Check(gt, ge, lt, le, tuple(choices) if choices is not None else None)
    return field(default=default, default_factory=default_factory, metadata={"check": check})


def validate(obj: Any, section: str) -> None:
    """Check every field of the dataclass ``obj`` against its type and its ``Check``: the one
    place a configuration value is checked."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        value = getattr(obj, f.name)
        key = f"{section}.{f.name}"
        check = f.metadata.get("check", Check())
        if check.choices is None and not _matches(value, hints[f.name]):
            raise ConfigError(f"config key {key!r} expects a {_type_name(hints[f.name])}, got {value!r}")
        if not check.accepts(value):
            raise ConfigError(f"{key} is {value!r}; allowed: {check.allowed()}")


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "None"
    return hint.__name__ if isinstance(hint, type) else str(hint)


def _matches(value: Any, hint: Any) -> bool:
    """Does ``value`` fit the type annotation ``hint`` (``int`` counts as ``float``)?"""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


class Section:
    """Base of the typed sections: validated when built, and rebuilt (revalidated) by ``replace``."""

    SECTION: typing.ClassVar[str]

    def __post_init__(self) -> None:
        for f in fields(self):  # ints are accepted for floats; store them as floats
            if (
                typing.get_type_hints(type(self))[f.name] in (float, float | None)
                and type(getattr(self, f.name)) is int
            ):
                object.__setattr__(self, f.name, float(getattr(self, f.name)))
        validate(self, self.SECTION)
        self.check_relations()

    def check_relations(self) -> None:
        """Constraints between fields (override where a section has some)."""

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)

    def updated(self, changes: Mapping[str, Any] | Section, where: str | None = None):
        """A copy with nested ``changes`` applied (nested sections updated in turn), checked again.
        A key the section does not declare is an error; a ``--set`` value (``CommandLineValue``)
        is read as the type its key declares."""
        where = where or self.SECTION
        if isinstance(changes, CommandLineValue):  # --set data.fbank={num_mel_bins: 40}
            changes = changes.parsed(where)
        if isinstance(changes, Section):
            if type(changes) is not type(self):
                raise ConfigError(f"config key {where!r} is a {type(self).__name__}, got {changes!r}")
            return changes
        if not isinstance(changes, Mapping):
            raise ConfigError(f"config key {where!r} is a section, not a value")
        hints, known = typing.get_type_hints(type(self)), sorted(f.name for f in fields(self))
        if unknown := sorted(set(changes) - set(known), key=str):
            raise ConfigError(
                f"unknown config key '{where}.{unknown[0]}'; known keys here: {', '.join(known)}"
            )
        new = {}
        for key, value in changes.items():
            current = getattr(self, key)
            if isinstance(current, Section):
                new[key] = current.updated(value, f"{where}.{key}")
            elif isinstance(value, CommandLineValue):
                new[key] = value.as_text() if hints[key] is str else value.parsed(f"{where}.{key}")
            else:
                new[key] = value
        return self.replace(**new)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]):
        """Build the section (nested sections included) from a dict: unknown keys and bad values
        are errors."""
        return cls().updated(values)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return asdict(cls())


class TaskSections(Mapping[str, Section]):
    """A task's own typed sections (``data``, ``model``, ...), by name: ``cfg.model.hidden``
    (or ``cfg["model"]``). What a task module's ``make``, ``build_model`` and ``block_names`` read."""

    def __init__(self, sections: Mapping[str, Section] | None = None):
        self._sections = dict(sections or {})

    def __getattr__(self, name: str) -> Section:
        if name.startswith("_"):  # pickling looks for dunders before __init__ has run
            raise AttributeError(name)
        try:
            return self._sections[name]
        except KeyError:
            raise AttributeError(f"the task has no config section {name!r}") from None

    def __getitem__(self, name: str) -> Section:
        return self._sections[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._sections)

    def __len__(self) -> int:
        return len(self._sections)

    def __repr__(self) -> str:
        return f"TaskSections({self._sections!r})"


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")  # 1e-3: YAML 1.1 reads it as a string


class YamlLoader(yaml.SafeLoader):
    """YAML as ``yaml.safe_load`` reads it, except that ``1e-3`` (no dot) is a number, not a string:
    how ``--set`` values and ``--config`` files are read."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(f"^{_NUMBER.pattern}$"), list("-+0123456789.")
)


@dataclass(frozen=True)
class CommandLineValue:
    """A ``--set`` value as typed. A string option takes the text itself (``data.unk=#`` is "#",
    where YAML would read a comment); any other option takes what YAML makes of it."""

    text: str

    def as_text(self) -> str:
        """The text without surrounding blanks, and without YAML quotes where it is quoted."""
        text = self.text.strip()
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            try:
                quoted = yaml.safe_load(text)
            except yaml.YAMLError:
                quoted = None
            if isinstance(quoted, str):
                return quoted
        return text

    def parsed(self, key: str) -> Any:
        try:
            value = yaml.load(self.text, Loader=YamlLoader) if self.text.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"--set {key}: cannot parse value {self.text!r}") from None
        if isinstance(value, str) and _NUMBER.fullmatch(value):
            value = float(value)  # a quoted number ("1e-3") is a number too
        return value
