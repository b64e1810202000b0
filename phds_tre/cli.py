"""The ``phds`` command line.

One click group; each concern registers its own sub-command here. Errors that
a user can fix are printed as one line (``phds: error: ...``) with exit status
2, never as a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from phds_tre import __version__


def fail(problem: object) -> NoReturn:
    """Print ``phds: error: ...`` as one line on stderr and exit with status 2 (bad input)."""
    message = " ".join(str(problem).split())
    click.echo(f"phds: error: {message}", err=True)
    raise SystemExit(2)


#: ``--policy FILE``: the site's disclosure policy, shared by every command that checks.
policy_option = click.option(
    "--policy",
    "policy_path",
    metavar="FILE",
    default=None,
    help="Site disclosure policy (TOML). Default: the built-in defaults.",
)


def study_parameter_options(command: Callable[..., None]) -> Callable[..., None]:
    """``-p NAME VALUE`` and ``--site-param SITE NAME VALUE``, shared by bundle and submit."""
    command = click.option(
        "--site-param",
        "site_params",
        nargs=3,
        multiple=True,
        metavar="SITE NAME VALUE",
        help="A parameter for one site, overriding the shared one (repeatable).",
    )(command)
    return click.option(
        "-p",
        "--parameter",
        "parameters",
        nargs=2,
        multiple=True,
        metavar="NAME VALUE",
        help="A parameter for every site (repeatable).",
    )(command)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="phds")
def cli() -> None:
    """phds_tre: federated paediatric analyses with statistical disclosure control."""


@cli.command("check")
@click.argument("notebook", metavar="NOTEBOOK.ipynb")
@policy_option
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Report as a table for people or as a JSON document.",
)
@click.option(
    "--write",
    "write_path",
    metavar="CHECKED.ipynb",
    default=None,
    help=(
        "Also write the notebook with each verdict in its output's metadata "
        "(stream and error outputs, which may not have metadata: in their cell's)."
    ),
)
@click.option(
    "--data",
    "site_dir",
    metavar="SITE_DIR",
    default=None,
    help="The site's data folder: also fail outputs that hold one of its identifiers.",
)
def check_command(
    notebook: str,
    policy_path: str | None,
    fmt: str,
    write_path: str | None,
    site_dir: str | None,
) -> None:
    """Check every output of an executed notebook with the disclosure rules.

    Each output gets a verdict, pass, review or fail, with its reasons; the
    notebook's verdict is its worst output's.

    \b
    Exit status:
      0  every output passes
      3  the worst verdict is review (a site reviewer decides)
      4  the worst verdict is fail (withheld)
      2  bad input: unreadable or malformed notebook, bad policy file,
         or the --write file cannot be written
    """
    # Imported here so that `phds --help` does not load the checker.
    from phds_tre.check.command import CheckInputError, run_check

    try:
        code = run_check(
            notebook,
            policy_path=policy_path,
            fmt=fmt,
            write_path=write_path,
            echo=click.echo,
            site_dir=site_dir,
        )
    except CheckInputError as exc:
        fail(exc)
    raise SystemExit(code)


@cli.command("demo")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo-out"),
    show_default=True,
    help="Report folder (summary.json, report.md, figures/); also holds the hospitals' data.",
)
@policy_option
def demo_command(out_dir: Path, policy_path: str | None) -> None:
    """Run the main job: a hub and three synthetic hospitals on localhost, the demo studies
    submitted, held outputs reviewed, releases verified and combined into a report.

    \b
    Exit status:
      0  every run released and every release verified
      1  the demo finished, but some run did not end released or a release did not verify
      2  bad input (policy), or a part of the network failed
      130  stopped by Ctrl-C (everything it started is stopped too)
    """
    import signal

    from phds_tre.demo import run_demo
    from phds_tre.demo.network import NetworkError
    from phds_tre.sdc.policy import PolicyError
    from phds_tre.site_policy import load_site_policy

    try:
        load_site_policy(policy_path)  # a bad policy is refused before anything starts
    except PolicyError as exc:
        fail(exc)

    def interrupted(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM stops the demo the way Ctrl-C does

    signal.signal(signal.SIGTERM, interrupted)
    try:
        result = run_demo(out_dir, Path(policy_path) if policy_path else None, echo=click.echo)
    except KeyboardInterrupt:
        click.echo("demo stopped: every process it started has been stopped", err=True)
        sys.exit(130)
    except (NetworkError, TimeoutError) as exc:
        fail(exc)
    click.echo("demo finished: " + ("all released and verified" if result.ok else "INCOMPLETE"))
    sys.exit(0 if result.ok else 1)


@cli.command("synth")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Folder to write <site>/<table>.parquet into.",
)
@click.option(
    "--sites",
    type=click.IntRange(1, 5),
    default=3,
    show_default=True,
    help="Number of hospitals (largest first).",
)
@click.option(
    "--persons",
    type=click.IntRange(min=20),
    default=None,
    help="Persons at the largest site; the others keep their proportions. [default: 4000]",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same bytes.")
def synth_command(out_dir: Path, sites: int, persons: int | None, seed: int) -> None:
    """Write synthetic paediatric hospitals as OMOP CDM tables (Parquet).

    Each site gets PICU sepsis stays, congenital heart surgery pathways,
    haemophilia, rare diseases and general paediatrics, in its own case mix.
    """
    from phds_tre.data.synth import format_summaries, timed_generate

    try:
        summaries, seconds = timed_generate(out_dir, sites=sites, persons=persons, seed=seed)
    except OSError as exc:
        fail(f"cannot write synthetic data to {out_dir}: {exc}")
    click.echo(format_summaries(summaries, seconds))
    click.echo(f"written to {out_dir}")


@cli.command("verify")
@click.argument("release_dir", metavar="RELEASE_DIR")
@click.option(
    "--key",
    "key_paths",
    metavar="PUBFILE",
    multiple=True,
    help="Trusted public key of the site (PEM .pub or base64); repeat for several.",
)
def verify_command(release_dir: str, key_paths: tuple[str, ...]) -> None:
    """Verify a release folder: signature, file hashes, no file added or removed.

    Prints one line per problem, or "release verified: N files, signed by
    key <id>". Without --key the signature is checked with the key the
    release carries, which proves integrity but not who signed it.

    \b
    Exit status:
      0  verified
      1  altered (or signed by a key that is not trusted)
      2  bad input: no such folder, not a release, unreadable key file
    """
    from phds_tre.release.verify import run_verify

    raise SystemExit(
        run_verify(
            release_dir,
            list(key_paths),
            echo=click.echo,
            error=lambda message: click.echo(message, err=True),
        )
    )


@cli.command("keygen")
@click.option(
    "--out",
    "out_path",
    metavar="KEYFILE",
    required=True,
    help="Private key file to create (mode 0600); the public key goes to KEYFILE.pub.",
)
def keygen_command(out_path: str) -> None:
    """Create a site signing key (Ed25519) for releases; never overwrites a file."""
    from phds_tre.release.signing import KeyFileError, generate_key, key_id, public_key_path

    try:
        key = generate_key(out_path)
    except KeyFileError as exc:
        fail(exc)
    click.echo(f"private key: {out_path} (keep it secret)")
    click.echo(f"public key:  {public_key_path(out_path)}")
    click.echo(f"key id:      {key_id(key.public_key())}")


@cli.command("run")
@click.argument("notebook", metavar="NOTEBOOK.ipynb", type=click.Path(path_type=Path))
@click.option(
    "--data",
    "site_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="The site's data folder (<table>.parquet), e.g. one made by phds synth.",
)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "-p",
    "--parameter",
    "parameters",
    nargs=2,
    multiple=True,
    metavar="NAME VALUE",
    help="A value for a name in the notebook's parameters cell (repeatable).",
)
@policy_option
@click.option("--site", "site_name", default=None, help="Site name (default: the data folder's).")
@click.option(
    "--key",
    "key_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The site's Ed25519 signing key (default: $PHDS_HOME/keys/<site>.pem, made on first use).",
)
@click.option(
    "--approved",
    is_flag=True,
    help="The site admin approves code-gate findings that need approval.",
)
def run_command(
    notebook: Path,
    site_dir: Path,
    out_dir: Path,
    parameters: tuple[tuple[str, str], ...],
    policy_path: str | None,
    site_name: str | None,
    key_path: Path | None,
    approved: bool,
) -> None:
    """Run a study notebook at one site, as the hospital node would, without the network.

    Validates the parameters, passes the code gate, executes in a fresh
    sandboxed kernel, checks every output and writes OUT/executed.ipynb
    (never leaves the site), OUT/checked.ipynb, OUT/run.json and the signed
    OUT/release/.

    \b
    Exit status:
      0  released: every output was released automatically
      3  some outputs are held for a site reviewer
      4  the run was blocked, awaits approval, failed, or was stopped
      2  bad input (notebook, parameters, data folder or policy)
    """
    from tqdm import tqdm

    from phds_tre.run import RunError, SiteRun
    from phds_tre.sdc.policy import PolicyError
    from phds_tre.site_policy import load_site_policy

    try:
        site_policy = load_site_policy(policy_path)
    except PolicyError as exc:
        fail(exc)
    bar: tqdm[Any] | None = None

    def progress(site: str, done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=f"{site}", unit="cell")
        bar.n = done
        bar.refresh()

    run = SiteRun(
        notebook_path=notebook,
        site_dir=site_dir,
        out_dir=out_dir,
        parameters=dict(parameters),
        site_policy=site_policy,
        site_name=site_name,
        key_path=key_path,
        approved=approved,
        progress=progress,
        echo=click.echo,
    )
    try:
        record = run.run()
    except RunError as exc:
        fail(exc)
    finally:
        if bar is not None:
            bar.close()
    status = record["status"]
    counts = (record.get("release") or {}).get("counts", {})
    summary = ", ".join(f"{n} {state}" for state, n in counts.items()) or "nothing released"
    click.echo(f"run {status}: {summary}; see {out_dir / 'run.json'}")
    if record.get("error"):
        click.echo(f"  {record['error']}")
    raise SystemExit({"released": 0, "awaiting_review": 3}.get(status, 4))


@cli.command("bundle")
@click.argument("notebook", metavar="NOTEBOOK.ipynb", type=click.Path(path_type=Path))
@click.option("--title", required=True, help="The study's title.")
@click.option(
    "--sites",
    required=True,
    metavar="A,B,...",
    help="Target sites, comma separated (names of [a-z0-9_]).",
)
@click.option("--purpose", default="", help="Why the study is run (shown to site admins).")
@click.option(
    "--researcher",
    default=None,
    help="The researcher's name (default: the login name).",
)
@study_parameter_options
@click.option(
    "--key",
    "key_path",
    required=True,
    metavar="KEYFILE",
    help="The researcher's Ed25519 private key (PEM, e.g. made by phds keygen).",
)
@click.option(
    "--out", "out_path", required=True, metavar="STUDY.zip", help="The bundle file to write."
)
def bundle_command(
    notebook: Path,
    title: str,
    sites: str,
    purpose: str,
    researcher: str | None,
    parameters: tuple[tuple[str, str], ...],
    site_params: tuple[tuple[str, str, str], ...],
    key_path: str,
    out_path: str,
) -> None:
    """Make a signed study bundle (notebook + manifest) and print its study id.

    Parameters are checked against the notebook's parameters cell, for
    every site, before anything is written.

    \b
    Exit status:
      0  written
      2  bad input: notebook, parameters, key file or output path
    """
    import getpass

    from phds_tre.bundle import BundleError, build_bundle, write_bundle
    from phds_tre.release.signing import KeyFileError, load_private_key

    per_site: dict[str, dict[str, str]] = {}
    for site, name, value in site_params:
        per_site.setdefault(site, {})[name] = value
    fields = {
        "title": title,
        "purpose": purpose,
        "researcher": researcher or getpass.getuser(),
        "sites": [s.strip() for s in sites.split(",") if s.strip()],
        "parameters": dict(parameters),
        "site_parameters": per_site,
    }
    try:
        key = load_private_key(key_path)
        study = build_bundle(notebook, fields, key)
        write_bundle(study, out_path)
    except (BundleError, KeyFileError) as exc:
        fail(exc)
    click.echo(study.study_id)


@cli.command("bundle-verify")
@click.argument("bundle_path", metavar="STUDY.zip")
@click.option(
    "--key",
    "key_paths",
    metavar="PUBFILE",
    multiple=True,
    help="A researcher public key the site accepted (PEM .pub or base64); repeatable.",
)
def bundle_verify_command(bundle_path: str, key_paths: tuple[str, ...]) -> None:
    """Verify a study bundle: members, notebook hash, manifest, signature, trusted key.

    Without --key the signature is checked with the key the bundle carries,
    which proves integrity but not who signed it.

    \b
    Exit status:
      0  verified
      1  altered, or signed by a key that is not trusted
      2  bad input: unreadable file, not a zip, unreadable key file
    """
    from phds_tre.bundle import BundleError, verify_bundle
    from phds_tre.release.signing import KeyFileError, load_public_key

    try:
        keys = [load_public_key(p) for p in key_paths] or None
        result = verify_bundle(bundle_path, keys)
    except (BundleError, KeyFileError) as exc:
        fail(exc)
    for problem in result.problems:
        click.echo(f"problem: {problem}")
    if not result.ok:
        click.echo(f"bundle NOT verified: {len(result.problems)} problem(s)")
        raise SystemExit(1)
    trust = (
        "a trusted key" if result.trusted else "a key not checked against trusted keys (no --key)"
    )
    click.echo(f"study {result.study_id} verified: signed by {trust} {result.key_id}")


@cli.group("audit")
def audit_group() -> None:
    """The tamper-evident audit trail of a hub or node (a hash-chained SQLite log)."""


@audit_group.command("verify")
@click.argument("db", metavar="DB")
@click.option(
    "--head",
    "head",
    metavar="COUNT:HASH",
    default=None,
    help="An anchor published earlier (e.g. at the hub): also finds a deleted tail.",
)
def audit_verify_command(db: str, head: str | None) -> None:
    """Verify an audit log's hash chain; name every edited, moved, deleted or forged entry.

    Prints "audit log verified: N entries, head <hash>" or one line per
    problem. Without --head a log whose last entries were deleted still
    verifies: publish the head (COUNT:HASH) somewhere else to detect that.

    \b
    Exit status:
      0  verified
      1  tampered: one line per problem
      2  bad input: no such file, not an audit log, malformed --head
    """
    from phds_tre.audit import AuditLog, AuditLogError, parse_anchor

    try:
        anchor = parse_anchor(head) if head is not None else None
        result = AuditLog(db, create=False).verify(expected_head=anchor)
    except (AuditLogError, ValueError) as exc:
        fail(exc)
    if result.ok:
        click.echo(f"audit log verified: {result.count} entries, head {result.head_hash}")
        raise SystemExit(0)
    for problem in result.problems:
        click.echo(problem)
    raise SystemExit(1)


@audit_group.command("show")
@click.argument("db", metavar="DB")
@click.option(
    "--last",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Only the last N entries.",
)
def audit_show_command(db: str, last: int | None) -> None:
    """Print an audit log's entries as a table (without verifying it)."""
    from phds_tre.audit import AuditLog, AuditLogError, format_entries

    try:
        entries = AuditLog(db, create=False).entries(last=last)
    except AuditLogError as exc:
        fail(exc)
    click.echo(format_entries(entries))


