"""Fuzz every operation of the hub's OpenAPI spec (schemathesis, in-process ASGI).

Each generated request is sent without a token and with an admin, researcher, node and
reviewer token, on SQLite and on PostgreSQL: no response is a 5xx, and status codes,
content types and bodies conform to the published spec.
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
import test_hub_api
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from test_hub_api import Net, _auth, _bundle, _submit

#: The hub with an admin, a researcher and two site nodes (one per store) from test_hub_api.
net = test_hub_api.net

# Study bundles and release archives are opaque bytes to the generator.
schemathesis.serializer.alias(["application/zip", "application/gzip"], "application/octet-stream")

#: Examples per operation and generation mode (x 5 callers): bounded to stay fast.
EXAMPLES = 6
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@pytest.fixture
def tokens(net: Net) -> dict[str, str | None]:
    """A token of every role (and none); one study queued, so ids can point at real rows."""
    r = net.client.post(
        "/admin/principals",
        json={"name": "rev_a", "role": "reviewer", "site": "site_a"},
        headers=_auth(net.admin),
    )
    assert r.status_code == 201, r.text
    reviewer = net.client.post(
        "/admin/tokens", json={"principal": "rev_a"}, headers=_auth(net.admin)
    ).json()["token"]
    assert _submit(net, _bundle(net, ["site_a"])).status_code == 201
    # Every claim's lease has run out at once, so site_a's run is always there to claim:
    # the node's long-poll answers at once (200, its full response) instead of waiting.
    net.client.app.state.hub.lease_s = -1.0  # type: ignore[attr-defined]
    return {
        "none": None,
        "admin": net.admin,
        "researcher": net.researcher,
        "node": net.nodes["site_a"],
        "reviewer": reviewer,
    }


def _fuzz(operation: Any, mode: GenerationMode, tokens: dict[str, str | None]) -> bool:
    """Send ``EXAMPLES`` generated requests of one operation as every caller; False if none."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,  # the same examples on every run: CI never meets new ones by chance
        suppress_health_check=list(HealthCheck),
        database=None,
        phases=[Phase.explicit, Phase.generate],  # report at once; shrinking takes minutes
    )
    def fuzz(case: Any) -> None:
        for role, token in tokens.items():
            note(f"{operation.label} as {role}")
            case.call_and_validate(headers=_auth(token) if token else {}, checks=CHECKS)

    try:
        fuzz()
    except Unsatisfiable:
        if mode == GenerationMode.POSITIVE:
            raise
        return False  # only free-form strings: nothing the spec calls invalid
    return True


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_error_for_any_role(
    net: Net, tokens: dict[str, str | None], mode: GenerationMode
) -> None:
    # schemathesis' pytest loader (from_fixture + parametrize) fails on this pytest
    # ("Function has no _nodeid"), so hypothesis drives each operation's strategy.
    schema = schemathesis.openapi.from_asgi("/openapi.json", net.client.app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14
    fuzzed = [
        operation.label
        for operation in operations
        if (mode == GenerationMode.POSITIVE or list(operation.iter_parameters()) or operation.body)
        and _fuzz(operation, mode, tokens)
    ]
    if mode == GenerationMode.POSITIVE:
        assert fuzzed == [operation.label for operation in operations]
    else:  # every operation with a typed query parameter or a JSON body
        assert {"POST /admin/principals", "POST /nodes/next", "POST /runs/{run_id}/status"} <= set(
            fuzzed
        )


# -- regressions: 5xx and nonconforming answers found by fuzzing, each fixed in the hub ----------


def test_undecodable_json_body_gets_the_hubs_error_and_an_audit_entry(net: Net) -> None:
    # Was FastAPI's own {"detail": ...} (not the published error shape) and no audit entry.
    r = net.client.post(
        "/admin/principals",
        content=b"\xff",  # not UTF-8
        headers={**_auth(net.admin), "Content-Type": "application/json"},
    )
    assert r.status_code == 400 and "cannot be decoded" in r.json()["reason"]
    assert net.last_refusal()["reason"] == r.json()["reason"]


def test_nul_in_the_url_is_refused(net: Net) -> None:
    # Was a 500 on PostgreSQL, whose text cannot hold NUL: the id reached a query.
    for path in ("/studies/a%00b", "/admin/tokens/ab%00/revoke", "/nodes/next?wait=0&x=%00"):
        token = net.nodes["site_a"] if path.startswith("/nodes") else net.researcher
        if path.startswith("/admin"):
            token = net.admin
        r = net.client.post(path, headers=_auth(token))
        if r.status_code == 405:
            r = net.client.get(path, headers=_auth(token))
        assert r.status_code == 400 and "NUL" in r.json()["reason"], (path, r.text)
        assert net.last_refusal()["status"] == 400


def test_nul_in_a_json_value_is_refused(net: Net) -> None:
    # Was a 500 on PostgreSQL: the principal's name reached a query.
    r = net.client.post("/admin/tokens", json={"principal": "a\x00b"}, headers=_auth(net.admin))
    if net.db_url.startswith("postgresql"):
        assert r.status_code == 422 and "NUL" in r.json()["reason"]
    else:  # SQLite stores any text: simply nobody of that name
        assert r.status_code == 404 and "no principal" in r.json()["reason"]
    assert net.last_refusal()["reason"] == r.json()["reason"]
