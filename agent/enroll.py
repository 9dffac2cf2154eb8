"""First contact with a master, verified against the CA fingerprint in the join token."""

from __future__ import annotations

import ssl

import httpx

from hcsdk._e2e import b64, derive_key, new_keypair, unb64
from hcsdk._http import error_message
from hcsdk._jointoken import JoinToken
from hcsdk._tls import ca_fingerprint, client_context, single_cert_pem

from .state import Identity, StateDir


class EnrollError(Exception):
    pass


def _unverified() -> ssl.SSLContext:
    # Only to fetch the CA certificate, which is then checked against the token's pin
    # before anything secret is sent.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def enroll(state: StateDir, ident: Identity, token: JoinToken, facts: dict[str, object],
                 labels: dict[str, str], kind: str = "agent") -> Identity:
    errors = []
    for url in token.urls:
        try:
            async with httpx.AsyncClient(verify=_unverified(), timeout=15) as probe:
                resp = await probe.get(f"{url}/v1/ca")
                resp.raise_for_status()
            try:
                ca_pem = single_cert_pem(resp.content)
            except ValueError as exc:
                raise EnrollError(f"{url}/v1/ca did not return a CA certificate ({exc})") from None
            if ca_fingerprint(ca_pem) != token.ca_fingerprint:
                raise EnrollError(
                    f"the CA served by {url} does not match the join token's fingerprint: "
                    "refusing to enroll (wrong master, or someone in between)")
            private, public = new_keypair()
            async with httpx.AsyncClient(verify=client_context(ca_pem), timeout=15) as client:
                resp = await client.post(f"{url}/v1/enroll", json={
                    "token": token.credential, "uuid": ident.uuid, "facts": facts, "labels": labels,
                    "kind": kind, "e2e_pub": b64(public)})
            if resp.status_code in (401, 403):
                raise EnrollError(f"master refused the join token: {error_message(resp)}")
            resp.raise_for_status()
        except httpx.HTTPError as exc:
            errors.append(f"{url}: {exc}")
            continue
        state.ca_path.write_bytes(ca_pem)
        ident.credential = resp.json()["credential"]
        ident.urls = list(token.urls)
        ident.ca_fingerprint = token.ca_fingerprint
        ident.labels = labels
        ident.e2e_key = derive_key(private, unb64(token.e2e_public), ident.uuid).hex()
        state.save(ident)
        return ident
    raise EnrollError("could not reach any master in the join token: " + "; ".join(errors))