@cli.group("hub")
def hub_group() -> None:
    """The hub: the coordinator that stores studies, runs and signed releases."""


_hub_db_option = click.option(
    "--db",
    "db_url",
    default=None,
    metavar="URL",
    help="SQLAlchemy URL (default: sqlite file hub.sqlite in --data; postgresql+psycopg://...).",
)
_hub_data_option = click.option(
    "--data",
    "data_dir",
    default="phds-hub",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for bundles, releases and the hub audit log.",
)


@hub_group.command("serve")
@_hub_db_option
@_hub_data_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8765, show_default=True, type=int, help="Port to listen on.")
def hub_serve_command(db_url: str | None, data_dir: Path, host: str, port: int) -> None:
    """Run the hub's REST service (OpenAPI at /openapi.json)."""
    import uvicorn

    from phds_tre.hub.app import create_app
    from phds_tre.hub.store import default_db_url

    data_dir.mkdir(parents=True, exist_ok=True)
    app = create_app(db_url or default_db_url(data_dir), data_dir)
    uvicorn.run(app, host=host, port=port)


@hub_group.group("admin")
def hub_admin_group() -> None:
    """Bootstrap the hub directly on its database (e.g. the first admin and token)."""


@hub_admin_group.command("create-principal")
@click.argument("name")
@click.option(
    "--role",
    required=True,
    type=click.Choice(["admin", "researcher", "node", "reviewer"]),
    help="What the principal may do.",
)
@click.option("--site", default=None, help="The site of a node or reviewer.")
@click.option(
    "--public-key",
    "public_key_path",
    default=None,
    metavar="FILE",
    help="Ed25519 public key (PEM .pub or base64) of a researcher or node.",
)
@_hub_db_option
@_hub_data_option
def hub_create_principal_command(
    name: str,
    role: str,
    site: str | None,
    public_key_path: str | None,
    db_url: str | None,
    data_dir: Path,
) -> None:
    """Register a principal."""
    from phds_tre.audit import AuditLog
    from phds_tre.hub.auth import create_principal
    from phds_tre.hub.store import Store, default_db_url
    from phds_tre.release.signing import KeyFileError, load_public_key, public_key_b64

    public_key = None
    try:
        if public_key_path:
            public_key = public_key_b64(load_public_key(public_key_path))
        data_dir.mkdir(parents=True, exist_ok=True)
        store = Store(db_url or default_db_url(data_dir))
        principal = create_principal(store, name, role, site, public_key)
    except (KeyFileError, ValueError) as exc:
        fail(exc)
    AuditLog(data_dir / "audit.sqlite").append(
        "cli:hub-admin",
        "key_accepted",
        f"principal:{principal.name}",
        {"event": "principal_created", "role": role, "site": site},
    )
    click.echo(f"principal {principal.id} {principal.name} ({role})")


