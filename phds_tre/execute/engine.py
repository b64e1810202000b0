"""Execute a study notebook with papermill in a sandboxed kernel that is already running.

:func:`execute_notebook` is papermill end to end, bound to a kernel from
:mod:`phds_tre.execute.sandbox` / :mod:`phds_tre.execute.pool`:

* parameters are validated and injected by :mod:`phds_tre.execute.parameters`
  (papermill's ``injected-parameters`` cell);
* the notebook runs through papermill's :class:`~papermill.engines.Engine` machinery
  (``NotebookExecutionManager``: cell metadata, start/end times, status) with
  :class:`SandboxEngine`, a subclass of papermill's ``NBClientEngine`` whose client is
  papermill's ``PapermillNotebookClient`` (nbclient) given the sandbox's
  ``KernelManager`` (``NotebookClient(km=...)``), so no kernel is started here;
* like papermill, execution stops at the first error and the error output stays in the
  notebook.

What this module adds, and why papermill/nbclient alone do not do it:

* time: a per-cell limit (nbclient's timeout; on expiry the kernel is killed rather than
  interrupted, since untrusted code can ignore SIGINT and the kernel is never reused)
  and a whole-run limit (a watchdog thread that kills the kernel);
* output size: every output is measured as it arrives (nbclient's ``output`` hook) and
  once more after the run; an output over ``limits.output_bytes``, or one that would take
  the notebook's outputs over that total, is replaced by an error-like placeholder
  (``ename`` ``OutputTooLarge``) and recorded in ``controls["output_size"]``;
* outcome: a kernel that dies, runs out of memory or out of time is a status of the
  :class:`Execution`, not an exception; only programming errors raise.

``SandboxEngine`` is also registered with papermill under the name ``phds-sandbox``
(in-process, at import) for callers that prefer ``papermill.execute_notebook(...,
engine_name="phds-sandbox", km=kernel.km, run=RunState(...))``. It is not published as a
``papermill.engine`` entry point: it cannot run without a sandboxed kernel handed to it,
so the papermill CLI could not use it anyway.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from queue import Empty
from typing import Any, Literal

import nbformat
from jupyter_core.utils import ensure_async, run_sync
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
from nbclient.util import run_hook
from nbformat import NotebookNode
from papermill.clientwrap import PapermillNotebookClient
from papermill.engines import NBClientEngine, papermill_engines
from papermill.exceptions import PapermillException
from papermill.execute import remove_error_markers

from phds_tre.execute.parameters import ParameterError, inject_parameters, validate_parameters
from phds_tre.execute.sandbox import SandboxedKernel, control
from phds_tre.site_policy import ExecutionLimits

__all__ = [
    "ENGINE_NAME",
    "Execution",
    "ExecutionStatus",
    "OutputLimiter",
    "RunState",
    "SandboxEngine",
    "execute_notebook",
]

log = logging.getLogger(__name__)

ENGINE_NAME = "phds-sandbox"
ExecutionStatus = Literal["completed", "failed", "timeout", "killed", "oom"]
PLACEHOLDER_ENAME = "OutputTooLarge"
_OOM_MARKERS = ("MemoryError", "Cannot allocate memory", "std::bad_alloc", "out of memory")


@dataclass
class Execution:
    """The result of one run: the executed notebook and how it ended."""

    notebook: NotebookNode
    status: ExecutionStatus
    #: One line for people; None when the run completed.
    error: str | None
    #: name → {"requested", "held", "how", "detail"}: the sandbox's controls and the engine's.
    controls: dict[str, dict[str, Any]]
    #: Seconds. ``kernel_wait_s``: acquire waiting for a ready kernel plus binding it to the
    #: run; ``first_cell_s``: from acquire (from this call when the kernel did not come
    #: from a pool) to the first code cell starting in the kernel (the kernel's own
    #: ``execute_input`` time); ``execute_s``: parameters, papermill and nbclient;
    #: ``total_s``: from acquire to the end, the kernel's shutdown included.
    timings: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (without the notebook)."""
        return {
            "status": self.status,
            "error": self.error,
            "controls": self.controls,
            "timings": self.timings,
        }


