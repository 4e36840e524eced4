"""The JSON report of a verify run: verdict, reasons, declared lineage, evidence, digests, timings.

Canonical JSON (sorted keys) so reports diff cleanly; `report_version` changes when a field changes
meaning. Everything a reviewer needs to re-check the verdict by hand is in it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from tg_verify.atomic import canonical_json
from tg_verify.pipeline import ReferenceOutcome, VerificationResult
from tg_verify.verdict import summarize

if TYPE_CHECKING:
    from tg_verify.analysis.lineage import LineageResult

SCHEMA = "https://tg-verify.dev/schemas/report"
# 2: candidate.files_verified means the features were recomputed (files_hashed added)
# 3: references[].lineage states its calibration: `calibrated`, the class or "uncalibrated", the null's size and
#    scope, the rate at the score with its 95% upper bound, and `stated` (the rate in words); its rates are null
#    where uncalibrated (they were a constant of the method before)
REPORT_VERSION = 3


def _path(path: Path | None) -> str | None:
    return None if path is None else str(path)


def lineage_dict(result: LineageResult | None) -> dict[str, Any] | None:
    """A lineage result as the report states it: the decision (score, threshold, derived, method), what the rate
    rests on (the calibration class or "uncalibrated", its null's size and scope) and the rates measured there
    (share of the null at or above the score with its exact 95% upper bound, p-value, the threshold's own rate),
    null where uncalibrated or not comparable, with `stated`, the same in words; then the units and notes."""
    if result is None:
        return None
    document = result.to_dict()
    calibrated = bool(result.comparable and result.calibrated)
    document.update(calibrated=calibrated, stated=result.rate_text())
    if not calibrated:
        document.update(null_size=None, rate=None, rate_upper=None, p_value=None, false_positive_rate=None,
                        false_positive_upper=None)
    return document


def _reference(ref: ReferenceOutcome) -> dict[str, Any]:
    spec = ref.spec
    return {
        "id": spec.id, "family": spec.family, "role": ref.role, "declared": ref.declared, "forbidden": ref.forbidden,
        "source": ref.source, "path": _path(spec.fingerprint if spec.fingerprint is not None else spec.model),
        "parent": spec.parent, "model_name": ref.fingerprint.model_name, "legacy": ref.fingerprint.legacy,
        "fingerprint_digest": ref.fingerprint_digest, "distance": ref.distance, "threshold": ref.threshold,
        "within_threshold": ref.within_threshold, "lineage": lineage_dict(ref.lineage),
        "lineage_unavailable": ref.lineage_unavailable,
    }


def build_report(result: VerificationResult) -> dict[str, Any]:
    """The report document (JSON-safe)."""
    policy, cand, cls = result.policy, result.candidate, result.classification
    return {
        "schema": SCHEMA,
        "report_version": REPORT_VERSION,
        "verdict": result.verdict.label,
        "summary": summarize(result.verdict.findings),
        "reasons": [f.to_dict() for f in result.verdict.reasons],
        "checks": [f.to_dict() for f in result.verdict.findings],
        "policy": {"path": str(policy.path), "sha256": policy.sha256, "version": policy.version},
        "declared": {"base": policy.declared.base, "family": policy.declared_family,
                     "relation": policy.declared.relation, "forbidden": list(policy.forbidden)},
        "rules": {"max_distance": policy.thresholds.max_distance,
                  "out_of_cluster": policy.thresholds.out_of_cluster, "on_out_of_cluster": policy.on_out_of_cluster,
                  "on_base_mismatch": policy.on_base_mismatch, "on_name_mismatch": policy.on_name_mismatch,
                  "on_statistics_disagree": policy.on_statistics_disagree,
                  "on_unexpected_tensors": policy.on_unexpected_tensors,
                  "lineage": {"enabled": policy.lineage.enabled, "alpha": policy.lineage.alpha,
                              "on_unavailable": policy.lineage.on_unavailable},
                  "require_weights": result.rules.require_weights},
        "candidate": {
            "name": cand.name, "source": cand.source, "path": _path(cand.path),
            "fingerprint_path": _path(cand.fingerprint_path), "model_name": cand.fingerprint.model_name,
            "fingerprint_digest": cand.fingerprint_digest, "layout": cand.layout,
            "total_params": cand.fingerprint.features.get("total_params"),
            "files": [f.to_dict() for f in cand.files], "root_digest": cand.root_digest,
            "weights_digest": cand.weights_digest, "read_through_symlinks": cand.symlinks,
            "files_hashed": cand.files_hashed, "files_verified": cand.files_verified,
            "base": cand.base.to_dict() if cand.base is not None else None, "warnings": list(cand.warnings),
            "unexpected_tensors": list(cand.unexpected),
        },
        "attribution": {
            "family": cls.family, "base": cls.base, "distance": cls.distance, "threshold": cls.threshold,
            "out_of_cluster": cls.out_of_cluster, "margin": cls.margin, "ratio": cls.ratio,
            "family_margin": cls.family_margin, "nearest_reference": cls.nearest_reference,
            "scale": cls.scale, "meaningful": cls.meaningful, "attribution_meaningful": cls.attribution_meaningful,
            "not_meaningful": list(cls.not_meaningful), "lineage_distance": cls.lineage_distance,
            "nearest_reference_distance": cls.nearest_reference_distance,
            "centroids": [{"base": c.base, "family": c.family, "distance": c.distance, "members": list(c.members)}
                          for c in cls.centroids],
            "space": cls.space,
        },
        "references": [_reference(r) for r in result.references],
        "fingerprint": {"settings": result.settings, "feature_version": result.feature_version},
        "caveats": list(result.caveats),
        "tool": result.tool,
        "timings": result.timings,
    }


def report_bytes(result: VerificationResult) -> bytes:
    """The report as canonical JSON bytes."""
    return canonical_json(build_report(result))
