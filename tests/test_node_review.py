"""The node's review queue: held outputs, the decision rules, release, CLI, and end to end.

Unit tests run a real :class:`~phds_tre.run.SiteRun` (gate, check with the site's
identifier index, release) whose kernel is replaced by canned outputs: the layer under
test is the review queue, not execution. The end-to-end test runs everything for real:
hub on loopback, NodeAgent, kernel, reviewer, researcher download.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import io
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import httpx
import nbformat
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nbformat.v4 import new_code_cell, new_notebook, new_output
from PIL import Image

from phds_tre.audit import AuditLog
from phds_tre.bundle import build_bundle
from phds_tre.cli import cli
from phds_tre.node.agent import zip_release
from phds_tre.node.review import ReviewError, ReviewQueue, build_reviewed_release, open_review
from phds_tre.node.state import NodeState
from phds_tre.release.signing import generate_key, load_public_key, public_key_path
from phds_tre.release.verify import verify_release
from phds_tre.run import SiteRun
from phds_tre.site_policy import SitePolicy

AUTHOR = "dr_author"
REVIEWER = "rev_maria"


def _png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def record_number(site_dir: Path) -> str:
    """A real record number of the site (what must never be released)."""
    query = f"SELECT person_source_value FROM '{site_dir}/person.parquet' LIMIT 1"
    return str(duckdb.sql(query).fetchall()[0][0])


def canned_outputs(site_dir: Path) -> list[dict[str, Any]]:
    """One output per cell: review, pass, image (held), not understood (fail), identifier."""
    return [
        new_output("stream", name="stdout", text="children with the rare condition: 7\n"),
        new_output("stream", name="stdout", text="cohort built\n"),
        new_output("display_data", data={"image/png": _png(), "text/plain": "<Figure>"}),
        new_output("display_data", data={"application/x-weird": "zz"}),
        new_output("stream", name="stdout", text=f"first child: {record_number(site_dir)}\n"),
    ]


@dataclass
class _CannedRun(SiteRun):
    """A SiteRun whose kernel is replaced by canned outputs (everything else is real)."""

    outputs: list[dict[str, Any]] | None = None

    def execute(self, nb: nbformat.NotebookNode) -> nbformat.NotebookNode | None:
        executed = copy.deepcopy(nb)
        for cell, output in zip(executed.cells, self.outputs or [], strict=False):
            cell.outputs = [nbformat.from_dict(output)]
            cell.execution_count = 1
        self.record["execution"] = {"status": "ok"}
        nbformat.write(executed, self.out_dir / "executed.ipynb")
        return executed


@dataclass
class Held:
    """A node working folder with one run in the review queue."""

    work: Path
    run_id: str
    site_dir: Path
    key_path: Path
    policy: SitePolicy

    @property
    def queue(self) -> ReviewQueue:
        return ReviewQueue(self.work)

    @property
    def state(self) -> NodeState:
        return NodeState(self.work / "node.sqlite")


def make_held_run(
    tmp: Path,
    site_dir: Path,
    outputs: list[dict[str, Any]],
    *,
    run_id: str = "run1",
    researcher: str = AUTHOR,
    policy: SitePolicy | None = None,
) -> Held:
    """Claim, run (canned kernel) and hold a run the way the agent does."""
    policy = policy or SitePolicy()
    work = tmp / "node"
    state = NodeState(work / "node.sqlite")
    run_dir = work / "runs" / run_id
    run_dir.mkdir(parents=True)
    notebook = run_dir / "notebook.ipynb"
    nbformat.write(
        new_notebook(
            cells=[new_code_cell(f"print({i})") for i in range(len(outputs))],
            metadata={"kernelspec": {"name": "python3", "display_name": "Python 3"}},
        ),
        notebook,
    )
    bundle = build_bundle(
        notebook,
        {"title": "T", "researcher": researcher, "sites": [site_dir.name]},
        Ed25519PrivateKey.generate(),
    )
    (run_dir / "bundle.zip").write_bytes(bundle.to_bytes())
    key_path = tmp / "site.pem"
    if not key_path.exists():
        generate_key(key_path)
    local, _ = state.claim(run_id, bundle.study_id, run_dir / "out", {})
    state.move(run_id, "running", attempt=True)
    record = _CannedRun(
        notebook_path=notebook,
        site_dir=site_dir,
        out_dir=run_dir / "out",
        site_policy=policy,
        site_name=site_dir.name,
        key_path=key_path,
        study_id=bundle.study_id,
        echo=lambda _line: None,
        outputs=outputs,
    ).run()
    assert record["status"] == "awaiting_review", record
    open_review(state, local, "held")
    return Held(work, run_id, site_dir, key_path, policy)


@pytest.fixture
def held(tmp_path: Path, site_dir: Path) -> Held:
    return make_held_run(tmp_path, site_dir, canned_outputs(site_dir))


def _refused(status: int, call: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(ReviewError) as info:
        call(*args, **kwargs)
    assert info.value.status == status, info.value.reason
    return info.value.reason


# -- showing ----------------------------------------------------------------------------


def test_show_gives_each_held_output_its_verdict_reasons_kind_and_content(held: Held) -> None:
    review = held.queue.show(held.run_id)
    by_key = {o.output: o for o in review.outputs}
    assert [o.output for o in review.outputs if o.needs_decision] == ["0:0", "2:0"]
    count = by_key["0:0"]
    assert count.verdict == "review" and count.kind == "stream"
    assert "children with the rare condition: 7" in count.content
    assert any("numbers in free text" in r for r in count.reasons)
    image = by_key["2:0"]
    png = Path(image.files[0])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(png) in image.content
    assert by_key["4:0"].identifier_found and by_key["4:0"].verdict == "fail"
    assert review.summary.researcher == AUTHOR and review.summary.held == 2
    assert [r.run_id for r in held.queue.list()] == [held.run_id]


def test_cli_show_prints_content_and_decisions(held: Held) -> None:
    runner = CliRunner()
    env = {"PHDS_REVIEWER": REVIEWER}
    work = str(held.work)
    result = runner.invoke(
        cli,
        ["review", "decide", held.run_id, "0:0", "approve", "--comment", "ok", "--work", work],
        env=env,
    )
    assert result.exit_code == 0, result.output
    shown = runner.invoke(cli, ["review", "show", held.run_id, "--work", work])
    assert shown.exit_code == 0, shown.output
    assert "output 0:0  verdict review  stream" in shown.output
    assert "children with the rare condition: 7" in shown.output
    assert f"decision: approve by {REVIEWER}" in shown.output
    assert "image/png image:" in shown.output and "(none yet)" in shown.output
    listed = runner.invoke(cli, ["review", "list", "--work", work])
    assert f"{held.run_id}  awaiting_review  1/2 decided" in listed.output


# -- the rules, one by one ---------------------------------------------------------------


def test_any_decision_on_a_review_verdict_needs_a_comment(held: Held) -> None:
    for decision in ("approve", "reject", "redact"):
        reason = _refused(422, held.queue.decide, held.run_id, "0:0", decision, "", REVIEWER)
        assert "comment is required" in reason and "verdict review" in reason
        _refused(422, held.queue.decide, held.run_id, "0:0", decision, "   ", REVIEWER)
    stored = held.queue.decide(held.run_id, "0:0", "redact", "a count of 7", REVIEWER)
    assert stored.decision == "redact" and stored.comment == "a count of 7"


def test_approving_a_fail_needs_a_comment(held: Held) -> None:
    reason = _refused(422, held.queue.decide, held.run_id, "3:0", "approve", "", REVIEWER)
    assert "approving an output that failed" in reason
    held.queue.decide(held.run_id, "3:0", "approve", "known harmless format", REVIEWER)
    # Rejecting or redacting a fail needs no comment.
    held.queue.decide(held.run_id, "3:0", "reject", "", REVIEWER)


def test_rejecting_a_pass_needs_a_comment(held: Held) -> None:
    reason = _refused(422, held.queue.decide, held.run_id, "1:0", "reject", "", REVIEWER)
    assert "rejecting an output that passed" in reason
    held.queue.decide(held.run_id, "1:0", "approve", "", REVIEWER)  # approving a pass: no comment
    held.queue.decide(held.run_id, "1:0", "reject", "not part of the protocol", REVIEWER)


def test_an_identifier_of_the_site_can_never_be_approved(held: Held) -> None:
    reason = _refused(403, held.queue.decide, held.run_id, "4:0", "approve", "I am sure", REVIEWER)
    assert "identifier from the site's data" in reason
    assert held.state.decisions(held.run_id) == {}
    held.queue.decide(held.run_id, "4:0", "reject", "", REVIEWER)


def test_the_author_cannot_review_their_own_study(held: Held) -> None:
    for name in (AUTHOR, " DR_Author "):
        reason = _refused(403, held.queue.decide, held.run_id, "0:0", "approve", "x", name)
        assert "authors cannot review their own study" in reason
        _refused(403, held.queue.release, held.run_id, name)


def test_a_reviewer_name_is_required(held: Held) -> None:
    reason = _refused(422, held.queue.decide, held.run_id, "0:0", "approve", "x", " ")
    assert "PHDS_REVIEWER" in reason


def test_unknown_runs_outputs_and_decisions_are_refused(held: Held) -> None:
    _refused(404, held.queue.show, "nope")
    _refused(404, held.queue.decide, held.run_id, "9:0", "reject", "", REVIEWER)
    assert "CELL:OUTPUT" in _refused(
        422, held.queue.decide, held.run_id, "0", "reject", "", REVIEWER
    )
    _refused(422, held.queue.decide, held.run_id, "0:0", "publish", "x", REVIEWER)


def test_decisions_are_recorded_and_can_change_until_release(held: Held) -> None:
    held.queue.decide(held.run_id, "0:0", "approve", "fine at 7", REVIEWER)
    held.queue.decide(held.run_id, "0:0", "reject", "on reflection, too small", "rev_jordi")
    stored = held.state.decisions(held.run_id)["0:0"]
    assert (stored.decision, stored.reviewer) == ("reject", "rev_jordi")
    entries = [
        e for e in AuditLog(held.work / "audit.sqlite").entries() if e.action == "review_decision"
    ]
    assert [(e.actor, e.details["decision"], e.details["comment"]) for e in entries] == [
        (f"reviewer:{REVIEWER}", "approve", "fine at 7"),
        ("reviewer:rev_jordi", "reject", "on reflection, too small"),
    ]
    held.queue.decide(held.run_id, "2:0", "redact", "figure not needed", REVIEWER)
    held.queue.release(held.run_id, REVIEWER)
    assert "already released" in _refused(409, held.queue.release, held.run_id, REVIEWER)
    reason = _refused(409, held.queue.decide, held.run_id, "0:0", "approve", "x", REVIEWER)
    assert "decisions are closed" in reason


def test_release_is_refused_while_a_held_output_is_undecided(held: Held) -> None:
    held.queue.decide(held.run_id, "0:0", "approve", "fine", REVIEWER)
    reason = _refused(409, held.queue.release, held.run_id, REVIEWER)
    assert "undecided output(s): 2:0" in reason
    assert held.state.get(held.run_id).status == "awaiting_review"  # type: ignore[union-attr]


def test_release_rebuilds_and_signs_with_the_decisions_once(held: Held) -> None:
    held.queue.decide(held.run_id, "0:0", "approve", "7 is fine for this rare disease", REVIEWER)
    held.queue.decide(held.run_id, "2:0", "reject", "raw image", REVIEWER)
    held.queue.release(held.run_id, REVIEWER, comment="checked")
    run = held.state.get(held.run_id)
    assert run is not None and run.status == "reviewed"
    path = build_reviewed_release(held.state, run, held.policy, held.site_dir, held.key_path)
    result = verify_release(path, [load_public_key(public_key_path(held.key_path))])
    assert result.ok, result.problems
    released = json.loads((path / "release.ipynb").read_text(encoding="utf-8"))
    texts = [json.dumps(c.get("outputs")) for c in released["cells"]]
    assert "children with the rare condition: 7" in texts[0]
    assert "rejected by the site's reviewer" in texts[2]
    assert "first child" not in texts[4]
    manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["decisions"]["0:0"]["reviewer"] == REVIEWER
    assert manifest["decisions"]["0:0"]["comment"] == "7 is fine for this rare disease"
    assert manifest["review"]["released_by"] == REVIEWER
    items = {(i["cell_index"], i["output_index"]): i for i in manifest["release"]["outputs"]}
    assert items[(0, 0)]["state"] == "released" and items[(0, 0)]["decision"] == "approve"
    record = json.loads((run.out_dir / "run.json").read_text(encoding="utf-8"))
    assert record["status"] == "released" and record["reviewed_release"]["counts"]["held"] == 0
    # A second build (after a crash before the upload) returns the signed release unchanged.
    before = {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}
    again = build_reviewed_release(held.state, run, held.policy, held.site_dir, held.key_path)
    assert again == path and before == {
        p.name: p.read_bytes() for p in path.iterdir() if p.is_file()
    }


# -- the CLI ----------------------------------------------------------------------------


def test_cli_decide_without_a_needed_comment_is_a_one_line_error(held: Held) -> None:
    result = CliRunner().invoke(
        cli,
        ["review", "decide", held.run_id, "0:0", "approve", "--work", str(held.work)],
        env={"PHDS_REVIEWER": REVIEWER},
    )
    assert result.exit_code == 2
    assert result.output.startswith("phds: error: a comment is required")
    assert result.output.count("\n") == 1


def test_cli_release_needs_every_held_output_decided(held: Held) -> None:
    runner = CliRunner()
    work = ["--work", str(held.work)]
    env = {"PHDS_REVIEWER": REVIEWER}
    result = runner.invoke(cli, ["review", "release", held.run_id, *work], env=env)
    assert result.exit_code == 2 and "undecided output(s): 0:0, 2:0" in result.output
    for key in ("0:0", "2:0"):
        runner.invoke(
            cli, ["review", "decide", held.run_id, key, "redact", "--comment", "no", *work], env=env
        )
    result = runner.invoke(cli, ["review", "release", held.run_id, *work], env=env)
    assert result.exit_code == 0, result.output
    assert held.state.get(held.run_id).status == "reviewed"  # type: ignore[union-attr]


def test_site_approve_and_reject_record_the_admin(tmp_path: Path) -> None:
    work = tmp_path / "node"
    state = NodeState(work / "node.sqlite")
    for run_id in ("a", "b"):
        state.claim(run_id, "s" * 64, work / "runs" / run_id / "out", {})
        state.move(run_id, "running")
        state.move(run_id, "awaiting_approval")
    runner = CliRunner()
    missing = runner.invoke(cli, ["site", "approve", "a", "--work", str(work)], env={})
    assert missing.exit_code == 2 and "PHDS_SITE_ADMIN" in missing.output
    ok = runner.invoke(
        cli,
        [
            "site",
            "approve",
            "a",
            "--comment",
            "file access is to the run folder",
            "--work",
            str(work),
        ],
        env={"PHDS_SITE_ADMIN": "admin_anna"},
    )
    assert ok.exit_code == 0, ok.output
    no = runner.invoke(
        cli,
        ["site", "reject", "b", "--admin", "admin_joan", "--comment", "no", "--work", str(work)],
    )
    assert no.exit_code == 0, no.output
    assert state.get("a").status == "approved"  # type: ignore[union-attr]
    assert state.get("b").status == "rejected"  # type: ignore[union-attr]
    entries = AuditLog(work / "audit.sqlite").entries()
    assert [(e.actor, e.action) for e in entries] == [
        ("site-admin:admin_anna", "approval"),
        ("site-admin:admin_joan", "rejection"),
    ]
    assert entries[0].details["comment"] == "file access is to the run folder"
    old = runner.invoke(cli, ["node", "approve", "a", "--work", str(work)])
    assert old.exit_code != 0  # one way to do it: `phds site approve`


# -- node state migration ---------------------------------------------------------------

_V0_SCHEMA = """
CREATE TABLE runs (
    run_id TEXT PRIMARY KEY, study_id TEXT NOT NULL, status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, out_dir TEXT NOT NULL,
    parameters TEXT NOT NULL DEFAULT '{}', detail TEXT NOT NULL DEFAULT '',
    reported INTEGER NOT NULL DEFAULT 0, release_sha256 TEXT,
    claimed_at TEXT NOT NULL, updated_at TEXT NOT NULL, uploaded_at TEXT
)
"""


def test_a_version_0_state_file_is_migrated_forward(tmp_path: Path) -> None:
    path = tmp_path / "node.sqlite"
    with sqlite3.connect(path) as db:
        db.execute(_V0_SCHEMA)
        rows = [
            ("held", "awaiting_review", "t1", "2024-01-01"),
            ("done", "uploaded", "t2", "2024-01-01"),
            ("waiting", "awaiting_approval", None, None),
        ]
        for run_id, status, sha, uploaded in rows:
            db.execute(
                "INSERT INTO runs (run_id, study_id, status, out_dir, claimed_at, updated_at, "
                "release_sha256, uploaded_at) VALUES (?, 's', ?, '/x', 'c', 'u', ?, ?)",
                (run_id, status, sha, uploaded),
            )
    state = NodeState(path)
    assert state.get("held").status == "uploaded"  # type: ignore[union-attr]
    assert "before the review queue" in state.get("held").detail  # type: ignore[union-attr]
    assert state.get("held").release_sha256 == "t1"  # type: ignore[union-attr]
    assert state.get("done").status == "uploaded"  # type: ignore[union-attr]
    assert state.get("waiting").status == "awaiting_approval"  # type: ignore[union-attr]
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"runs", "reviews", "decisions", "reviewer_tokens"} <= tables
    NodeState(path)  # opening again changes nothing
    assert state.get("held").status == "uploaded"  # type: ignore[union-attr]


# -- end to end: real hub, node agent, kernel, reviewer, researcher -----------------------

HELD_STUDY = (
    "from phds_tre import data, sdc\n"
    "person = data.connect().table('person')\n"
    "person = person[2024 - person.year_of_birth >= min_age]\n"
    "person['sex'] = person.gender_concept_id.map({8507: 'M', 8532: 'F'})\n"
    "person['band'] = (person.year_of_birth >= 2015).map({True: 'new', False: 'old'})",
    "sdc.crosstab(person.sex, person.band)",
    "print('children born in 2023:', int((person.year_of_birth == 2023).sum()))",
)


@pytest.mark.slow
def test_held_run_is_uploaded_once_after_review(site_dir: Path, tmp_path: Path) -> None:
    import zipfile

    from test_node_agent import _make_hub

    from phds_tre.release.verify import verify_release as verify

    hub = _make_hub(tmp_path, site_dir.name)
    hub.start()
    work = tmp_path / "node"
    headers = {"Authorization": f"Bearer {hub.researcher}"}
    try:
        study = hub.submit(*HELD_STUDY)
        with hub.agent(work, data_dir=site_dir) as agent:
            run_id = agent.run_once(wait=2)
            assert run_id is not None
            run = hub.run(study)
            assert run["status"] == "awaiting_review", run["history"]
            assert httpx.get(f"{hub.url}/runs/{run_id}/release", headers=headers).status_code == 409
            assert "release_uploaded" not in [
                e.details.get("event") for e in AuditLog(work / "audit.sqlite").entries()
            ]

            queue = ReviewQueue(work)
            review = queue.show(run_id)
            # Cells: parameters, papermill's injected parameters, setup, crosstab, print.
            held_keys = [o.output for o in review.outputs if o.needs_decision]
            assert held_keys == ["4:0"], [(o.output, o.verdict, o.release) for o in review.outputs]
            assert "children born in 2023:" in review.outputs[-1].content
            crosstab = next(o for o in review.outputs if o.output == "3:0")
            assert (crosstab.verdict, crosstab.release) == ("pass", "released")
            assert review.summary.researcher == "dr_a"
            _refused(403, queue.decide, run_id, "4:0", "approve", "mine", "dr_a")
            queue.decide(run_id, "4:0", "approve", "a birth-year count, not rare here", REVIEWER)
            queue.release(run_id, REVIEWER)

            # The node crashes right after signing the reviewed release, before uploading it.
            local = agent.state.get(run_id)
            assert local is not None and local.status == "reviewed"
            signed = build_reviewed_release(
                agent.state, local, agent.site_policy, site_dir, hub.node_key
            )
            expected = hashlib.sha256(zip_release(signed)).hexdigest()
        with hub.agent(work, data_dir=site_dir) as agent:
            assert agent.run_once(wait=0) is None  # resumed: uploads what was signed
        assert hub.run(study)["status"] == "released"
        local = NodeState(work / "node.sqlite").get(run_id)
        assert local is not None and local.release_sha256 == expected
        # Crashed after the upload but before recording it: the same bytes again, a 409, done.
        with sqlite3.connect(work / "node.sqlite") as db:
            db.execute("UPDATE runs SET status = 'releasing' WHERE run_id = ?", (run_id,))
        with hub.agent(work, data_dir=site_dir) as agent:
            agent.run_once(wait=0)
        local = NodeState(work / "node.sqlite").get(run_id)
        assert local is not None and local.status == "uploaded"
        history = [e["status"] for e in hub.run(study)["history"]]
        assert history.count("released") == 1
        events = [e.details.get("event") for e in AuditLog(work / "audit.sqlite").entries()]
        assert events.count("release_uploaded") == 1 and "release_already_uploaded" in events

        # The researcher downloads the reviewed release.
        response = httpx.get(f"{hub.url}/runs/{run_id}/release", headers=headers)
        assert response.status_code == 200
        target = tmp_path / "download"
        with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
            archive.extractall(target)
        assert verify(target, [load_public_key(public_key_path(hub.node_key))]).ok
        released = json.loads((target / "release.ipynb").read_text(encoding="utf-8"))
        assert "children born in 2023:" in json.dumps(released["cells"][4]["outputs"])
        manifest = json.loads((target / "manifest.json").read_text(encoding="utf-8"))
        assert manifest["decisions"]["4:0"]["decision"] == "approve"
        assert manifest["decisions"]["4:0"]["reviewer"] == REVIEWER
        assert manifest["review"]["released_by"] == REVIEWER
        assert manifest["release"]["counts"]["held"] == 0
    finally:
        hub.stop()
        hub.app.state.hub.store.dispose()
    verified = CliRunner().invoke(cli, ["audit", "verify", str(work / "audit.sqlite")])
    assert verified.exit_code == 0, verified.output
