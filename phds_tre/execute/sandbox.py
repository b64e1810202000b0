"""Sandboxed IPython kernels: started ahead of time, bound to one run at acquire, never reused.

The kernel runs researcher code and is untrusted (DESIGN.md, principle 3). Each kernel is
an ordinary ipykernel started by :class:`jupyter_client.KernelManager` (the library owns
the connection file, the ZMQ session and the process lifecycle); this module only wraps
the kernel's command line and checks, from inside the kernel, which controls held.

Pre-started, then bound to a run
--------------------------------
A run's folder and environment are known only when the run starts, yet starting a kernel
costs about 0.55 s here (importing IPython/ipykernel; the sandbox adds ~10 ms) and about
1.3 s with the default warm imports. The design chosen starts kernels ahead of time in a
neutral state and binds one to a run at :meth:`SandboxedKernel.bootstrap`. Measured on
the 2-core build machine: from ``acquire`` to the first cell executing in the kernel
0.065 s (median of 8; 0.09 s max) with the pool, against 1.4 s for starting a kernel
per run and binding it (the alternative, rejected: it puts the whole start on every
run's critical path, and the imports the notebook needs come on top):

* at start: a scrubbed environment (``PATH``, ``HOME`` = the kernel's own empty folder,
  ``TMPDIR``, ``LANG``, ``PYTHONHASHSEED=0`` for reproducible set/dict-of-str order, the
  site's variables), a private working folder, and expensive modules imported
  (:data:`DEFAULT_WARM_IMPORTS`: numpy, pandas, matplotlib.pyplot, phds_tre.sdc and the
  phds_tre.kernel package, whose import reads no environment) without binding any name
  in the user namespace;
* at acquire, before any researcher code and not as a notebook cell: the run folder is
  mounted into the kernel's file-system view (isolated mode), then one silent
  ``execute_request`` (no history, no execution count, no output in the notebook)
  ``chdir()``-s into the run folder, sets ``PHDS_SITE_DIR``, ``PHDS_SITE_NAME``,
  ``PHDS_RUN_DIR``, ``PHDS_POLICY_JSON``…, loads the ``phds_tre.kernel`` extension (so
  it sees the run's environment) and reports what it finds.

The working folder and environment of a process are conveniences, not security
boundaries, so setting them from inside the kernel before the researcher's first cell
loses nothing; the controls below are set on the process by the kernel's parent and
cannot be undone from inside.

Controls (each recorded in :attr:`SandboxedKernel.controls` as
``{"requested", "held", "how", "detail"}``)
---------------------------------------------------------------------------------------
Isolated mode (root with Linux namespaces; detected by :func:`probe_support`):

* ``network``: the kernel starts inside ``unshare --net`` (a new network namespace with
  only a loopback interface that is down). Verified from inside: ``socket.if_nameindex()``
  lists only ``lo``, and only then a UDP ``connect()`` to 1.1.1.1:53 is tried, which sends
  no packet and fails at once (no route). The kernel talks to its parent over ZMQ ``ipc``
  sockets in its private folder, which work across network namespaces.
* ``filesystem``: ``unshare --mount --pid --fork`` and a small init (``_INIT_SCRIPT``) that
  builds a new root on a tmpfs: read-only binds of the Python installation, the project's
  import path, /usr, a few /etc files and the site's data folder; the kernel's own folder
  read-write; fresh /proc (read-only) and a minimal /dev; then ``pivot_root``. The rest of
  the host (other runs, the node's database and keys, /root…) is not visible.
* ``read_only_data``: the site folder is a read-only bind mount; verified by trying to
  create a file there from inside (expect EROFS).
* ``capabilities``: the init drops the whole capability bounding set and sets
  ``no_new_privs`` before exec, so the kernel is uid 0 with no capabilities: it cannot
  remount, leave its namespaces, signal processes outside its PID namespace, or gain
  privileges from setuid programs. Verified via ``CapEff`` in ``/proc/self/status``.
* ``processes``: a ``pids`` cgroup per kernel with ``pids.max`` (threads count too).
  ``RLIMIT_NPROC`` does not apply to uid 0 at all (the kernel exempts the root user),
  so it is not used. Without a writable pids cgroup this control is recorded as not held.

Both modes:

* ``memory``: ``RLIMIT_AS`` (``limits.memory_mb``) and ``RLIMIT_CORE`` = 0 set in the
  child before exec (``preexec_fn`` calls only ``setrlimit`` and one ``write``); verified
  with ``resource.getrlimit`` inside. It bounds address space, not resident memory.
* ``environment``: the kernel process gets only the variables listed above; verified by
  listing ``os.environ`` inside at bootstrap.
* ``working_folder``: verified by ``os.getcwd()`` and a probe file inside.
* ``kernel_extension``: whether ``phds_tre.kernel`` loaded.
* ``fresh_kernel``: a kernel is bound to one run only (:class:`SandboxedKernel` refuses a
  second bootstrap) and is killed afterwards.

Plain mode (no namespaces: not root, or a container without ``CAP_SYS_ADMIN``): the same
kernel without the isolation; ``network``, ``filesystem``, ``read_only_data`` (unless
the write probe happens to fail), ``capabilities`` and ``processes`` are recorded as not
held with the reason. The caller decides whether a run may go ahead like that.

Time limits and output size are enforced by :mod:`phds_tre.execute.engine`.

Not enforced here: CPU share and disk use of the private folders (no quota); resident
memory (``RLIMIT_AS`` only); the kernel can read everything that is bound read-only into
its view (the project's own source included, when installed editable); no seccomp filter.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from jupyter_client import BlockingKernelClient, KernelManager
from jupyter_client.asynchronous import AsyncKernelClient

from phds_tre.site_policy import ExecutionLimits

__all__ = [
    "DEFAULT_MAX_TASKS",
    "DEFAULT_WARM_IMPORTS",
    "SandboxError",
    "SandboxSupport",
    "SandboxedKernel",
    "control",
    "probe_support",
    "start_kernel",
]

log = logging.getLogger(__name__)

#: Processes + threads one kernel may have (pids cgroup). ExecutionLimits has no field yet.
DEFAULT_MAX_TASKS = 256
#: Imported while a kernel waits in the pool, so a notebook's own imports are instant.
DEFAULT_WARM_IMPORTS: tuple[str, ...] = (
    "numpy",
    "pandas",
    "matplotlib.pyplot",
    "phds_tre.sdc",
    "phds_tre.kernel",
)
# Variables ipykernel/IPython/debugpy set in their own process while starting.
_KERNEL_SET_ENV = frozenset(
    {
        "CLICOLOR",
        "CLICOLOR_FORCE",
        "FORCE_COLOR",
        "PAGER",
        "GIT_PAGER",
        "TERM",
        "PYDEVD_USE_FRAME_EVAL",
        "JPY_PARENT_PID",
    }
)
#: The extension every site kernel loads (DESIGN.md: phds_tre/kernel).
KERNEL_EXTENSION = "phds_tre.kernel"
#: Run-level variables the bootstrap sets (plus whatever else the caller passes).
RUN_ENV_NAMES = ("PHDS_SITE_DIR", "PHDS_SITE_NAME", "PHDS_RUN_DIR", "PHDS_POLICY_JSON")

# System paths the kernel needs read-only (anything missing on a host is skipped).
_SYSTEM_RO = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_ETC_RO = (
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/timezone",
    "/etc/passwd",
    "/etc/group",
    "/etc/nsswitch.conf",
    "/etc/mime.types",
    "/etc/fonts",
    "/etc/alternatives",
    "/etc/os-release",
    "/etc/matplotlibrc",
)


class SandboxError(RuntimeError):
    """A kernel could not be started or bound to a run."""


def control(requested: Any, held: bool, how: str, detail: str = "") -> dict[str, Any]:
    """One entry of a ``controls`` record."""
    return {"requested": requested, "held": bool(held), "how": how, "detail": detail}


# --------------------------------------------------------------------------------------
# What this machine supports
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SandboxSupport:
    """What the host allows; probed once per process."""

    #: ``unshare --mount --net --pid --fork`` works (root, or CAP_SYS_ADMIN).
    namespaces: bool
    #: Why not, when it does not.
    detail: str
    unshare: str | None
    #: A pids cgroup folder under which a per-kernel group can be made, if any.
    pids_cgroup: Path | None


_PIVOT_ROOT_SYSCALL = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}


def _pids_cgroup_base() -> Path | None:
    """The pids cgroup of this process, if it is writable (cgroup v1 or v2)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "pids" in controllers.split(","):
            base = Path("/sys/fs/cgroup/pids") / path.lstrip("/")
            if (base / "cgroup.procs").exists() and os.access(base, os.W_OK):
                return base
    for line in lines:
        if line.startswith("0::"):
            base = Path("/sys/fs/cgroup") / line[3:].lstrip("/")
            try:
                enabled = (base / "cgroup.subtree_control").read_text().split()
            except OSError:
                return None
            if "pids" in enabled and os.access(base, os.W_OK):
                return base
    return None


