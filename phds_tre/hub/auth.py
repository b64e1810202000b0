"""Principals and bearer tokens: ``Authorization: Bearer phds_<id>_<secret>``.

A token's secret is ``secrets.token_urlsafe(32)`` and is shown once, when issued; the
store keeps only its sha256. A token is scoped to its principal's role, expires, and
can be revoked. :func:`require` is the FastAPI dependency every protected route
uses: 401 for a missing, malformed, unknown, expired or revoked token, 403 for a
token of the wrong role.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from fastapi import Request
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from phds_tre.hub.models import ROLES, Principal, Token, utc_now
from phds_tre.hub.store import Store

__all__ = [
    "MAX_TOKEN_LIFETIME_S",
    "TOKEN_PREFIX",
    "AuthError",
    "Caller",
    "HubError",
    "create_principal",
    "hash_secret",
    "issue_token",
    "parse_public_key",
    "require",
    "revoke_token",
]

TOKEN_PREFIX = "phds_"
#: Longest a token may live (a year): long-lived credentials are rotated, not kept.
MAX_TOKEN_LIFETIME_S = 366 * 24 * 3600
_SITE_RE = re.compile(r"[a-z0-9_]{1,64}")
_TOKEN_ID_RE = re.compile(r"[0-9a-f]{16}")


class HubError(Exception):
    """A refused request: HTTP status, one-line reason, optional problems (audited by the app)."""

    def __init__(
        self,
        status: int,
        reason: str,
        problems: list[str] | None = None,
        *,
        subject: str = "",
        headers: dict[str, str] | None = None,
    ) -> None:
        """Remember what the client is told and what the audit entry is about."""
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.problems = problems or []
        self.subject = subject
        self.headers = headers


class AuthError(HubError):
    """401: no usable credentials (asks for a bearer token)."""

    def __init__(self, reason: str) -> None:
        """A 401 with ``WWW-Authenticate: Bearer``."""
        super().__init__(401, reason, headers={"WWW-Authenticate": "Bearer"})


@dataclass(frozen=True)
class Caller:
    """Who is calling: the principal behind a valid token."""

    principal_id: int
    name: str
    role: str
    site: str | None
    public_key: str | None
    token_id: str

    @property
    def actor(self) -> str:
        """How audit entries and run histories name the caller (never the secret)."""
        return f"{self.role}:{self.name}"


def hash_secret(secret: str) -> str:
    """sha256 (hex) of a token secret: what the store keeps instead of it."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def parse_public_key(text: str) -> Ed25519PublicKey:
    """A raw 32-byte Ed25519 public key from base64; ValueError when it is not one."""
    try:
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(text.strip(), validate=True))
    except (binascii.Error, ValueError):
        raise ValueError("public_key is not base64 of a raw 32-byte Ed25519 key") from None


def create_principal(
    store: Store, name: str, role: str, site: str | None = None, public_key: str | None = None
) -> Principal:
    """Register a principal; ValueError (one line) for a bad or duplicate one.

    Nodes and reviewers belong to a site; researchers (who sign bundles) and nodes
    (which sign releases) must have a public key.
    """
    name = name.strip()
    if not name or len(name) > 200 or not name.isprintable():
        raise ValueError("name must be 1-200 printable characters")
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    if role in ("node", "reviewer"):
        if site is None or not _SITE_RE.fullmatch(site):
            raise ValueError(f"a {role} needs a site matching [a-z0-9_]{{1,64}}")
    elif site is not None:
        raise ValueError(f"a {role} has no site")
    if role in ("researcher", "node"):
        if not public_key:
            raise ValueError(f"a {role} needs a public_key (base64 raw Ed25519)")
        parse_public_key(public_key)
        public_key = public_key.strip()
    elif public_key:
        raise ValueError(f"a {role} has no public_key")
    principal = Principal(
        name=name, role=role, site=site, public_key=public_key or None, created=utc_now()
    )
    try:
        with store.session() as session:
            session.add(principal)
    except IntegrityError:
        raise ValueError(f"a principal named {name!r} already exists") from None
    return principal


def issue_token(store: Store, principal_name: str, expires_in_s: int) -> tuple[str, Token]:
    """Issue a token for a principal: the full bearer string (shown once) and its row."""
    if not 1 <= expires_in_s <= MAX_TOKEN_LIFETIME_S:
        raise ValueError(f"expires_in_s must be between 1 and {MAX_TOKEN_LIFETIME_S}")
    with store.session() as session:
        principal = session.scalars(
            select(Principal).where(Principal.name == principal_name)
        ).first()
        if principal is None:
            raise LookupError(f"no principal named {principal_name!r}")
        secret = secrets.token_urlsafe(32)
        now = utc_now()
        token = Token(
            id=secrets.token_hex(8),
            principal_id=principal.id,
            secret_sha256=hash_secret(secret),
            scope=principal.role,
            created=now,
            expires=now + dt.timedelta(seconds=expires_in_s),
            revoked=False,
        )
        session.add(token)
    return f"{TOKEN_PREFIX}{token.id}_{secret}", token


def revoke_token(store: Store, token_id: str) -> Token:
    """Revoke a token (idempotent); LookupError when there is no such token."""
    with store.session() as session:
        token = session.get(Token, token_id)
        if token is None:
            raise LookupError(f"no token {token_id!r}")
        if not token.revoked:
            token.revoked = True
            token.revoked_at = utc_now()
    return token


def authenticate(store: Store, header: str | None) -> Caller:
    """The caller behind an ``Authorization`` header; :class:`AuthError` otherwise."""
    if not header:
        raise AuthError("missing bearer token (Authorization: Bearer phds_<id>_<secret>)")
    scheme, _, credential = header.partition(" ")
    if scheme.lower() != "bearer" or not credential.startswith(TOKEN_PREFIX):
        raise AuthError("malformed Authorization header (expected Bearer phds_<id>_<secret>)")
    token_id, sep, secret = credential[len(TOKEN_PREFIX) :].partition("_")
    if not sep or not secret or not _TOKEN_ID_RE.fullmatch(token_id):
        raise AuthError("malformed bearer token")
    with store.session() as session:
        token = session.get(Token, token_id)
        # Compare digests in constant time; an unknown id costs the same as a wrong secret.
        expected = token.secret_sha256 if token is not None else "0" * 64
        if not hmac.compare_digest(expected, hash_secret(secret)) or token is None:
            raise AuthError("invalid token")
        if token.revoked:
            raise AuthError("token revoked")
        if token.expires <= utc_now():
            raise AuthError("token expired")
        principal = token.principal
        return Caller(
            principal_id=principal.id,
            name=principal.name,
            role=token.scope,
            site=principal.site,
            public_key=principal.public_key,
            token_id=token.id,
        )


def require(*roles: str) -> Callable[[Request], Caller]:
    """A FastAPI dependency admitting a valid token of one of ``roles`` (401, else 403)."""
    unknown = set(roles) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown roles {sorted(unknown)}")

    def dependency(request: Request) -> Caller:
        store: Store = request.app.state.hub.store
        caller = authenticate(store, request.headers.get("authorization"))
        # Remembered so that a refusal later in the request is audited under this name.
        request.state.actor = caller.actor
        if caller.role not in roles:
            raise HubError(
                403, f"this route is for {' or '.join(roles)} tokens, not {caller.role} tokens"
            )
        return caller

    return dependency
