"""The ``phds`` command line.

One click group; each concern registers its own sub-command here. Errors that
a user can fix are printed as one line (``phds: error: ...``) with exit status
2, never as a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from phds_tre import __version__

#: ``--policy FILE``: the site's disclosure policy, shared by every command that checks.
policy_option = click.option(
    "--policy",
    "policy_path",
    metavar="FILE",
    default=None,
    help="Site disclosure policy (TOML). Default: the built-in defaults.",
)


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
        message = " ".join(str(exc).split())
        click.echo(f"phds: error: {message}", err=True)
        raise SystemExit(2) from None
    raise SystemExit(code)


@cli.command("demo")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo-out"),
    show_default=True,
    help="Folder for the synthetic hospitals, each hospital's run and the summary.",
)
@policy_option
def demo_command(out_dir: Path, policy_path: str | None) -> None:
    """Run the local demo: the example study at three synthetic hospitals."""
    from tqdm import tqdm

    from phds_tre.demo import run_demo
    from phds_tre.sdc.policy import PolicyError
    from phds_tre.site_policy import load_site_policy

    try:
        site_policy = load_site_policy(policy_path)
    except PolicyError as exc:
        click.echo(f"phds: error: {exc}", err=True)
        raise SystemExit(2) from None
    bars: dict[str, tqdm[Any]] = {}

    def progress(site: str, done: int, total: int) -> None:
        bar = bars.get(site)
        if bar is None:
            bar = bars[site] = tqdm(total=total, desc=f"{site:<22}", unit="cell", leave=True)
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    result = run_demo(out_dir, site_policy=site_policy, echo=click.echo, progress=progress)
    counts = ", ".join(f"{n} {s}" for s, n in result.counts.items())
    click.echo(f"demo finished: {counts}")


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
        click.echo(f"phds: error: cannot write synthetic data to {out_dir}: {exc}", err=True)
        raise SystemExit(2) from None
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
        click.echo(f"phds: error: {exc}", err=True)
        raise SystemExit(2) from None
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
        click.echo(f"phds: error: {exc}", err=True)
        raise SystemExit(2) from None
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
        click.echo(f"phds: error: {exc}", err=True)
        raise SystemExit(2) from None
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


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="phds")


if __name__ == "__main__":  # pragma: no cover
    main()