@lru_cache(maxsize=1)
def probe_support() -> SandboxSupport:
    """Detect whether isolated kernels can be started here (cached for the process)."""
    unshare = shutil.which("unshare")
    cgroup = _pids_cgroup_base()
    if sys.platform != "linux":
        return SandboxSupport(False, f"not Linux ({sys.platform})", None, None)
    if os.uname().machine not in _PIVOT_ROOT_SYSCALL:
        return SandboxSupport(False, f"unknown pivot_root on {os.uname().machine}", None, cgroup)
    if unshare is None:
        return SandboxSupport(False, "the unshare program (util-linux) is missing", None, cgroup)
    try:
        done = subprocess.run(
            [unshare, "--mount", "--net", "--pid", "--fork", "--kill-child", "--", "true"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return SandboxSupport(False, f"unshare failed: {exc}", unshare, cgroup)
    if done.returncode != 0:
        reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "no reason"
        return SandboxSupport(False, f"unshare refused: {reason}", unshare, cgroup)
    return SandboxSupport(True, "Linux namespaces available", unshare, cgroup)


# --------------------------------------------------------------------------------------
# Scripts run by a fresh interpreter (python -I -S): the sandbox init and the run mount
# --------------------------------------------------------------------------------------

# Runs as root inside the new mount/network/PID namespaces (it is PID 1 there), builds the
# kernel's file-system view, drops every capability and execs the kernel. Plain syscalls
# through ctypes: util-linux's mount/pivot_root programs would cost a process each.
_INIT_SCRIPT = r"""
import ctypes, json, os, sys
libc = ctypes.CDLL(None, use_errno=True)
RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
def fail(what):
    e = ctypes.get_errno()
    sys.stderr.write("phds sandbox init: %s: %s\n" % (what, os.strerror(e)))
    sys.exit(121)
def mount(src, dst, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()
    if libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data)) != 0:
        fail("mount %s on %s" % (src, dst))
cfg = json.loads(sys.argv[1])
root = cfg["root"]
mount(None, "/", None, REC | PRIVATE)
mount("tmpfs", root, "tmpfs", NOSUID | NODEV, "size=2m,mode=0755")
def mkpoint(dst, is_dir):
    if is_dir:
        os.makedirs(dst, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        open(dst, "a").close()
ours = set()
for op in sorted(cfg["mounts"], key=lambda m: m["target"].count("/")):
    kind, target = op["kind"], op["target"]
    dst = root + target
    if kind == "symlink":
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.symlink(op["source"], dst)
        continue
    if kind == "tmpfs":
        mkpoint(dst, True)
        mount("tmpfs", dst, "tmpfs", NOSUID | NODEV, op.get("data"))
    elif kind == "proc":
        mkpoint(dst, True)
        mount("proc", dst, "proc", NOSUID | NODEV | NOEXEC | RDONLY)
    else:
        mkpoint(dst, os.path.isdir(op["source"]))
        rw, dev = op.get("rw", False), op.get("dev", False)
        mount(op["source"], dst, None, BIND | (0 if rw or dev else REC))
        flags = REMOUNT | BIND | NOSUID | (0 if dev else NODEV) | (0 if rw else RDONLY)
        mount(None, dst, None, flags)
    ours.add(dst)
# Submounts carried along by recursive binds stay writable unless remounted too.
for line in open("/proc/self/mountinfo"):
    point = line.split()[4].encode().decode("unicode_escape")
    if point.startswith(root + "/") and point not in ours:
        mount(None, point, None, REMOUNT | BIND | NOSUID | NODEV | RDONLY)
os.chdir(root)
if libc.syscall(cfg["pivot_root"], b".", b".") != 0:
    fail("pivot_root")
if libc.umount2(b".", 2) != 0:
    fail("detach the old root")
os.chdir("/")
mount(None, "/", None, REMOUNT | RDONLY | NOSUID | NODEV, "size=2m,mode=0755")
os.chdir(cfg["cwd"])
# Drop every capability for good: empty bounding set + no_new_privs, then exec as uid 0.
cap = 0
while libc.prctl(24, cap, 0, 0, 0) == 0:  # PR_CAPBSET_DROP
    cap += 1
libc.prctl(47, 4, 0, 0, 0)  # PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL
if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
    fail("no_new_privs")
os.execv(cfg["argv"][0], cfg["argv"])
"""

# Runs as root in the host: clones the run folder as a detached mount (open_tree), enters
# the kernel's mount namespace and attaches it at the same path (move_mount). setns into a
# mount namespace needs a single-threaded process, hence a fresh interpreter.
_MOUNT_RUN_SCRIPT = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
def fail(what):
    e = ctypes.get_errno()
    sys.stderr.write("%s: %s\n" % (what, os.strerror(e)))
    sys.exit(1)
pid, path = int(sys.argv[1]), sys.argv[2]
# open_tree(AT_FDCWD, path, OPEN_TREE_CLONE | AT_RECURSIVE | OPEN_TREE_CLOEXEC)
fd = libc.syscall(428, -100, path.encode(), 1 | 0x8000 | 0o2000000)
if fd < 0:
    fail("open_tree")
ns = os.open("/proc/%d/ns/mnt" % pid, os.O_RDONLY)
if libc.setns(ns, 0x20000) != 0:
    fail("setns")
try:
    os.makedirs(path, exist_ok=True)
except OSError:
    if libc.mount(None, b"/", None, 32 | 2 | 4, None) != 0:
        fail("remount / read-write")
    os.makedirs(path, exist_ok=True)
    libc.mount(None, b"/", None, 32 | 1 | 2 | 4, None)
# move_mount(fd, "", AT_FDCWD, path, MOVE_MOUNT_F_EMPTY_PATH)
if libc.syscall(429, fd, b"", -100, path.encode(), 4) != 0:
    fail("move_mount")
"""

# Kernel-level checks, run silently right after start (and the warm imports).
_PROBE_CODE = r"""
def _phds_probe(modules):
    import importlib, json, os, resource, socket
    out = {"pid": os.getpid(), "uid": os.getuid()}
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError as exc:
        names, out["interfaces_error"] = None, str(exc)
    out["interfaces"] = names
    if names == ["lo"]:
        # Only loopback exists, so nothing can leave; UDP connect() sends no packet anyway.
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.connect(("1.1.1.1", 53))
            out["connect"] = "connected"
        except OSError as exc:
            out["connect"] = "failed: " + (exc.strerror or str(exc))
        finally:
            sock.close()
    out["rlimit_as"] = resource.getrlimit(resource.RLIMIT_AS)[0]
    out["rlimit_core"] = resource.getrlimit(resource.RLIMIT_CORE)[0]
    try:
        status = open("/proc/self/status").read()
        out["cap_eff"] = [l.split()[1] for l in status.splitlines() if l.startswith("CapEff")][0]
        out["visible_pids"] = sum(1 for p in os.listdir("/proc") if p.isdigit())
    except OSError as exc:
        out["proc_error"] = str(exc)
    out["root"] = sorted(os.listdir("/"))
    warmed, failed = [], {}
    for name in modules:
        try:
            importlib.import_module(name)
            warmed.append(name)
        except Exception as exc:
            failed[name] = "%s: %s" % (type(exc).__name__, exc)
    out["warmed"], out["warm_failed"] = warmed, failed
    return json.dumps(out)
_phds_result = _phds_probe(__PHDS_MODULES__)
del _phds_probe
"""

# Binds the kernel to a run; runs silently before any researcher code.
_BOOTSTRAP_CODE = r"""
def _phds_bootstrap(cfg):
    import errno, json, os, secrets
    out = {}
    for name in cfg["unset"]:
        os.environ.pop(name, None)
    os.environ.update(cfg["env"])
    try:
        os.chdir(cfg["run_dir"])
    except OSError as exc:
        out["chdir_error"] = str(exc)
    out["cwd"] = os.getcwd()
    probe = ".phds-probe-" + secrets.token_hex(6)
    try:
        open(probe, "x").close()
        os.unlink(probe)
        out["cwd_writable"] = True
    except OSError as exc:
        out["cwd_writable"], out["cwd_error"] = False, str(exc)
    site = os.environ.get("PHDS_SITE_DIR")
    if site:
        target = os.path.join(site, probe)
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            code = errno.errorcode.get(exc.errno, "?")
            verdict = "refused" if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM) else "error"
            out["data_write"] = "%s: %s (%s)" % (verdict, exc.strerror, code)
        else:
            os.close(fd)
            os.unlink(target)
            out["data_write"] = "succeeded"
        try:
            out["data_entries"] = len(os.listdir(site))
        except OSError as exc:
            out["data_read_error"] = str(exc)
    out["env_names"] = sorted(os.environ)
    name = cfg["extension"]
    if name:
        manager = get_ipython().extension_manager
        try:
            result = manager.load_extension(name)
            out["extension"] = result or "loaded"
        except ModuleNotFoundError as exc:
            out["extension"] = "not installed (%s)" % exc
        except Exception as exc:
            out["extension"] = "failed: %s: %s" % (type(exc).__name__, exc)
        out["extension_loaded"] = name in manager.loaded
    return json.dumps(out)
_phds_result = _phds_bootstrap(__import__("json").loads(__PHDS_CFG__))
del _phds_bootstrap
"""


# --------------------------------------------------------------------------------------
# The kernel manager
# --------------------------------------------------------------------------------------


class _SandboxKernelManager(KernelManager):
    """jupyter_client's KernelManager with the sandbox wrapped around the kernel command.

    The library still builds the kernel's own command (kernelspec ``python3``, connection
    file, extra arguments); :meth:`format_kernel_cmd` only puts the namespace wrapper in
    front, so nothing about the kernel protocol is reimplemented here.
    """

    wrapper: Callable[[list[str]], list[str]] | None = None

    def format_kernel_cmd(self, extra_arguments: list[str] | None = None) -> list[str]:
        """The library's kernel command, wrapped in the sandbox when isolation is on."""
        cmd: list[str] = super().format_kernel_cmd(extra_arguments)
        return self.wrapper(cmd) if self.wrapper is not None else cmd


