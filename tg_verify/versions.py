"""Version information, in one place: tg-verify's own version and the versions of the libraries that shape a
verdict (recorded in fingerprints, reports and attestations, so a result can be traced to the code that made it)."""

from __future__ import annotations

from importlib import metadata

VERSION = "0.1.0"

# (distribution name, key in reports and attestations): the libraries whose behaviour can change a verdict.
COMPONENTS: tuple[tuple[str, str], ...] = (
    ("tg-verify", "tg-verify"), ("torch", "torch"), ("safetensors", "safetensors"),
    ("transformers", "transformers"), ("peft", "peft"), ("scikit-learn", "sklearn"), ("numpy", "numpy"),
)


def component_versions() -> dict[str, str]:
    """Installed versions of tg-verify and the libraries that shape a verdict (VSA `verifier.version`).

    Read from package metadata, never by importing the libraries, so asking is cheap. A library that
    is not installed is left out; tg-verify itself falls back to VERSION when run from a source tree.
    """
    versions: dict[str, str] = {}
    for dist, key in COMPONENTS:
        try:
            versions[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            if key == "tg-verify":
                versions[key] = VERSION
    return versions


def tool_record() -> dict[str, str]:
    """How documents name the tool that wrote them."""
    return {"name": "tg-verify", "version": VERSION}
