"""The researcher's client of the hub: :class:`ClientConfig` and :class:`Hub`.

Configuration comes from environment variables and a TOML file, never from the
command line, so a token never shows in a shell history or a process list:

* ``PHDS_HUB_URL`` or ``hub_url`` — the hub's address (``https://``; plain ``http://``
  only to a loopback address unless ``PHDS_ALLOW_HTTP=1``);
* ``PHDS_TOKEN`` (for CI), else ``PHDS_TOKEN_FILE`` or ``token_file`` — a file holding
  the bearer token ``phds_<id>_<secret>``, refused unless only its owner may read it
  (mode 0600 or stricter);
* ``PHDS_KEY`` or ``key`` — the researcher's Ed25519 signing key (PEM), for submitting;
* ``PHDS_RESEARCHER`` or ``researcher`` — the researcher's name in the study manifest.

The file is ``$PHDS_HOME/client.toml``, else ``~/.phds/client.toml``; relative paths
in it are relative to its folder. Environment variables override the file.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
import tomllib
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import nbformat
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "FINISHED",
    "MAX_DOWNLOAD_BYTES",
    "ClientConfig",
    "ConfigError",
    "Hub",
    "HubError",
    "read_token_file",
]

#: Statuses a run never leaves.
FINISHED = frozenset({"released", "rejected", "failed", "cancelled"})
#: Largest release archive the client downloads.
MAX_DOWNLOAD_BYTES = 100 * 1024 * 1024
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class ConfigError(ValueError):
    """Unusable client configuration (missing, malformed, unsafe); one-line message."""


class HubError(Exception):
    """A request the hub refused (or could not be reached: ``status`` 0); one line."""

    def __init__(self, status: int, reason: str, problems: Sequence[str] = ()) -> None:
        """Keep the HTTP status, the hub's one-line reason and its problems."""
        self.status = status
        self.reason = " ".join(reason.split())
        self.problems = [" ".join(p.split()) for p in problems]
        super().__init__(self.message)

    @property
    def message(self) -> str:
        """The whole error as one line (at most five problems are listed)."""
        text = (
            f"hub refused the request ({self.status}): {self.reason}"
            if self.status
            else self.reason
        )
        if self.problems:
            shown = "; ".join(self.problems[:5])
            more = len(self.problems) - 5
            text += f": {shown}" + (f" (+{more} more)" if more > 0 else "")
        return text


# -- configuration ----------------------------------------------------------------------


def read_token_file(path: str | Path) -> str:
    """The bearer token in ``path``; ConfigError unless only its owner can read it."""
    path = Path(path).expanduser()
    try:
        info = path.stat()
    except OSError as exc:
        raise ConfigError(f"token file {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"token file {path}: not a regular file")
    if info.st_mode & 0o077:
        mode = stat.S_IMODE(info.st_mode)
        raise ConfigError(
            f"token file {path} is accessible to others (mode {mode:04o}); run: chmod 600 {path}"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"token file {path}: cannot read ({exc})") from None
    return _valid_token(text, f"token file {path}")


def _valid_token(text: str, where: str) -> str:
    token = text.strip()
    if not token:
        raise ConfigError(f"{where}: empty")
    if not token.startswith("phds_") or any(c.isspace() for c in token):
        raise ConfigError(f"{where}: not a hub token (phds_<id>_<secret>)")
    return token


def _check_url(url: str, env: Mapping[str, str]) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"hub URL {url!r}: not an http(s) address")
    if (
        parts.scheme == "http"
        and parts.hostname not in _LOOPBACK
        and env.get("PHDS_ALLOW_HTTP") != "1"
    ):
        raise ConfigError(
            f"hub URL {url!r}: plain http would send the token unencrypted; use https "
            "(or set PHDS_ALLOW_HTTP=1)"
        )
    return url.rstrip("/")