def _import_roots() -> list[str]:
    """Folders the kernel's Python needs: its installation and its import path."""
    candidates = [
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        sys.base_exec_prefix,
        str(Path(sys.executable).resolve().parent.parent),
        *sys.path,
    ]
    roots: list[str] = []
    for entry in candidates:
        if not entry or not os.path.isabs(entry):
            continue
        path = os.path.realpath(entry)
        if path == "/" or not os.path.exists(path):
            continue
        if os.path.isfile(path):  # a zip on sys.path
            path = os.path.dirname(path)
        roots.append(path)
    # Keep only the outermost folders: binding a child of a bound folder adds nothing.
    roots = sorted(set(roots), key=len)
    kept: list[str] = []
    for path in roots:
        if not any(path == k or path.startswith(k + "/") for k in kept):
            kept.append(path)
    # A symlinked executable (a venv's python) must resolve inside the new root too.
    for entry in (sys.executable,):
        link = os.path.realpath(entry)
        if not any(link.startswith(k + "/") for k in kept):
            kept.append(os.path.dirname(link))
    return kept


def _mount_plan(kernel_dir: Path, site_dir: str | None) -> list[dict[str, Any]]:
    """The init's mounts: what the kernel sees, and what it may write."""
    plan: list[dict[str, Any]] = []
    for path in _SYSTEM_RO:
        if os.path.islink(path):
            plan.append({"kind": "symlink", "source": os.readlink(path), "target": path})
        elif os.path.isdir(path):
            plan.append({"kind": "bind", "source": path, "target": path})
    plan += [{"kind": "bind", "source": p, "target": p} for p in _ETC_RO if os.path.exists(p)]
    plan += [{"kind": "bind", "source": p, "target": p} for p in _import_roots()]
    plan.append({"kind": "tmpfs", "target": "/tmp", "data": "size=16m,mode=1777"})
    plan.append({"kind": "tmpfs", "target": "/dev", "data": "size=64k,mode=0755"})
    for dev in ("null", "zero", "full", "random", "urandom"):
        plan.append({"kind": "bind", "source": f"/dev/{dev}", "target": f"/dev/{dev}", "dev": True})
    plan.append(
        {"kind": "bind", "source": str(kernel_dir / "shm"), "target": "/dev/shm", "rw": True}
    )
    plan.append({"kind": "proc", "target": "/proc"})
    plan.append({"kind": "bind", "source": str(kernel_dir), "target": str(kernel_dir), "rw": True})
    if site_dir and os.path.isdir(site_dir):
        real = os.path.realpath(site_dir)
        plan.append({"kind": "bind", "source": real, "target": real})
        if real != os.path.abspath(site_dir):
            plan.append({"kind": "bind", "source": real, "target": os.path.abspath(site_dir)})
    return plan


