"""Module-name patterns from adapter configs, matched with peft's semantics in linear time.

peft picks a module's rank and alpha with `re.match(rf"(.*\\.)?({pattern})$", module)` over
`rank_pattern` / `alpha_pattern` keys in order, and IA3's `feedforward_modules` string with
`re.fullmatch`. The patterns come from an untrusted adapter_config.json, and Python's backtracking
engine takes exponential time on keys such as `(x+x+)+y`. Here the same regular expressions run on
RE2 (google-re2), whose time is linear in the name, with a cap on how many patterns and how long.
Patterns that only a backtracking engine can run (backreferences, lookaround) are refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import re2

from tg_verify.artifact.errors import shown
from tg_verify.errors import AdapterError

MAX_PATTERNS = 1024  # keys per rank_pattern / alpha_pattern (a per-module pattern for an 80-layer model: 560)
MAX_PATTERN_LENGTH = 256  # characters per key
MAX_PROGRAM_BYTES = 64 << 20  # RE2 memory budget for one compiled table


class PatternError(AdapterError):
    """An adapter config pattern that is too long, too many, or needs a backtracking engine."""

    code = "TGV_ADAPTER_FORMAT"


def _options() -> Any:
    options = re2.Options()
    options.log_errors = False  # RE2 would write parse errors to stderr; they are raised as errors here
    options.max_mem = MAX_PROGRAM_BYTES
    return options


def _python_valid(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError):
        return False
    return True


class PatternTable:
    """An ordered {pattern: value} table; `lookup(module)` is peft's `get_pattern_key` then the value.

    A key that is not a valid Python regex matches literally (the name, or a dotted suffix of it),
    as tg-verify always did; every other key is compiled once into one RE2 set.
    """

    def __init__(self, patterns: Mapping[str, Any], where: str, field: str) -> None:
        if len(patterns) > MAX_PATTERNS:
            raise PatternError(f"{where}: adapter_config.json field '{field}' has {len(patterns)} patterns; at most "
                               f"{MAX_PATTERNS} are matched", field=field)
        self.keys = list(patterns)
        self.values = list(patterns.values())
        self._literal: dict[int, str] = {}
        self._set_positions: list[int] = []
        self._set: Any = None
        for position, pattern in enumerate(self.keys):
            if len(pattern) > MAX_PATTERN_LENGTH:
                raise PatternError(f"{where}: adapter_config.json field '{field}' has a pattern of {len(pattern)} "
                                   f"characters ('{shown(pattern, 60)}'); at most {MAX_PATTERN_LENGTH} are matched",
                                   field=field)
            if not _python_valid(pattern):
                self._literal[position] = pattern
                continue
            if self._set is None:
                self._set = re2.Set.MatchSet(_options())
            try:
                self._set.Add(rf"(?:.*\.)?(?:{pattern})$")
            except re2.error:
                raise PatternError(f"{where}: adapter_config.json field '{field}' pattern '{shown(pattern, 60)}' "
                                   f"uses a construct (a backreference or lookaround) that cannot be matched in "
                                   f"linear time; write it as a plain regular expression", field=field) from None
            self._set_positions.append(position)
        if self._set is not None:
            try:
                self._set.Compile()
            except re2.error:
                raise PatternError(f"{where}: adapter_config.json field '{field}': the patterns are too large to "
                                   f"compile within {MAX_PROGRAM_BYTES >> 20} MiB", field=field) from None

    def position(self, module: str) -> int | None:
        """Index of the first pattern (in config order) that matches `module`, or None."""
        hits = [self._set_positions[i] for i in (self._set.Match(module) or ())] if self._set is not None else []
        hits += [p for p, pattern in self._literal.items() if module == pattern or module.endswith(f".{pattern}")]
        return min(hits) if hits else None

    def lookup(self, module: str, default: Any) -> Any:
        """The value of the first matching pattern, else `default`."""
        position = self.position(module)
        return default if position is None else self.values[position]


def fullmatch(pattern: str, name: str, where: str, field: str) -> bool:
    """peft's `re.fullmatch(pattern, name)` in linear time; an invalid Python regex matches nothing."""
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise PatternError(f"{where}: adapter_config.json field '{field}' is a pattern of {len(pattern)} characters; "
                           f"at most {MAX_PATTERN_LENGTH} are matched", field=field)
    if not _python_valid(pattern):
        return False
    compiled = _compile(pattern)
    if compiled is None:
        raise PatternError(f"{where}: adapter_config.json field '{field}' pattern '{shown(pattern, 60)}' uses a "
                           f"construct (a backreference or lookaround) that cannot be matched in linear time",
                           field=field)
    return compiled.fullmatch(name) is not None


@lru_cache(maxsize=64)
def _compile(pattern: str) -> Any:
    try:
        return re2.compile(pattern, options=_options())
    except re2.error:
        return None