def _size(obj: Any) -> int:
    return len(json.dumps(obj, default=str, separators=(",", ":")))


def _placeholder(text: str) -> NotebookNode:
    return nbformat.v4.new_output(
        "error", ename=PLACEHOLDER_ENAME, evalue=text, traceback=[f"{PLACEHOLDER_ENAME}: {text}"]
    )


def _is_placeholder(out: NotebookNode) -> bool:
    return out.get("output_type") == "error" and out.get("ename") == PLACEHOLDER_ENAME


class OutputLimiter:
    """Keeps each output under ``per_output`` bytes and all outputs under ``total`` bytes.

    Sizes are those of the output's JSON in the notebook. ``limits.output_bytes`` is used
    for both (ExecutionLimits has one field); placeholders do not count.
    """

    def __init__(self, per_output: int, total: int) -> None:
        self.per_output = per_output
        self.total = total
        self.used = 0
        self.exhausted = False
        self.dropped = 0
        #: One entry per withheld output: cell, bytes, why.
        self.withheld: list[dict[str, Any]] = []

    def admit(self, out: NotebookNode, cell_index: int) -> NotebookNode | None:
        """The output itself, a placeholder for it, or None (dropped after the total was hit)."""
        if self.exhausted:
            self.dropped += 1
            return None
        size = _size(out)
        if size > self.per_output:
            self.withheld.append({"cell": cell_index, "bytes": size, "why": "output too large"})
            return _placeholder(
                f"an output of {size:,} bytes was withheld: the limit per output is "
                f"{self.per_output:,} bytes"
            )
        if self.used + size > self.total:
            self.exhausted = True
            self.withheld.append({"cell": cell_index, "bytes": size, "why": "notebook total"})
            return _placeholder(
                f"outputs withheld from here on: the notebook's outputs reached the limit of "
                f"{self.total:,} bytes"
            )
        self.used += size
        return out

    def audit(self, nb: NotebookNode) -> None:
        """Re-measure the finished notebook (streams are merged, displays updated by then)."""
        used = 0
        over = False
        for index, cell in enumerate(nb.cells):
            outputs = cell.get("outputs")
            if not outputs:
                continue
            kept: list[NotebookNode] = []
            for out in outputs:
                if _is_placeholder(out):
                    kept.append(out)
                    continue
                if over:
                    continue
                size = _size(out)
                if size > self.per_output:
                    self.withheld.append(
                        {"cell": index, "bytes": size, "why": "output too large (after merging)"}
                    )
                    kept.append(
                        _placeholder(
                            f"an output of {size:,} bytes was withheld: the limit per output "
                            f"is {self.per_output:,} bytes"
                        )
                    )
                elif used + size > self.total:
                    over = True
                    self.withheld.append({"cell": index, "bytes": size, "why": "notebook total"})
                    kept.append(
                        _placeholder(
                            f"outputs withheld from here on: the notebook's outputs reached the "
                            f"limit of {self.total:,} bytes"
                        )
                    )
                else:
                    used += size
                    kept.append(out)
            cell["outputs"] = kept
        self.used = used


@dataclass
class RunState:
    """What :class:`SandboxEngine`'s client needs beyond papermill's arguments, and reports."""

    limiter: OutputLimiter
    cell_timeout_s: float
    progress: Callable[[int, int], None] | None = None
    #: Called when a cell times out (kills the kernel).
    on_cell_timeout: Callable[[], None] | None = None
    #: How the cell loop ended: None (all ran), "error", "timeout" or "dead".
    stopped: str | None = None
    stopped_cell: int | None = None
    error_output: dict[str, Any] | None = None
    cells_done: int = 0
    first_cell_started: str | None = None
    notes: list[str] = field(default_factory=list)


