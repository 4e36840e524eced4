"""Policy-level waivers: a reviewed, dated exception for one finding, as pip-audit and trivy users keep them.

A waiver names a reason code, the reference the finding concerns (omitted for findings that concern
none), why it is accepted, and the day it expires. While it is active, the `fail` or `warn` finding it
matches is reported as `info`, its message saying it was waived, until when and why; the verdict no
longer counts it. On the day after it expires it stops waiving, and the expired waiver is a finding
of its own (TGV_WAIVER_EXPIRED, fail), so an exception cannot outlive its review silently. A waiver
that matches nothing is a warning (TGV_WAIVER_UNUSED): a typo in a code must not pass unnoticed.
Waivers are recorded in the attestation (decisionRules.waivers) so a consumer sees them and
verify-attestation re-derives the verdict with them.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from tg_verify.escaping import one_line

WAIVER_EXPIRED = "TGV_WAIVER_EXPIRED"
WAIVER_UNUSED = "TGV_WAIVER_UNUSED"
WAIVABLE_SEVERITIES = ("fail", "warn")
# Codes a waiver can never match: the waiver findings themselves.
UNWAIVABLE = (WAIVER_EXPIRED, WAIVER_UNUSED)


@dataclass(frozen=True)
class Waiver:
    """One waiver: which finding (code and reference id), why, and the last day it applies (UTC)."""

    code: str
    reason: str
    expires: _dt.date
    reference: str | None = None

    def active(self, today: _dt.date) -> bool:
        """True through the expiry day itself."""
        return today <= self.expires

    def matches(self, code: str, subject: str | None) -> bool:
        return code == self.code and subject == self.reference

    def describe(self) -> str:
        about = f"{self.code}" + (f" (reference {self.reference})" if self.reference else "")
        return one_line(f"{about}, expires {self.expires.isoformat()}: {self.reason}")

    def to_dict(self) -> dict[str, Any]:
        """The attestation's and the JSON report's form (lowerCamelCase keys, ISO date)."""
        record: dict[str, Any] = {"code": self.code, "reason": self.reason, "expires": self.expires.isoformat()}
        if self.reference is not None:
            record["reference"] = self.reference
        return record


def today_utc() -> _dt.date:
    """The date waivers are judged against: today in UTC, so a runner's time zone changes nothing."""
    return _dt.datetime.now(_dt.timezone.utc).date()


def waive(findings: Sequence[Any], waivers: Iterable[Waiver], today: _dt.date, make: Any) -> list[Any]:
    """`findings` with active waivers applied and the waivers' own findings appended.

    `findings` are verdict.Finding objects (code, severity, message, subject); `make(code, severity,
    message, subject)` builds a new one, so this module stays below the verdict in the layers.
    """
    waivers = list(waivers)
    used: set[Waiver] = set()
    result = []
    for finding in findings:
        match = next((w for w in waivers if w.matches(finding.code, finding.subject)), None)
        if match is None or finding.severity not in WAIVABLE_SEVERITIES or finding.code in UNWAIVABLE:
            result.append(finding)
            continue
        used.add(match)
        if match.active(today):
            result.append(replace(finding, severity="info", message=one_line(
                f"waived until {match.expires.isoformat()} ({match.reason}): {finding.message}")))
        else:
            result.append(finding)
    for waiver in waivers:
        if not waiver.active(today):
            result.append(make(WAIVER_EXPIRED, "fail", f"waiver for {waiver.describe()} expired; review it and "
                                                       "renew or remove it", waiver.reference))
        elif waiver not in used:
            result.append(make(WAIVER_UNUSED, "warn", f"waiver for {waiver.describe()} matches no failure or "
                                                      "warning of this run; remove it", waiver.reference))
    return result


def from_records(records: Sequence[Mapping[str, Any]]) -> tuple[Waiver, ...]:
    """Waivers as an attestation records them (`to_dict`); ValueError on a malformed record."""
    waivers = []
    for record in records:
        if not isinstance(record, Mapping):
            raise ValueError("a waiver must be an object")
        code, reason, expires = record.get("code"), record.get("reason"), record.get("expires")
        reference = record.get("reference")
        if not (isinstance(code, str) and isinstance(reason, str) and isinstance(expires, str)
                and (reference is None or isinstance(reference, str))):
            raise ValueError("a waiver needs string code, reason and expires (and an optional string reference)")
        waivers.append(Waiver(code=code, reason=reason, expires=_dt.date.fromisoformat(expires), reference=reference))
    return tuple(waivers)