def _scrubbed_env(kernel_dir: Path, site_env: Mapping[str, str]) -> dict[str, str]:
    """The kernel's whole environment: nothing of the node's leaks through."""
    venv_bin = str(Path(sys.executable).parent)
    env = {
        "PATH": os.pathsep.join([venv_bin, "/usr/local/bin", "/usr/bin", "/bin"]),
        "HOME": str(kernel_dir / "home"),
        "TMPDIR": str(kernel_dir / "tmp"),
        "LANG": "C.UTF-8",
        "PYTHONHASHSEED": "0",
        "PYTHONNOUSERSITE": "1",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",
    }
    env.update({str(k): str(v) for k, v in site_env.items()})
    return env


def _make_cgroup(base: Path | None, max_tasks: int) -> tuple[Path | None, str]:
    if base is None:
        return None, "no writable pids cgroup on this host"
    group = base / f"phds-kernel-{uuid.uuid4().hex[:12]}"
    try:
        group.mkdir()
        (group / "pids.max").write_text(str(max_tasks))
    except OSError as exc:
        with contextlib.suppress(OSError):
            group.rmdir()
        return None, f"cannot create a pids cgroup: {exc.strerror}"
    return group, f"pids cgroup {group} with pids.max={max_tasks}"


#: prctl option: the signal a process gets when the thread that started it dies.
_PR_SET_PDEATHSIG = 1


