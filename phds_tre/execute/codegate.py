"""The code gate: a static look at a notebook's code before a site agrees to run it.

:func:`code_gate` parses every code cell and reports :class:`Finding` objects, one per
suspicious construct, each with the cell index, the line within the cell, a category
from :data:`phds_tre.site_policy.CODE_GATE_CATEGORIES`, a reason and the line itself.
The site's :class:`~phds_tre.site_policy.CodeGatePolicy` maps each category to
``allow``, ``approve`` (a person at the site must approve the run) or ``block``.

IPython syntax is turned into Python by IPython's own input transformer
(:class:`IPython.core.inputtransformer2.TransformerManager`), the code the kernel would
run, so ``!cmd``, ``x = !cmd``, ``%magic`` and ``%%cellmagic`` arrive as calls to
``get_ipython().system/getoutput/run_line_magic/run_cell_magic`` and are classified
like the same calls written by hand: shell escapes and ``%%bash``/``%%sh``/
``%%script``/``%%perl``/``%%ruby``/``%%python*``/``%system``/``%sx`` are "shell", other
magics are "magic". The bodies of ``%%time``/``%%timeit``/``%%capture``/``%%prun`` and
the code of ``%time``/``%timeit``/``%prun`` are analysed as Python too. Three magics
that only time code or select the inline plotting backend (``%time``, ``%timeit``,
``%matplotlib inline``) give no finding of their own.

What is looked for:

* network: imports of socket, ssl, http, urllib, requests, httpx, aiohttp, ftplib,
  smtplib, paramiko, websocket… and URL literals (``https://``, ``s3://``…) given to a call;
* subprocess: subprocess, os.system/popen/exec*/spawn*/fork, pty, multiprocessing,
  ctypes/cffi, asyncio subprocesses, process pools;
* filesystem: open()/pathlib/shutil/os/glob with an absolute path or ``..``;
  os.remove/unlink/rmdir/chmod/chown/rename/symlink…, shutil.rmtree/move, Path.unlink…;
  reading the site's data files directly (``PHDS_SITE_DIR``, ``*.parquet``,
  ``read_parquet``) instead of through :mod:`phds_tre.data`;
* dynamic_code: exec, eval, compile, __import__, importlib, runpy, marshal, pickle
  loading, getattr/setattr on a module with a computed name, ``globals()``/``locals()``/
  ``vars()``/``__builtins__``, frame and code-object introspection (``__globals__``,
  ``__subclasses__``, ``sys._getframe`` …), ``get_ipython().run_cell`` and friends;
* display_tampering: IPython/ipykernel internals (``IPython.core.formatters``,
  ``get_ipython().display_formatter/events/kernel/displayhook``…), reassigning
  ``sys.displayhook``/``sys.stdout``/``sys.stderr``/``sys.excepthook``, assigning
  ``_repr_*_``/``__repr__`` methods or other attributes of pandas/matplotlib/IPython;
* phds_tampering: assigning attributes of phds_tre modules or classes, importing
  phds_tre private modules (``_name``) or the node's own machinery (execute, node, hub,
  release), ``phds_tre.sdc.policy.set_active_policy``, ``_phds*`` attributes, and the
  structured-output MIME type ``application/vnd.phds…`` written by hand.

Code that does not parse gets a "cannot be analysed" finding (dynamic_code).

What a static gate cannot stop, said plainly: it reads the code, not what the code does.
Obfuscation (building names or code from strings, bytes or data; encodings; calling
through objects reached by introspection that the patterns above miss), behaviour that
depends on data or on the time, code in files the notebook opens or in installed
packages, and anything a library does on the notebook's behalf all pass a static check.
The gate is a triage tool for the site's reviewer and a way to refuse the obvious; the
sandbox (:mod:`phds_tre.execute.sandbox`: no network, read-only data, limits, a fresh
kernel) is the control that holds when the gate is fooled, and the output checker
(:mod:`phds_tre.check`) is the control for what leaves.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import nbformat
from IPython.core.inputtransformer2 import TransformerManager

from phds_tre.site_policy import CODE_GATE_CATEGORIES, CodeGatePolicy

__all__ = ["Finding", "GateResult", "GateStatus", "code_gate", "scan_source"]

GateStatus = Literal["clean", "needs_approval", "blocked"]

_NETWORK_MODULES = frozenset(
    {
        "socket",
        "ssl",
        "http",
        "urllib",
        "urllib2",
        "urllib3",
        "requests",
        "httpx",
        "aiohttp",
        "httplib2",
        "pycurl",
        "ftplib",
        "smtplib",
        "poplib",
        "imaplib",
        "nntplib",
        "telnetlib",
        "socketserver",
        "xmlrpc",
        "paramiko",
        "fabric",
        "websocket",
        "websockets",
        "asyncssh",
        "grpc",
        "zmq",
        "tornado",
        "twisted",
        "dns",
        "boto3",
        "botocore",
        "s3fs",
        "gcsfs",
        "fsspec",
        "smbclient",
        "pysftp",
    }
)
_SUBPROCESS_MODULES = frozenset(
    {"subprocess", "pty", "multiprocessing", "ctypes", "cffi", "_posixsubprocess", "sh", "pexpect"}
)
_DYNAMIC_MODULES = frozenset({"importlib", "runpy", "marshal", "code", "codeop", "builtins", "imp"})
_DISPLAY_MODULES = (
    "IPython.core",
    "IPython.kernel",
    "IPython.terminal",
    "IPython.utils",
    "IPython.extensions",
    "ipykernel",
    "jupyter_client",
    "comm",
    "nbformat",
)
# Public display API: what notebooks normally import from IPython.
_DISPLAY_PUBLIC = ("IPython.core.display", "IPython.core.pylabtools", "IPython.core.getipython")
_PHDS_INTERNAL_PACKAGES = ("phds_tre.execute", "phds_tre.node", "phds_tre.hub", "phds_tre.release")
_LIBRARIES_WITH_HOOKS = (
    "pandas",
    "matplotlib",
    "IPython",
    "ipykernel",
    "statsmodels",
    "seaborn",
    "plotly",
    "numpy",
)
# Attribute assignments on these are configuration, not tampering.
_LIBRARY_SETTINGS = ("pandas.options", "matplotlib.rcParams", "numpy.random.seed")

_SUBPROCESS_CALLS = frozenset(
    {
        "os.system",
        "os.popen",
        "os.fork",
        "os.forkpty",
        "os.posix_spawn",
        "os.posix_spawnp",
        "os.kill",
        "os.killpg",
        "os.startfile",
        "asyncio.create_subprocess_exec",
        "asyncio.create_subprocess_shell",
        "concurrent.futures.ProcessPoolExecutor",
        "concurrent.futures.process.ProcessPoolExecutor",
    }
)
_SUBPROCESS_PREFIXES = ("os.exec", "os.spawn")
_FS_ALWAYS = frozenset(
    {
        "os.remove",
        "os.unlink",
        "os.rmdir",
        "os.removedirs",
        "os.chmod",
        "os.lchmod",
        "os.fchmod",
        "os.chown",
        "os.lchown",
        "os.fchown",
        "os.rename",
        "os.renames",
        "os.replace",
        "os.link",
        "os.symlink",
        "os.truncate",
        "os.ftruncate",
        "os.mkfifo",
        "os.mknod",
        "os.chroot",
        "os.chdir",
        "os.fchdir",
        "os.utime",
        "os.setxattr",
        "os.removexattr",
        "shutil.rmtree",
        "shutil.move",
        "shutil.chown",
        "shutil.copystat",
        "shutil.copymode",
        "pandas.read_parquet",
        "pyarrow.parquet.read_table",
        "pyarrow.parquet.ParquetFile",
        "pyarrow.parquet.ParquetDataset",
        "pyarrow.dataset.dataset",
        "polars.read_parquet",
        "polars.scan_parquet",
    }
)
_FS_METHODS = frozenset(
    {"unlink", "rmdir", "chmod", "lchmod", "symlink_to", "hardlink_to", "link_to", "chown"}
)
_FS_PATH_CALLS = frozenset(
    {
        "open",
        "io.open",
        "os.open",
        "codecs.open",
        "os.listdir",
        "os.scandir",
        "os.walk",
        "os.stat",
        "os.lstat",
        "os.access",
        "os.makedirs",
        "os.mkdir",
        "os.path.exists",
        "os.path.isfile",
        "os.path.isdir",
        "os.path.getsize",
        "glob.glob",
        "glob.iglob",
        "pathlib.Path",
        "pathlib.PosixPath",
        "pathlib.PurePath",
        "pathlib.PurePosixPath",
        "numpy.load",
        "numpy.save",
        "numpy.loadtxt",
        "numpy.fromfile",
        "sqlite3.connect",
        "duckdb.connect",
        "tarfile.open",
        "zipfile.ZipFile",
        "tempfile.mkdtemp",
        "tempfile.mkstemp",
    }
)
_FS_PATH_PREFIXES = ("shutil.", "pandas.read_", "pandas.DataFrame.to_", "duckdb.")
_DYNAMIC_CALLS = frozenset(
    {
        "exec",
        "eval",
        "compile",
        "__import__",
        "globals",
        "locals",
        "vars",
        "breakpoint",
        "sys._getframe",
        "sys.settrace",
        "sys.setprofile",
        "sys.addaudithook",
        "inspect.currentframe",
        "inspect.stack",
        "inspect.getouterframes",
        "types.FunctionType",
        "types.CodeType",
        "types.ModuleType",
        "pickle.load",
        "pickle.loads",
        "pickle.Unpickler",
        "dill.load",
        "dill.loads",
        "cloudpickle.load",
        "cloudpickle.loads",
        "shelve.open",
        "marshal.loads",
        "joblib.load",
    }
)
_INTROSPECTION_ATTRS = frozenset(
    {
        "__globals__",
        "__builtins__",
        "__code__",
        "__closure__",
        "__subclasses__",
        "__import__",
        "__loader__",
        "__spec__",
        "__getattribute__",
        "f_globals",
        "f_locals",
        "f_builtins",
        "f_back",
        "f_code",
        "tb_frame",
        "gi_frame",
        "cr_frame",
        "ag_frame",
        "co_code",
    }
)
_SYS_DISPLAY = frozenset(
    {
        "displayhook",
        "excepthook",
        "stdout",
        "stderr",
        "stdin",
        "__displayhook__",
        "__excepthook__",
        "__stdout__",
        "__stderr__",
    }
)
_SYS_DYNAMIC = frozenset({"modules", "meta_path", "path_hooks", "path_importer_cache", "path"})
_IPY_SHELL = frozenset({"system", "getoutput", "system_raw", "system_piped"})
_IPY_DYNAMIC = frozenset(
    {
        "run_cell",
        "run_cell_async",
        "run_code",
        "run_ast_nodes",
        "ex",
        "ev",
        "safe_execfile",
        "safe_execfile_ipy",
        "safe_run_module",
        "push",
        "user_ns",
        "user_global_ns",
        "transform_cell",
    }
)
_IPY_MAGIC_RUNNERS = frozenset({"run_line_magic", "run_cell_magic", "magic", "find_line_magic"})
_SHELL_MAGICS = frozenset(
    {
        "bash",
        "sh",
        "script",
        "system",
        "sx",
        "perl",
        "ruby",
        "python",
        "python2",
        "python3",
        "pypy",
        "!",
        "sc",
    }
)
# Magics whose argument (line magic) or body (cell magic) is Python code to analyse.
_CODE_MAGICS = frozenset({"time", "timeit", "capture", "prun", "debug"})
# Magics that only time code or choose the inline backend: no finding of their own.
_BENIGN_MAGICS = frozenset({"time", "timeit"})
_PRINT_LIKE = frozenset(
    {
        "print",
        "IPython.display.display",
        "IPython.display.Markdown",
        "IPython.display.HTML",
        "display",
        "logging.info",
        "logging.warning",
    }
)
_URL = re.compile(
    r"^\s*(https?|ftps?|sftp|ssh|wss?|s3a?|gs|gcs|az|abfs|hdfs|smb|file|postgres(ql)?|mysql|"
    r"mongodb(\+srv)?|redis|jdbc|odbc|telnet)://",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Finding:
    """One construct the gate reports."""

    #: Index of the cell in ``nb.cells`` (markdown cells count).
    cell: int
    #: Line number within the cell's source, from 1.
    line: int
    #: One of :data:`phds_tre.site_policy.CODE_GATE_CATEGORIES`.
    category: str
    reason: str
    #: The source line, stripped and shortened.
    excerpt: str
    #: What the site's policy does with this category: allow, approve or block.
    action: str = "approve"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return asdict(self)


@dataclass(frozen=True)
class GateResult:
    """The gate's verdict on a notebook."""

    status: GateStatus
    findings: list[Finding] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return {"status": self.status, "findings": [f.to_dict() for f in self.findings]}

    def summary(self) -> str:
        """One line for logs and the CLI."""
        if not self.findings:
            return "clean: no findings"
        counts: dict[str, int] = {}
        for f in self.findings:
            counts[f.category] = counts.get(f.category, 0) + 1
        parts = ", ".join(f"{n} {c}" for c, n in sorted(counts.items()))
        return f"{self.status}: {len(self.findings)} finding(s) ({parts})"


