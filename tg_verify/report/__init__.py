"""Reports of a verify run: console (rich), JSON, Markdown step summary, in-toto attestation, plots."""
