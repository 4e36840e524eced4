"""The attestation stage: an in-toto Statement of a verdict, built and checked side by side.

- record.py: the predicate's typed form (`Predicate`), its JSON (`to_json`) and the strict parser of
  untrusted JSON back into it (`parse_statement`); one schema for both directions.
- statement.py: a verify run's result -> Predicate -> Statement (what `tg-verify POLICY.yml
  --attestation` writes).
- envelope.py: reading a Statement out of any wrapper (bare, DSSE, Sigstore bundle, JSON Lines).
- check.py: `verify-attestation`: files and digests against the disk, the policy digest, and the
  verdict re-derived with the same decision procedure (tg_verify.verdict.decide) from the recorded
  rules and evidence.

Nothing here imports torch or scikit-learn except statement.py's caller (the verify pipeline's result).
"""
