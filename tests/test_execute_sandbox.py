"""Sandboxed kernels, the pool and the papermill engine, with real kernels (no mocks)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest

from phds_tre.execute import (
    Execution,
    KernelPool,
    SandboxError,
    execute_notebook,
    probe_support,
    start_kernel,
)
from phds_tre.site_policy import ExecutionLimits

SECRET = "PHDS_TEST_NODE_SECRET"
LIMITS = ExecutionLimits(memory_mb=1024, cell_timeout_s=20, run_timeout_s=60, output_bytes=20_000)
isolated_only = pytest.mark.skipif(
    not probe_support().namespaces, reason=f"no Linux namespaces: {probe_support().detail}"
)


def notebook(*sources: str, parameters: str | None = None) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "language": "python", "display_name": "P"}
    if parameters is not None:
        cell = nbformat.v4.new_code_cell(parameters)
        cell.metadata["tags"] = ["parameters"]
        nb.cells.append(cell)
    nb.cells.extend(nbformat.v4.new_code_cell(s) for s in sources)
    return nb


def stdout(execution: Execution) -> str:
    return "".join(
        out.get("text", "")
        for cell in execution.notebook.cells
        for out in cell.get("outputs", [])
        if out.get("output_type") == "stream"
    )


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site = tmp_path_factory.mktemp("site")
    (site / "person.parquet").write_bytes(b"not really parquet")
    return site


@pytest.fixture(scope="module")
def pool(site_dir: Path) -> Iterator[KernelPool]:
    """Light kernels (no warm imports, no extension) for the behaviour tests."""
    os.environ[SECRET] = "hunter2"  # in the node's environment before any kernel starts
    try:
        with KernelPool(
            2,
            LIMITS,
            {"PHDS_SITE_DIR": str(site_dir), "PHDS_SITE_NAME": "test"},
            warm_imports=(),
            extension=None,
        ) as kernels:
            yield kernels
    finally:
        os.environ.pop(SECRET, None)


def run(
    pool: KernelPool,
    run_dir: Path,
    nb: nbformat.NotebookNode,
    limits: ExecutionLimits = LIMITS,
    parameters: dict[str, object] | None = None,
) -> Execution:
    kernel = pool.acquire(run_dir, {"PHDS_POLICY_JSON": "{}"})
    return execute_notebook(nb, parameters or {}, kernel, limits)


def gone(pid: int | None) -> bool:
    """The process no longer exists (killed and reaped, not a zombie)."""
    if pid is None:
        return True
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@isolated_only
def test_network_namespace_has_only_loopback(pool: KernelPool, tmp_path: Path) -> None:
    code = (
        "import socket\n"
        "print(sorted(n for _, n in socket.if_nameindex()))\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "try:\n    s.connect(('1.1.1.1', 53)); print('connected')\n"
        "except OSError as e:\n    print('errno', e.errno)"
    )
    execution = run(pool, tmp_path, notebook(code))
    assert execution.status == "completed", execution.error
    assert stdout(execution).splitlines() == ["['lo']", "errno 101"]  # ENETUNREACH
    network = execution.controls["network"]
    assert network["held"] is True and network["requested"] == "deny"
    assert "['lo']" in network["detail"] and "unshare --net" in network["how"]


def test_memory_bomb_is_stopped_and_recorded(pool: KernelPool, tmp_path: Path) -> None:
    bomb = "hoard = []\nwhile True:\n    hoard.append(bytearray(64 * 1024 * 1024))"
    execution = run(pool, tmp_path, notebook("x = 1", bomb, "print('after')"))
    assert execution.status in ("oom", "killed")
    assert execution.status == "oom"  # RLIMIT_AS makes it a MemoryError in the kernel
    assert "memory" in (execution.error or "") and "cell 1" in (execution.error or "")
    assert execution.controls["memory"]["held"] is True
    assert execution.controls["memory"]["requested"] == 1024
    assert "after" not in stdout(execution)


def test_infinite_loop_times_out_even_when_it_ignores_interrupts(
    pool: KernelPool, tmp_path: Path
) -> None:
    limits = LIMITS.model_copy(update={"cell_timeout_s": 1.5})
    code = "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass"
    kernel = pool.acquire(tmp_path, {})
    started = time.monotonic()
    execution = execute_notebook(
        notebook("print('start')", code, "print('after')"), {}, kernel, limits
    )
    assert execution.status == "timeout"
    assert execution.error == "cell 1 exceeded the per-cell time limit of 1.5 s"
    assert time.monotonic() - started < 8
    assert gone(kernel.host_kernel_pid)
    outputs = execution.notebook.cells[1].outputs
    assert outputs[-1]["ename"] == "CellTimeoutError"
    assert execution.notebook.cells[1].metadata["papermill"]["exception"] is True
    assert stdout(execution) == "start\n"


def test_whole_run_timeout_kills_the_kernel(pool: KernelPool, tmp_path: Path) -> None:
    limits = LIMITS.model_copy(update={"run_timeout_s": 1.5})
    nb = notebook(*["import time; time.sleep(0.6)"] * 5)
    execution = run(pool, tmp_path, nb, limits)
    assert execution.status == "timeout"
    assert (execution.error or "").startswith("the run exceeded its time limit of 1.5 s")
    assert execution.controls["run_timeout"]["detail"] == "the run hit the limit"


def test_os_exit_is_a_killed_kernel(pool: KernelPool, tmp_path: Path) -> None:
    execution = run(pool, tmp_path, notebook("print(1)", "import os; os._exit(1)", "print(2)"))
    assert execution.status == "killed"
    assert execution.error == "the kernel died during cell 1 (exit code 1)"
    assert execution.notebook.cells[1].outputs[-1]["ename"] == "DeadKernelError"


def test_failing_cell_stops_the_run_and_keeps_its_error(pool: KernelPool, tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    kernel = pool.acquire(tmp_path, {})
    nb = notebook("print('one')", "1 / 0", "print('three')")
    execution = execute_notebook(
        nb, {}, kernel, LIMITS, lambda done, total: seen.append((done, total))
    )
    assert execution.status == "failed"
    assert execution.error == "cell 1 raised ZeroDivisionError: division by zero"
    assert execution.notebook.cells[1].outputs[0]["ename"] == "ZeroDivisionError"
    assert "three" not in stdout(execution)
    assert seen == [(1, 3), (2, 3)]
    assert set(execution.timings) == {"kernel_wait_s", "first_cell_s", "execute_s", "total_s"}


def test_huge_output_is_replaced_and_recorded(pool: KernelPool, tmp_path: Path) -> None:
    nb = notebook(
        "print('x' * 50_000)",
        "print('small')",
        *[f"print('{c}' * 8_000)" for c in "abc"],
        "print('late')",
    )
    execution = run(pool, tmp_path, nb)
    assert execution.status == "completed", execution.error
    first = execution.notebook.cells[0].outputs
    assert [o["output_type"] for o in first] == ["error"] and first[0]["ename"] == "OutputTooLarge"
    assert "50,0" in first[0]["evalue"]
    assert execution.notebook.cells[1].outputs[0]["text"] == "small\n"
    later = [o for c in execution.notebook.cells[2:] for o in c.outputs]
    assert any(o.get("ename") == "OutputTooLarge" and "from here on" in o["evalue"] for o in later)
    assert "late" not in stdout(execution)
    record = execution.controls["output_size"]
    assert record["held"] is True and record["requested"] == 20_000
    assert [w["why"] for w in record["withheld"]] == ["output too large", "notebook total"]
    total = sum(len(str(o)) for c in execution.notebook.cells for o in c.get("outputs", []))
    assert total < 2 * 20_000


def test_environment_is_scrubbed_and_set_for_the_run(
    pool: KernelPool, tmp_path: Path, site_dir: Path
) -> None:
    names = (SECRET, "PHDS_SITE_DIR", "PHDS_RUN_DIR", "PHDS_POLICY_JSON")
    code = f"import os\nfor k in {names!r}:\n    print(k, os.environ.get(k))"
    assert os.environ[SECRET] == "hunter2"
    execution = run(pool, tmp_path, notebook(code))
    assert stdout(execution).splitlines() == [
        f"{SECRET} None",
        f"PHDS_SITE_DIR {site_dir}",
        f"PHDS_RUN_DIR {tmp_path}",
        "PHDS_POLICY_JSON {}",
    ]
    record = execution.controls["environment"]
    assert record["held"] is True and SECRET not in record["detail"]


def test_working_folder_is_the_run_folder(pool: KernelPool, tmp_path: Path) -> None:
    code = "import os\nprint(os.getcwd())\nopen('result.txt', 'w').write('42')"
    execution = run(pool, tmp_path, notebook(code))
    assert stdout(execution) == f"{tmp_path}\n"
    assert (tmp_path / "result.txt").read_text() == "42"
    assert execution.controls["working_folder"]["held"] is True


@isolated_only
def test_site_data_is_read_only_and_the_host_is_hidden(
    pool: KernelPool, tmp_path: Path, site_dir: Path
) -> None:
    code = (
        "import os\n"
        "print(sorted(os.listdir(os.environ['PHDS_SITE_DIR'])))\n"
        "print(os.path.exists('/etc/shadow'), os.path.exists('/root/.bash_history'))\n"
        "print(len([p for p in os.listdir('/proc') if p.isdigit()]))\n"
        "open(os.path.join(os.environ['PHDS_SITE_DIR'], 'x.txt'), 'w')"
    )
    execution = run(pool, tmp_path, notebook(code))
    assert stdout(execution).splitlines() == ["['person.parquet']", "False False", "1"]
    assert execution.status == "failed"
    assert "Read-only file system" in (execution.error or "")
    assert not (site_dir / "x.txt").exists()
    for name in ("read_only_data", "filesystem", "capabilities", "processes"):
        assert execution.controls[name]["held"] is True, (name, execution.controls[name])
    assert "EROFS" in execution.controls["read_only_data"]["detail"]


@isolated_only
def test_processes_are_limited(pool: KernelPool, tmp_path: Path) -> None:
    code = (
        "import threading, time\n"
        "threads = []\n"
        "for _ in range(400):\n"
        "    t = threading.Thread(target=time.sleep, args=(30,), daemon=True)\n"
        "    t.start(); threads.append(t)"
    )
    execution = run(pool, tmp_path, notebook(code))
    assert execution.status == "failed"
    assert "can't start new thread" in (execution.error or "")


def test_a_kernel_is_never_reused(pool: KernelPool, tmp_path: Path) -> None:
    first = pool.acquire(tmp_path, {})
    with pytest.raises(SandboxError, match="never reused"):
        first.bootstrap(tmp_path, {})
    execute_notebook(notebook("1"), {}, first, LIMITS)
    with pytest.raises(ValueError, match="shut down"):
        execute_notebook(notebook("1"), {}, first, LIMITS)
    second = pool.acquire(tmp_path, {})
    assert second is not first
    assert second.host_kernel_pid != first.host_kernel_pid
    assert gone(first.host_kernel_pid)
    execute_notebook(notebook("1"), {}, second, LIMITS)
    assert gone(second.host_kernel_pid)


def test_malicious_parameter_stays_a_string_in_the_kernel(pool: KernelPool, tmp_path: Path) -> None:
    evil = "x'); print('PWNED'); ('"
    nb = notebook("print(repr(label))", parameters="label = 'safe'")
    execution = run(pool, tmp_path, nb, parameters={"label": evil})
    assert execution.status == "completed", execution.error
    assert stdout(execution) == repr(evil) + "\n"


def test_bad_parameters_are_a_failed_run(pool: KernelPool, tmp_path: Path) -> None:
    nb = notebook("print(n)", parameters="n = 1")
    execution = run(pool, tmp_path, nb, parameters={"m": 2})
    assert execution.status == "failed"
    assert (execution.error or "").startswith("parameters: unknown parameter 'm'")


def test_plain_kernel_records_what_does_not_hold(tmp_path: Path, site_dir: Path) -> None:
    kernel = start_kernel(
        LIMITS, {"PHDS_SITE_DIR": str(site_dir)}, isolate=False, warm_imports=(), extension=None
    )
    try:
        kernel.bootstrap(tmp_path, {})
        c = kernel.controls
        assert c["network"]["held"] is False and "none" in c["network"]["how"]
        assert c["filesystem"]["held"] is False
        assert c["memory"]["held"] is True
        assert c["environment"]["held"] is True
        assert c["working_folder"]["held"] is True
        # As root without a read-only mount, the write probe succeeds: recorded, not hidden.
        if os.geteuid() == 0:
            assert c["capabilities"]["held"] is False
            assert c["read_only_data"]["held"] is False
            assert "succeeded" in c["read_only_data"]["detail"]
    finally:
        kernel.shutdown()
    assert gone(kernel.host_pid)


def test_pool_hands_out_a_prestarted_kernel_quickly(tmp_path: Path, site_dir: Path) -> None:
    """Default pool (warm imports, the phds_tre.kernel extension); a loose bound only."""
    with KernelPool(1, LIMITS, {"PHDS_SITE_DIR": str(site_dir)}) as warm:
        assert warm.wait_ready(timeout=60)
        acquired = time.monotonic()
        kernel = warm.acquire(tmp_path, {"PHDS_POLICY_JSON": "{}"})
        execution = execute_notebook(
            notebook("import pandas as pd\nprint(pd.__name__)"), {}, kernel, LIMITS
        )
        elapsed = time.monotonic() - acquired
    assert execution.status == "completed", execution.error
    assert execution.timings["first_cell_s"] < 2
    assert execution.timings["kernel_wait_s"] < 2
    assert elapsed < 4
    extension = execution.controls["kernel_extension"]
    assert extension["requested"] == "phds_tre.kernel"
    assert extension["held"] is True, extension["detail"]
    assert execution.controls["fresh_kernel"]["held"] is True


def test_closed_pool_refuses(site_dir: Path, tmp_path: Path) -> None:
    pool = KernelPool(1, LIMITS, {"PHDS_SITE_DIR": str(site_dir)}, warm_imports=(), extension=None)
    pool.close()
    with pytest.raises(SandboxError, match="closed"):
        pool.acquire(tmp_path, {})


def _kernels_of(marker: str) -> list[int]:
    """Pids of live processes whose command line mentions ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_kernels_die_with_a_killed_node(tmp_path: Path, site_dir: Path) -> None:
    """A node killed with SIGKILL must not leave its sandboxed kernels running."""
    import signal
    import subprocess
    import sys

    marker = str(tmp_path / "tmp")
    (tmp_path / "tmp").mkdir()
    code = (
        "import sys, time\n"
        "from phds_tre.execute import KernelPool\n"
        "from phds_tre.site_policy import ExecutionLimits\n"
        "pool = KernelPool(size=2, limits=ExecutionLimits(),"
        f" site_env={{'PHDS_SITE_DIR': {str(site_dir)!r}}})\n"
        "while len(pool._ready) < 2: time.sleep(0.1)\n"
        "print('ready', flush=True)\n"
        "time.sleep(600)\n"
    )
    node = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": marker},
    )
    try:
        assert node.stdout is not None and node.stdout.readline().strip() == "ready"
        assert len(_kernels_of(marker)) >= 2  # kernels (and their wrappers) are running
        node.send_signal(signal.SIGKILL)
        node.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _kernels_of(marker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _kernels_of(marker) == []
    finally:
        node.kill()
        for pid in _kernels_of(marker):
            os.kill(pid, 9)
