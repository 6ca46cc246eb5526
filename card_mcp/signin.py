"""The OAuth sign-in page at /signin: server-rendered HTML, no JavaScript, every shown value escaped.

/authorize sends the person here with a pending request. First the sign-in form: the tenant's name and a
one-time connect code (`card-mcp connect --tenant NAME`) or an API key of that tenant. Then, on the same URL, the
consent screen naming the client (as it registered itself: untrusted text) and the tenant; approving sends the
browser back to the client with an authorization code.

CSRF: the first browser to open a request binds it with a cookie (HttpOnly, SameSite=Lax); every POST must carry
the same value in its form and come from no other Origin. Content-Security-Policy allows no script at all, the one
stylesheet by its hash, and forms only to this page and the client's redirect (Chromium checks redirects after a
form against form-action).
"""

from __future__ import annotations

import base64
import hashlib
import html
import logging
import secrets
from typing import Any
from urllib.parse import urlsplit

import asyncpg
from mcp.server.auth.provider import construct_redirect_uri
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from . import oauth
from .config import Settings

logger = logging.getLogger(__name__)

COOKIE = "card_mcp_signin"
_STYLE = (
    "body{font:16px/1.5 system-ui,sans-serif;max-width:32rem;margin:3rem auto;padding:0 1rem;color:#1b1b1b}"
    "h1{font-size:1.4rem}label{display:block;margin:1rem 0 .25rem}"
    "input[type=text],input[type=password]{width:100%;padding:.5rem;font:inherit;box-sizing:border-box}"
    "button{margin-top:1.25rem;margin-right:.5rem;padding:.5rem 1rem;font:inherit}"
    ".untrusted{font-family:monospace;background:#f3f3f3;padding:.1rem .3rem;word-break:break-all}"
    ".error{color:#a40000}.note{color:#555;font-size:.9rem}"
)
_STYLE_HASH = base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _csp(redirect_uri: str | None) -> str:
    targets = ["'self'"]
    if redirect_uri:
        parts = urlsplit(redirect_uri)
        if parts.scheme in ("http", "https") and parts.netloc:
            targets.append(f"{parts.scheme}://{parts.netloc}")
        elif parts.scheme:
            targets.append(f"{parts.scheme}:")
    return (
        f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; form-action {' '.join(targets)}; "
        "frame-ancestors 'none'; base-uri 'none'; img-src 'none'"
    )


def _page(title: str, body: str, *, status: int = 200, redirect_uri: str | None = None) -> HTMLResponse:
    document = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f'<meta name="referrer" content="same-origin"><title>{_e(title)}</title><style>{_STYLE}</style></head>'
        f"<body><h1>{_e(title)}</h1>{body}</body></html>"
    )
    return HTMLResponse(
        document,
        status_code=status,
        headers={
            "Content-Security-Policy": _csp(redirect_uri),
            "X-Frame-Options": "DENY",
            "X-Content-Type-Options": "nosniff",
            # Not no-referrer: browsers then send `Origin: null` with the form, and the request id stays on this site.
            "Referrer-Policy": "same-origin",
            "Cache-Control": "no-store",
        },
    )


def _client_name(pending: oauth.PendingRequest) -> str:
    return pending.client.client_name or pending.client.client_id


def _sign_in_form(request_id: str, browser: str, pending: oauth.PendingRequest, error: str | None) -> str:
    problem = f'<p class="error" role="alert">{_e(error)}</p>' if error else ""
    return (
        f'<p>The application calling itself <span class="untrusted">{_e(_client_name(pending))}</span> '
        "asks to use the brand cards of one of your tenants. Sign in to the tenant to continue.</p>"
        f'{problem}<form method="post" action="/signin">'
        f'<input type="hidden" name="request" value="{_e(request_id)}">'
        f'<input type="hidden" name="csrf" value="{_e(browser)}">'
        '<input type="hidden" name="step" value="sign_in">'
        '<label for="tenant">Tenant</label>'
        '<input type="text" id="tenant" name="tenant" required maxlength="100" autocomplete="organization">'
        '<label for="proof">Connect code or API key</label>'
        '<input type="password" id="proof" name="proof" required maxlength="200" autocomplete="off">'
        '<p class="note">Make a connect code with <code>card-mcp connect --tenant NAME</code>; '
        "it works once, for a few minutes.</p>"
        '<button type="submit">Sign in</button></form>'
    )