@hub_admin_group.command("create-token")
@click.argument("name")
@click.option(
    "--expires-in",
    "expires_in_s",
    default=30 * 24 * 3600,
    show_default=True,
    type=int,
    help="Seconds until the token expires.",
)
@_hub_db_option
@_hub_data_option
def hub_create_token_command(
    name: str, expires_in_s: int, db_url: str | None, data_dir: Path
) -> None:
    """Issue a token for a principal and print it (shown this once)."""
    from phds_tre.audit import AuditLog
    from phds_tre.hub.auth import issue_token
    from phds_tre.hub.store import Store, default_db_url

    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        store = Store(db_url or default_db_url(data_dir))
        bearer, token = issue_token(store, name, expires_in_s)
    except (LookupError, ValueError) as exc:
        fail(f"{str(exc).strip(chr(34))}")
    AuditLog(data_dir / "audit.sqlite").append(
        "cli:hub-admin",
        "key_accepted",
        f"token:{token.id}",
        {"event": "token_issued", "principal": name, "expires": token.expires.isoformat()},
    )
    click.echo(bearer)


# -- the researcher's client of the hub (configuration: see phds_tre.client) -------------------


def _client_hub() -> Any:
    """The configured :class:`phds_tre.client.Hub` (bad configuration: exit 2)."""
    from phds_tre.client import ClientConfig, ConfigError, Hub

    try:
        return Hub.from_config(ClientConfig.load())
    except ConfigError as exc:
        fail(exc)