class _SandboxClient(PapermillNotebookClient):
    """papermill's nbclient client with output limits, progress and sandbox outcomes."""

    def __init__(self, nb_man: Any, km: Any, run: RunState, **kw: Any) -> None:
        super().__init__(nb_man, km=km, **kw)
        self.run = run

    async def async_start_new_kernel_client(self) -> Any:
        """nbclient's client start, with a readiness check that does not idle 0.2 s.

        jupyter_client's ``wait_for_ready`` ends by draining IOPub until it has been
        silent for 0.2 s, which is most of the time from acquire to the first cell of a
        pre-started kernel. Seeing one IOPub message caused by our own kernel_info
        request proves the subscription is connected just as well.
        """
        assert self.km is not None
        self.kc = self.km.client()
        await ensure_async(self.kc.start_channels())
        await _wait_ready(self.kc, self.km, self.startup_timeout)
        self.kc.allow_stdin = False
        await run_hook(self.on_notebook_start, notebook=self.nb)
        return self.kc

    # nbclient binds the synchronous wrapper at class creation; rebind it to the override.
    start_new_kernel_client = run_sync(async_start_new_kernel_client)

    def execute(self, **kwargs: Any) -> NotebookNode:
        """papermill's ``execute``, minus the kernel_info round trip to a dead kernel."""
        self.reset_execution_trackers()
        try:
            with self.setup_kernel(**kwargs):
                self.papermill_execute_cells()
                if self.run.stopped not in ("timeout", "dead") and self.kc is not None:
                    try:
                        info = self.wait_for_reply(self.kc.kernel_info())
                        if info is not None:
                            self.nb.metadata["language_info"] = info["content"]["language_info"]
                    except (RuntimeError, KeyError, TimeoutError) as exc:
                        log.debug("kernel_info after the run: %s", exc)
                self.set_widgets_metadata()
        finally:
            # The kernel manager is not ours (owns_km is False), so nbclient leaves the
            # client's channels open; close them here. The kernel itself is killed by the caller.
            if self.kc is not None:
                try:
                    self.kc.stop_channels()
                except Exception as exc:  # channels of a dead kernel
                    log.debug("stop_channels: %s", exc)
        nb: NotebookNode = self.nb
        return nb

    def papermill_execute_cells(self) -> None:
        """papermill's cell loop, also stopping on a timeout or a dead kernel."""
        total = len(self.nb.cells)
        for index, cell in enumerate(self.nb.cells):
            stop = False
            try:
                self.nb_man.cell_start(cell, index)
                self.execute_cell(cell, index)
            except CellExecutionError as exc:
                self.nb_man.cell_exception(self.nb.cells[index], cell_index=index, exception=exc)
                self._stop("error", index)
                stop = True
            except CellTimeoutError as exc:
                if self.run.on_cell_timeout is not None:
                    self.run.on_cell_timeout()
                self.nb_man.cell_exception(self.nb.cells[index], cell_index=index, exception=exc)
                self.nb.cells[index].setdefault("outputs", []).append(
                    nbformat.v4.new_output(
                        "error",
                        ename="CellTimeoutError",
                        evalue=f"the cell ran longer than {self.run.cell_timeout_s:g} s "
                        "and was stopped",
                        traceback=[],
                    )
                )
                self._stop("timeout", index)
                stop = True
            except DeadKernelError as exc:
                self.nb_man.cell_exception(self.nb.cells[index], cell_index=index, exception=exc)
                self._stop("dead", index)
                stop = True
            finally:
                self.nb_man.cell_complete(self.nb.cells[index], cell_index=index)
                self.run.cells_done = index + 1
                self._note_first_cell(self.nb.cells[index])
                self._progress(index + 1, total)
            if stop:
                break

    def _stop(self, how: str, index: int) -> None:
        self.run.stopped = how
        self.run.stopped_cell = index
        for out in self.nb.cells[index].get("outputs", []):
            if out.get("output_type") == "error" and not _is_placeholder(out):
                self.run.error_output = {"ename": out.get("ename"), "evalue": out.get("evalue")}

    def _note_first_cell(self, cell: NotebookNode) -> None:
        if self.run.first_cell_started is None and cell.get("cell_type") == "code":
            execution = cell.get("metadata", {}).get("execution", {})
            started = execution.get("iopub.execute_input") or execution.get("iopub.status.busy")
            if started:
                self.run.first_cell_started = str(started)

    def _progress(self, done: int, total: int) -> None:
        if self.run.progress is None:
            return
        try:
            self.run.progress(done, total)
        except Exception:  # a broken progress callback must not break the run
            log.exception("progress callback failed")

    def output(
        self, outs: list[NotebookNode], msg: dict[str, Any], display_id: str | None, cell_index: int
    ) -> NotebookNode | None:
        """nbclient's output hook, with the size limits applied as outputs arrive."""
        out: NotebookNode | None = super().output(outs, msg, display_id, cell_index)
        if out is None:
            return None
        admitted = self.run.limiter.admit(out, cell_index)
        if admitted is out:
            return out
        for position in range(len(outs) - 1, -1, -1):
            if outs[position] is out:
                if admitted is None and display_id is None:
                    del outs[position]
                else:
                    # Keep the position: nbclient's display-id map points at it.
                    outs[position] = admitted or _placeholder("output withheld")
                break
        return admitted

    def _update_display_id(self, display_id: str, msg: dict[str, Any]) -> None:
        """nbclient's display update, refusing payloads over the per-output limit."""
        content = msg.get("content", {})
        size = _size({"data": content.get("data"), "metadata": content.get("metadata")})
        if size > self.run.limiter.per_output:
            msg = copy.copy(msg)
            msg["header"] = dict(msg["header"])
            msg["content"] = {
                **content,
                "data": {
                    "text/plain": f"[display update of {size:,} bytes withheld: the limit per "
                    f"output is {self.run.limiter.per_output:,} bytes]"
                },
                "metadata": {},
            }
            self.run.limiter.withheld.append({"cell": None, "bytes": size, "why": "display update"})
        super()._update_display_id(display_id, msg)


