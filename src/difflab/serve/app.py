"""The HTTP API of `difflab serve` (FastAPI): the page at /, difflab's own JSON API under /api, and AUTOMATIC1111's
/sdapi/v1 (difflab.serve.a1111) so that existing clients work.

    GET  /api/models                  the models offered (name, conditioning, size, default sampler and steps)
    GET  /api/samplers                the samplers, their options and other tools' names for them
    GET  /api/limits                  what one request may ask for
    POST /api/generate                queue a generation -> 202 {"id", "seeds", "status"}
    GET  /api/jobs/{id}               a job's status, parameters and image URLs
    GET  /api/jobs/{id}/events        server-sent events: "progress" (step, steps, preview PNG of x0-hat), then the end
    POST /api/jobs/{id}/cancel        cancel a queued or running job
    GET  /api/jobs/{id}/images/{i}    a result as PNG, with its generation parameters (difflab JSON + A1111 text)

Refusals are JSON {"detail": ...}: 401 without the token (when one is set), 404 unknown model or job, 422 bad input
or a request over the limits (naming the limit), 429 queue full (with Retry-After)."""

from __future__ import annotations

import asyncio
import hmac
import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from difflab.serve.jobs import FINISHED, Job, JobQueue, QueueFull
from difflab.serve.models import ServedModel
from difflab.serve.requests import Limits, RequestRefused, resolve

MAX_TEXT = 2000  # characters of a prompt or negative prompt


@dataclass
class Server:
    """What the app serves: the models by name, the job queue, the limits, the token (None: no token asked)."""

    models: dict[str, ServedModel]
    queue: JobQueue
    limits: Limits = field(default_factory=Limits)
    token: str | None = None
    default_model: str | None = None

    def model(self, name: str | None) -> ServedModel:
        """The model called `name` (None: the default); 404 naming the models offered."""
        name = name or self.default_model or next(iter(self.models))
        if name not in self.models:
            raise RequestRefused(f"unknown model '{name}'; this server offers {', '.join(self.models)}", status=404)
        return self.models[name]

    def job(self, job_id: str) -> Job:
        job = self.queue.jobs.get(job_id)
        if job is None:
            raise RequestRefused(f"no job '{job_id}' on this server (finished jobs are kept for a while)", status=404)
        return job


class GenerateBody(BaseModel):
    """POST /api/generate: unknown fields are refused (422)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = Field(None, max_length=MAX_TEXT)
    negative_prompt: str | None = Field(None, max_length=MAX_TEXT)
    class_label: int | None = None
    sampler: str | None = Field(None, max_length=100)
    grid: str | None = Field(None, max_length=100)
    options: dict[str, float | int | bool | str] = Field(default_factory=dict, max_length=20)
    steps: int | None = None
    guidance: float | None = Field(None, ge=0, le=100)
    seed: int | None = None
    n: int = 1


def create_app(server: Server) -> FastAPI:
    """The FastAPI application of a server."""
    app = FastAPI(title="difflab serve", docs_url="/docs", redoc_url=None)
    app.state.server = server

    @app.middleware("http")
    async def require_token(request: Request, call_next):
        if server.token is not None and request.url.path.startswith(("/api/", "/sdapi/")):
            sent = request.headers.get("authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Bearer {server.token}".encode()):
                return JSONResponse({"detail": "send the server's token: Authorization: Bearer TOKEN"}, status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
        return await call_next(request)

    @app.exception_handler(RequestRefused)
    async def refused(request: Request, err: RequestRefused):
        return JSONResponse({"detail": str(err)}, status_code=err.status)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, err: QueueFull):
        return JSONResponse({"detail": str(err)}, status_code=429, headers={"Retry-After": str(err.retry_after)})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(resources.files("difflab.serve").joinpath("page.html").read_text(encoding="utf-8"))

    @app.get("/api/models")
    async def models():
        return {"models": [m.describe() for m in server.models.values()], "default": server.model(None).name}

    @app.get("/api/samplers")
    async def samplers():
        return {"samplers": sampler_list()}

    @app.get("/api/limits")
    async def limits():
        return vars(server.limits)

    @app.post("/api/generate", status_code=202)
    async def generate(body: GenerateBody):
        settings = body.model_dump(exclude={"model"})
        job = server.queue.submit(resolve(server.model(body.model), server.limits, **settings))
        return {"id": job.id, "seeds": job.generation.seeds, "status": job.status}

    @app.get("/api/jobs/{job_id}")
    async def job_status(job_id: str):
        return server.job(job_id).describe()

    @app.post("/api/jobs/{job_id}/cancel")
    async def cancel(job_id: str):
        job = server.job(job_id)
        server.queue.cancel(job)
        return job.describe()

    @app.get("/api/jobs/{job_id}/events")
    async def events(job_id: str):
        job = server.job(job_id)
        return StreamingResponse(event_stream(job), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store"})  # fmt: skip

    @app.get("/api/jobs/{job_id}/images/{index}")
    async def image(job_id: str, index: int):
        job = server.job(job_id)
        if not 0 <= index < len(job.images):
            raise RequestRefused(f"job '{job_id}' has {len(job.images)} images (status {job.status})", status=404)
        path = job.images[index]
        return FileResponse(path, media_type="image/png", filename=path.name)

    from difflab.serve.a1111 import add_a1111_routes

    add_a1111_routes(app, server)
    return app


async def event_stream(job: Job):
    """The job's events as server-sent events, ending after its final one."""
    queue = job.subscribe(asyncio.get_running_loop())
    try:
        while True:
            kind, payload = await queue.get()
            yield f"event: {kind}\ndata: {json.dumps(payload)}\n\n"
            if kind in FINISHED:
                return
    finally:
        job.unsubscribe(queue)


async def wait_for(job: Job) -> dict[str, Any]:
    """The job's description once it has finished (awaited, not blocking the event loop)."""
    queue = job.subscribe(asyncio.get_running_loop())
    try:
        while True:
            kind, payload = await queue.get()
            if kind in FINISHED:
                return payload
    finally:
        job.unsubscribe(queue)


def sampler_list() -> list[dict[str, Any]]:
    """Every registered sampler with its options and the names other tools give it."""
    from difflab.sampling import SAMPLERS, sampler_aliases

    aliases: dict[str, list[str]] = {}
    for alias, (name, _grid) in sampler_aliases().items():
        aliases.setdefault(name, []).append(alias)
    return [{"name": name, "summary": spec.summary, "options": list(spec.options), "family": spec.family,
             "aliases": aliases.get(name, [])} for name, spec in SAMPLERS.items()]  # fmt: skip
