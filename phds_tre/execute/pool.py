"""A pool of sandboxed kernels started ahead of time, each used for one run only.

:class:`KernelPool` keeps ``size`` kernels started, warmed and probed in the background
(:func:`phds_tre.execute.sandbox.start_kernel`), so a run does not wait for a kernel to
start. :meth:`KernelPool.acquire` takes a ready kernel, binds it to the run (mounts the
run folder, ``chdir``, the run's environment, the ``phds_tre.kernel`` extension; see
:meth:`SandboxedKernel.bootstrap`) and wakes the filler thread to start a replacement.
A kernel is never handed out twice: after its run it is killed (by
:func:`phds_tre.execute.engine.execute_notebook`, or :meth:`KernelPool.release`).

jupyter_client's ``MultiKernelManager`` was not used: it manages kernels by id for
reuse and restarts, while this pool needs the opposite (single use, pre-started,
per-kernel sandbox set-up); each kernel still has its own jupyter_client
``KernelManager``.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from phds_tre.execute.sandbox import (
    DEFAULT_MAX_TASKS,
    DEFAULT_WARM_IMPORTS,
    KERNEL_EXTENSION,
    SandboxedKernel,
    SandboxError,
    start_kernel,
)
from phds_tre.site_policy import ExecutionLimits

__all__ = ["KernelPool"]

log = logging.getLogger(__name__)


class KernelPool:
    """Kernels started ahead of time in their sandbox, handed out once each.

    ``site_env`` holds the site's variables every kernel starts with (at least
    ``PHDS_SITE_DIR``, whose folder is mounted read-only in isolated kernels, and
    ``PHDS_SITE_NAME``). ``isolate``: None = when the host allows it (recorded per
    kernel), True = require it, False = plain kernels. The other keyword arguments go to
    :func:`~phds_tre.execute.sandbox.start_kernel`.
    """

    def __init__(
        self,
        size: int = 2,
        limits: ExecutionLimits | None = None,
        site_env: Mapping[str, str] | None = None,
        *,
        isolate: bool | None = None,
        warm_imports: Sequence[str] = DEFAULT_WARM_IMPORTS,
        extension: str | None = KERNEL_EXTENSION,
        startup_timeout: float = 60.0,
        max_tasks: int = DEFAULT_MAX_TASKS,
        base_dir: str | Path | None = None,
    ) -> None:
        if size < 1:
            raise ValueError("a kernel pool needs at least one kernel")
        self.size = size
        self.limits = limits or ExecutionLimits()
        self.site_env = dict(site_env or {})
        self._start_kw: dict[str, Any] = {
            "isolate": isolate,
            "warm_imports": tuple(warm_imports),
            "extension": extension,
            "startup_timeout": startup_timeout,
            "max_tasks": max_tasks,
            "base_dir": base_dir,
        }
        self.startup_timeout = startup_timeout
        self._ready: collections.deque[SandboxedKernel] = collections.deque()
        self._handed_out: set[SandboxedKernel] = set()
        self._cond = threading.Condition()
        self._starting = 0
        self._closed = False
        self._last_error: BaseException | None = None
        self._failures = 0
        #: Seconds each kernel took to start (most recent last), for benchmarks and logs.
        self.start_times: collections.deque[float] = collections.deque(maxlen=50)
        self._filler = threading.Thread(target=self._fill, name="phds-kernel-pool", daemon=True)
        self._filler.start()

    # -- the filler --------------------------------------------------------------------
    def _fill(self) -> None:
        while True:
            with self._cond:
                while not self._closed and len(self._ready) + self._starting >= self.size:
                    self._cond.wait()
                if self._closed:
                    return
                self._starting += 1
            try:
                kernel = start_kernel(self.limits, self.site_env, **self._start_kw)
            except Exception as exc:  # recorded and raised to the next acquire
                log.warning("kernel pool: could not start a kernel: %s", exc)
                with self._cond:
                    self._starting -= 1
                    self._last_error = exc
                    self._failures += 1
                    failures = self._failures
                    self._cond.notify_all()
                time.sleep(min(30.0, 0.5 * 2 ** min(failures, 6)))
                continue
            with self._cond:
                self._starting -= 1
                if self._closed:
                    closed = True
                else:
                    closed = False
                    self._ready.append(kernel)
                    self.start_times.append(kernel.start_s)
                    self._last_error = None
                    self._failures = 0
                self._cond.notify_all()
            if closed:
                kernel.shutdown()

    # -- handing out -------------------------------------------------------------------
    def acquire(
        self, run_dir: Path, env: Mapping[str, str], timeout: float | None = None
    ) -> SandboxedKernel:
        """A fresh kernel bound to ``run_dir`` with the run's ``env``; never one used before.

        Waits for a ready kernel up to ``timeout`` seconds (default: the start-up
        timeout). Raises :class:`SandboxError` when the pool is closed, when kernels
        cannot be started (with the reason), or when none becomes ready in time.
        """
        t0 = time.monotonic()
        wall0 = time.time()
        deadline = t0 + (self.startup_timeout if timeout is None else timeout)
        stale: list[SandboxedKernel] = []
        kernel: SandboxedKernel | None = None
        with self._cond:
            while kernel is None:
                if self._closed:
                    raise SandboxError("the kernel pool is closed")
                while self._ready:
                    candidate = self._ready.popleft()
                    if candidate.is_alive():
                        kernel = candidate
                        break
                    stale.append(candidate)
                if kernel is not None:
                    break
                if self._last_error is not None and self._starting == 0:
                    raise SandboxError(f"no kernel could be started: {self._last_error}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise SandboxError("no kernel became ready in time")
                self._cond.wait(remaining)
            # Kernels killed after their run (by the engine) need no tracking any more.
            self._handed_out = {k for k in self._handed_out if not k.closed}
            self._handed_out.add(kernel)
            self._cond.notify_all()  # the filler starts a replacement now
        for dead in stale:
            dead.shutdown()
        kernel.acquire_started = t0
        kernel.acquire_wall = wall0
        try:
            kernel.bootstrap(Path(run_dir), env)
        except BaseException:
            self.release(kernel, wait=True)
            raise
        kernel.wait_s = time.monotonic() - t0
        return kernel

    def release(self, kernel: SandboxedKernel, wait: bool = False) -> None:
        """Kill a kernel after its run (in the background unless ``wait``); idempotent."""
        with self._cond:
            self._handed_out.discard(kernel)
        if wait:
            kernel.shutdown()
        else:
            threading.Thread(target=kernel.shutdown, name="phds-kernel-stop", daemon=True).start()

    # -- state and closing -------------------------------------------------------------
    @property
    def ready(self) -> int:
        """How many kernels are ready now."""
        with self._cond:
            return len(self._ready)

    def wait_ready(self, count: int | None = None, timeout: float = 60.0) -> bool:
        """Block until ``count`` (default: size) kernels are ready; False on timeout."""
        wanted = self.size if count is None else count
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._ready) < wanted:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    return False
                self._cond.wait(remaining)
            return True

    def close(self) -> None:
        """Stop starting kernels and kill every kernel the pool started (ready or handed out)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            kernels = list(self._ready) + list(self._handed_out)
            self._ready.clear()
            self._handed_out.clear()
            self._cond.notify_all()
        for kernel in kernels:
            kernel.shutdown()
        self._filler.join(timeout=self.startup_timeout + 5)

    def __enter__(self) -> KernelPool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<KernelPool size={self.size} ready={self.ready} closed={self._closed}>"