class SandboxEngine(NBClientEngine):
    """papermill's nbclient engine, bound to an already running sandboxed kernel.

    Needs ``km`` (the sandbox's KernelManager) and ``run`` (:class:`RunState`) among
    papermill's engine keyword arguments.
    """

    @classmethod
    def execute_managed_notebook(
        cls,
        nb_man: Any,
        kernel_name: str,
        log_output: bool = False,
        stdout_file: Any = None,
        stderr_file: Any = None,
        start_timeout: float = 60,
        execution_timeout: float | None = None,
        km: Any = None,
        run: RunState | None = None,
        **kwargs: Any,
    ) -> NotebookNode:
        """Run the managed notebook with :class:`_SandboxClient` on the given kernel."""
        if km is None or run is None:
            raise PapermillException(
                f"the {ENGINE_NAME} engine runs only on a sandboxed kernel (pass km= and run=)"
            )
        limit = run.cell_timeout_s
        client = _SandboxClient(
            nb_man,
            km=km,
            run=run,
            kernel_name=kernel_name,
            timeout_func=lambda cell: limit,
            startup_timeout=start_timeout,
            interrupt_on_timeout=False,
            raise_on_iopub_timeout=True,
            record_timing=True,
            log_output=log_output,
            stdout_file=stdout_file,
            stderr_file=stderr_file,
            log=logging.getLogger("papermill"),
        )
        result: NotebookNode = client.execute()
        return result


papermill_engines.register(ENGINE_NAME, SandboxEngine)


