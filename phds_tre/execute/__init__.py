"""Running a study notebook at a site: parameters, code gate, sandboxed kernels, papermill.

One module per concern, as in papermill:

* :mod:`~phds_tre.execute.parameters`: validate a researcher's parameters against the
  notebook's ``parameters`` cell and inject them (papermill);
* :mod:`~phds_tre.execute.codegate`: the static code gate and the site's decision
  (clean / needs approval / blocked);
* :mod:`~phds_tre.execute.sandbox`: one sandboxed kernel (network namespace, private
  root, read-only data, limits) and the record of which controls held;
* :mod:`~phds_tre.execute.pool`: kernels started ahead of time, each used once;
* :mod:`~phds_tre.execute.engine`: papermill execution on such a kernel, with time and
  output limits, returning an :class:`~phds_tre.execute.engine.Execution`.

Typical use at a node::

    pool = KernelPool(size=2, limits=policy.limits, site_env={"PHDS_SITE_DIR": ..., ...})
    gate = code_gate(nb, policy.code_gate)            # before agreeing to run
    values = validate_parameters(nb, given)            # before queueing
    kernel = pool.acquire(run_dir, {"PHDS_POLICY_JSON": ...})
    execution = execute_notebook(nb, values, kernel, policy.limits, progress)
"""

from phds_tre.execute.codegate import Finding, GateResult, code_gate
from phds_tre.execute.engine import Execution, execute_notebook
from phds_tre.execute.parameters import (
    ParameterError,
    ParameterSpec,
    declared_parameters,
    inject_parameters,
    validate_parameters,
)
from phds_tre.execute.pool import KernelPool
from phds_tre.execute.sandbox import SandboxedKernel, SandboxError, probe_support, start_kernel

__all__ = [
    "Execution",
    "Finding",
    "GateResult",
    "KernelPool",
    "ParameterError",
    "ParameterSpec",
    "SandboxError",
    "SandboxedKernel",
    "code_gate",
    "declared_parameters",
    "execute_notebook",
    "inject_parameters",
    "probe_support",
    "start_kernel",
    "validate_parameters",
]
