"""First contact with a master, verified against the CA fingerprint in the join token."""

from __future__ import annotations

import ssl

import httpx

from ._e2e import b64, derive_key, new_keypair, unb64
from ._http import error_message
from ._identity import Identity, StateDir
from ._jointoken import JoinToken
from ._tls import ca_fingerprint, shared_client_context, single_cert_pem


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
        return single_cert_pem(resp.content)
    except ValueError as exc:
        raise EnrollError(f"{url}/v1/ca did not return a CA certificate ({exc})") from None


async def enroll(state: StateDir, ident: Identity, token: JoinToken, facts: dict[str, object],
                 labels: dict[str, str], kind: str = "agent", urls: list[str] | None = None,
                 csr: bytes | None = None, ca_pem: bytes | None = None) -> Identity:
    """Enroll once with the master (directly or through proxies at ``urls``).

    A proxy sends ``csr`` and gets a server certificate from the master's CA (``tls.pem``).
    ``ca_pem`` skips fetching the CA (a swarm enrolling thousands fetches it once); it is
    checked against the token's fingerprint all the same."""
    errors = []
    for url in urls or token.urls:
        try:
            if ca_pem is None:
                ca_pem = await _fetch_ca(url)
            if ca_fingerprint(ca_pem) != token.ca_fingerprint:
                raise EnrollError(
                    f"the CA served by {url} does not match the join token's fingerprint: "
                    "refusing to enroll (wrong master, or someone in between)")
            private, public = new_keypair()
            async with httpx.AsyncClient(verify=shared_client_context(ca_pem), timeout=15) as client:
                resp = await client.post(f"{url}/v1/enroll", json={
                    "token": token.credential, "uuid": ident.uuid, "facts": facts, "labels": labels,
                    "kind": kind, "e2e_pub": b64(public), **({"csr": csr.decode()} if csr else {})})
            if resp.status_code in (401, 403):
                raise EnrollError(f"master refused the join token: {error_message(resp)}")
            resp.raise_for_status()
        except httpx.HTTPError as exc:
            errors.append(f"{url}: {exc}")
            continue
        state.ca_path.write_bytes(ca_pem)
        answer = resp.json()
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