def _progress(run: dict[str, Any]) -> str:
    total = run["cells_total"]
    return f"{run['cells_done']}/{total}" if total else "-"


@cli.command("submit")
@click.argument("notebook", metavar="NOTEBOOK.ipynb", type=click.Path(path_type=Path))
@click.option("--sites", required=True, metavar="A,B,...", help="Target sites, comma separated.")
@click.option("--title", default=None, help="The study's title (default: the notebook's name).")
@click.option("--purpose", default="", help="Why the study is run (shown to site admins).")
@study_parameter_options
def submit_command(
    notebook: Path,
    sites: str,
    title: str | None,
    purpose: str,
    parameters: tuple[tuple[str, str], ...],
    site_params: tuple[tuple[str, str, str], ...],
) -> None:
    """Sign a study bundle for NOTEBOOK with your key and submit it; print the study id.

    The hub, the token and the signing key come from the client configuration
    (PHDS_HUB_URL, PHDS_TOKEN_FILE, PHDS_KEY or ~/.phds/client.toml), never from
    the command line.

    \b
    Exit status:
      0  submitted (or submitted before: the same study id)
      2  bad configuration or input, or the hub refused the study
    """
    import getpass
    import tempfile

    from phds_tre.bundle import BundleError, build_bundle, write_bundle
    from phds_tre.client import ClientConfig, ConfigError, Hub, HubError
    from phds_tre.release.signing import KeyFileError, load_private_key

    per_site: dict[str, dict[str, str]] = {}
    for site, name, value in site_params:
        per_site.setdefault(site, {})[name] = value
    try:
        config = ClientConfig.load()
        if config.key_path is None:
            raise ConfigError("no signing key: set PHDS_KEY or key in the client configuration")
        fields = {
            "title": title or notebook.stem,
            "purpose": purpose,
            "researcher": config.researcher or getpass.getuser(),
            "sites": [s.strip() for s in sites.split(",") if s.strip()],
            "parameters": dict(parameters),
            "site_parameters": per_site,
        }
        bundle = build_bundle(notebook, fields, load_private_key(config.key_path))
        with tempfile.TemporaryDirectory() as tmp, Hub.from_config(config) as hub:
            study = hub.submit(write_bundle(bundle, Path(tmp) / "study.zip"))
    except (BundleError, ConfigError, HubError, KeyFileError) as exc:
        fail(exc)
    click.echo(study["id"])


