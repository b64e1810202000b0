"""phds_tre: a trusted research environment for a federated paediatric health data network.

Researchers send Jupyter notebooks to hospitals; every output is checked by
statistical disclosure control rules (:mod:`phds_tre.sdc`) before anything leaves.
"""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``phds_tre.share`` is imported on first use, so ``import phds_tre`` stays cheap."""
    if name == "share":
        from phds_tre.kernel.share import share

        return share
    raise AttributeError(f"module 'phds_tre' has no attribute {name!r}")
