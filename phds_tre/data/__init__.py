"""Site data: OMOP tables read through one call that works at a hospital and in a dry run.

Inside a notebook::

    from phds_tre import data

    site = data.connect()           # the folder the executor configured
    person = site.table("person")   # one OMOP table as a DataFrame
    df = site.sql("SELECT gender_concept_id, count(*) AS n FROM person GROUP BY 1")

:mod:`phds_tre.data.concepts` names the OMOP concept ids; the synthetic
hospitals come from :func:`phds_tre.data.synth.generate` (``phds synth``).
Importing this package loads neither DuckDB nor pandas.
"""

from phds_tre.data import concepts
from phds_tre.data.site import SITE_DIR_ENV, SITE_NAME_ENV, Site, SiteDataError, connect

__all__ = ["SITE_DIR_ENV", "SITE_NAME_ENV", "Site", "SiteDataError", "concepts", "connect"]