@cli.command("status")
@click.argument("study_id", metavar="STUDY")
def status_command(study_id: str) -> None:
    """Print a study's runs: one line per site with status, cells done and last update.

    \b
    Exit status:
      0  shown
      2  bad configuration, or the hub refused
    """
    from phds_tre.client import HubError

    try:
        with _client_hub() as hub:
            study = hub.study(study_id)
    except HubError as exc:
        fail(exc)
    click.echo(f"study {study['id']}: {study['title']}")
    # A ROUND column once the study has follow-up rounds.
    rounds = study.get("rounds", 1) > 1
    rows = [
        (
            *((str(run.get("round", 1)),) if rounds else ()),
            run["site"],
            run["status"],
            _progress(run),
            str(run["updated"])[:19].replace("T", " "),
        )
        for run in study["runs"]
    ]
    header = (*(("ROUND",) if rounds else ()), "SITE", "STATUS", "CELLS", "UPDATED (UTC)")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        click.echo(
            "  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True))
            + "  "
            + row[-1]
        )


@cli.command("watch")
@click.argument("study_id", metavar="STUDY")
@click.option(
    "--interval",
    default=2.0,
    show_default=True,
    type=click.FloatRange(min=0.05),
    help="Seconds between polls.",
)
@click.option(
    "--timeout",
    default=None,
    type=click.FloatRange(min=0),
    help="Give up after this many seconds (default: never).",
)
def watch_command(study_id: str, interval: float, timeout: float | None) -> None:
    """Show a progress bar per site until every run has finished.

    \b
    Exit status:
      0  every run released
      2  bad configuration, or the hub refused
      3  timed out with runs unfinished (e.g. awaiting output review)
      4  a run failed, was rejected or was cancelled
    """
    import sys
    import time

    from tqdm import tqdm

    from phds_tre.client import FINISHED, HubError

    deadline = None if timeout is None else time.monotonic() + timeout
    bars: dict[str, Any] = {}
    try:
        with _client_hub() as hub:
            while True:
                study = hub.study(study_id)
                runs = study["runs"]
                for position, run in enumerate(runs):
                    site = run["site"]
                    if study.get("rounds", 1) > 1:
                        site = f"{site} round {run.get('round', 1)}"
                    if run["id"] not in bars:
                        bars[run["id"]] = tqdm(
                            total=1,
                            position=position,
                            file=sys.stderr,
                            leave=True,
                            unit="cell",
                            dynamic_ncols=True,
                        )
                    bar = bars[run["id"]]
                    total = max(run["cells_total"], 1)
                    done = run["cells_done"] if run["cells_total"] else 0
                    if run["status"] == "released":
                        done = total
                    bar.total = total
                    bar.n = min(done, total)
                    bar.set_description(f"{site} {run['status']}", refresh=False)
                    bar.refresh()
                finished = all(run["status"] in FINISHED for run in runs)
                if finished or (deadline is not None and time.monotonic() >= deadline):
                    break
                time.sleep(
                    interval
                    if deadline is None
                    else max(0.0, min(interval, deadline - time.monotonic()))
                )
    except HubError as exc:
        for bar in bars.values():
            bar.close()
        fail(exc)
    for bar in bars.values():
        bar.close()
    for run in runs:
        label = f"{run['site']} round {run['round']}" if study.get("rounds", 1) > 1 else run["site"]
        click.echo(f"{label}: {run['status']} ({_progress(run)} cells)")
    statuses = {run["status"] for run in runs}
    if statuses & {"failed", "rejected", "cancelled"}:
        raise SystemExit(4)
    if not finished:
        waiting = sorted(run["site"] for run in runs if run["status"] == "awaiting_review")
        note = f"; awaiting output review at {', '.join(waiting)}" if waiting else ""
        click.echo(f"phds: timed out with runs unfinished{note}", err=True)
        raise SystemExit(3)


