"""The studio's web server: our own FastAPI app with the Gradio page mounted at `/`.

    build_server(settings, services, blocks) -> FastAPI

Routes of our own: `/login`, `/logout`, `/setup` (small HTML pages, no external assets, every
interpolated value escaped), `/healthz` (readiness, no login) and the REST API of `studio.api`
when that module exists. Around everything, outermost first:

1. security headers on every response (CSP, X-Frame-Options, nosniff, Referrer-Policy);
2. an Origin check: a POST/PUT/PATCH/DELETE whose Origin header is present and neither the
   studio's own origin nor one of `Settings.allowed_origins` (STUDIO_ALLOWED_ORIGINS, the public
   address behind a reverse proxy) gets 403 (cross-site request forgery, also against Gradio's routes);
3. the session cookie (`studio.auth.SessionMiddleware`), which names the user for Gradio
   (`auth_dependency=gradio_user`) and for the API (`Depends(api_user)`);
4. file uploads to Gradio (`POST /gradio_api/upload`) only for admins (403 otherwise): only the
   admin tabs take files, and anyone else could fill the disk;
5. CORS with an empty allow-list, which also switches off Gradio's own, laxer CORS handling.
"""

from __future__ import annotations

import html
import importlib
from typing import Any

import fastapi
import gradio as gr
from fastapi.encoders import jsonable_encoder
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from storage.models import Role
from studio.auth import SCOPE_USER, Auth, SessionMiddleware, clear_cookie_header, cookie_header, gradio_user
from studio.services import Services
from studio.services.errors import Conflict, ServiceError
from studio.settings import Settings
from studio.ui import mount_options

GRADIO_CSP = "; ".join(
    [
        "default-src 'self'",
        # Gradio's page runs inline bootstrapping code and compiles event `js=` snippets.
        "script-src 'self' 'unsafe-inline' 'unsafe-eval'",
        "style-src 'self' 'unsafe-inline'",
        # No image, font or media from another host: text rendered from model output cannot fetch.
        "img-src 'self' data: blob:",
        "font-src 'self' data:",
        "media-src 'self' data: blob:",
        "connect-src 'self'",
        "worker-src 'self' blob:",
        "object-src 'none'",
        "base-uri 'self'",
        "form-action 'self'",
        "frame-ancestors 'self'",
    ]
)
PAGE_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'self'; object-src 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": GRADIO_CSP,
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cross-origin-opener-policy": "same-origin",
}
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
ADMIN_ONLY_POSTS = ("/gradio_api/upload", "/gradio_api/process_recording")
"""Gradio routes that store files sent by the client: admins only (`AdminUploadsMiddleware`)."""


# --------------------------------------------------------------------------- middleware