def _preexec(memory_bytes: int, cgroup_procs: str | None) -> Callable[[], None]:
    """Run in the child between fork and exec: setrlimit, prctl and one write (no locks).

    PR_SET_PDEATHSIG: when the process (thread) that started the kernel dies — a node
    killed with SIGKILL, say — the kernel's wrapper gets SIGKILL, and ``unshare
    --kill-child`` takes the kernel with it. Without it a crashed node leaves its
    sandboxed kernels running (they ignore SIGTERM). The kernel pool starts kernels
    from its filler thread, which lives until the pool closes.
    """
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before fork: no dlopen in the child
    parent = os.getpid()

    def apply() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core dumps of patient data
        if cgroup_procs is not None:
            fd = os.open(cgroup_procs, os.O_WRONLY)
            try:
                os.write(fd, str(os.getpid()).encode())
            finally:
                os.close(fd)

    return apply


def _silent(kc: BlockingKernelClient, code: str, timeout: float) -> dict[str, Any]:
    """Run code silently (no history, no outputs in any notebook) and read ``_phds_result``."""
    msg_id = kc.execute(
        code,
        silent=True,
        store_history=False,
        user_expressions={"r": "globals().pop('_phds_result', None)"},
        stop_on_error=False,
    )
    reply = kc.get_shell_msg(timeout=timeout)
    while reply["parent_header"].get("msg_id") != msg_id:
        reply = kc.get_shell_msg(timeout=timeout)
    content = reply["content"]
    if content.get("status") != "ok":
        raise SandboxError(
            f"kernel set-up code failed: {content.get('ename')}: {content.get('evalue')}"
        )
    expr = content.get("user_expressions", {}).get("r", {})
    text = expr.get("data", {}).get("text/plain")
    if expr.get("status") != "ok" or not isinstance(text, str):
        raise SandboxError(f"kernel set-up code returned nothing ({expr.get('evalue', '')})")
    import ast  # the value is the repr of a JSON string

    result: dict[str, Any] = json.loads(ast.literal_eval(text))
    return result


# --------------------------------------------------------------------------------------
# A sandboxed kernel
# --------------------------------------------------------------------------------------