@dataclass(frozen=True)
class _Raw:
    line: int
    category: str
    reason: str


def _dotted(node: ast.AST) -> list[str] | None:
    """``a.b.c`` → ["a", "b", "c"] for a chain of names; None for anything else."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return parts[::-1]
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "get_ipython"
        and not node.args
    ):
        parts.append("<ipython>")
        return parts[::-1]
    return None


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _top(name: str) -> str:
    return name.split(".", 1)[0]


def _is_outside_path(text: str) -> bool:
    text = text.strip()
    if text.startswith(("/", "~", "file:")):
        return True
    return ".." in re.split(r"[\\/]", text)


def _strings(node: ast.AST) -> Iterator[str]:
    """String constants inside an expression (f-string parts included)."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
            yield sub.value


class _Analyser(ast.NodeVisitor):
    """Walks one cell's AST; names imported in earlier cells stay known (shared state)."""

    def __init__(self, state: _State, line_offset: int = 0) -> None:
        self.state = state
        self.offset = line_offset
        self.found: list[_Raw] = []

    # -- helpers -----------------------------------------------------------------------
    def add(self, node: ast.AST, category: str, reason: str) -> None:
        line = getattr(node, "lineno", 1) + self.offset
        self.found.append(_Raw(line, category, reason))

    def resolve(self, node: ast.AST) -> str | None:
        """Qualified name of a name/attribute chain, through import aliases."""
        parts = _dotted(node)
        if parts is None:
            return None
        head = self.state.aliases.get(parts[0], parts[0])
        return ".".join([head, *parts[1:]])

    def is_module_ref(self, node: ast.AST) -> bool:
        parts = _dotted(node)
        return parts is not None and parts[0] in self.state.aliases

    # -- imports -----------------------------------------------------------------------
    def check_module(self, node: ast.AST, module: str) -> None:
        top = _top(module)
        if top in _NETWORK_MODULES or module.startswith("asyncio.streams"):
            self.add(node, "network", f"imports {module} (network access)")
        if top in _SUBPROCESS_MODULES or module in (
            "concurrent.futures.process",
            "os.system",
            "os.popen",
        ):
            self.add(node, "subprocess", f"imports {module} (runs other programs or processes)")
        if top in _DYNAMIC_MODULES:
            self.add(node, "dynamic_code", f"imports {module} (loads or runs code dynamically)")
        if _under(module, _DISPLAY_MODULES) and not _under(module, _DISPLAY_PUBLIC):
            self.add(node, "display_tampering", f"imports {module} (IPython/kernel internals)")
        if top == "phds_tre":
            parts = module.split(".")
            if any(p.startswith("_") and not p.startswith("__") for p in parts):
                self.add(node, "phds_tampering", f"imports {module} (a private phds_tre module)")
            elif _under(module, _PHDS_INTERNAL_PACKAGES):
                self.add(node, "phds_tampering", f"imports {module} (the node's own machinery)")
            if module.endswith("set_active_policy"):
                self.add(node, "phds_tampering", "imports set_active_policy (changes the policy)")

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.check_module(node, alias.name)
            if alias.asname:
                self.state.aliases[alias.asname] = alias.name
            else:
                top = _top(alias.name)
                self.state.aliases[top] = top

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if node.level:
            self.add(node, "filesystem", "relative import (loads code from the folder)")
        for alias in node.names:
            if alias.name == "*":
                self.check_module(node, module)
                self.state.star_modules.append(module)
                continue
            full = f"{module}.{alias.name}" if module else alias.name
            self.check_module(node, full)
            self.state.aliases[alias.asname or alias.name] = full

    # -- names and attributes ----------------------------------------------------------
    def visit_Name(self, node: ast.Name) -> None:
        if node.id == "__builtins__":
            self.add(node, "dynamic_code", "uses __builtins__")
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        attr = node.attr
        if attr in _INTROSPECTION_ATTRS:
            self.add(node, "dynamic_code", f"uses .{attr} (introspection to reach hidden code)")
        if attr.startswith("_phds"):
            self.add(node, "phds_tampering", f"uses .{attr} (phds_tre's capture metadata)")
        name = self.resolve(node)
        if name is not None:
            if name.startswith("<ipython>."):
                self.check_ipython_attr(node, name.split(".")[1])
            elif name in (
                "phds_tre.sdc.policy.set_active_policy",
                "phds_tre.sdc.set_active_policy",
            ):
                self.add(node, "phds_tampering", "uses set_active_policy (changes the policy)")
        self.generic_visit(node)

    def check_ipython_attr(self, node: ast.AST, attr: str) -> None:
        if attr in _IPY_SHELL or attr in _IPY_MAGIC_RUNNERS:
            return  # classified at the call, where the command/magic name is known
        if attr in _IPY_DYNAMIC:
            self.add(node, "dynamic_code", f"get_ipython().{attr} (runs or reaches code)")
        else:
            self.add(node, "display_tampering", f"get_ipython().{attr} (IPython shell internals)")

    # -- assignments -------------------------------------------------------------------
    def check_target(self, target: ast.AST, verb: str = "assigns") -> None:
        if isinstance(target, ast.Tuple | ast.List):
            for elt in target.elts:
                self.check_target(elt, verb)
            return
        if isinstance(target, ast.Starred):
            self.check_target(target.value, verb)
            return
        if isinstance(target, ast.Subscript):
            base = self.resolve(target.value)
            if base in ("sys.modules", "sys.meta_path", "sys.path_hooks"):
                keys = list(_strings(target.slice))
                if any(k.startswith("phds_tre") for k in keys):
                    self.add(target, "phds_tampering", f"{verb} {base}[…phds_tre…]")
                else:
                    self.add(target, "dynamic_code", f"{verb} an entry of {base}")
            return
        if not isinstance(target, ast.Attribute):
            return
        attr = target.attr
        owner = self.resolve(target.value)
        on_self = isinstance(target.value, ast.Name) and target.value.id in ("self", "cls")
        if not on_self and re.fullmatch(
            r"_repr_\w+_|__repr__|__str__|_ipython_display_|__format__", attr
        ):
            self.add(target, "display_tampering", f"{verb} .{attr} (replaces how objects display)")
            return
        if owner is None or not self.is_module_ref(target.value):
            return
        full = f"{owner}.{attr}"
        if _top(owner) == "phds_tre":
            self.add(target, "phds_tampering", f"{verb} {full} (changes phds_tre)")
        elif owner == "sys" and attr in _SYS_DISPLAY:
            self.add(target, "display_tampering", f"{verb} sys.{attr}")
        elif owner == "sys" and attr in _SYS_DYNAMIC:
            self.add(target, "dynamic_code", f"{verb} sys.{attr}")
        elif owner == "builtins" or _top(owner) == "builtins":
            self.add(target, "dynamic_code", f"{verb} {full} (changes the builtins)")
        elif owner.startswith("<ipython>"):
            self.add(target, "display_tampering", f"{verb} get_ipython() attributes")
        elif _under(owner, _LIBRARIES_WITH_HOOKS) and not _under(full, _LIBRARY_SETTINGS):
            self.add(target, "display_tampering", f"{verb} {full} (monkeypatches a library)")

    def visit_Assign(self, node: ast.Assign) -> None:
        for target in node.targets:
            self.check_target(target)
            if isinstance(target, ast.Name):
                self.track(target.id, node.value)
        self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self.check_target(node.target)
        if isinstance(node.target, ast.Name) and node.value is not None:
            self.track(node.target.id, node.value)
        self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        self.check_target(node.target)
        self.generic_visit(node)

    def visit_Delete(self, node: ast.Delete) -> None:
        for target in node.targets:
            self.check_target(target, "deletes")
        self.generic_visit(node)

    def track(self, name: str, value: ast.AST) -> None:
        """Follow ``s = os.system`` / ``ip = get_ipython()`` / ``url = "https://…"``."""
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            self.state.constants[name] = value.value
            return
        self.state.constants.pop(name, None)
        resolved = self.resolve(value)
        if resolved is not None and (self.is_module_ref(value) or resolved.startswith("<ipython>")):
            self.state.aliases[name] = resolved
        elif name in self.state.aliases:
            del self.state.aliases[name]  # rebound to something we cannot follow

    # -- calls ---------------------------------------------------------------------------
    def call_strings(self, node: ast.Call) -> list[str]:
        values: list[str] = []
        for arg in [*node.args, *(k.value for k in node.keywords)]:
            values.extend(_strings(arg))
            if isinstance(arg, ast.Name) and arg.id in self.state.constants:
                values.append(self.state.constants[arg.id])
        return values

    def candidates(self, func: ast.AST) -> list[str]:
        name = self.resolve(func)
        if name is None:
            return []
        names = [name]
        if isinstance(func, ast.Name) and func.id not in self.state.aliases:
            names += [f"{m}.{func.id}" for m in self.state.star_modules if m]
        return names

    def visit_Call(self, node: ast.Call) -> None:
        names = self.candidates(node.func)
        for name in names:
            self.check_call(node, name)
        strings = self.call_strings(node)
        if not any(n in _PRINT_LIKE for n in names):
            for text in strings:
                if _URL.match(text) and not text.lower().startswith("file:"):
                    self.add(node, "network", f"passes the URL {text[:60]!r} to a call")
                    break
        if (
            isinstance(node.func, ast.Attribute)
            and node.func.attr in _FS_METHODS
            and not any(n in _FS_ALWAYS for n in names)
        ):
            self.add(node, "filesystem", f".{node.func.attr}() changes files")
        self.generic_visit(node)

    def check_call(self, node: ast.Call, name: str) -> None:
        args = node.args
        if name in _SUBPROCESS_CALLS or name.startswith(_SUBPROCESS_PREFIXES):
            self.add(node, "subprocess", f"calls {name}")
        elif name in _FS_ALWAYS:
            self.add(node, "filesystem", f"calls {name}")
        elif name in _DYNAMIC_CALLS or name.startswith(("importlib.", "runpy.")):
            self.add(node, "dynamic_code", f"calls {name}")
        elif name in ("getattr", "setattr", "delattr", "hasattr") and args:
            self.check_getattr(node, name)
        elif name.startswith("<ipython>."):
            self.check_ipython_call(node, name.split(".", 2)[1])
        elif _top(name) == "phds_tre" and name.endswith(".set_active_policy"):
            self.add(node, "phds_tampering", "calls set_active_policy (changes the policy)")
        if name in _FS_PATH_CALLS or name.startswith(_FS_PATH_PREFIXES):
            for text in self.call_strings(node):
                if _is_outside_path(text):
                    self.add(
                        node,
                        "filesystem",
                        f"{name} with a path outside the run folder ({text[:60]!r})",
                    )
                    break

    def check_getattr(self, node: ast.Call, name: str) -> None:
        target = node.args[0]
        key = node.args[1] if len(node.args) > 1 else None
        attr = key.value if isinstance(key, ast.Constant) and isinstance(key.value, str) else None
        if attr is not None and name in ("setattr", "delattr"):
            fake = ast.Attribute(value=target, attr=attr, ctx=ast.Store())
            ast.copy_location(fake, node)
            self.check_target(fake, "sets" if name == "setattr" else "deletes")
            return
        if attr is not None:
            fake_load = ast.Attribute(value=target, attr=attr, ctx=ast.Load())
            ast.copy_location(fake_load, node)
            self.visit_Attribute(fake_load)
            owner = self.resolve(target)
            if owner is not None and self.is_module_ref(target):
                self.check_call(node, f"{owner}.{attr}")
            return
        if self.is_module_ref(target) or (self.resolve(target) or "").startswith("<ipython>"):
            self.add(node, "dynamic_code", f"{name}() on a module with a computed name")

    def check_ipython_call(self, node: ast.Call, attr: str) -> None:
        if attr in _IPY_SHELL:
            self.add(node, "shell", f"shell command (get_ipython().{attr})")
            return
        if attr not in ("run_line_magic", "run_cell_magic", "magic"):
            return
        first = node.args[0] if node.args else None
        if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
            self.add(node, "dynamic_code", "runs a magic whose name is computed")
            return
        magic = first.value.split()[0] if attr == "magic" and first.value.split() else first.value
        magic = magic.lstrip("%")
        arg = node.args[1] if len(node.args) > 1 else None
        line_arg = arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else ""
        body = None
        if attr == "run_cell_magic" and len(node.args) > 2:
            third = node.args[2]
            if isinstance(third, ast.Constant) and isinstance(third.value, str):
                body = third.value
        kind = "cell magic %%" if attr == "run_cell_magic" else "magic %"
        if magic in _SHELL_MAGICS:
            self.add(node, "shell", f"{kind}{magic} runs a shell or another program")
        elif magic == "writefile":
            target = line_arg.split()[-1] if line_arg.split() else ""
            category = "filesystem"
            reason = f"{kind}writefile writes a file"
            if _is_outside_path(target):
                reason += f" outside the run folder ({target!r})"
            self.add(node, category, reason)
        elif magic in _BENIGN_MAGICS or (
            magic == "matplotlib" and line_arg.strip() in ("", "inline")
        ):
            pass
        else:
            self.add(node, "magic", f"{kind}{magic}")
        if magic in _CODE_MAGICS:
            base_line = getattr(node, "lineno", 1) + self.offset
            if body is not None:
                self.found.extend(self.state.analyse_code(body, base_line))
            elif attr == "run_line_magic" and magic != "capture":
                code = line_arg if magic == "time" else _strip_timeit(line_arg)
                self.found.extend(self.state.analyse_code(code, base_line - 1))


