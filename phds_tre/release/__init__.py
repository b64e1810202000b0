"""Releases: what leaves a hospital, rebuilt from checked outputs, signed by the site.

DESIGN.md, step 5 of a run. One concern per module:

* :mod:`~phds_tre.release.scan` — the site's identifiers, looked for in every
  representation of an output;
* :mod:`~phds_tre.release.notebook` — the release notebook: released outputs
  rebuilt by the node, placeholders for held and withheld ones;
* :mod:`~phds_tre.release.acro` — ``results.json`` in ACRO's format (SACRO-Viewer);
* :mod:`~phds_tre.release.signing` — site keys, Ed25519 signatures;
* :mod:`~phds_tre.release.manifest` — writing the release folder atomically;
* :mod:`~phds_tre.release.verify` — checking a release folder (``phds verify``).
"""

from __future__ import annotations

from phds_tre.release.manifest import write_release
from phds_tre.release.notebook import (
    DECISIONS,
    ReleaseError,
    ReleaseItem,
    ReleaseNotebook,
    build_release,
)
from phds_tre.release.scan import Hit, IdentifierIndex, IdentifierIndexError, hits_verdict
from phds_tre.release.signing import (
    KeyFileError,
    generate_key,
    key_id,
    load_private_key,
    load_public_key,
)
from phds_tre.release.verify import ReleaseInputError, VerifyResult, verify_release

__all__ = [
    "DECISIONS",
    "Hit",
    "IdentifierIndex",
    "IdentifierIndexError",
    "KeyFileError",
    "ReleaseError",
    "ReleaseInputError",
    "ReleaseItem",
    "ReleaseNotebook",
    "VerifyResult",
    "build_release",
    "generate_key",
    "hits_verdict",
    "key_id",
    "load_private_key",
    "load_public_key",
    "verify_release",
    "write_release",
]
