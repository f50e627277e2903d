"""The studio's REST API (`/api/v1`): the annotation queue, votes, spans, progress, exports.

Every route needs a signed-in session (`studio.auth.api_user`, else 401) and calls one service
method, which checks the role in the database (403 when it does not allow the action, with
nothing written). Request bodies are pydantic models that refuse unknown fields (422).
A `ServiceError` becomes `{"error": message}` with the status its class carries (400, 401, 403,
404, 409); a Conflict adds `"current"` (the stored state, e.g. a span set's version and spans).

    GET  /me                                 who is signed in
    POST /projects/{id}/pairwise/next        reserve (or resume) a comparison -> {"item": ...|null}
    POST /votes                              judge it (idempotent by key)      -> 201, or 200 replayed
    POST /assignments/{id}/skip              give an item back
    POST /projects/{id}/segments/next        reserve (or resume) a response for spans
    PUT  /generations/{id}/spans             save spans (optimistic version)   -> {"version", "spans"}
    GET  /projects/{id}/progress?task=       the user's and the project's progress
    GET  /projects/{id}/activity             who did what (admin)
    POST /projects/{id}/exports              freeze dataset snapshots (admin)
    GET  /snapshots/{id}/download            a snapshot's file; a folder comes as a .zip (admin)

The server (`studio.server.build_server`) sets `app.state.services`; routes read it from there.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.responses import FileResponse, JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt
from starlette.background import BackgroundTask

from storage.models import DatasetSnapshot
from studio.auth import api_user
from studio.services.errors import Conflict, NotFound, ServiceError


def error_response(exc: ServiceError) -> JSONResponse:
    body: dict[str, Any] = {"error": str(exc)}
    if isinstance(exc, Conflict) and exc.current is not None:
        body["current"] = jsonable_encoder(exc.current)
    return JSONResponse(body, status_code=exc.status_code)


class ServiceErrorRoute(APIRoute):
    """Maps a ServiceError (or an HTTPException such as the 401 of `api_user`) to `{"error": ...}`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except ServiceError as exc:
                return error_response(exc)
            except HTTPException as exc:
                return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)

        return route


router = APIRouter(prefix="/api/v1", route_class=ServiceErrorRoute, tags=["studio"])


def get_services(request: Request):
    """The `Services` bundle of the running server (`app.state.services`)."""
    return request.app.state.services


User = Annotated[str, Depends(api_user)]
ServicesDep = Annotated[Any, Depends(get_services)]


# --------------------------------------------------------------------------- request bodies


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VoteIn(_Body):
    assignment_id: StrictInt
    choice: Literal["left", "right", "tie", "both_bad"]
    strength: Literal["slight", "clear", "much"] | None = None
    rationale: str | None = Field(default=None, max_length=5000)
    idempotency_key: str = Field(min_length=1, max_length=64)
    time_spent_ms: StrictInt | None = None


class SpanIn(_Body):
    start: StrictInt
    end: StrictInt
    polarity: Literal["good", "bad"]
    label: str | None = Field(default=None, max_length=100)
    comment: str | None = Field(default=None, max_length=2000)


class SpansIn(_Body):
    spans: list[SpanIn] = Field(max_length=1000)
    version: StrictInt = Field(ge=0)
    submit: StrictBool = False
    offsets: Literal["codepoint", "utf16"] = "codepoint"


class ExportIn(_Body):
    kinds: list[str] = Field(min_length=1, max_length=20)
    format: Literal["jsonl", "parquet", "hf"] = "jsonl"
    filters: dict[str, Any] | None = None


# --------------------------------------------------------------------------- routes


@router.get("/me")
def me(username: User, services: ServicesDep) -> dict[str, Any]:
    user = services.users.require(username)
    return {"id": user.id, "username": user.username, "role": str(user.role)}


@router.post("/projects/{project_id}/pairwise/next")
def next_pairwise(project_id: int, username: User, services: ServicesDep) -> dict[str, Any]:
    return {"item": jsonable_encoder(services.annotation.next_pairwise(username, project_id))}


@router.post("/votes")
def submit_vote(body: VoteIn, response: Response, username: User, services: ServicesDep) -> dict[str, Any]:
    result = services.annotation.submit_vote(
        username,
        body.assignment_id,
        body.choice,
        body.strength,
        body.rationale,
        body.idempotency_key,
        body.time_spent_ms,
    )
    response.status_code = 200 if result.replayed else 201
    return jsonable_encoder(result)


@router.post("/assignments/{assignment_id}/skip")
def skip(assignment_id: int, username: User, services: ServicesDep) -> dict[str, Any]:
    services.annotation.skip(username, assignment_id)
    return {"skipped": assignment_id}


@router.post("/projects/{project_id}/segments/next")
def next_segment(project_id: int, username: User, services: ServicesDep) -> dict[str, Any]:
    return {"item": jsonable_encoder(services.annotation.next_segment(username, project_id))}


@router.put("/generations/{generation_id}/spans")
def save_spans(generation_id: int, body: SpansIn, username: User, services: ServicesDep) -> dict[str, Any]:
    result = services.annotation.save_spans(
        username,
        generation_id,
        [s.model_dump() for s in body.spans],
        body.version,
        body.submit,
        body.offsets,
    )
    return jsonable_encoder(result)


@router.get("/projects/{project_id}/progress")
def progress(
    project_id: int,
    username: User,
    services: ServicesDep,
    task: Literal["pairwise", "segment"] = "pairwise",
) -> dict[str, Any]:
    return jsonable_encoder(services.annotation.progress(username, project_id, task=task))


@router.get("/projects/{project_id}/activity")
def activity(project_id: int, username: User, services: ServicesDep) -> list[dict[str, Any]]:
    return jsonable_encoder(services.annotation.activity(username, project_id))


@router.post("/projects/{project_id}/exports", status_code=201)
def export(project_id: int, body: ExportIn, username: User, services: ServicesDep) -> list[dict[str, Any]]:
    infos = services.datasets.export(username, project_id, body.kinds, body.format, body.filters)
    return jsonable_encoder(infos)


@router.get("/snapshots/{snapshot_id}/download")
def download(snapshot_id: int, username: User, services: ServicesDep) -> Response:
    if not services.datasets.verify(username, snapshot_id):  # admin only; NotFound if unknown
        raise Conflict(f"snapshot {snapshot_id} is missing or changed on disk (its sha256 no longer matches)")
    with services.db.read() as s:
        row = s.get(DatasetSnapshot, snapshot_id)
    path = Path(row.path).resolve()
    exports = Path(services.settings.exports_dir).resolve()
    if not path.is_relative_to(exports):
        raise NotFound(f"snapshot {snapshot_id} is not in the studio's exports folder")
    name = f"snapshot-{snapshot_id}-{path.name}"
    if path.is_file():
        return FileResponse(path, filename=name, media_type="application/octet-stream")
    tmp = Path(tempfile.mkdtemp(prefix="studio-snapshot-"))
    archive = shutil.make_archive(str(tmp / name), "zip", root_dir=path)
    return FileResponse(
        archive,
        filename=os.path.basename(archive),
        media_type="application/zip",
        background=BackgroundTask(shutil.rmtree, tmp, True),
    )
