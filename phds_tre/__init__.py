"""phds_tre: a trusted research environment for a federated paediatric health data network.

Researchers send Jupyter notebooks to hospitals; every output is checked by
statistical disclosure control rules (:mod:`phds_tre.sdc`) before anything leaves.
"""

__version__ = "0.1.0"
