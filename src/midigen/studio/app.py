"""The studio's HTTP API and page (FastAPI): routes only; the work is `midigen.studio.service.Studio`'s.

Every refusal is JSON `{"error": "<one line>"}` with a 4xx status: 400 bad input, 404 unknown take, 411/413
an upload without a length or over the limit, 415 not a form, 429 the queue is full.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from importlib.resources import files
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from midigen import __version__
from midigen.errors import MidigenError
from midigen.studio.generation import (
    MAX_UPLOAD_BYTES,
    TEXT_FIELDS,
    GenerationRequest,
    UploadTooLarge,
    check_field_names,
)
from midigen.studio.jobs import TERMINAL, BusyError, Job
from midigen.studio.service import Studio, Upload
from midigen.studio.takes import UnknownTake

STATIC = Path(str(files("midigen.studio") / "static"))
FORM_OVERHEAD_BYTES = 64 * 1024  # the form's text fields and multipart framing, beside the file
MEDIA_TYPES = {"mid": "audio/midi", "wav": "audio/wav", "png": "image/png"}
CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; "
                           "object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message.splitlines()[0] if message else "error"}, status_code=status)


def create_app(studio: Studio, allowed_hosts: Sequence[str] = ("*",)) -> FastAPI:
    """The app serving `studio`; `allowed_hosts` guards a studio on the loopback against DNS rebinding."""
    app = FastAPI(title="midigen studio", version=__version__, docs_url=None, redoc_url=None)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))

    @app.middleware("http")
    async def security_headers(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    @app.exception_handler(BusyError)
    async def busy(_: Request, exc: BusyError) -> JSONResponse:
        return error(429, str(exc))

    @app.exception_handler(UploadTooLarge)
    async def too_large(_: Request, exc: UploadTooLarge) -> JSONResponse:
        return error(413, str(exc))

    @app.exception_handler(UnknownTake)
    async def unknown_take(_: Request, exc: UnknownTake) -> JSONResponse:
        return error(404, str(exc))

    @app.exception_handler(MidigenError)
    async def bad_input(_: Request, exc: MidigenError) -> JSONResponse:
        return error(400, str(exc))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()) if part not in ("path", "query", "body"))
        return error(400, f"{where}: {first.get('msg', 'invalid')}")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/health")
    async def health() -> dict[str, Any]:
        return await run_in_threadpool(studio.health)

    @app.get("/api/models")
    async def models() -> dict[str, Any]:
        return {"models": await run_in_threadpool(studio.models)}

    @app.get("/api/models/{name}/loss.png")
    async def loss_plot(name: str) -> FileResponse:
        plot = studio.shelf.loss_plot(name)
        if plot is None:
            raise HTTPException(404, f"model {name} has no loss curve (a model folder keeps none)")
        return FileResponse(plot, media_type="image/png")

    async def queued(request: Request) -> Job:
        fields, upload = await read_form(request, "prompt")
        generation = GenerationRequest.from_form(fields)
        if studio.jobs.full():  # before the prompt's parsing or transcription
            raise BusyError("busy: the generation queue is full; try again shortly")
        loaded, prompt = await run_in_threadpool(studio.prepare, generation, upload)
        return studio.submit(loaded, prompt, generation)

    @app.post("/api/generations")
    async def generation(request: Request) -> JSONResponse:
        job = await queued(request)
        watcher = asyncio.ensure_future(cancel_when_gone(request, studio, job))
        try:
            async for event in job.events():
                if event.kind in TERMINAL:
                    break
        finally:
            watcher.cancel()
        if event.kind == "done":
            return JSONResponse(event.data)
        return error(400 if event.kind == "error" else 409, event.data.get("error", "the generation was cancelled"))

    @app.post("/api/generations/stream")
    async def generation_stream(request: Request) -> StreamingResponse:
        job = await queued(request)

        async def events() -> AsyncIterator[str]:
            try:
                async for event in job.events():
                    yield f"event: {event.kind}\ndata: {json.dumps(event.data)}\n\n"
            finally:  # the client has gone (or the stream is over): a generation nobody reads stops
                studio.jobs.cancel(job)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    @app.get("/api/generations/{take}.{kind}")
    async def take_file(take: str, kind: str) -> FileResponse:
        path = await run_in_threadpool(studio.takes.file, take, kind)
        return FileResponse(path, media_type=MEDIA_TYPES[kind], filename=f"midigen-{take[:8]}.{kind}")

    @app.get("/api/generations/{take}")
    async def take_info(take: str) -> dict[str, Any]:
        return studio.takes.info(take)

    @app.post("/api/transcriptions")
    async def transcription(request: Request) -> dict[str, Any]:
        _, upload = await read_form(request, "audio", text_fields=())
        if upload is None:
            raise MidigenError("audio: missing (send the clip as the form's `audio` file)")
        return await run_in_threadpool(studio.transcription, upload)

    return app


async def read_form(request: Request, file_field: str, text_fields: Sequence[str] = TEXT_FIELDS
                    ) -> tuple[dict[str, str], Upload | None]:
    """A multipart form's text fields and its one file, within the upload limit; unknown fields refused."""
    length = request.headers.get("content-length")
    if length is None or not length.isdigit():
        raise HTTPException(411, "send the form with a Content-Length")
    if int(length) > MAX_UPLOAD_BYTES + FORM_OVERHEAD_BYTES:
        raise HTTPException(413, f"{int(length) / 2**20:.1f} MiB sent; uploads are limited to "
                                 f"{MAX_UPLOAD_BYTES // 2**20} MiB")
    if not request.headers.get("content-type", "").startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise HTTPException(415, "send a multipart/form-data form")
    form = await request.form(max_files=1, max_fields=len(text_fields) + 1)
    items = form.multi_items()
    check_field_names([name for name, _ in items], list(text_fields), file_field)
    fields, upload = {}, None
    for name, value in items:
        if name == file_field:
            if not isinstance(value, UploadFile):
                raise MidigenError(f"{file_field}: send a file, not text")
            upload = Upload(value.filename or file_field, await value.read(MAX_UPLOAD_BYTES + 1))
        elif isinstance(value, UploadFile):
            raise MidigenError(f"{name}: send text, not a file")
        else:
            fields[name] = value
    return fields, upload


async def cancel_when_gone(request: Request, studio: Studio, job: Job) -> None:
    """Cancel `job` when its client disconnects (the body has been read: what comes next is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    studio.jobs.cancel(job)