def _strip_timeit(arg: str) -> str:
    """``%timeit -n 10 -r 3 expr`` → ``expr``."""
    words = arg.split()
    while words and words[0].startswith("-"):
        flag = words.pop(0)
        if flag in ("-n", "-r", "-p") and words:
            words.pop(0)
    return " ".join(words)


class _State:
    """What the analysis knows across cells: imports, aliases, string constants."""

    def __init__(self) -> None:
        self.aliases: dict[str, str] = {}
        self.constants: dict[str, str] = {}
        self.star_modules: list[str] = []
        self.transformer = TransformerManager()

    def analyse_code(self, source: str, line_offset: int = 0) -> list[_Raw]:
        """Findings for IPython-flavoured source; lines shifted by ``line_offset``."""
        try:
            python = self.transformer.transform_cell(source)
        except Exception as exc:  # IPython raises assorted errors on broken input
            return [_Raw(1 + line_offset, "dynamic_code", f"cannot be analysed ({exc})")]
        try:
            tree = ast.parse(python)
        except SyntaxError as exc:
            return [
                _Raw(
                    (exc.lineno or 1) + line_offset,
                    "dynamic_code",
                    f"cannot be analysed: {exc.msg}",
                )
            ]
        except (ValueError, RecursionError, MemoryError) as exc:
            return [_Raw(1 + line_offset, "dynamic_code", f"cannot be analysed ({exc})")]
        analyser = _Analyser(self, line_offset)
        try:
            analyser.visit(tree)
        except RecursionError:
            analyser.found.append(
                _Raw(1 + line_offset, "dynamic_code", "cannot be analysed (nested too deeply)")
            )
        self.scan_strings(tree, analyser, line_offset)
        return analyser.found

    def scan_strings(self, tree: ast.AST, analyser: _Analyser, line_offset: int) -> None:
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Constant) and isinstance(node.value, str)):
                continue
            text = node.value
            if "PHDS_SITE_DIR" in text:
                analyser.add(
                    node, "filesystem", "reads the site data folder directly (use phds_tre.data)"
                )
            if re.search(r"\.parquet\b", text) or re.search(r"read_parquet|parquet_scan", text):
                analyser.add(
                    node,
                    "filesystem",
                    "names a parquet file (site data is read through phds_tre.data)",
                )
            if "application/vnd.phds" in text or "application/x-phds" in text:
                analyser.add(
                    node, "phds_tampering", "writes phds_tre's structured output type by hand"
                )