class SandboxedKernel:
    """One kernel process in its sandbox, for one run only.

    Created by :func:`start_kernel` (or a :class:`~phds_tre.execute.pool.KernelPool`).
    :attr:`km` is a :class:`jupyter_client.KernelManager` whose clients are asynchronous,
    as nbclient expects; it can be handed to ``nbclient.NotebookClient(km=...)``.
    """

    def __init__(
        self,
        km: _SandboxKernelManager,
        base_dir: Path,
        kernel_dir: Path,
        kc: BlockingKernelClient,
        isolated: bool,
        cgroup: Path | None,
        controls: dict[str, dict[str, Any]],
        limits: ExecutionLimits,
        extension: str | None,
        start_s: float,
    ) -> None:
        self.km = km
        self.base_dir = base_dir
        self.kernel_dir = kernel_dir
        self._kc: BlockingKernelClient | None = kc
        self.isolated = isolated
        self.cgroup = cgroup
        self.controls = controls
        self.limits = limits
        self.extension = extension
        #: Seconds from launching the process to a ready, probed kernel.
        self.start_s = start_s
        self.started_at = time.monotonic()
        self.run_dir: Path | None = None
        #: time.monotonic()/time.time() when acquire began (set by the pool).
        self.acquire_started: float | None = None
        self.acquire_wall: float | None = None
        #: Seconds the run waited for this kernel (pool wait + bootstrap).
        self.wait_s: float = 0.0
        #: Host PIDs, kept after the kernel is gone (see :attr:`pid`, :attr:`kernel_pid`).
        self.host_pid = self.pid
        self.host_kernel_pid = self.kernel_pid
        self.killed_by: str | None = None
        #: Set by the engine when a notebook has run on this kernel.
        self.executed = False
        self._lock = threading.Lock()
        self._closed = False

    # -- facts -----------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        """Host PID of the process jupyter_client manages (``unshare`` when isolated)."""
        process = getattr(self.km.provisioner, "process", None)
        return process.pid if process is not None else None

    @property
    def kernel_pid(self) -> int | None:
        """Host PID of the Python kernel itself (the child of ``unshare`` when isolated)."""
        pid = self.pid
        if pid is None or not self.isolated:
            return pid
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return pid
        return int(children[0]) if children else pid

    def is_alive(self) -> bool:
        """Whether the kernel process is still running."""
        process = getattr(self.km.provisioner, "process", None)
        return process is not None and process.poll() is None

    def exit_description(self) -> str:
        """How the process ended ("exit code 1", "signal SIGKILL"), or "running"."""
        process = getattr(self.km.provisioner, "process", None)
        if process is None:
            return "not started"
        code = process.poll()
        if code is None:
            return "running"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"signal {signal.Signals(-code).name}"
            return f"signal {-code}"
        return f"exit code {code}"

    def log_tail(self, size: int = 4000) -> str:
        """The end of the kernel's own stdout/stderr (crash messages land here)."""
        path = self.base_dir / "kernel.log"
        try:
            with path.open("rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - size))
                return fh.read().decode("utf-8", "replace")
        except OSError:
            return ""

    # -- binding to a run ---------------------------------------------------------------
    def bootstrap(
        self, run_dir: Path, env: Mapping[str, str], timeout: float = 30.0
    ) -> dict[str, dict[str, Any]]:
        """Bind the kernel to a run: mount, chdir, environment, extension; verify; record.

        Runs before any researcher code. Raises :class:`SandboxError` if the kernel has
        already been bound to a run (kernels are never reused) or cannot be bound.
        """
        with self._lock:
            if self.run_dir is not None or self._closed:
                raise SandboxError("this kernel has already been used; kernels are never reused")
            self.run_dir = Path(run_dir).resolve()
        run_path = str(self.run_dir)
        if not self.run_dir.is_dir():
            raise SandboxError(f"run folder {run_path} does not exist")
        if self.isolated:
            self._mount_run(run_path, timeout)
        run_env = {str(k): str(v) for k, v in env.items()}
        run_env.setdefault("PHDS_RUN_DIR", run_path)
        cfg = {
            "run_dir": run_path,
            "env": run_env,
            "unset": [],
            "extension": self.extension or "",
        }
        kc = self._client()
        try:
            code = _BOOTSTRAP_CODE.replace("__PHDS_CFG__", repr(json.dumps(cfg)))
            found = _silent(kc, code, timeout)
        except (SandboxError, OSError, RuntimeError) as exc:
            raise SandboxError(f"bootstrap failed: {exc}; {self.exit_description()}") from exc
        finally:
            kc.stop_channels()
            self._kc = None
        self._record_bootstrap(found, run_path, run_env)
        return self.controls

    def _client(self) -> BlockingKernelClient:
        if self._kc is None:
            self._kc = _blocking_client(self.km)
        return self._kc

    def _mount_run(self, run_path: str, timeout: float) -> None:
        pid = self.pid
        if pid is None:
            raise SandboxError("the kernel process is gone")
        done = subprocess.run(
            [sys.executable, "-I", "-S", "-c", _MOUNT_RUN_SCRIPT, str(pid), run_path],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise SandboxError(
                f"cannot mount the run folder into the sandbox: {done.stderr.strip()}"
            )

    def _record_bootstrap(self, found: dict[str, Any], run_path: str, env: dict[str, str]) -> None:
        c = self.controls
        cwd_ok = found.get("cwd") == run_path and bool(found.get("cwd_writable"))
        c["working_folder"] = control(
            run_path,
            cwd_ok,
            "bootstrap chdir() before the first cell"
            + ("; run folder mounted into the sandbox" if self.isolated else ""),
            f"cwd {found.get('cwd')!r}, probe write "
            + ("ok" if found.get("cwd_writable") else f"failed ({found.get('cwd_error')})")
            + (f"; {found['chdir_error']}" if "chdir_error" in found else ""),
        )
        allowed = set(c["environment"]["requested"]) | set(env)
        names = set(found.get("env_names", []))
        # ipykernel/IPython set a few of their own while starting; they carry no secrets.
        extra = sorted(names - allowed - _KERNEL_SET_ENV)
        c["environment"] = control(
            sorted(allowed),
            not extra,
            "the kernel process starts with a built environment, not the node's",
            "variables in the kernel: "
            + ", ".join(sorted(names))
            + (f"; unexpected: {', '.join(extra)}" if extra else ""),
        )
        site = env.get("PHDS_SITE_DIR") or c["read_only_data"]["requested"]
        if site:
            write = str(found.get("data_write", "not tried"))
            held = write.startswith("refused")
            how = (
                "read-only bind mount of the site folder"
                if self.isolated
                else "none (no mount namespace); relies on file permissions"
            )
            detail = f"write probe in {site}: {write}"
            if "data_read_error" in found:
                detail += f"; the folder cannot be read: {found['data_read_error']}"
            c["read_only_data"] = control(site, held, how, detail)
        if self.extension:
            loaded = bool(found.get("extension_loaded"))
            c["kernel_extension"] = control(
                self.extension,
                loaded,
                "IPython extension loaded by the bootstrap, after the run's environment is set",
                str(found.get("extension", "")),
            )
        c["fresh_kernel"] = control(
            "never reused",
            True,
            "a kernel is bound to one run and killed after it",
            f"kernel pid {self.host_kernel_pid}, started {time.monotonic() - self.started_at:.1f} s "
            f"before the run (start took {self.start_s:.2f} s)",
        )

    # -- ending ----------------------------------------------------------------------------
    def kill(self, reason: str = "killed") -> None:
        """SIGKILL the kernel and everything it started (PID namespace, cgroup, process group).

        The kernel is killed before its ``unshare`` parent, so that ``unshare`` reaps it;
        killing the parent first would leave the kernel to the host's init, which may not
        reap it. Safe to call from another thread while the kernel is being waited on.
        """
        if self.killed_by is None:
            self.killed_by = reason
        outer = self.host_pid
        inner = self.host_kernel_pid if self.isolated else None
        if inner is not None and inner != outer:
            _sigkill(inner)
        if self.cgroup is not None:
            # Processes that left the process group (setsid) are still in the cgroup.
            with contextlib.suppress(OSError):
                for line in (self.cgroup / "cgroup.procs").read_text().split():
                    if line.isdigit() and int(line) != outer:
                        _sigkill(int(line))
        process = getattr(self.km.provisioner, "process", None)
        if process is not None and inner is not None and inner != outer:
            with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                process.wait(timeout=2)  # unshare exits once its child is gone
        pgid = getattr(self.km.provisioner, "pgid", None)
        if pgid:
            with contextlib.suppress(OSError):
                os.killpg(pgid, signal.SIGKILL)
        if outer is not None:
            _sigkill(outer)

    def shutdown(self) -> None:
        """Kill the kernel (it is never reused) and remove its folders; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._kc is not None:
            with contextlib.suppress(Exception):
                self._kc.stop_channels()
            self._kc = None
        self.kill(self.killed_by or "shutdown")
        process = getattr(self.km.provisioner, "process", None)
        if process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                process.wait(timeout=5)
        try:
            # The library's own clean-up: connection file, ipc sockets, control socket.
            self.km.shutdown_kernel(now=True)
        except Exception as exc:  # the process is already gone; clean-up is best effort
            log.debug("kernel shutdown: %s", exc)
        with contextlib.suppress(Exception):
            self.km.cleanup_resources()
        if self.cgroup is not None:
            for _ in range(50):
                try:
                    self.cgroup.rmdir()
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        break
                    time.sleep(0.02)
        shutil.rmtree(self.base_dir, ignore_errors=True)

    @property
    def closed(self) -> bool:
        """Whether :meth:`shutdown` has run."""
        return self._closed

    def __repr__(self) -> str:
        state = "closed" if self._closed else "bound" if self.run_dir else "ready"
        return f"<SandboxedKernel pid={self.pid} {state} isolated={self.isolated}>"


def _sigkill(pid: int) -> None:
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)


def _blocking_client(km: KernelManager) -> BlockingKernelClient:
    """A blocking client on its own channels (thread-safe, no event loop needed)."""
    info = km.get_connection_info(session=True)
    kc = BlockingKernelClient(**info, parent=km)
    kc.start_channels()
    return kc


def start_kernel(
    limits: ExecutionLimits,
    site_env: Mapping[str, str] | None = None,
    *,
    isolate: bool | None = None,
    warm_imports: Sequence[str] = DEFAULT_WARM_IMPORTS,
    extension: str | None = KERNEL_EXTENSION,
    startup_timeout: float = 60.0,
    max_tasks: int = DEFAULT_MAX_TASKS,
    base_dir: str | Path | None = None,
) -> SandboxedKernel:
    """Start one sandboxed kernel, wait until it answers, import ``warm_imports``, probe it.

    ``isolate``: ``None`` isolates when :func:`probe_support` says the host can, ``True``
    raises :class:`SandboxError` if it cannot, ``False`` starts a plain kernel. The
    kernel-level controls are verified from inside the kernel before this returns.
    """
    support = probe_support()
    if isolate is None:
        isolate = support.namespaces
    elif isolate and not support.namespaces:
        raise SandboxError(f"isolated kernels are not available here: {support.detail}")
    site_env = dict(site_env or {})
    base = Path(tempfile.mkdtemp(prefix="phds-kernel-", dir=base_dir)).resolve()
    kernel_dir = base / "k"
    for sub in ("home", "tmp", "work", "shm"):
        (kernel_dir / sub).mkdir(parents=True, mode=0o700)
    (base / "root").mkdir(mode=0o700)
    cgroup, cgroup_detail = _make_cgroup(support.pids_cgroup, max_tasks)
    env = _scrubbed_env(kernel_dir, site_env)
    site_dir = site_env.get("PHDS_SITE_DIR")

    km = _SandboxKernelManager(
        kernel_name="python3",
        transport="ipc",
        ip=str(kernel_dir / "ipc"),
        connection_file=str(kernel_dir / "kernel.json"),
        client_factory=AsyncKernelClient,
    )
    network_deny = limits.network == "deny"
    if isolate:
        assert support.unshare is not None
        init_cfg: dict[str, Any] = {
            "root": str(base / "root"),
            "mounts": _mount_plan(kernel_dir, site_dir),
            "cwd": str(kernel_dir / "work"),
            "pivot_root": _PIVOT_ROOT_SYSCALL[os.uname().machine],
        }
        flags = ["--mount", "--pid", "--fork", "--kill-child"] + (["--net"] if network_deny else [])
        unshare = support.unshare

        def wrap(cmd: list[str]) -> list[str]:
            cfg = json.dumps({**init_cfg, "argv": cmd})
            return [unshare, *flags, "--", sys.executable, "-I", "-S", "-c", _INIT_SCRIPT, cfg]

        km.wrapper = wrap
    memory_bytes = limits.memory_mb * 1024 * 1024
    procs = str(cgroup / "cgroup.procs") if cgroup is not None else None
    t0 = time.monotonic()
    logfile = (base / "kernel.log").open("ab")
    try:
        km.start_kernel(
            env=env,
            cwd=str(kernel_dir / "work"),
            stdout=logfile,
            stderr=logfile,
            preexec_fn=_preexec(memory_bytes, procs),
            extra_arguments=["--HistoryManager.enabled=False", "--IPKernelApp.log_level=WARN"],
        )
    except Exception as exc:
        logfile.close()
        _cleanup_failed(km, base, cgroup)
        raise SandboxError(f"cannot start a kernel: {exc}") from exc
    logfile.close()  # the child holds its own descriptor

    kc: BlockingKernelClient | None = None
    try:
        kc = _blocking_client(km)
        kc.wait_for_ready(timeout=startup_timeout)
        code = _PROBE_CODE.replace("__PHDS_MODULES__", repr([str(m) for m in warm_imports]))
        probe = _silent(kc, code, startup_timeout)
    except Exception as exc:
        tail = (
            (base / "kernel.log").read_text(errors="replace")[-1500:]
            if (base / "kernel.log").exists()
            else ""
        )
        if kc is not None:
            kc.stop_channels()
        _cleanup_failed(km, base, cgroup)
        raise SandboxError(f"the kernel did not come up: {exc}\n{tail}".strip()) from exc
    start_s = time.monotonic() - t0

    expected_root = {m["target"].split("/")[1] for m in _mount_plan(kernel_dir, site_dir)}
    controls = _kernel_controls(
        probe,
        limits,
        isolate,
        support,
        cgroup,
        cgroup_detail,
        env,
        site_dir,
        memory_bytes,
        expected_root,
    )
    if probe.get("warm_failed"):
        log.info("warm imports failed in the kernel: %s", probe["warm_failed"])
    return SandboxedKernel(
        km, base, kernel_dir, kc, bool(isolate), cgroup, controls, limits, extension, start_s
    )


def _cleanup_failed(km: KernelManager, base: Path, cgroup: Path | None) -> None:
    with contextlib.suppress(Exception):
        km.shutdown_kernel(now=True)
    with contextlib.suppress(Exception):
        km.cleanup_resources()
    if cgroup is not None:
        with contextlib.suppress(OSError):
            cgroup.rmdir()
    shutil.rmtree(base, ignore_errors=True)


def _kernel_controls(
    probe: dict[str, Any],
    limits: ExecutionLimits,
    isolate: bool,
    support: SandboxSupport,
    cgroup: Path | None,
    cgroup_detail: str,
    env: dict[str, str],
    site_dir: str | None,
    memory_bytes: int,
    expected_root: set[str],
) -> dict[str, dict[str, Any]]:
    """The controls a kernel has before it is bound to a run, as verified from inside."""
    c: dict[str, dict[str, Any]] = {}
    interfaces = probe.get("interfaces")
    connect = probe.get("connect", "not tried (interfaces other than lo exist)")
    isolated_net = interfaces == ["lo"] and str(connect).startswith("failed")
    if limits.network == "allow":
        c["network"] = control(
            "allow",
            True,
            "not isolated: the site policy allows network",
            f"interfaces {interfaces}",
        )
    else:
        c["network"] = control(
            "deny",
            isolated_net,
            "network namespace (unshare --net)" if isolate else f"none: {support.detail}",
            f"interfaces {interfaces}; UDP connect to 1.1.1.1:53: {connect}",
        )
    limit = probe.get("rlimit_as")
    c["memory"] = control(
        limits.memory_mb,
        limit == memory_bytes,
        "RLIMIT_AS set before exec (address space, not resident memory); RLIMIT_CORE=0",
        f"RLIMIT_AS in the kernel: {limit} bytes; core dumps limit {probe.get('rlimit_core')}",
    )
    cap_eff = probe.get("cap_eff")
    c["capabilities"] = control(
        "none",
        cap_eff is not None and int(str(cap_eff), 16) == 0,
        "capability bounding set dropped and no_new_privs before exec" if isolate else "none",
        f"uid {probe.get('uid')}, CapEff {cap_eff}",
    )
    seen_root = set(probe.get("root", []))
    c["filesystem"] = control(
        "private root",
        bool(isolate) and bool(seen_root) and seen_root <= expected_root,
        "mount namespace + pivot_root into a tmpfs with read-only binds" if isolate else "none",
        "kernel sees / as " + ", ".join(probe.get("root", [])),
    )
    c["processes"] = control(
        DEFAULT_MAX_TASKS if cgroup is not None else "limited",
        cgroup is not None,
        "pids cgroup per kernel"
        + (" + PID namespace" if isolate else "")
        + "; RLIMIT_NPROC is not used because uid 0 is exempt from it",
        cgroup_detail + f"; the kernel sees {probe.get('visible_pids')} process(es)",
    )
    c["environment"] = control(
        sorted(env),
        True,  # confirmed at bootstrap
        "the kernel process starts with a built environment, not the node's",
        "",
    )
    c["read_only_data"] = control(
        site_dir or "",
        False,
        "read-only bind mount of the site folder" if isolate else "none",
        "checked when the kernel is bound to a run",
    )
    return c
