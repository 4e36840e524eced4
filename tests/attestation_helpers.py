"""Shared test records for attestation tests: what the verify pipeline records for a PASS of a tiny model."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import torch

from tg_verify.artifact import file_digests, resolve
from tg_verify.attestation.record import (
    AttributionRecord,
    CandidateRecord,
    FingerprintRecord,
    Predicate,
    ReferenceRecord,
)
from tg_verify.fingerprint.document import FileDigest
from tg_verify.tiny import build_model, save_model
from tg_verify.verdict import DecisionRules, LineageEvidence

T0_TEXT = "2026-01-02T03:04:05Z"


def candidate_record(model_dir: Path, **overrides) -> CandidateRecord:
    """The files of `model_dir` as an attestation records them, features recomputed from them."""
    from tg_verify.artifact import root_digest

    artifact = resolve(model_dir)
    digests = file_digests(artifact)
    files = tuple(FileDigest(f.path, digests[f.path], f.size, f.role) for f in artifact.files)
    record = CandidateRecord(name=artifact.name, layout=artifact.layout, root_digest=root_digest(digests),
                             files=files, features="recomputed", files_hashed=True,
                             weights_digest=root_digest(digests))
    return replace(record, **overrides)


def make_predicate(model_dir: Path, **overrides) -> Predicate:
    """A PASS of `model_dir` against a declared base with a forbidden reference, as verify would record it."""
    base = ReferenceRecord(
        id="base-1b", family="llama", role="declared-base", fingerprint_sha256="a" * 64, distance=1.25, threshold=7.0,
        within_threshold=True,
        lineage=LineageEvidence(score=0.93, threshold=0.2, derived=True, p_value=1e-12, false_positive_rate=0.01,
                                alpha=0.01))
    other = ReferenceRecord(
        id="qwen-7b", family="qwen", role="forbidden", fingerprint_sha256="b" * 64, distance=11.5, threshold=7.0,
        within_threshold=False,
        lineage=LineageEvidence(score=0.01, threshold=0.2, derived=False, p_value=0.4, false_positive_rate=0.01,
                                alpha=0.01))
    predicate = Predicate(
        verifier_version={"tg-verify": "0.1.0", "torch": "2.13.0"}, time_verified=T0_TEXT,
        policy_sha256=hashlib.sha256(b"version: 1\n").hexdigest(), policy_name="policy.yml",
        candidate=candidate_record(model_dir),
        fingerprint=FingerprintRecord(feature_version="tg1", parameters={"seed": 0, "repeats": 30,
                                                                          "strategy": "random"},
                                      sha256="c" * 64, features={"global_mean": 0.123456789, "num_layers": 2.0}),
        rules=DecisionRules(declared_base="base-1b", declared_family="llama", declared_root="base-1b",
                            forbidden=("qwen-7b",)),
        references=(base, other),
        attribution=AttributionRecord(family="llama", base="base-1b", distance=1.25, threshold=7.0,
                                      out_of_cluster=False, margin=9.0, matches_declared=True),
        result="PASSED", reasons=(), distance_space="standardized")
    return replace(predicate, **overrides)


POLICY = """version: 1
candidate:
  path: ./candidate
declared:
  base: {base}
  family: {family}
references:
  - id: llama-base
    family: llama
    model: ./llama-base
  - id: qwen-base
    family: qwen2
    model: ./qwen-base
forbidden: [{forbidden}]
"""


def build_workspace(root: Path) -> Path:
    """A repository checkout: two bases, a fine-tune of the llama base, a passing and a failing policy."""
    base = build_model("llama", seed=0)
    save_model(base, root / "llama-base", "single")
    save_model(build_model("qwen2", seed=1), root / "qwen-base", "single")
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():  # a light fine-tune: every weight nudged by 2% of its tensor's spread
        for p in base.parameters():
            if p.numel() > 1:
                p.add_(torch.randn(p.shape, generator=generator) * p.std() * 0.02)
    save_model(base, root / "candidate", "indexed-shards")
    (root / "pass.yml").write_text(POLICY.format(base="llama-base", family="llama", forbidden="qwen-base"))
    (root / "fail.yml").write_text(POLICY.format(base="qwen-base", family="qwen2", forbidden="llama-base"))
    return root
