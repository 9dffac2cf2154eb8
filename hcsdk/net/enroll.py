"""First contact with a master, verified against the CA fingerprint in the join token."""

from __future__ import annotations

import ssl
import sys
from collections.abc import Callable

import httpx

from hcsdk.common.identity import Identity, StateDir
from hcsdk.common.jointoken import JoinToken
from hcsdk.net.http import error_message
from hcsdk.net.tls import ca_fingerprint, shared_client_context, split_certs
from hcsdk.protocol.e2e import b64, derive_key, new_keypair, unb64


class EnrollError(Exception):
    pass


def _unverified() -> ssl.SSLContext:
    # Only to fetch the CA certificate, which is then checked against the token's pin
    # before anything secret is sent.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def _fetch_ca(url: str) -> bytes:
    async with httpx.AsyncClient(verify=_unverified(), timeout=15) as probe:
        resp = await probe.get(f"{url}/v1/ca")
        resp.raise_for_status()
    try:
        split_certs(resp.content)
    except ValueError as exc:
        raise EnrollError(f"{url}/v1/ca did not return a CA certificate ({exc})") from None
    return resp.content


def _short(fingerprint: str) -> str:
    """``sha256:`` and the first 16 hex digits: enough to tell two CAs apart by eye, and to find
    the right one with `openssl x509 -noout -fingerprint -sha256` (colons aside)."""
    algo, _, digest = fingerprint.partition(":")
    return f"{algo}:{digest[:16]}..." if len(digest) > 16 else fingerprint


def pinned_bundle(pem: bytes, token: JoinToken, url: str) -> bytes:
    """What to trust from a CA bundle: the master CA, which must match the token's pin, and the
    proxy CA when it matches the token's other pin (a proxy serves both; the master only its
    own). Anything else is dropped: only pinned certificates are ever trusted."""
    certs = {ca_fingerprint(c): c for c in split_certs(pem)}
    if token.ca_fingerprint not in certs:
        got = ", ".join(_short(f) for f in certs) or "no certificate"
        raise EnrollError(
            f"the CA served by {url} does not match the join token's fingerprint: "
            f"refusing to enroll (wrong master, or someone in between); the token expects "
            f"{_short(token.ca_fingerprint)}, the server sent {got}")
    return b"".join(certs[f] for f in (token.ca_fingerprint, token.proxy_ca_fingerprint) if f in certs)


def _with_proxy_ca(bundle: bytes, answer: dict[str, object], token: JoinToken) -> bytes:
    """The bundle plus the proxy CA the master returned, if it is the one the token pins."""
    extra = answer.get("proxy_ca")
    if not isinstance(extra, str) or not token.proxy_ca_fingerprint:
        return bundle
    return pinned_bundle(bundle + extra.encode(), token, "the master")


def _print_warning(text: str) -> None:
    print(f"zy: the master warns: {text}", file=sys.stderr, flush=True)


async def enroll(state: StateDir, ident: Identity, token: JoinToken, facts: dict[str, object],
                 labels: dict[str, str], kind: str = "agent", urls: list[str] | None = None,
                 csr: bytes | None = None, ca_pem: bytes | None = None,
                 on_warning: Callable[[str], None] = _print_warning) -> Identity:
    """Enroll once with the master (directly or through proxies at ``urls``).

    A proxy sends ``csr`` and gets a server certificate from the master's CA (``tls.pem``).
    ``ca_pem`` skips fetching the CA (a swarm enrolling thousands fetches it once); it is
    checked against the token's fingerprint all the same. What the master warns about (a
    hostname another agent already uses) goes to ``on_warning``.

    The saved ``ca.pem`` holds the master CA and the proxy CA: an agent accepts the master and
    proxies; the SDK trusts only the master CA, so a proxy's certificate is never a master's."""
    errors = []
    for url in urls or token.urls:
        try:
            if ca_pem is None:
                ca_pem = await _fetch_ca(url)
            ca_pem = pinned_bundle(ca_pem, token, url)
            private, public = new_keypair()
            async with httpx.AsyncClient(verify=shared_client_context(ca_pem), timeout=15) as client:
                resp = await client.post(f"{url}/v1/enroll", json={
                    "token": token.credential, "uuid": ident.uuid, "facts": facts, "labels": labels,
                    "kind": kind, "e2e_pub": b64(public), **({"csr": csr.decode()} if csr else {})})
            if resp.status_code in (401, 403):
                raise EnrollError(f"master refused the join token: {error_message(resp)}")
            if resp.status_code == 400:
                raise EnrollError(f"master refused the enrollment: {error_message(resp)}")
            resp.raise_for_status()
        except httpx.HTTPError as exc:
            errors.append(f"{url}: {exc}")
            continue
        answer = resp.json()
        state.ca_path.write_bytes(_with_proxy_ca(ca_pem, answer, token))
        for text in answer.get("warnings") or []:
            on_warning(str(text))
        if csr is not None:
            (state.root / "tls.pem").write_text(answer["cert"])
        ident.credential = answer["credential"]
        ident.urls = list(urls or token.urls)
        ident.ca_fingerprint = token.ca_fingerprint
        ident.labels = labels
        ident.e2e_key = derive_key(private, unb64(token.e2e_public), ident.uuid).hex()
        state.save(ident)
        return ident
    raise EnrollError("could not reach any master in the join token: " + "; ".join(errors))