async def _wait_ready(kc: Any, km: Any, timeout: float) -> None:
    """Until the kernel answers kernel_info on shell and IOPub carries a message about it."""
    deadline = time.monotonic() + timeout
    while True:
        msg_id = kc.kernel_info()
        try:
            while True:
                reply = await ensure_async(kc.shell_channel.get_msg(timeout=1))
                if reply["parent_header"].get("msg_id") == msg_id:
                    break
            while True:
                msg = await ensure_async(kc.iopub_channel.get_msg(timeout=0.05))
                if msg["parent_header"].get("msg_id") == msg_id:
                    return
        except Empty:
            pass
        if not await ensure_async(km.is_alive()):
            raise DeadKernelError("the kernel died before it was ready")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the kernel did not answer within {timeout:g} s")


def _iso_to_epoch(stamp: str) -> float | None:
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def execute_notebook(
    nb: NotebookNode,
    parameters: dict[str, Any] | None,
    kernel: SandboxedKernel,
    limits: ExecutionLimits,
    progress: Callable[[int, int], None] | None = None,
) -> Execution:
    """Run ``nb`` with ``parameters`` on ``kernel`` under ``limits``; the kernel is then killed.

    ``limits`` gives the time and output limits applied here; memory and network were
    fixed when the kernel started (the pool's limits) and are recorded in its controls.
    ``parameters`` may be raw (CLI strings) or already validated: they are validated
    (again) and injected by :mod:`phds_tre.execute.parameters`.
    ``kernel`` must already be bound to the run (:meth:`KernelPool.acquire` or
    :meth:`SandboxedKernel.bootstrap`). ``progress(done, total)`` is called after each cell
    (total counts every cell, markdown included, like papermill's progress bar). The
    input notebook is not modified. Returns an :class:`Execution`; a failing cell, a
    timeout, a dead or out-of-memory kernel and bad parameters are statuses, not exceptions.
    """
    if kernel.closed:
        raise ValueError("this kernel has been shut down; acquire a fresh one for every run")
    if kernel.executed:
        raise ValueError("this kernel has already run a notebook; kernels are never reused")
    if kernel.run_dir is None:
        raise ValueError("bind the kernel to a run first (KernelPool.acquire or kernel.bootstrap)")
    kernel.executed = True

    t_start = time.monotonic()
    wall_start = time.time()
    controls = copy.deepcopy(kernel.controls)
    timings: dict[str, float] = {"kernel_wait_s": round(kernel.wait_s, 4)}
    limiter = OutputLimiter(limits.output_bytes, limits.output_bytes)
    run = RunState(
        limiter=limiter,
        cell_timeout_s=limits.cell_timeout_s,
        progress=progress,
        on_cell_timeout=lambda: kernel.kill("cell_timeout"),
    )

    try:
        values = validate_parameters(nb, dict(parameters or {}))
        prepared = inject_parameters(nb, values)
    except ParameterError as exc:
        kernel.shutdown()
        timings.update(first_cell_s=0.0, execute_s=0.0, total_s=_since(t_start, kernel))
        failed = copy.deepcopy(nb)
        return Execution(failed, "failed", f"parameters: {exc}", controls, timings)
    prepared = remove_error_markers(prepared)

    run_timed_out = threading.Event()

    def watchdog() -> None:
        run_timed_out.set()
        kernel.kill("run_timeout")

    timer = threading.Timer(limits.run_timeout_s, watchdog)
    timer.daemon = True
    timer.start()
    machinery_error: str | None = None
    executed = prepared
    try:
        executed = SandboxEngine.execute_notebook(
            prepared,
            "python3",
            progress_bar=False,
            log_output=False,
            autosave_cell_every=0,
            km=kernel.km,
            run=run,
            start_timeout=30,
        )
    except (RuntimeError, OSError, TimeoutError, PapermillException) as exc:
        # A dead kernel can surface outside the cell loop (e.g. while connecting).
        machinery_error = f"{type(exc).__name__}: {exc}"
        log.warning("execution stopped by %s", machinery_error)
    finally:
        timer.cancel()
    t_end = time.monotonic()

    limiter.audit(executed)
    status, error = _outcome(run, kernel, limits, run_timed_out.is_set(), machinery_error)
    if (
        status in ("killed", "oom", "timeout")
        and run.stopped == "dead"
        and run.stopped_cell is not None
    ):
        executed.cells[run.stopped_cell].setdefault("outputs", []).append(
            nbformat.v4.new_output(
                "error", ename="DeadKernelError", evalue=error or "the kernel died", traceback=[]
            )
        )
    kernel.shutdown()

    first = _iso_to_epoch(run.first_cell_started) if run.first_cell_started else None
    origin = kernel.acquire_wall if kernel.acquire_wall is not None else wall_start
    timings["first_cell_s"] = round(first - origin, 4) if first is not None else 0.0
    timings["execute_s"] = round(t_end - t_start, 4)
    timings["total_s"] = _since(t_start, kernel)

    controls["cell_timeout"] = control(
        limits.cell_timeout_s,
        True,
        "nbclient per-cell timeout; the kernel is killed when it expires",
        "a cell timed out" if run.stopped == "timeout" else "no cell timed out",
    )
    controls["run_timeout"] = control(
        limits.run_timeout_s,
        True,
        "watchdog thread kills the kernel's process group (and cgroup)",
        "the run hit the limit" if run_timed_out.is_set() else "the run finished within the limit",
    )
    output_control = control(
        limits.output_bytes,
        True,
        "each output and the notebook's total measured as they arrive and after the run; "
        "oversize outputs replaced by an OutputTooLarge placeholder",
        f"{limiter.used:,} bytes of outputs kept; {len(limiter.withheld)} withheld"
        + (
            f", {limiter.dropped} more dropped after the total was reached"
            if limiter.dropped
            else ""
        ),
    )
    output_control["withheld"] = limiter.withheld
    controls["output_size"] = output_control
    return Execution(executed, status, error, controls, timings)