@cli.command("results")
@click.argument("study_id", metavar="STUDY")
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the releases and results.json.",
)
@click.option(
    "--site-key",
    "site_keys",
    nargs=2,
    multiple=True,
    metavar="SITE KEYFILE",
    help="A site's trusted public key (repeatable); given any, every release must be signed by its site's key.",
)
@click.option(
    "--round",
    "round_number",
    type=click.IntRange(min=1),
    default=None,
    help="One round of the study (default: each site's latest released round).",
)
def results_command(
    study_id: str, out_dir: Path, site_keys: tuple[tuple[str, str], ...], round_number: int | None
) -> None:
    """Download and verify every released run into OUT/<site>/release/, with OUT/results.json.

    \b
    Exit status:
      0  every release verified
      1  a release failed verification (altered, or signed by an untrusted key)
      2  bad configuration or key file, or the hub refused
    """
    from phds_tre.client import HubError
    from phds_tre.release.signing import KeyFileError, load_public_key

    trusted: dict[str, list[Any]] | None = None
    try:
        if site_keys:
            trusted = {}
            for site, path in site_keys:
                trusted.setdefault(site, []).append(load_public_key(path))
        with _client_hub() as hub:
            summary = hub.results(study_id, out_dir, trusted, round=round_number)
    except (HubError, KeyFileError, OSError) as exc:
        fail(exc)
    for site, entry in summary["sites"].items():
        if not entry["released"]:
            click.echo(f"{site}: {entry['status']} (no release)")
        elif entry["verified"]:
            later = f" (round {entry['round']})" if entry["round"] > 1 else ""
            click.echo(
                f"{site}: verified, {entry['files']} files, key {entry['key_id']} -> "
                f"{entry['path']}{later}"
            )
        else:
            click.echo(f"{site}: NOT VERIFIED: {'; '.join(entry['problems'])}")
    click.echo(f"summary: {out_dir / 'results.json'}")
    if not summary["ok"]:
        raise SystemExit(1)


@cli.command("round")
@click.argument("study_id", metavar="STUDY")
@click.option(
    "--sites", default=None, metavar="A,B,...", help="Target sites (default: all the study's)."
)
@study_parameter_options
def round_command(
    study_id: str,
    sites: str | None,
    parameters: tuple[tuple[str, str], ...],
    site_params: tuple[tuple[str, str, str], ...],
) -> None:
    """Run the study's notebook again with new parameters (a signed follow-up round).

    Prints the round number. Each site runs the round without fresh approval only if
    its policy says ``[approval] later_rounds = "auto"`` and round 1 ran there.

    \b
    Exit status:
      0  submitted
      2  bad configuration or parameter, or the hub refused the round
    """
    from phds_tre.client import ClientConfig, ConfigError, Hub, HubError
    from phds_tre.release.signing import KeyFileError, load_private_key

    per_site: dict[str, dict[str, str]] = {}
    for site, name, value in site_params:
        per_site.setdefault(site, {})[name] = value
    try:
        config = ClientConfig.load()
        if config.key_path is None:
            raise ConfigError("no signing key: set PHDS_KEY or key in the client configuration")
        key = load_private_key(config.key_path)
        targets = [s.strip() for s in sites.split(",") if s.strip()] if sites else None
        with Hub.from_config(config) as hub:
            found = hub.submit_round(
                study_id, key, dict(parameters), site_parameters=per_site, sites=targets
            )
    except (ConfigError, HubError, KeyFileError) as exc:
        fail(exc)
    click.echo(f"round {found['round']} of study {study_id}: {', '.join(found['sites'])}")


