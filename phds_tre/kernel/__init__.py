"""What runs inside the site kernel: output capture and :func:`share`.

The executor loads this IPython extension into every site kernel when it binds
the kernel to a run (the bootstrap in :mod:`phds_tre.execute.sandbox`, after the
run's environment is set and before any researcher code); outside a site, a
notebook can run ``%load_ext phds_tre.kernel``. Loading it

* sets the active disclosure policy from the environment variable
  :data:`POLICY_ENV` (a JSON object of :class:`~phds_tre.sdc.Policy` fields;
  absent → the defaults), so ``phds_tre.sdc`` calls without a policy use the
  site's;
* installs :class:`~phds_tre.kernel.capture.Capture`: pandas tables,
  matplotlib figures and statsmodels results are displayed as structured
  outputs (kinds ``"frame"``, ``"figure"``, ``"model"``) that the checker
  re-checks exactly, even when the researcher did not use ``phds_tre.sdc``.

The kernel is untrusted (DESIGN.md, principle 3): everything captured here is
a hint. The checker re-checks every structured output from its payload with
the site's own policy, treats whatever bypassed the hooks as unstructured
(review or fail), and the node's data-aware scanning looks for row-level
values in outputs.

Importing this package is cheap: IPython, pandas and matplotlib are imported
only when the extension loads or an output is captured.
"""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["POLICY_ENV", "load_ipython_extension", "policy_from_env", "unload_ipython_extension"]

#: Environment variable holding the site's policy as JSON.
POLICY_ENV = "PHDS_POLICY_JSON"

_capture: Any = None


def policy_from_env(environ: dict[str, str] | None = None) -> Any:
    """The :class:`~phds_tre.sdc.Policy` in :data:`POLICY_ENV`, or None when it is not set.

    Raises :class:`~phds_tre.sdc.PolicyError` naming the problem when the
    value is not a JSON object of valid policy fields.
    """
    from phds_tre.sdc.policy import Policy, PolicyError

    raw = (os.environ if environ is None else environ).get(POLICY_ENV)
    if raw is None or not raw.strip():
        return None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise PolicyError(f"{POLICY_ENV}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise PolicyError(f"{POLICY_ENV}: must be a JSON object of policy fields")
    return Policy.from_mapping(data, source=POLICY_ENV)


def load_ipython_extension(ip: Any) -> None:
    """Install the capture hooks in ``ip`` and set the site's policy from the environment.

    The hooks are installed first, so that a bad policy (which raises
    :class:`~phds_tre.sdc.PolicyError` for the executor's log) never leaves
    the kernel without them.
    """
    global _capture
    from phds_tre.kernel.capture import Capture
    from phds_tre.sdc.policy import set_active_policy

    if _capture is None:
        _capture = Capture(ip)
        _capture.install()
    set_active_policy(policy_from_env())


def unload_ipython_extension(ip: Any) -> None:
    """Remove the capture hooks and return to the default policy."""
    global _capture
    from phds_tre.sdc.policy import set_active_policy

    if _capture is not None:
        _capture.uninstall()
        _capture = None
    set_active_policy(None)