class SecurityHeadersMiddleware:
    """Adds the security headers to every HTTP response that does not set its own."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    if name not in headers:
                        headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _authority(origin: str) -> str:
    """`host[:port]` of an origin such as `https://studio.example:8443` (lower case)."""
    return origin.split("://", 1)[-1].rstrip("/").lower()


class OriginCheckMiddleware:
    """403 for a state-changing request sent from another origin (its Origin header says so).

    The Origin's host[:port] must be the Host the request was sent to. The scheme is not compared:
    behind a TLS proxy the server may see http while the browser says https.
    """

    def __init__(self, app: ASGIApp, allowed_origins: tuple[str, ...] = ()):
        self.app = app
        self.allowed = {_authority(o) for o in allowed_origins}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in UNSAFE_METHODS:
            headers = Headers(scope=scope)
            origin = headers.get("origin")
            if origin is not None:
                host = (headers.get("host") or "").lower()
                ok = "://" in origin and _authority(origin) in ({host} | self.allowed) and host
                if not ok:
                    response = JSONResponse({"error": "cross-origin request refused"}, status_code=403)
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)


class AdminUploadsMiddleware:
    """403 for a file upload to Gradio unless the signed-in user is an admin (role read from the DB).

    Anonymous requests pass on: Gradio's own login check answers them with 401.
    """

    def __init__(self, app: ASGIApp, users: Any):
        self.app = app
        self.users = users

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        username = scope.get(SCOPE_USER)
        if (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and username
            and scope["path"].rstrip("/").endswith(ADMIN_ONLY_POSTS)
        ):
            try:
                await run_in_threadpool(self.users.require, username, Role.admin)
            except ServiceError:
                response = JSONResponse({"error": "only admins may upload files"}, status_code=403)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


# --------------------------------------------------------------------------- pages

_STYLE = """
body { font-family: system-ui, sans-serif; background: #f6f7fb; color: #1f2330; margin: 0; }
main { max-width: 24rem; margin: 12vh auto; background: #fff; padding: 2rem 2.2rem; border-radius: 12px;
       box-shadow: 0 2px 12px rgba(0,0,0,.08); }
h1 { font-size: 1.4rem; margin: 0 0 .3rem; } p.sub { margin: 0 0 1.4rem; opacity: .75; }
label { display: block; margin: .9rem 0 .3rem; font-weight: 600; font-size: .9rem; }
input { width: 100%; box-sizing: border-box; padding: .55rem .65rem; border: 1px solid #c9cdd8;
        border-radius: 8px; font-size: 1rem; }
button { margin-top: 1.4rem; width: 100%; padding: .65rem; border: 0; border-radius: 8px;
         background: #4f46e5; color: #fff; font-size: 1rem; font-weight: 600; cursor: pointer; }
.error { background: #fdecec; color: #8a1c1c; padding: .6rem .8rem; border-radius: 8px; margin-bottom: .8rem; }
.note { font-size: .85rem; opacity: .75; margin-top: 1.2rem; }
"""


def _page(
    title: str, body: str, status_code: int = 200, headers: dict[str, str] | None = None
) -> HTMLResponse:
    """A small page of our own; `body` is trusted markup whose values the caller has escaped."""
    document = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{html.escape(title)} · Feedback Studio</title><style>{_STYLE}</style></head>"
        f"<body><main>{body}</main></body></html>"
    )
    merged = {"content-security-policy": PAGE_CSP, "cache-control": "no-store", **(headers or {})}
    return HTMLResponse(document, status_code=status_code, headers=merged)


def _error(message: str | None) -> str:
    return f"<div class='error' role='alert'>{html.escape(message)}</div>" if message else ""


def login_page(message: str | None = None, username: str = "", status_code: int = 200, **kw) -> HTMLResponse:
    body = (
        "<h1>Feedback Studio</h1><p class='sub'>Sign in to continue.</p>"
        f"{_error(message)}"
        "<form method='post' action='/login'>"
        "<label for='username'>Username</label>"
        f"<input id='username' name='username' autocomplete='username' required maxlength='64' "
        f"value='{html.escape(username, quote=True)}' autofocus>"
        "<label for='password'>Password</label>"
        "<input id='password' name='password' type='password' autocomplete='current-password' required>"
        "<button type='submit' id='login-button'>Sign in</button></form>"
    )
    return _page("Sign in", body, status_code, **kw)


def setup_page(
    token: str, message: str | None = None, username: str = "", status_code: int = 200
) -> HTMLResponse:
    body = (
        "<h1>Welcome to Feedback Studio</h1>"
        "<p class='sub'>Create the first admin account. It can then add everyone else.</p>"
        f"{_error(message)}"
        "<form method='post' action='/setup'>"
        f"<input type='hidden' name='token' value='{html.escape(token, quote=True)}'>"
        "<label for='username'>Admin username</label>"
        f"<input id='username' name='username' autocomplete='username' required maxlength='64' "
        f"pattern='[A-Za-z0-9_.\\-]{{1,64}}' value='{html.escape(username, quote=True)}' autofocus>"
        "<label for='password'>Password (at least 8 characters)</label>"
        "<input id='password' name='password' type='password' autocomplete='new-password' required minlength='8'>"
        "<label for='password2'>Password again</label>"
        "<input id='password2' name='password2' type='password' autocomplete='new-password' required minlength='8'>"
        "<button type='submit' id='setup-button'>Create admin and sign in</button></form>"
    )
    return _page("First-run setup", body, status_code)


def _field(form: Any, name: str) -> str:
    value = form.get(name)
    return value if isinstance(value, str) else ""


def _secure(request: fastapi.Request) -> bool:
    return request.url.scheme == "https"


def _signed_in(request: fastapi.Request, user_id: int) -> RedirectResponse:
    auth: Auth = request.app.state.auth
    response = RedirectResponse("/", status_code=303)
    response.headers.append("set-cookie", cookie_header(auth.new_cookie(user_id), secure=_secure(request)))
    return response


def _add_pages(app: fastapi.FastAPI, auth: Auth) -> None:
    users = auth.users

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/login", include_in_schema=False)
    def login_form(request: fastapi.Request):
        if request.scope.get(SCOPE_USER):
            return RedirectResponse("/", status_code=303)
        if auth.setup_open():
            return RedirectResponse("/setup", status_code=303)
        return login_page()

    @app.post("/login", include_in_schema=False)
    async def login(request: fastapi.Request):
        form = await request.form()
        username, password = _field(form, "username")[:200], _field(form, "password")
        wait = auth.throttle.start(username)
        if wait is not None:
            seconds = max(1, int(wait + 0.999))
            return login_page(
                f"Too many failed sign-ins for this user. Try again in {seconds} s.",
                username,
                429,
                headers={"retry-after": str(seconds)},
            )
        user = None
        try:
            user = await run_in_threadpool(users.authenticate, username, password)
        finally:  # ends the attempt `start` counted in flight, also when authenticate raised
            if user is None:
                auth.throttle.failure(username)
            else:
                auth.throttle.success(username)
        if user is None:
            return login_page("Wrong username or password.", username, 401)
        return _signed_in(request, user.id)

    @app.api_route("/logout", methods=["GET", "POST"], include_in_schema=False)
    def logout(request: fastapi.Request):
        response = RedirectResponse("/login", status_code=303)
        response.headers.append("set-cookie", clear_cookie_header(secure=_secure(request)))
        return response

    @app.get("/setup", include_in_schema=False)
    def setup_form(token: str = ""):
        if not auth.setup_open():
            raise StarletteHTTPException(404, "Not Found")
        if not auth.setup_token_ok(token):
            body = (
                "<h1>First-run setup</h1><p>Open the setup link printed in the server's console when it "
                "started (the token is also in the file <code>setup_token</code> in the studio's data "
                "folder).</p>"
            )
            return _page("First-run setup", body, 403)
        return setup_page(token)

    @app.post("/setup", include_in_schema=False)
    async def setup(request: fastapi.Request):
        if not auth.setup_open():
            raise StarletteHTTPException(404, "Not Found")
        form = await request.form()
        token, username = _field(form, "token"), _field(form, "username")[:200]
        if not auth.setup_token_ok(token):
            return _page("First-run setup", _error("The setup link is not valid."), 403)
        if _field(form, "password") != _field(form, "password2"):
            return setup_page(token, "The two passwords differ.", username, 400)
        try:
            info = await run_in_threadpool(users.create_first_admin, username, _field(form, "password"))
        except ServiceError as exc:
            if not auth.setup_open():
                raise StarletteHTTPException(404, "Not Found") from None
            return setup_page(token, str(exc), username, 400)
        auth.finish_setup()
        return _signed_in(request, info.id)


# --------------------------------------------------------------------------- errors


def _add_error_handlers(app: fastapi.FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(_request: fastapi.Request, exc: ServiceError) -> JSONResponse:
        body: dict[str, Any] = {"error": str(exc)}
        if isinstance(exc, Conflict) and exc.current is not None:
            body["current"] = jsonable_encoder(exc.current)
        return JSONResponse(body, status_code=exc.status_code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: fastapi.Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)


# --------------------------------------------------------------------------- the app


def _include_api(app: fastapi.FastAPI) -> None:
    try:
        api = importlib.import_module("studio.api")
    except ModuleNotFoundError as exc:
        if exc.name != "studio.api":
            raise
        return
    app.include_router(api.router)


def build_server(
    settings: Settings, services: Services, blocks: gr.Blocks, *, auth: Auth | None = None
) -> fastapi.FastAPI:
    """Our FastAPI app with the Gradio page at `/`; run it with one uvicorn worker.

    `auth` is built from the services and the data folder unless given (tests pass one with a
    fake clock). On a database without users a one-time setup token is issued:
    `app.state.setup_path` is then `/setup?token=...` (print it), else None.
    """
    auth = auth or Auth(services.users, settings.data_dir)
    token = auth.prepare_setup()
    app = fastapi.FastAPI(title="Feedback Studio", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.auth = auth
    app.state.services = services
    app.state.setup_path = f"/setup?token={token}" if token else None
    _add_pages(app, auth)
    _add_error_handlers(app)
    _include_api(app)
    # Starlette runs the last added middleware first: headers → origin → session → uploads → CORS → routes.
    app.add_middleware(CORSMiddleware, allow_origins=[], allow_credentials=False)
    app.add_middleware(AdminUploadsMiddleware, users=services.users)
    app.add_middleware(SessionMiddleware, auth=auth)
    app.add_middleware(OriginCheckMiddleware, allowed_origins=tuple(settings.allowed_origins))
    app.add_middleware(SecurityHeadersMiddleware)
    return gr.mount_gradio_app(app, blocks, path="/", auth_dependency=gradio_user, **mount_options(settings))