def _since(t_start: float, kernel: SandboxedKernel) -> float:
    origin = kernel.acquire_started if kernel.acquire_started is not None else t_start
    return round(time.monotonic() - origin, 4)


def _outcome(
    run: RunState,
    kernel: SandboxedKernel,
    limits: ExecutionLimits,
    run_timed_out: bool,
    machinery_error: str | None,
) -> tuple[ExecutionStatus, str | None]:
    cell = f"cell {run.stopped_cell}" if run.stopped_cell is not None else "the run"
    if run_timed_out:
        return (
            "timeout",
            f"the run exceeded its time limit of {limits.run_timeout_s:g} s ({cell} was running)",
        )
    if run.stopped == "timeout":
        return "timeout", f"{cell} exceeded the per-cell time limit of {limits.cell_timeout_s:g} s"
    if run.stopped == "error":
        ename = (run.error_output or {}).get("ename") or "an error"
        evalue = (run.error_output or {}).get("evalue") or ""
        if ename == "MemoryError":
            return "oom", f"{cell} ran out of memory (limit {limits.memory_mb} MiB)"
        if ename == "SystemExit" and evalue in ("", "0", "None"):
            return "completed", None
        text = f"{cell} raised {ename}" + (f": {evalue}" if evalue else "")
        return "failed", text if len(text) <= 300 else text[:297] + "..."
    if run.stopped == "dead" or machinery_error is not None or not kernel.is_alive():
        how = kernel.exit_description()
        tail = kernel.log_tail()
        if any(marker in tail for marker in _OOM_MARKERS):
            return (
                "oom",
                f"the kernel ran out of memory during {cell} (limit {limits.memory_mb} MiB; {how})",
            )
        if run.stopped is None and machinery_error is None:
            return "completed", None  # finished, then exited on its own (e.g. quit())
        detail = f"; {machinery_error}" if machinery_error and run.stopped != "dead" else ""
        return "killed", f"the kernel died during {cell} ({how}){detail}"
    return "completed", None
