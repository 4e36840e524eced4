"""Shared test evidence for attestation tests: what the verify pipeline records for a PASS of a tiny model."""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import replace
from pathlib import Path

import torch

from tg_verify.artifact import file_digests, resolve
from tg_verify.report import attestation as att
from tg_verify.tiny import build_model, save_model

T0 = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)


def make_evidence(model_dir: Path, **overrides) -> att.AttestationEvidence:
    """Evidence for a PASS of `model_dir` against a declared base, as the verify pipeline would record it."""
    artifact = resolve(model_dir)
    files = att.subject_files(artifact, file_digests(artifact))
    base = att.ReferenceEvidence(
        id="base-1b", family="llama", fingerprint_sha256="a" * 64, distance=1.25, threshold=7.0,
        role="declared-base",
        lineage=att.LineageEvidence(score=0.93, threshold=0.2, derived=True, p_value=1e-12,
                                    false_positive_rate=0.01, method="sketch/v1", alpha=0.01))
    other = att.ReferenceEvidence(
        id="qwen-7b", family="qwen", fingerprint_sha256="b" * 64, distance=11.5, threshold=7.0,
        role="forbidden",
        lineage=att.LineageEvidence(score=0.01, threshold=0.2, derived=False, p_value=0.4,
                                    false_positive_rate=0.01, alpha=0.01))
    evidence = att.AttestationEvidence(
        model_name=artifact.name, layout=artifact.layout, files=files,
        policy_sha256=hashlib.sha256(b"version: 1\n").hexdigest(), policy_name="policy.yml",
        fingerprint_sha256="c" * 64, fingerprint_settings={"seed": 0, "repeats": 30, "strategy": "random"},
        feature_version="tg1", verdict="pass", reasons=(), references=(other, base),
        attribution=att.AttributionEvidence(family="llama", base="base-1b", distance=1.25, margin=9.0,
                                            threshold=7.0, out_of_cluster=False),
        declared_base="base-1b", declared_family="llama", forbidden=("qwen-7b",),
        features={"global_mean": 0.1234567890123, "num_layers": 2.0})
    return replace(evidence, **overrides)


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