@dataclass(frozen=True)
class ClientConfig:
    """Where the hub is, the bearer token, and the researcher's signing key and name."""

    hub_url: str
    token: str
    key_path: Path | None = None
    researcher: str | None = None
    source: Path | None = None

    def __repr__(self) -> str:
        """Everything but the token."""
        return (
            f"ClientConfig(hub_url={self.hub_url!r}, token='***', key_path={self.key_path!r}, "
            f"researcher={self.researcher!r}, source={self.source!r})"
        )

    @staticmethod
    def default_path(env: Mapping[str, str] | None = None) -> Path:
        """``$PHDS_HOME/client.toml``, else ``~/.phds/client.toml``."""
        env = os.environ if env is None else env
        home = env.get("PHDS_HOME")
        base = Path(home).expanduser() if home else Path.home() / ".phds"
        return base / "client.toml"

    @classmethod
    def load(
        cls, env: Mapping[str, str] | None = None, path: str | Path | None = None
    ) -> ClientConfig:
        """The configuration from ``env`` (default: ``os.environ``) and the TOML file.

        ``path`` overrides the file's location; a missing file is fine when the
        environment gives the URL and the token. Raises :class:`ConfigError`.
        """
        env = os.environ if env is None else env
        file = Path(path) if path is not None else cls.default_path(env)
        values: dict[str, Any] = {}
        source: Path | None = None
        if file.exists():
            try:
                values = tomllib.loads(file.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(f"{file}: cannot read ({' '.join(str(exc).split())})") from None
            source = file
            if "token" in values:
                raise ConfigError(
                    f"{file}: holds a token; keep it in a separate file (mode 0600) named by token_file"
                )
            unknown = sorted(set(values) - {"hub_url", "token_file", "key", "researcher"})
            if unknown:
                raise ConfigError(f"{file}: unknown settings: {', '.join(unknown)}")
            for name, value in values.items():
                if not isinstance(value, str) or not value:
                    raise ConfigError(f"{file}: {name} must be a non-empty string")
        base = file.parent

        def from_file(name: str) -> Path | None:
            value = values.get(name)
            return None if value is None else base / Path(value).expanduser()

        url = env.get("PHDS_HUB_URL") or values.get("hub_url")
        if not url:
            raise ConfigError(f"no hub URL: set PHDS_HUB_URL or hub_url in {file}")
        if env.get("PHDS_TOKEN"):
            token = _valid_token(env["PHDS_TOKEN"], "PHDS_TOKEN")
        else:
            token_file = (
                Path(env["PHDS_TOKEN_FILE"])
                if env.get("PHDS_TOKEN_FILE")
                else from_file("token_file")
            )
            if token_file is None:
                raise ConfigError(
                    f"no token: set PHDS_TOKEN_FILE (or PHDS_TOKEN) or token_file in {file}"
                )
            token = read_token_file(token_file)
        key = Path(env["PHDS_KEY"]).expanduser() if env.get("PHDS_KEY") else from_file("key")
        researcher = env.get("PHDS_RESEARCHER") or values.get("researcher")
        return cls(_check_url(str(url), env), token, key, researcher, source)


# -- the hub ----------------------------------------------------------------------------


def _error(response: httpx.Response) -> HubError:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("reason"), str):
        problems = body.get("problems") or []
        return HubError(response.status_code, body["reason"], [str(p) for p in problems])
    text = response.text.strip().splitlines()
    return HubError(response.status_code, (text[0][:200] if text else "") or response.reason_phrase)


