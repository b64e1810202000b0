"""A federated GLM fitted over the network: one signed follow-up round per IRLS step.

:func:`run_glm` is the researcher's side of :class:`~phds_tre.federate.glm.GLM` across
real hospitals. It submits the study notebook once (round 1, with the model's initial
state as the ``glm_state`` parameter), then for every round waits until each site has
released its run, downloads and verifies the releases, reads each site's ``glm_round``
share, steps the model, and submits the next round (the same notebook, the new state,
signed again) until the fit converges::

    from phds_tre import federate
    from phds_tre.client import ClientConfig, Hub

    with Hub.from_config(ClientConfig.load()) as hub:
        fit = federate.run_glm(hub, "notebooks/sepsis_logistic.ipynb",
                               ["site_a", "site_b", "site_c"],
                               "died ~ lactate + age + C(sex)", "binomial",
                               levels={"sex": ["F", "M"]})
    fit.result.summary(); fit.rounds[-1].overhead_s

Each site decides whether a later round needs its admin's approval (the site policy's
``[approval] later_rounds``); a round that waits simply takes longer here.
"""

from __future__ import annotations

import getpass
import json
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = ["FederatedRun", "FederatedRunError", "RoundTiming", "run_glm"]

#: The name the study notebook shares its round under (``share("glm_round", ...)``).
SHARE_NAME = "glm_round"
#: The notebook parameter that carries the model's state to the sites.
STATE_PARAMETER = "glm_state"
#: Release-manifest timings that are the site's own work on a run.
_SITE_STAGES = ("prepare_s", "gate_s", "execute_s", "check_s")


class FederatedRunError(RuntimeError):
    """A round that cannot go on (a site did not release, a release did not verify)."""


@dataclass(frozen=True)
class RoundTiming:
    """How long one round took, and how much of that was the sites' own work."""

    round: int
    #: From submitting the round to the model's update with its shares.
    wall_s: float
    #: The slowest site's own run (prepare, code gate, execute, check; from its release).
    site_s: float
    #: Everything else: hub, long-polls, uploads, downloads, verification, the update.
    overhead_s: float
    #: Each site's own run time.
    sites: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data."""
        return {
            "round": self.round,
            "wall_s": round(self.wall_s, 4),
            "site_s": round(self.site_s, 4),
            "overhead_s": round(self.overhead_s, 4),
            "sites": {s: round(v, 4) for s, v in self.sites.items()},
        }


@dataclass
class FederatedRun:
    """What :func:`run_glm` returns: the fitted model, its study and every round's timing."""

    study_id: str
    model: Any  # phds_tre.federate.glm.GLM
    rounds: list[RoundTiming]

    @property
    def result(self) -> Any:
        """The pooled fit (:class:`~phds_tre.federate.glm.GLMResult`)."""
        return self.model.result

    @property
    def iterations(self) -> int:
        """IRLS iterations, as statsmodels counts them."""
        return int(self.model.iterations)


def _site_seconds(release_dir: Path) -> float:
    manifest = json.loads((release_dir / "manifest.json").read_text(encoding="utf-8"))
    timings = manifest.get("timings") or {}
    return float(sum(float(timings.get(stage) or 0.0) for stage in _SITE_STAGES))


def _not_released(study: Mapping[str, Any], number: int) -> list[str]:
    problems = []
    for run in study["runs"]:
        if run.get("round", 1) == number and run["status"] != "released":
            last = run["history"][-1]["detail"] if run.get("history") else ""
            problems.append(f"{run['site']} {run['status']}" + (f" ({last})" if last else ""))
    return problems