def _consent_form(request_id: str, browser: str, pending: oauth.PendingRequest) -> str:
    redirect = str(pending.params.get("redirect_uri", ""))
    return (
        f'<p>Allow the application calling itself <span class="untrusted">{_e(_client_name(pending))}</span> '
        f"to read and write the brand cards of tenant <strong>{_e(pending.tenant)}</strong>?</p>"
        f'<p class="note">Its name is what it said when it registered; card-mcp has not checked it. '
        f'It will be sent back to <span class="untrusted">{_e(redirect)}</span>. '
        "You can revoke it any time with <code>card-mcp connections revoke</code>.</p>"
        f'<form method="post" action="/signin">'
        f'<input type="hidden" name="request" value="{_e(request_id)}">'
        f'<input type="hidden" name="csrf" value="{_e(browser)}">'
        '<input type="hidden" name="step" value="consent">'
        '<button type="submit" name="decision" value="approve">Allow</button>'
        '<button type="submit" name="decision" value="deny">Deny</button></form>'
    )


def _gone() -> HTMLResponse:
    return _page(
        "This sign-in link cannot be used",
        "<p>It has expired, was used already, or was opened in another browser. "
        "Start connecting again from your application.</p>",
        status=400,
    )


class SignInPages:
    """GET and POST /signin, on the admin pool of the server's lifespan (``pool()``)."""

    def __init__(self, settings: Settings, pool: Any) -> None:
        self.settings = settings
        self._pool = pool  # a callable: the admin pool once the lifespan has started
        self.origin = "{0.scheme}://{0.netloc}".format(urlsplit(settings.url))

    def pool(self) -> asyncpg.Pool:
        pool: asyncpg.Pool = self._pool()
        return pool

    def _with_cookie(self, response: Response, browser: str) -> Response:
        response.set_cookie(
            COOKIE,
            browser,
            max_age=1800,
            path="/signin",
            httponly=True,
            samesite="lax",
            secure=self.settings.url.startswith("https://"),
        )
        return response

    async def get(self, request: Request) -> Response:
        request_id = request.query_params.get("request", "")
        browser = request.cookies.get(COOKIE) or secrets.token_urlsafe(32)
        if not request_id or len(request_id) > 100:
            return _gone()
        pending = await oauth.pending(self.pool(), request_id, browser)
        if pending is None:
            return self._with_cookie(_gone(), browser)
        if pending.tenant is None:
            page = _page("Connect to card-mcp", _sign_in_form(request_id, browser, pending, None))
        else:
            redirect = str(pending.params.get("redirect_uri", ""))
            page = _page("Allow access?", _consent_form(request_id, browser, pending), redirect_uri=redirect)
        return self._with_cookie(page, browser)

    async def post(self, request: Request) -> Response:
        origin = request.headers.get("origin")
        if origin is not None and origin != self.origin:
            return _page("Refused", "<p>This form was sent from another site.</p>", status=403)
        form = await request.form()
        fields = {key: value for key, value in form.items() if isinstance(value, str)}
        request_id, csrf = fields.get("request", ""), fields.get("csrf", "")
        browser = request.cookies.get(COOKIE)
        if not request_id or len(request_id) > 100 or not oauth.csrf_matches(csrf, browser):
            return _page("Refused", "<p>This form did not come from this browser's sign-in page.</p>", status=403)
        assert browser is not None
        pool = self.pool()
        if fields.get("step") == "sign_in":
            tenant, proof = fields.get("tenant", "").strip(), fields.get("proof", "")
            status = "denied"
            if 1 <= len(tenant) <= 100 and 1 <= len(proof) <= 200:
                status = await oauth.sign_in(pool, request_id, browser, tenant, proof)
            if status == "ok":
                return RedirectResponse(f"/signin?request={request_id}", status_code=303)
            pending = await oauth.pending(pool, request_id, browser)
            if status == "invalid" or pending is None:
                return _gone()
            error = "That tenant and code (or key) do not match. Codes work once and expire after a few minutes."
            return _page("Connect to card-mcp", _sign_in_form(request_id, browser, pending, error), status=401)
        if fields.get("step") == "consent":
            decision = fields.get("decision")
            decided = await oauth.decide(pool, request_id, browser, decision == "approve")
            if decided is None:
                return _gone()
            params, code = decided
            redirect = str(params["redirect_uri"])
            if decision == "approve":
                target = construct_redirect_uri(redirect, code=code, state=params.get("state"))
            else:
                target = construct_redirect_uri(
                    redirect,
                    error="access_denied",
                    error_description="the person denied access",
                    state=params.get("state"),
                )
            return RedirectResponse(target, status_code=303, headers={"Cache-Control": "no-store"})
        return _page("Refused", "<p>Unknown step.</p>", status=400)
