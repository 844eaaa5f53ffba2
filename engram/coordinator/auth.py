"""Per-namespace bearer tokens (gRPC metadata `authorization: Bearer <token>`), from a TOML tokens file."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import tomllib
from pathlib import Path

import grpc

log = logging.getLogger("engram")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_exposure(host: str, tokens_file: str | None, tls: bool, allow_unauthenticated: bool) -> None:
    """Refuse to serve beyond loopback without bearer tokens: anyone who reaches the port could read, write and
    delete every namespace. server.allow_unauthenticated = true says the network itself is trusted."""
    if is_loopback(host):
        return
    if not tokens_file and not allow_unauthenticated:
        raise ValueError(
            f"server.host {host!r} is reachable beyond this machine but auth.tokens_file is not set: every client "
            "could read and delete every namespace. Set auth.tokens_file (README: Security), or "
            "server.allow_unauthenticated = true if only trusted clients can reach this network."
        )
    if tokens_file and not tls:
        log.warning("serving bearer tokens over plain TCP on %s: set server.tls_cert_file/tls_key_file", host)


class Auth:
    """Bearer tokens from the tokens file; None when authentication is off."""

    def __init__(self, tokens_file: str | None):
        self.tokens: dict[str, set[str]] | None = None
        if tokens_file:
            data = tomllib.loads(Path(tokens_file).read_text())
            self.tokens = {}
            for tok, namespaces in data.get("tokens", {}).items():
                # a bare string would silently become a set of its characters
                if not isinstance(namespaces, list) or not all(isinstance(n, str) and n for n in namespaces):
                    raise ValueError(
                        f"{tokens_file}: each token's value must be a list of namespace names, e.g. "
                        '"<token>" = ["alice"] (or ["*"]); one is not'
                    )
                self.tokens[tok] = set(namespaces)
            if not self.tokens:
                raise ValueError(f"{tokens_file} has no [tokens] table; see README (Security)")

    @staticmethod
    def header_of(context) -> str:
        """A gRPC call's `authorization` metadata ("" when absent)."""
        return dict(context.invocation_metadata()).get("authorization", "")

    @staticmethod
    def readable(allowed: set[str] | None, names) -> list[str]:
        """Of `names`, sorted, those a token that may access `allowed` (from `namespaces`) may read."""
        return sorted(n for n in names if allowed is None or "*" in allowed or n in allowed)

    def check(self, context, namespace: str | None) -> None:
        """A gRPC call's metadata. namespace None = cluster-wide (Stats): needs a "*" token."""
        if self.tokens is not None:
            self.check_header(self.header_of(context), namespace)

    def check_header(self, header: str, namespace: str | None, where: str = "gRPC metadata") -> None:
        """An `authorization` header's value may access `namespace` (None: cluster-wide, a "*" token)."""
        allowed = self.namespaces(header, where)
        if allowed is not None and "*" not in allowed and (namespace is None or namespace not in allowed):
            what = "cluster-wide statistics" if namespace is None else f"namespace {namespace!r}"
            raise AuthError(grpc.StatusCode.PERMISSION_DENIED, f"this token may not access {what}")

    def namespaces(self, header: str, where: str = "gRPC metadata") -> set[str] | None:
        """The namespaces the presented token may access ({"*"}: all); None when authentication is off."""
        if self.tokens is None:
            return None
        if not header.startswith("Bearer "):
            raise AuthError(
                grpc.StatusCode.UNAUTHENTICATED, f"missing credentials: send {where} 'authorization: Bearer <token>'"
            )
        presented = header[len("Bearer ") :].encode()
        allowed = None
        for token, namespaces in self.tokens.items():  # compare every token in constant time
            if hmac.compare_digest(token.encode(), presented):
                allowed = namespaces
        if allowed is None:
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED, "unknown token")
        return allowed


class AuthError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
