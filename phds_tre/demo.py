"""``phds demo``: the local demo — one study run at three synthetic hospitals.

Today's demo has no network yet (the hub and nodes come next): it makes three
synthetic paediatric hospitals on first use, then runs the example study at each
of them through exactly the code path a hospital uses (:class:`~phds_tre.run.SiteRun`:
code gate, sandboxed kernel from a pre-started pool, checks, data-aware scanning,
signed release), verifies every release's signature and writes a summary.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phds_tre.site_policy import SitePolicy

__all__ = ["DemoResult", "default_notebook", "run_demo"]


@dataclass(frozen=True)
class DemoResult:
    """Where the demo wrote its files and what each hospital released."""

    out_dir: Path
    sites: dict[str, dict[str, Any]]

    @property
    def counts(self) -> dict[str, int]:
        """Outputs released, held and withheld, over every site."""
        total = {"released": 0, "held": 0, "withheld": 0}
        for site in self.sites.values():
            for state, n in (site.get("counts") or {}).items():
                total[state] = total.get(state, 0) + n
        return total


def default_notebook() -> Path:
    """The example study: shipped in the wheel, or found beside the package in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (
        here / "_notebooks" / "example.ipynb",
        here.parent / "notebooks" / "example.ipynb",
    ):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("the example notebook (notebooks/example.ipynb) is not installed")


def run_demo(
    out_dir: Path,
    notebook: Path | None = None,
    site_policy: SitePolicy | None = None,
    echo: Callable[[str], None] = print,
    progress: Callable[[str, int, int], None] | None = None,
    seed: int = 0,
) -> DemoResult:
    """Run the example study at three synthetic hospitals; write ``out_dir/summary.json``."""
    from phds_tre.data.synth import generate
    from phds_tre.execute.pool import KernelPool
    from phds_tre.release.verify import verify_release
    from phds_tre.run import RunError, SiteRun

    policy = site_policy or SitePolicy()
    source = notebook or default_notebook()
    out_dir.mkdir(parents=True, exist_ok=True)
    data_dir = out_dir / "data"
    if not data_dir.is_dir() or not any(data_dir.iterdir()):
        t0 = time.monotonic()
        generate(data_dir, sites=3, seed=seed)
        echo(f"== made three synthetic hospitals in {data_dir} ({time.monotonic() - t0:.1f} s)")
    sites = sorted(p for p in data_dir.iterdir() if p.is_dir())
    keys = out_dir / "keys"
    summary: dict[str, dict[str, Any]] = {}
    echo(f"== running {source.name} at {len(sites)} hospitals (sandboxed kernels, pre-started)")
    # One pool per hospital, as each node has its own: a kernel mounts its site's data
    # read-only when it starts, so kernels are never shared between hospitals.
    pools = {
        site_dir.name: KernelPool(
            size=1,
            limits=policy.limits,
            site_env={"PHDS_SITE_DIR": str(site_dir.resolve()), "PHDS_SITE_NAME": site_dir.name},
        )
        for site_dir in sites
    }
    try:
        for site_dir in sites:
            pool = pools[site_dir.name]
            run = SiteRun(
                notebook_path=source,
                site_dir=site_dir,
                out_dir=out_dir / "runs" / site_dir.name,
                site_policy=policy,
                key_path=keys / f"{site_dir.name}.pem",
                pool=pool,
                progress=progress,
                echo=echo,
            )
            try:
                record = run.run()
            except RunError as exc:
                summary[site_dir.name] = {"status": "error", "error": str(exc)}
                continue
            release = out_dir / "runs" / site_dir.name / "release"
            verified = None
            if release.is_dir():
                public = keys / f"{site_dir.name}.pem.pub"
                from phds_tre.release.signing import load_public_key

                result = verify_release(release, [load_public_key(public)])
                verified = result.ok
            summary[site_dir.name] = {
                "status": record["status"],
                "counts": (record.get("release") or {}).get("counts"),
                "shared": (record.get("release") or {}).get("shared", []),
                "signature_verified": verified,
                "controls_held": sorted(
                    k
                    for k, v in ((record.get("execution") or {}).get("controls") or {}).items()
                    if v.get("held")
                ),
                "timings": record.get("timings"),
            }
    finally:
        for pool in pools.values():
            pool.close()
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    echo("")
    echo(f"{'hospital':<24} {'status':<16} {'released':>8} {'held':>5} {'withheld':>8}  signature")
    for name, site in summary.items():
        counts = site.get("counts") or {}
        sig = {True: "verified", False: "ALTERED", None: "-"}[site.get("signature_verified")]
        echo(
            f"{name:<24} {site['status']:<16} {counts.get('released', 0):>8} "
            f"{counts.get('held', 0):>5} {counts.get('withheld', 0):>8}  {sig}"
        )
    echo(f"== wrote {out_dir}/summary.json; each hospital's run is in {out_dir}/runs/<hospital>/")
    return DemoResult(out_dir, summary)