class Hub:
    """A researcher's session with the hub's REST API (a bearer token, JSON in and out)."""

    def __init__(
        self,
        url: str,
        token: str,
        transport: httpx.BaseTransport | None = None,
        *,
        timeout: float = 60.0,
    ) -> None:
        """Talk to the hub at ``url`` with ``token``; ``transport`` replaces the network."""
        self.url = url.rstrip("/")
        self._client = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}"},
            transport=transport,
            timeout=timeout,
            follow_redirects=False,
        )
        self._bundles: dict[str, Any] = {}

    @classmethod
    def from_config(cls, config: ClientConfig) -> Hub:
        """A session configured by ``config``."""
        return cls(config.hub_url, config.token)

    def close(self) -> None:
        """Close the connections."""
        self._client.close()

    def __enter__(self) -> Hub:
        """Use as a context manager."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close on leaving."""
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise HubError(0, f"cannot reach the hub at {self.url}: {exc}") from None
        if response.status_code >= 400:
            raise _error(response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._request(method, path, **kwargs)
        try:
            return response.json()
        except ValueError:
            raise HubError(response.status_code, "the hub's answer is not JSON") from None

    def submit(self, bundle_path: str | Path) -> dict[str, Any]:
        """Submit a signed study bundle (zip); the stored study (new or submitted before)."""
        path = Path(bundle_path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise HubError(0, f"{path}: cannot read bundle ({exc.strerror or exc})") from None
        study: dict[str, Any] = self._json(
            "POST", "/studies", content=data, headers={"Content-Type": "application/zip"}
        )
        return study

    def studies(self) -> list[dict[str, Any]]:
        """The researcher's studies, newest first."""
        found: list[dict[str, Any]] = self._json("GET", "/studies")
        return found

    def study(self, study_id: str) -> dict[str, Any]:
        """One study with every run's status, progress and history."""
        found: dict[str, Any] = self._json("GET", f"/studies/{_segment(study_id)}")
        return found

    def cancel(self, study_id: str) -> dict[str, Any]:
        """Cancel every unfinished run of the study; the study afterwards."""
        found: dict[str, Any] = self._json("POST", f"/studies/{_segment(study_id)}/cancel")
        return found

    def download_release(self, run_id: str, dest: str | Path) -> Path:
        """Download a released run's signed archive to ``dest`` (a file, or a folder for it)."""
        dest = Path(dest)
        try:
            with self._client.stream("GET", f"/runs/{_segment(run_id)}/release") as response:
                if response.status_code >= 400:
                    response.read()
                    raise _error(response)
                kind = response.headers.get("content-type", "").split(";")[0].strip()
                fmt = "zip" if kind == "application/zip" else "tar.gz"
                target = dest / f"release-{run_id}.{fmt}" if dest.is_dir() else dest
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
                size = 0
                try:
                    with partial.open("wb") as out:
                        for chunk in response.iter_bytes():
                            size += len(chunk)
                            if size > MAX_DOWNLOAD_BYTES:
                                raise HubError(
                                    0, f"release of run {run_id} is over {MAX_DOWNLOAD_BYTES} bytes"
                                )
                            out.write(chunk)
                    os.replace(partial, target)
                finally:
                    partial.unlink(missing_ok=True)
        except httpx.HTTPError as exc:
            raise HubError(0, f"cannot reach the hub at {self.url}: {exc}") from None
        return target

    def study_bundle(self, study_id: str) -> Any:
        """The study's own bundle (a :class:`~phds_tre.bundle.StudyBundle`), checked intact.

        Fetched once per session: a study's bundle never changes.
        """
        from phds_tre.bundle import BundleError, read_bundle

        cached = self._bundles.get(study_id)
        if cached is not None:
            return cached
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "study.zip"
            path.write_bytes(self._request("GET", f"/studies/{_segment(study_id)}/bundle").content)
            try:
                bundle = read_bundle(path)
            except BundleError as exc:
                raise HubError(0, f"the hub's copy of study {study_id}: {exc}") from None
        if bundle.study_id != study_id:
            raise HubError(0, f"the hub sent study {bundle.study_id} for {study_id}")
        self._bundles[study_id] = bundle
        return bundle

    def submit_round(
        self,
        study_id: str,
        key: Ed25519PrivateKey,
        parameters: Mapping[str, object] | None = None,
        *,
        site_parameters: Mapping[str, Mapping[str, object]] | None = None,
        sites: Sequence[str] | None = None,
        number: int | None = None,
    ) -> dict[str, Any]:
        """Sign and submit a follow-up round of the study; the stored round with its runs.

        The same notebook runs again with ``parameters`` (every target site) and
        ``site_parameters`` (one site) over the study's own; ``sites`` defaults to every
        site of the study and ``number`` to the next round. Values given as strings are
        converted to the types the notebook declares before signing. Raises
        :class:`HubError` (a refused parameter or site: status 0, before anything is sent).
        """
        from phds_tre.execute.parameters import ParameterError
        from phds_tre.rounds import RoundError, build_round

        bundle = self.study_bundle(study_id)
        if number is None:
            number = int(self.study(study_id).get("rounds", 1)) + 1
        try:
            notebook = nbformat.reads(bundle.notebook.decode("utf-8"), as_version=4)
            signed = build_round(
                bundle.manifest,
                notebook,
                number,
                key,
                parameters=parameters,
                site_parameters=site_parameters,
                sites=sites,
            )
        except (RoundError, ParameterError) as exc:
            raise HubError(0, f"round {number}: {exc}") from None
        found: dict[str, Any] = self._json(
            "POST", f"/studies/{_segment(study_id)}/rounds", json=signed.to_json()
        )
        return found

    def wait(
        self,
        study_id: str,
        round: int | None = None,
        *,
        timeout: float | None = None,
        interval: float = 0.5,
        on_update: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll until every run of ``round`` (default: the latest) has finished; the study.

        ``on_update`` gets the study after every poll (for progress display). Raises
        :class:`TimeoutError` naming the unfinished sites after ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            study = self.study(study_id)
            wanted = round if round is not None else int(study.get("rounds", 1))
            runs = [r for r in study["runs"] if r.get("round", 1) == wanted]
            if on_update is not None:
                on_update(study)
            if runs and all(r["status"] in FINISHED for r in runs):
                return study
            if not runs:
                raise HubError(0, f"study {study_id} has no round {wanted}")
            if deadline is not None and time.monotonic() >= deadline:
                waiting = ", ".join(f"{r['site']} {r['status']}" for r in runs)
                raise TimeoutError(f"round {wanted} of study {study_id} unfinished: {waiting}")
            time.sleep(interval)

    def results(
        self,
        study_id: str,
        out_dir: str | Path,
        trusted_site_keys: Mapping[str, Sequence[Ed25519PublicKey]] | None = None,
        *,
        round: int | None = None,
    ) -> dict[str, Any]:
        """Download, unpack and verify every released run; write ``out_dir/results.json``.

        ``round`` picks one round of a study with follow-up rounds; by default each site's
        latest released run is taken (else its latest run).

        Each release goes to ``out_dir/<site>/release/`` (replacing an earlier copy),
        unpacked safely and checked with :func:`~phds_tre.release.verify.verify_release`,
        and its manifest must name this study and that site. With ``trusted_site_keys``
        (site → public keys) a site's release must be signed by one of its keys; a site
        missing from the mapping has no trusted key. Returns the summary written:
        ``ok`` is true when every released run verified.
        """
        study = self.study(study_id)
        chosen = _round_runs(study, round)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        sites: dict[str, dict[str, Any]] = {}
        for run in chosen:
            site = str(run["site"])
            entry: dict[str, Any] = {
                "run_id": run["id"],
                "round": run.get("round", 1),
                "status": run["status"],
                "cells_done": run["cells_done"],
                "cells_total": run["cells_total"],
                "released": run["status"] == "released",
                "path": None,
                "verified": None,
                "trusted": None,
                "key_id": None,
                "files": 0,
                "sha256": None,
                "problems": [],
            }
            if entry["released"]:
                keys = None if trusted_site_keys is None else list(trusted_site_keys.get(site, ()))
                entry.update(self._fetch_release(study_id, site, str(run["id"]), out, keys))
            sites[site] = entry
        released = [e for e in sites.values() if e["released"]]
        summary: dict[str, Any] = {
            "study_id": study["id"],
            "title": study["title"],
            "round": round,
            "hub": self.url,
            "fetched": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "ok": all(e["verified"] for e in released),
            "complete": len(released) == len(sites),
            "sites": sites,
        }
        target = out / "results.json"
        partial = out / f".results.json.{uuid.uuid4().hex}"
        partial.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(partial, target)
        return summary

    def _fetch_release(
        self,
        study_id: str,
        site: str,
        run_id: str,
        out: Path,
        keys: list[Ed25519PublicKey] | None,
    ) -> dict[str, Any]:
        from phds_tre.hub.archive import ArchiveError, unpack
        from phds_tre.release.verify import ReleaseInputError, verify_release

        if not _safe_site(site):
            return {"verified": False, "problems": [f"unsafe site name {site!r}"]}
        site_dir = out / site
        site_dir.mkdir(exist_ok=True)
        with tempfile.TemporaryDirectory(dir=site_dir, prefix=".download-") as tmp:
            archive = self.download_release(run_id, Path(tmp) / "archive")
            data = archive.read_bytes()
            staging = Path(tmp) / "unpacked"
            staging.mkdir()
            info: dict[str, Any] = {"sha256": hashlib.sha256(data).hexdigest()}
            try:
                unpack(data, staging)
            except ArchiveError as exc:
                return {**info, "verified": False, "problems": [f"release archive: {exc}"]}
            top = {p.name for p in staging.iterdir()}
            if "release" in top:
                folder = staging / "release"
                extra = sorted(top - {"release"})
            else:
                folder, extra = staging, []
            final = site_dir / "release"
            if final.is_symlink() or final.is_file():
                final.unlink()
            elif final.exists():
                shutil.rmtree(final)
            os.replace(folder, final)
        info["path"] = final.relative_to(out).as_posix()
        problems = [f"{name}: outside the release folder (not kept)" for name in extra]
        try:
            result = verify_release(final, keys)
        except ReleaseInputError as exc:
            return {**info, "verified": False, "problems": [*problems, str(exc)]}
        problems.extend(result.problems)
        try:
            manifest = json.loads((final / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            manifest = {}
        if isinstance(manifest, dict):
            for name, want in (("study_id", study_id), ("site", site)):
                if manifest.get(name) != want:
                    problems.append(f"manifest {name} is {manifest.get(name)!r}, expected {want!r}")
        return {
            **info,
            "verified": not problems,
            "trusted": result.trusted,
            "key_id": result.key_id,
            "files": result.files,
            "problems": problems,
        }


def _round_runs(study: Mapping[str, Any], round: int | None) -> list[dict[str, Any]]:
    """One run per site: of ``round``, or each site's latest released (else latest) run."""
    runs: list[dict[str, Any]] = list(study["runs"])
    if round is not None:
        picked = [r for r in runs if r.get("round", 1) == round]
        if not picked:
            raise HubError(0, f"study {study['id']} has no round {round}")
        return picked
    latest: dict[str, dict[str, Any]] = {}
    for run in sorted(runs, key=lambda r: int(r.get("round", 1))):
        held = latest.get(str(run["site"]))
        if held is None or run["status"] == "released" or held["status"] != "released":
            latest[str(run["site"])] = run
    return list(latest.values())


def _safe_site(site: str) -> bool:
    return bool(site) and all(c.isascii() and (c.isalnum() or c == "_") for c in site)


def _segment(value: str) -> str:
    """A path segment; refuses anything that would change the path."""
    if not value or any(c in value for c in "/?#%\\") or value in (".", ".."):
        raise HubError(0, f"not a valid id: {value!r}")
    return value