@cli.command("cancel")
@click.argument("study_id", metavar="STUDY")
def cancel_command(study_id: str) -> None:
    """Cancel every unfinished run of a study; print each site's status.

    \b
    Exit status:
      0  cancelled (finished runs keep their status)
      2  bad configuration, or the hub refused
    """
    from phds_tre.client import HubError

    try:
        with _client_hub() as hub:
            study = hub.cancel(study_id)
    except HubError as exc:
        fail(exc)
    for run in study["runs"]:
        click.echo(f"{run['site']}: {run['status']}")


@cli.group("node")
def node_group() -> None:
    """The hospital node: pulls runs from the hub (outbound connections only)."""


_node_work_option = click.option(
    "--work",
    "work_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("node-work"),
    show_default=True,
    help="The node's working folder (state, audit log, runs).",
)


@node_group.command("serve")
@click.option("--hub", "hub_url", required=True, help="The hub's URL, e.g. https://hub.example.")
@click.option("--site", required=True, help="This site's name, as registered at the hub.")
@click.option(
    "--data",
    "site_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="The site's data folder (<table>.parquet).",
)
@policy_option
@_node_work_option
@click.option(
    "--key",
    "key_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The site's signing key (default: $PHDS_HOME/keys/<site>.pem, made on first use).",
)
@click.option(
    "--researcher-key",
    "researcher_keys",
    multiple=True,
    metavar="PUB",
    help="A researcher public key the site admin accepted (repeatable).",
)
@click.option(
    "--token-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="File holding the node's hub token (default: $PHDS_NODE_TOKEN).",
)
@click.option(
    "--review-port",
    type=click.IntRange(1, 65535),
    default=None,
    help="Also serve the review API (for JupyterLab) on 127.0.0.1:PORT.",
)
def node_serve_command(
    hub_url: str,
    site: str,
    site_dir: Path,
    policy_path: str | None,
    work_dir: Path,
    key_path: Path | None,
    researcher_keys: tuple[str, ...],
    token_file: Path | None,
    review_port: int | None,
) -> None:
    """Serve runs for this site until Ctrl-C (long-polls the hub; retries while it is away)."""
    import logging
    import os

    from phds_tre.node import NodeAgent
    from phds_tre.release.signing import KeyFileError, load_public_key
    from phds_tre.run import default_key_path
    from phds_tre.sdc.policy import PolicyError
    from phds_tre.site_policy import load_site_policy

    token = (
        token_file.read_text(encoding="utf-8").strip()
        if token_file
        else os.environ.get("PHDS_NODE_TOKEN", "")
    )
    if not token:
        fail("no hub token: set PHDS_NODE_TOKEN or --token-file")
    try:
        site_policy = load_site_policy(policy_path)
        keys = [load_public_key(k) for k in researcher_keys]
    except (PolicyError, KeyFileError) as exc:
        fail(exc)
    if not keys:
        click.echo("phds: warning: no --researcher-key: every bundle will be rejected", err=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    agent = NodeAgent(
        hub_url,
        token,
        site,
        site_dir,
        site_policy,
        work_dir,
        key_path or default_key_path(site),
        keys,
    )
    review_server = None
    if review_port is not None:
        from phds_tre.node.api import serve_review_api

        try:
            review_server = serve_review_api(work_dir, review_port)
        except RuntimeError as exc:
            agent.close()
            fail(f"{exc} (port {review_port} taken?)")
        click.echo(f"node {site}: review API on http://127.0.0.1:{review_server.port}")
    click.echo(f"node {site}: serving runs from {hub_url} (Ctrl-C stops)")
    try:
        agent.run_forever()
    except KeyboardInterrupt:
        click.echo("node: stopping")
    finally:
        agent.close()
        if review_server is not None:
            review_server.stop()


@cli.group("site")
def site_group() -> None:
    """The site admin: approve or reject runs the code gate holds for approval."""


_site_admin_option = click.option(
    "--admin",
    envvar="PHDS_SITE_ADMIN",
    default="",
    help="Who approves (recorded in the audit log; default: $PHDS_SITE_ADMIN).",
)


@site_group.command("approve")
@click.argument("run_id", metavar="RUN")
@click.option("--comment", default="", help="Why (recorded in the audit log).")
@_site_admin_option
@_node_work_option
def site_approve_command(run_id: str, comment: str, admin: str, work_dir: Path) -> None:
    """Approve a run awaiting the site's approval; the serving node runs it."""
    from phds_tre.node import StateError, approve_run

    try:
        approve_run(work_dir, run_id, comment, admin=admin)
    except (StateError, ValueError) as exc:
        fail(exc)
    click.echo(f"run {run_id} approved by {admin}")


@site_group.command("reject")
@click.argument("run_id", metavar="RUN")
@click.option("--comment", default="", help="Why (sent to the hub and the researcher).")
@_site_admin_option
@_node_work_option
def site_reject_command(run_id: str, comment: str, admin: str, work_dir: Path) -> None:
    """Reject a run awaiting the site's approval; the serving node tells the hub."""
    from phds_tre.node import StateError, reject_run

    try:
        reject_run(work_dir, run_id, comment, admin=admin)
    except (StateError, ValueError) as exc:
        fail(exc)
    click.echo(f"run {run_id} rejected by {admin}")


@cli.group("review")
def review_group() -> None:
    """The site reviewer: held outputs, decisions, release (the review API does the same)."""


_reviewer_option = click.option(
    "--reviewer",
    envvar="PHDS_REVIEWER",
    default="",
    help="Who decides (recorded; default: $PHDS_REVIEWER).",
)


def _review_queue(work_dir: Path) -> Any:
    from phds_tre.node.review import ReviewError, ReviewQueue

    try:
        return ReviewQueue(work_dir)
    except ReviewError as exc:
        fail(exc)


@review_group.command("list")
@click.option("--all", "include_released", is_flag=True, help="Also runs already released.")
@_node_work_option
def review_list_command(include_released: bool, work_dir: Path) -> None:
    """Runs whose outputs are held for review."""
    runs = _review_queue(work_dir).list(include_released=include_released)
    if not runs:
        click.echo("no run awaiting review")
    for r in runs:
        click.echo(
            f"{r.run_id}  {r.status:15}  {r.decided}/{r.held} decided  "
            f"study {r.study_id[:12]}  author {r.researcher}"
        )


@review_group.command("show")
@click.argument("run_id", metavar="RUN")
@_node_work_option
def review_show_command(run_id: str, work_dir: Path) -> None:
    """Each held output: verdict, the rules' reasons, kind, content, decisions so far."""
    from phds_tre.node.review import ReviewError, format_review

    try:
        click.echo(format_review(_review_queue(work_dir).show(run_id)))
    except ReviewError as exc:
        fail(exc)


@review_group.command("decide")
@click.argument("run_id", metavar="RUN")
@click.argument("output", metavar="OUTPUT")
@click.argument("decision", type=click.Choice(["approve", "reject", "redact"]))
@click.option("--comment", default="", help="Why (required for some decisions).")
@_reviewer_option
@_node_work_option
def review_decide_command(
    run_id: str, output: str, decision: str, comment: str, reviewer: str, work_dir: Path
) -> None:
    """Decide one held output (OUTPUT is CELL:OUTPUT, e.g. 3:0); changeable until release."""
    from phds_tre.node.review import ReviewError

    try:
        _review_queue(work_dir).decide(run_id, output, decision, comment, reviewer)
    except ReviewError as exc:
        fail(exc)
    click.echo(f"run {run_id} output {output}: {decision} by {reviewer}")


@review_group.command("release")
@click.argument("run_id", metavar="RUN")
@click.option("--comment", default="", help="A note for the researcher (in the manifest).")
@_reviewer_option
@_node_work_option
def review_release_command(run_id: str, comment: str, reviewer: str, work_dir: Path) -> None:
    """Release a run whose held outputs are all decided; the node signs and uploads it."""
    from phds_tre.node.review import ReviewError

    try:
        _review_queue(work_dir).release(run_id, reviewer, comment)
    except ReviewError as exc:
        fail(exc)
    click.echo(f"run {run_id} released by {reviewer}; the node signs and uploads it")


@review_group.command("token")
@click.argument("reviewer", metavar="NAME")
@_node_work_option
def review_token_command(reviewer: str, work_dir: Path) -> None:
    """Make a review API token for reviewer NAME (printed once; only its hash is kept)."""
    from phds_tre.node.api import issue_reviewer_token

    _review_queue(work_dir)  # a node working folder, not a typo
    try:
        click.echo(issue_reviewer_token(work_dir, reviewer))
    except ValueError as exc:
        fail(exc)


@review_group.command("revoke-token")
@click.argument("token_id", metavar="TOKEN_ID")
@_node_work_option
def review_revoke_token_command(token_id: str, work_dir: Path) -> None:
    """Revoke a review API token (TOKEN_ID: the 16 hex digits after phdsr_)."""
    from phds_tre.node.api import revoke_reviewer_token

    _review_queue(work_dir)
    try:
        revoke_reviewer_token(work_dir, token_id)
    except ValueError as exc:
        fail(exc)
    click.echo(f"token {token_id} revoked")


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="phds")


if __name__ == "__main__":  # pragma: no cover
    main()