class _Progress:
    """One tqdm bar for the rounds and one per site for the current round's cells."""

    def __init__(self, sites: Sequence[str], max_rounds: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.rounds = tqdm(total=max_rounds, desc="rounds", unit="round", disable=not enabled)
        self.sites = {
            site: tqdm(total=1, desc=site, unit="cell", position=i + 1, disable=not enabled)
            for i, site in enumerate(sites)
        }

    def study(self, study: Mapping[str, Any], number: int) -> None:
        for run in study["runs"]:
            bar = self.sites.get(run["site"])
            if bar is None or run.get("round", 1) != number:
                continue
            total = max(int(run["cells_total"]), 1)
            done = total if run["status"] == "released" else min(int(run["cells_done"]), total)
            bar.total, bar.n = total, done
            bar.set_description(f"{run['site']} round {number} {run['status']}", refresh=False)
            bar.refresh()

    def round_done(self, number: int, timing: RoundTiming) -> None:
        self.rounds.update(1)
        self.rounds.set_postfix(round=number, wall=f"{timing.wall_s:.2f}s", refresh=True)

    def finish(self) -> None:
        """The fit converged: the rounds bar ends where it is."""
        self.rounds.total = self.rounds.n
        self.rounds.refresh()

    def close(self) -> None:
        for bar in (*self.sites.values(), self.rounds):
            bar.close()


def _signing(key: Ed25519PrivateKey | str | Path | None) -> tuple[Ed25519PrivateKey, str | None]:
    """The researcher's key (given, or from the client configuration) and configured name."""
    from phds_tre.release.signing import load_private_key

    if isinstance(key, Ed25519PrivateKey):
        return key, None
    if key is not None:
        return load_private_key(key), None
    from phds_tre.client import ClientConfig, ConfigError

    config = ClientConfig.load()
    if config.key_path is None:
        raise ConfigError("no signing key: set PHDS_KEY or key in the client configuration")
    return load_private_key(config.key_path), config.researcher


def run_glm(
    hub: Any,
    notebook: str | Path,
    sites: Sequence[str],
    formula: str,
    family: str = "binomial",
    levels: Mapping[str, list[Any]] | None = None,
    max_iter: int = 25,
    title: str = "Federated GLM",
    *,
    key: Ed25519PrivateKey | str | Path | None = None,
    researcher: str | None = None,
    parameters: Mapping[str, object] | None = None,
    site_keys: Mapping[str, Sequence[Ed25519PublicKey]] | None = None,
    work_dir: str | Path | None = None,
    round_timeout_s: float | None = 3600.0,
    poll_interval_s: float = 0.05,
    progress: bool = True,
) -> FederatedRun:
    """Fit a GLM across ``sites`` through ``hub`` (a :class:`phds_tre.client.Hub`).

    ``notebook`` declares the ``glm_state`` parameter and shares
    ``federate.glm_round(cohort, glm_state)`` as ``"glm_round"`` (see
    ``notebooks/sepsis_logistic.ipynb``); ``parameters`` are its other parameters,
    for every site and every round. ``key`` signs the study and each round (default: the
    client configuration's key). With ``site_keys`` every release must be signed by its
    site's key. Releases are kept under ``work_dir/round-N/`` (a temporary folder by
    default). Shows a progress bar for the rounds and one per site unless not
    ``progress``.

    Returns a :class:`FederatedRun` (``.result`` is the pooled fit, ``.rounds`` the
    timing of every round). Raises :class:`FederatedRunError` when a site does not
    release a round or a release does not verify, :class:`TimeoutError` when a round
    takes longer than ``round_timeout_s``, and the GLM's ``ConvergenceError`` after
    ``max_iter`` iterations.
    """
    from phds_tre.bundle import build_bundle, write_bundle
    from phds_tre.federate.glm import GLM
    from phds_tre.federate.shares import load_shares

    signing_key, configured = _signing(key)
    name = researcher or configured or getpass.getuser()
    model = GLM(formula, family, levels=levels, max_iter=max_iter)
    shared = {**dict(parameters or {}), STATE_PARAMETER: model.state()}
    keep = tempfile.TemporaryDirectory(prefix="phds-glm-") if work_dir is None else None
    root = Path(keep.name if keep is not None else str(work_dir))
    root.mkdir(parents=True, exist_ok=True)
    # Rounds: statsmodels' iterations, plus the round that shows convergence (and the mean
    # round of poisson/gaussian).
    bars = _Progress(list(sites), max_iter + 2, progress)
    timings: list[RoundTiming] = []
    try:
        started = time.monotonic()
        bundle = build_bundle(
            notebook,
            {"title": title, "researcher": name, "sites": list(sites), "parameters": shared},
            signing_key,
        )
        study_id = str(hub.submit(write_bundle(bundle, root / "study.zip"))["id"])
        number = 1
        while True:
            study = hub.wait(
                study_id,
                number,
                timeout=round_timeout_s,
                interval=poll_interval_s,
                on_update=lambda s, n=number: bars.study(s, n),
            )
            problems = _not_released(study, number)
            if problems:
                raise FederatedRunError(f"round {number}: " + "; ".join(problems))
            folder = root / f"round-{number}"
            summary = hub.results(study_id, folder, site_keys, round=number)
            if not summary["ok"]:
                bad = [
                    f"{s}: {'; '.join(e['problems'])}"
                    for s, e in summary["sites"].items()
                    if not e["verified"]
                ]
                raise FederatedRunError(f"round {number}: releases not verified: {'; '.join(bad)}")
            per_site = {
                s: _site_seconds(folder / str(e["path"])) for s, e in summary["sites"].items()
            }
            model.update(load_shares(folder, SHARE_NAME))
            wall = time.monotonic() - started
            slowest = max(per_site.values(), default=0.0)
            timing = RoundTiming(number, wall, slowest, wall - slowest, per_site)
            timings.append(timing)
            bars.round_done(number, timing)
            if model.converged:
                bars.finish()
                return FederatedRun(study_id=study_id, model=model, rounds=timings)
            number += 1
            started = time.monotonic()
            hub.submit_round(study_id, signing_key, {STATE_PARAMETER: model.state()}, number=number)
    finally:
        bars.close()
        if keep is not None:
            keep.cleanup()