def _excerpt(lines: list[str], line: int) -> str:
    text = lines[line - 1].strip() if 1 <= line <= len(lines) else ""
    return text if len(text) <= 200 else text[:197] + "..."


def scan_source(source: str) -> list[tuple[int, str, str]]:
    """(line, category, reason) for one piece of IPython source; a convenience for tools."""
    raws = sorted(_dedupe(_State().analyse_code(source)), key=lambda r: r.line)
    return [(r.line, r.category, r.reason) for r in raws]


def _dedupe(raws: Iterable[_Raw]) -> list[_Raw]:
    seen: set[_Raw] = set()
    out: list[_Raw] = []
    for raw in raws:
        if raw not in seen:
            seen.add(raw)
            out.append(raw)
    return out


def code_gate(nb: nbformat.NotebookNode, policy: CodeGatePolicy) -> GateResult:
    """Analyse every code cell of ``nb`` and decide with the site's ``policy``.

    ``blocked`` if any finding's category is set to "block", else ``needs_approval`` if
    any is set to "approve", else ``clean`` (findings in "allow" categories are still
    listed). Never raises on bad code: unparseable cells become findings.
    """
    state = _State()
    findings: list[Finding] = []
    for index, cell in enumerate(nb.cells):
        if cell.get("cell_type") != "code":
            continue
        source = cell.get("source", "")
        if isinstance(source, list):
            source = "".join(source)
        lines = source.splitlines()
        for raw in sorted(_dedupe(state.analyse_code(source)), key=lambda r: r.line):
            category = raw.category if raw.category in CODE_GATE_CATEGORIES else "dynamic_code"
            findings.append(
                Finding(
                    cell=index,
                    line=raw.line,
                    category=category,
                    reason=raw.reason,
                    excerpt=_excerpt(lines, raw.line),
                    action=policy.action(category),
                )
            )
    actions = {f.action for f in findings}
    status: GateStatus = (
        "blocked" if "block" in actions else "needs_approval" if "approve" in actions else "clean"
    )
    return GateResult(status=status, findings=findings)
