"""The verification policy (YAML, schema version 1): loaded as untrusted input, validated strictly.

Every error is one line naming the policy file, the field path (`references[2].fingerprint`) and what
was expected. Paths in the policy are relative to the policy file. docs/policy.md is the reference.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import math
import os
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml.events import AliasEvent, NodeEvent

from tg_verify.analysis.lineage_rule import DEFAULT_ALPHA
from tg_verify.errors import InputError, PolicyError
from tg_verify.escaping import shown
from tg_verify.verdict import Action, DecisionRules
from tg_verify.waivers import UNWAIVABLE, Waiver

SUPPORTED_VERSIONS: tuple[int, ...] = (1,)
MAX_POLICY_BYTES = 1 << 20  # a policy is a few hundred bytes; 1 MiB leaves room for thousands of references
MAX_DEPTH = 16
MAX_STRING = 4096
# Reference ids and family names (docs/policy.md, "Identifiers"): ASCII only, so look-alike letters from
# other scripts cannot make two ids a reviewer reads as one.
MAX_IDENTIFIER = 128
IDENTIFIER = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._+@/-]{{0,{MAX_IDENTIFIER - 1}}}")
MAX_WAIVERS = 100
WAIVER_CODE = re.compile(r"TGV_[A-Z0-9_]{1,64}")
MAX_REFERENCES = 10_000
MAX_INT = 2**63 - 1
DEFAULT_MAX_DISTANCE = 7.0  # the paper's out-of-cluster distance in the standardised 15-feature space
RELATIONS = ("finetune", "adapter", "merge", "quantization", "identical", "other")


@dataclass(frozen=True)
class CandidateSpec:
    """The model under test: weights (`path`), a fingerprint made earlier, or both (digests must agree)."""

    path: Path | None
    fingerprint: Path | None
    name: str | None = None
    base_model: Path | None = None  # base weights an adapter candidate is merged onto
    # Features must be recomputed from `path` (a fingerprint file's features fail the verdict). None: not set,
    # the caller's default applies (off for `tg-verify POLICY.yml`, on for `tg-verify action`).
    require_weights: bool | None = None


@dataclass(frozen=True)
class ReferenceSpec:
    """A known model: its id, family, and a fingerprint file or weights to fingerprint on the fly."""

    id: str
    family: str
    index: int
    fingerprint: Path | None = None
    model: Path | None = None
    max_distance: float | None = None  # per-reference override of thresholds.max_distance
    parent: str | None = None  # a known derivative of another reference: it moves that base's cluster centre
    sha256: str | None = None  # pin: sha256 of the fingerprint file's bytes, or the model's root digest

    @property
    def field(self) -> str:
        """The field path of this reference in the policy, for messages."""
        return f"references[{self.index}]"

    @property
    def source_field(self) -> str:
        return f"{self.field}.{'fingerprint' if self.fingerprint is not None else 'model'}"


@dataclass(frozen=True)
class Declared:
    """The lineage the candidate claims: a base reference id, a family, or both."""

    base: str | None = None
    family: str | None = None
    relation: str | None = None  # informational: finetune | adapter | merge | quantization | identical | other


@dataclass(frozen=True)
class Thresholds:
    """Distance limits in the standardised feature space (the paper's scale)."""

    max_distance: float = DEFAULT_MAX_DISTANCE  # candidate to declared base
    out_of_cluster: float = DEFAULT_MAX_DISTANCE  # candidate to its nearest cluster centre


@dataclass(frozen=True)
class LineagePolicy:
    """How the sketch-based lineage test takes part in the verdict."""

    enabled: bool = True
    alpha: float = DEFAULT_ALPHA  # target false-positive rate: the calibrated threshold's level (docs/lineage.md)
    min_score: float | None = None  # a floor under the calibrated threshold (None: no floor)
    on_unavailable: Action = "warn"  # a fingerprint without a sketch (e.g. a legacy reference)


@dataclass(frozen=True)
class Outputs:
    """Files the run writes (absolute, or relative to the policy file)."""

    report: Path | None = None
    attestation: Path | None = None
    fingerprint: Path | None = None
    summary: Path | None = None  # the Markdown summary, besides $GITHUB_STEP_SUMMARY


@dataclass(frozen=True)
class Policy:
    """A validated policy. `sha256` is the digest of the file's bytes, as attestations record it."""

    path: Path
    sha256: str
    version: int
    candidate: CandidateSpec
    declared: Declared
    references: tuple[ReferenceSpec, ...]
    forbidden: tuple[str, ...] = ()
    thresholds: Thresholds = field(default_factory=Thresholds)
    lineage: LineagePolicy = field(default_factory=LineagePolicy)
    fingerprint: dict[str, Any] = field(default_factory=dict)  # FingerprintSettings overrides
    on_out_of_cluster: Action = "fail"
    on_name_mismatch: Action = "warn"
    on_base_mismatch: Action = "warn"
    # What a statistical finding that would fail (distance, family, out of cluster) becomes when the lineage
    # test establishes the declared lineage: warn (the stronger evidence decides) or fail (both must agree).
    on_statistics_disagree: Action = "warn"
    on_unexpected_tensors: Action = "fail"  # stored tensors no runtime loads (artifact/loading.py)
    outputs: Outputs = field(default_factory=Outputs)
    waivers: tuple[Waiver, ...] = ()  # reviewed, dated exceptions for single findings (tg_verify/waivers.py)

    def reference(self, ref_id: str) -> ReferenceSpec:
        """The reference with this id (the policy guarantees ids are unique and declared ones exist)."""
        for ref in self.references:
            if ref.id == ref_id:
                return ref
        raise KeyError(ref_id)

    @property
    def declared_family(self) -> str | None:
        """The declared family, following from the declared base when only the base is given."""
        if self.declared.family is not None:
            return self.declared.family
        return self.reference(self.declared.base).family if self.declared.base else None

    def root_of(self, ref_id: str) -> str:
        """The base at the end of a reference's parent chain (itself for a base)."""
        ref = self.reference(ref_id)
        while ref.parent is not None:
            ref = self.reference(ref.parent)
        return ref.id

    def decision_rules(self, *, require_weights_default: bool = False) -> DecisionRules:
        """The rules the verdict applies, as tg_verify.verdict.decide reads them (and attestations record them)."""
        base = self.declared.base
        require = self.candidate.require_weights
        return DecisionRules(
            declared_base=base, declared_family=self.declared_family,
            declared_root=self.root_of(base) if base is not None else None, forbidden=self.forbidden,
            on_out_of_cluster=self.on_out_of_cluster, on_base_mismatch=self.on_base_mismatch,
            on_name_mismatch=self.on_name_mismatch, lineage_enabled=self.lineage.enabled,
            on_lineage_unavailable=self.lineage.on_unavailable, on_statistics_disagree=self.on_statistics_disagree,
            on_unexpected_tensors=self.on_unexpected_tensors,
            require_weights=require_weights_default if require is None else require, waivers=self.waivers)

    def threshold_for(self, ref: ReferenceSpec) -> float:
        return ref.max_distance if ref.max_distance is not None else self.thresholds.max_distance


# --------------------------------------------------------------------------------------------- YAML


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors and aliases (expansion bombs), duplicate keys and deep nesting."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event: Any = self.peek_event()  # type: ignore[no-untyped-call]
        start: Any = event.start_mark  # the C and pure-Python loaders have different Mark types
        if isinstance(event, AliasEvent) or (isinstance(event, NodeEvent) and event.anchor is not None):
            raise yaml.MarkedYAMLError(problem="anchors and aliases (&name, *name) are not allowed in a policy",
                                       problem_mark=start)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.MarkedYAMLError(problem=f"nesting deeper than {MAX_DEPTH} levels", problem_mark=start)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:
                raise yaml.MarkedYAMLError(problem="mapping keys must be plain scalars",
                                           problem_mark=key_node.start_mark) from None
            if duplicate:
                raise yaml.MarkedYAMLError(problem=f"duplicate key {key!r}", problem_mark=key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(path: Path, data: bytes) -> Any:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError(f"{path}: not UTF-8 text", file=str(path)) from None
    loader = _StrictLoader(text)
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = " ".join(str(exc.problem or exc.context or "invalid YAML").split())
        raise PolicyError(f"{path}: {where}{problem}", file=str(path)) from None
    except yaml.YAMLError as exc:
        raise PolicyError(f"{path}: invalid YAML ({' '.join(str(exc).split())[:200]})", file=str(path)) from None
    except (ValueError, RecursionError, OverflowError) as exc:  # e.g. an integer with too many digits
        raise PolicyError(f"{path}: invalid YAML value ({' '.join(str(exc).split())[:200]})", file=str(path)) from None
    finally:
        loader.dispose()


# --------------------------------------------------------------------------------------- validation


class _Checker:
    """Type checks that raise PolicyError naming the policy file and the field path."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.base_dir = path.parent

    def fail(self, where: str, message: str) -> PolicyError:
        return PolicyError(f"{self.path}: {where}: {message}" if where else f"{self.path}: {message}",
                           file=str(self.path), field=where or None)

    def mapping(self, value: Any, where: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()
                ) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, f"expected a mapping with keys {', '.join(allowed)}, got {_kind(value)}")
        for key in value:
            if not isinstance(key, str):
                raise self.fail(where, f"keys must be strings, got {_kind(key)} {key!r}")
            if key not in allowed:
                raise self.fail(_join(where, key), f"unknown key (expected one of: {', '.join(allowed)})")
        for key in required:
            if key not in value:
                raise self.fail(_join(where, key), "is required")
        return value

    def string(self, value: Any, where: str, *, choices: tuple[str, ...] | None = None) -> str:
        if not isinstance(value, str):
            hint = f" (quote it: '{value}')" if isinstance(value, (int, float)) and not isinstance(value, bool) \
                else ""
            raise self.fail(where, f"expected a string, got {_kind(value)}{hint}")
        if not value.strip():
            raise self.fail(where, "must not be empty")
        if len(value) > MAX_STRING or any(ord(c) < 32 for c in value):
            raise self.fail(where, f"expected a one-line string under {MAX_STRING} characters")
        if choices is not None and value not in choices:
            raise self.fail(where, f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    def identifier(self, value: Any, where: str) -> str:
        """A reference id or family name: ASCII letters, digits and `. _ - + @ /` only (IDENTIFIER), so two
        names a reviewer reads as the same (a Cyrillic letter, a zero-width space) cannot be two ids."""
        text = self.string(value, where)
        if IDENTIFIER.fullmatch(text) is None:
            bad = next((c for c in text if not (c.isascii() and (c.isalnum() or c in "._-+@/"))), text[0])
            what = f"{unicodedata.name(bad, 'an unnamed character')} (U+{ord(bad):04X})"
            raise self.fail(where, f"{shown(text)!r} is not an identifier: use ASCII letters, digits and . _ - + @ / "
                                   f"(starting with a letter or digit, at most {MAX_IDENTIFIER} characters); "
                                   f"found {what}")
        return text

    def number(self, value: Any, where: str, *, low: float, high: float, low_open: bool = False) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(where, f"expected a number, got {_kind(value)}")
        if isinstance(value, int) and abs(value) > MAX_INT:
            raise self.fail(where, "number is too large")
        number = float(value)
        if not math.isfinite(number) or number > high or number < low or (low_open and number == low):
            bound = f"{'>' if low_open else '>='} {low:g} and <= {high:g}"
            raise self.fail(where, f"expected a finite number {bound}, got {value}")
        return number

    def boolean(self, value: Any, where: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(where, f"expected true or false, got {_kind(value)}")
        return value

    def path_value(self, value: Any, where: str, *, must_exist: bool = True) -> Path:
        text = self.string(value, where)
        resolved = Path(text).expanduser()
        if not resolved.is_absolute():
            resolved = self.base_dir / resolved
        if must_exist and not os.path.lexists(resolved):
            raise self.fail(where, f"{text} does not exist (looked for {resolved})")
        return resolved


def _kind(value: Any) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
             float: "a number", type(None): "nothing (null)"}
    return names.get(type(value), type(value).__name__)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _bound_document(check: _Checker, value: Any, where: str = "") -> None:
    """Reject giant integers anywhere (before any field-specific check can choke on them)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
        raise check.fail(where, "number is too large")
    if isinstance(value, float) and not math.isfinite(value):
        raise check.fail(where, f"non-finite number {value} is not allowed")
    if isinstance(value, dict):
        for key, item in value.items():
            _bound_document(check, item, _join(where, str(key)))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _bound_document(check, item, f"{where}[{i}]")


TOP_KEYS = ("version", "candidate", "declared", "references", "forbidden", "thresholds", "lineage", "fingerprint",
            "on_out_of_cluster", "on_name_mismatch", "on_base_mismatch", "on_statistics_disagree",
            "on_unexpected_tensors", "outputs", "waivers")
ACTIONS: tuple[str, ...] = ("fail", "warn")


def _candidate(check: _Checker, raw: Any, override: Path | None) -> CandidateSpec:
    doc = check.mapping(raw, "candidate", ("path", "fingerprint", "name", "base_model", "require_weights"))
    path = override if override is not None else (
        check.path_value(doc["path"], "candidate.path") if "path" in doc else None)
    fingerprint = check.path_value(doc["fingerprint"], "candidate.fingerprint") if "fingerprint" in doc else None
    if path is None and fingerprint is None:
        raise check.fail("candidate", "needs `path` (the model) or `fingerprint` (a fingerprint made earlier)")
    name = check.string(doc["name"], "candidate.name") if "name" in doc else None
    base_model = check.path_value(doc["base_model"], "candidate.base_model") if "base_model" in doc else None
    require = check.boolean(doc["require_weights"], "candidate.require_weights") if "require_weights" in doc else None
    return CandidateSpec(path=path, fingerprint=fingerprint, name=name, base_model=base_model,
                         require_weights=require)


def _references(check: _Checker, raw: Any) -> tuple[ReferenceSpec, ...]:
    if not isinstance(raw, list) or not raw:
        raise check.fail("references", f"expected a non-empty list of references, got {_kind(raw)}")
    if len(raw) > MAX_REFERENCES:
        raise check.fail("references", f"more than {MAX_REFERENCES} references")
    refs: list[ReferenceSpec] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(raw):
        where = f"references[{i}]"
        doc = check.mapping(item, where, ("id", "family", "fingerprint", "model", "max_distance", "parent",
                                          "sha256"), required=("id", "family"))
        ref_id = check.identifier(doc["id"], f"{where}.id")
        if ref_id in seen:
            raise check.fail(f"{where}.id", f"duplicate id {ref_id!r} (also references[{seen[ref_id]}])")
        seen[ref_id] = i
        family = check.identifier(doc["family"], f"{where}.family")
        if ("fingerprint" in doc) == ("model" in doc):
            raise check.fail(where, "needs exactly one of `fingerprint: FILE` or `model: PATH`")
        fingerprint = check.path_value(doc["fingerprint"], f"{where}.fingerprint") if "fingerprint" in doc else None
        model = check.path_value(doc["model"], f"{where}.model") if "model" in doc else None
        limit = check.number(doc["max_distance"], f"{where}.max_distance", low=0.0, high=1e6, low_open=True) \
            if "max_distance" in doc else None
        parent = check.identifier(doc["parent"], f"{where}.parent") if "parent" in doc else None
        pin = _sha256_pin(check, doc["sha256"], f"{where}.sha256") if "sha256" in doc else None
        refs.append(ReferenceSpec(id=ref_id, family=family, index=i, fingerprint=fingerprint, model=model,
                                  max_distance=limit, parent=parent, sha256=pin))
    _check_parents(check, refs)
    return tuple(refs)


def _sha256_pin(check: _Checker, raw: Any, where: str) -> str:
    """A pinned digest: 64 hex digits, optionally prefixed `sha256:`; returned lower-case without prefix."""
    value = check.string(raw, where).strip().lower()
    value = value[len("sha256:"):] if value.startswith("sha256:") else value
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise check.fail(where, "expected a sha256 digest: 64 hex digits, optionally prefixed 'sha256:'")
    return value


def _check_parents(check: _Checker, refs: list[ReferenceSpec]) -> None:
    """A derivative's parent is another reference of the same family, and parent chains end at a base."""
    by_id = {r.id: r for r in refs}
    for ref in refs:
        if ref.parent is None:
            continue
        where = f"{ref.field}.parent"
        parent = by_id.get(ref.parent)
        if parent is None:
            raise check.fail(where, f"unknown reference id {ref.parent!r} (known: {', '.join(sorted(by_id))})")
        if parent.family != ref.family:
            raise check.fail(where, f"parent {parent.id!r} is family {parent.family!r}, not {ref.family!r}")
        seen = {ref.id}
        while parent.parent is not None:
            if parent.id in seen:
                raise check.fail(where, f"parent chain of {ref.id!r} loops back to {parent.id!r}")
            seen.add(parent.id)
            parent = by_id[parent.parent]
        if parent.id in seen:
            raise check.fail(where, f"parent chain of {ref.id!r} loops back to {parent.id!r}")


def _declared(check: _Checker, raw: Any, refs: tuple[ReferenceSpec, ...]) -> Declared:
    doc = check.mapping(raw, "declared", ("base", "family", "relation"))
    ids = {r.id: r for r in refs}
    base = check.identifier(doc["base"], "declared.base") if "base" in doc else None
    family = check.identifier(doc["family"], "declared.family") if "family" in doc else None
    relation = check.string(doc["relation"], "declared.relation", choices=RELATIONS) if "relation" in doc else None
    if base is None and family is None:
        raise check.fail("declared", "needs `base` (a reference id) or `family`, or both")
    if base is not None and base not in ids:
        raise check.fail("declared.base", f"unknown reference id {base!r} (known: {', '.join(sorted(ids))})")
    if base is not None and family is not None and ids[base].family != family:
        raise check.fail("declared.family", f"{family!r} disagrees with the family of declared base {base!r} "
                                            f"({ids[base].family!r})")
    if family is not None and family not in {r.family for r in refs}:
        raise check.fail("declared.family", f"no reference has family {family!r} "
                                            f"(families: {', '.join(sorted({r.family for r in refs}))})")
    return Declared(base=base, family=family, relation=relation)


def _forbidden(check: _Checker, raw: Any, refs: tuple[ReferenceSpec, ...], declared: Declared) -> tuple[str, ...]:
    if not isinstance(raw, list):
        raise check.fail("forbidden", f"expected a list of reference ids, got {_kind(raw)}")
    ids = {r.id for r in refs}
    result: list[str] = []
    for i, item in enumerate(raw):
        ref_id = check.identifier(item, f"forbidden[{i}]")
        if ref_id not in ids:
            raise check.fail(f"forbidden[{i}]", f"unknown reference id {ref_id!r} (known: {', '.join(sorted(ids))})")
        if ref_id == declared.base:
            raise check.fail(f"forbidden[{i}]", f"{ref_id!r} is also the declared base")
        if ref_id in result:
            raise check.fail(f"forbidden[{i}]", f"{ref_id!r} is listed twice")
        result.append(ref_id)
    return tuple(result)


def _thresholds(check: _Checker, raw: Any) -> Thresholds:
    doc = check.mapping(raw, "thresholds", ("max_distance", "out_of_cluster"))
    max_distance = check.number(doc["max_distance"], "thresholds.max_distance", low=0.0, high=1e6, low_open=True) \
        if "max_distance" in doc else DEFAULT_MAX_DISTANCE
    out = check.number(doc["out_of_cluster"], "thresholds.out_of_cluster", low=0.0, high=1e6, low_open=True) \
        if "out_of_cluster" in doc else DEFAULT_MAX_DISTANCE
    return Thresholds(max_distance=max_distance, out_of_cluster=out)


def _lineage(check: _Checker, raw: Any) -> LineagePolicy:
    doc = check.mapping(raw, "lineage", ("enabled", "alpha", "min_score", "on_unavailable"))
    enabled = check.boolean(doc["enabled"], "lineage.enabled") if "enabled" in doc else True
    alpha = check.number(doc["alpha"], "lineage.alpha", low=0.0, high=0.5, low_open=True) \
        if "alpha" in doc else DEFAULT_ALPHA
    min_score = check.number(doc["min_score"], "lineage.min_score", low=-1.0, high=1.0) \
        if "min_score" in doc else None
    action = check.string(doc["on_unavailable"], "lineage.on_unavailable", choices=ACTIONS) \
        if "on_unavailable" in doc else "warn"
    return LineagePolicy(enabled=enabled, alpha=alpha, min_score=min_score,
                         on_unavailable=action)  # type: ignore[arg-type]


def settings_fields() -> dict[str, Any]:
    """FingerprintSettings' fields and defaults: what a policy's `fingerprint:` block may set."""
    from tg_verify.fingerprint.settings import FingerprintSettings

    return {f.name: (f.default if f.default is not dataclasses.MISSING else None)
            for f in dataclasses.fields(FingerprintSettings)}


def _fingerprint(check: _Checker, raw: Any) -> dict[str, Any]:
    from tg_verify.fingerprint.settings import FingerprintSettings

    defaults = settings_fields()
    doc = check.mapping(raw, "fingerprint", tuple(defaults))
    result: dict[str, Any] = {}
    for key, value in doc.items():
        where = f"fingerprint.{key}"
        default = defaults[key]
        if isinstance(default, bool):
            result[key] = check.boolean(value, where)
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise check.fail(where, f"expected an integer, got {_kind(value)}")
            result[key] = value
        elif isinstance(default, float):
            result[key] = check.number(value, where, low=-1e12, high=1e12)
        elif isinstance(default, str):
            result[key] = check.string(value, where)
        else:
            raise check.fail(where, "cannot be set from a policy")
    try:
        FingerprintSettings(**result)
    except (ValueError, TypeError, InputError) as exc:
        raise check.fail("fingerprint", " ".join(str(exc).split())) from None
    return result


def _outputs(check: _Checker, raw: Any) -> Outputs:
    doc = check.mapping(raw, "outputs", ("report", "attestation", "fingerprint", "summary"))
    values = {key: check.path_value(doc[key], f"outputs.{key}", must_exist=False) for key in doc}
    for key, target in values.items():
        if target.is_dir():
            raise check.fail(f"outputs.{key}", f"{target} is a directory; expected a file path")
    return Outputs(**values)


def _action(check: _Checker, doc: dict[str, Any], key: str, default: str) -> Action:
    return check.string(doc[key], key, choices=ACTIONS) if key in doc else default  # type: ignore[return-value]


def _waivers(check: _Checker, raw: Any, refs: tuple[ReferenceSpec, ...]) -> tuple[Waiver, ...]:
    if not isinstance(raw, list):
        raise check.fail("waivers", f"expected a list of waivers, got {_kind(raw)}")
    if len(raw) > MAX_WAIVERS:
        raise check.fail("waivers", f"more than {MAX_WAIVERS} waivers")
    ids = {r.id for r in refs}
    result: list[Waiver] = []
    for i, item in enumerate(raw):
        where = f"waivers[{i}]"
        doc = check.mapping(item, where, ("code", "reference", "reason", "expires"),
                            required=("code", "reason", "expires"))
        code = check.string(doc["code"], f"{where}.code")
        if WAIVER_CODE.fullmatch(code) is None or code in UNWAIVABLE:
            raise check.fail(f"{where}.code", f"{shown(code)!r} is not a reason code a waiver can name (TGV_..., "
                                              "docs/reasons.md; waiver codes themselves cannot be waived)")
        reference = check.identifier(doc["reference"], f"{where}.reference") if "reference" in doc else None
        if reference is not None and reference not in ids:
            raise check.fail(f"{where}.reference", f"unknown reference id {reference!r} "
                                                   f"(known: {', '.join(sorted(ids))})")
        reason = check.string(doc["reason"], f"{where}.reason")
        expires = doc["expires"]
        if isinstance(expires, str):
            try:
                expires = _dt.date.fromisoformat(expires)
            except ValueError:
                expires = None
        if not isinstance(expires, _dt.date) or isinstance(expires, _dt.datetime):
            raise check.fail(f"{where}.expires", "expected a date, YYYY-MM-DD (the last day the waiver applies)")
        if any(w.code == code and w.reference == reference for w in result):
            raise check.fail(where, f"a second waiver for {code}" + (f" on {reference}" if reference else ""))
        result.append(Waiver(code=code, reason=reason, expires=expires, reference=reference))
    return tuple(result)


def parse_policy(data: bytes, path: Path, *, candidate_override: Path | None = None) -> Policy:
    """Validate policy bytes read from `path` (used for messages and to resolve relative paths)."""
    check = _Checker(path)
    if len(data) > MAX_POLICY_BYTES:
        raise check.fail("", f"{len(data)} bytes is over the {MAX_POLICY_BYTES}-byte limit for a policy")
    document = _parse_yaml(path, data)
    if document is None:
        raise check.fail("", "the policy is empty")
    _bound_document(check, document)
    doc = check.mapping(document, "", TOP_KEYS, required=("version", "candidate", "declared", "references"))
    version = doc["version"]
    if isinstance(version, bool) or not isinstance(version, int) or version not in SUPPORTED_VERSIONS:
        raise check.fail("version", f"expected {' or '.join(str(v) for v in SUPPORTED_VERSIONS)}, got {version!r}")
    refs = _references(check, doc["references"])
    declared = _declared(check, doc["declared"], refs)
    steps: dict[str, Callable[[], Any]] = {
        "forbidden": lambda: _forbidden(check, doc["forbidden"], refs, declared),
        "thresholds": lambda: _thresholds(check, doc["thresholds"]),
        "lineage": lambda: _lineage(check, doc["lineage"]),
        "fingerprint": lambda: _fingerprint(check, doc["fingerprint"]),
        "outputs": lambda: _outputs(check, doc["outputs"]),
        "waivers": lambda: _waivers(check, doc["waivers"], refs),
    }
    extras = {key: make() for key, make in steps.items() if key in doc}
    return Policy(path=path, sha256=hashlib.sha256(data).hexdigest(), version=version,
                  candidate=_candidate(check, doc["candidate"], candidate_override), declared=declared,
                  references=refs, on_out_of_cluster=_action(check, doc, "on_out_of_cluster", "fail"),
                  on_name_mismatch=_action(check, doc, "on_name_mismatch", "warn"),
                  on_base_mismatch=_action(check, doc, "on_base_mismatch", "warn"),
                  on_statistics_disagree=_action(check, doc, "on_statistics_disagree", "warn"),
                  on_unexpected_tensors=_action(check, doc, "on_unexpected_tensors", "fail"), **extras)


def load_policy(path: str | os.PathLike[str], *, candidate_override: str | os.PathLike[str] | None = None
                ) -> Policy:
    """Read and validate a policy file. `candidate_override` replaces `candidate.path` (e.g. --candidate)."""
    path = Path(path)
    try:
        if not path.is_file():
            raise PolicyError(f"{path}: no such policy file" if not os.path.lexists(path)
                              else f"{path}: not a regular file", file=str(path))
        size = path.stat().st_size
        if size > MAX_POLICY_BYTES:
            raise PolicyError(f"{path}: {size} bytes is over the {MAX_POLICY_BYTES}-byte limit for a policy",
                              file=str(path))
        with open(path, "rb") as handle:
            data = handle.read(MAX_POLICY_BYTES + 1)
    except PolicyError:
        raise
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read policy ({exc.strerror or exc})", file=str(path)) from exc
    override = None
    if candidate_override is not None:
        override = Path(candidate_override)
        if not os.path.lexists(override):
            raise PolicyError(f"{override}: candidate path (given on the command line) does not exist")
    return parse_policy(data, path, candidate_override=override)
