"""AUTOMATIC1111's web UI API (modules/api/api.py, `--api`), enough for its clients and scripts: POST
/sdapi/v1/txt2img (prompt, negative_prompt, steps, cfg_scale, seed, sampler_name with A1111's labels such as
"Euler a" and "DPM++ 2M Karras", scheduler, batch_size x n_iter, override_settings.sd_model_checkpoint) answered
with base64 PNGs, the request as `parameters` and an `info` JSON string; GET /sdapi/v1/progress (the generation under
way: share of steps, ETA, current x0-hat), POST /sdapi/v1/interrupt and skip (the generations under way stop),
sd-models, samplers and options. A class model reads its class from the prompt ("class 7" or "7", as difflab's PNGs
write it). The model draws at its own size: width and height are accepted and the size drawn is reported in `info`.
Fields whose features difflab does not have (hires fix, face restoration, tiling, variation seeds, scripts) are
refused (422)."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from difflab.serve.requests import RequestRefused, resolve

SCHEDULERS = {"automatic": None, "karras": "karras", "exponential": "log_snr", "uniform": "uniform_t"}
CLASS_PROMPT = re.compile(r"^\s*(?:class\s+)?(\d+)\s*$", re.IGNORECASE)


class Txt2ImgBody(BaseModel):
    """A1111's StableDiffusionTxt2ImgProcessingAPI fields; other keys are refused (422)."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field("", max_length=2000)
    negative_prompt: str = Field("", max_length=2000)
    styles: list[str] = Field(default_factory=list)
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = Field(None, max_length=100)
    sampler_index: str | None = Field(None, max_length=100)
    scheduler: str | None = Field(None, max_length=100)
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = Field(7.0, ge=0, le=100)
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    denoising_strength: float | None = None
    s_churn: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] = Field(default_factory=dict)
    override_settings_restore_afterwards: bool = True
    enable_hr: bool = False
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    send_images: bool = True
    save_images: bool = False
    comments: dict[str, Any] | None = None


def add_a1111_routes(app: FastAPI, server) -> None:
    """Register /sdapi/v1/txt2img, progress, interrupt, skip, sd-models, samplers and options on the app."""
    from difflab.serve.app import wait_for

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(body: Txt2ImgBody):
        refuse_unsupported(body)
        model = server.model(model_name(body.override_settings.get("sd_model_checkpoint"), server.models))
        settings = generation_settings(body, model)
        job = server.queue.submit(resolve(model, server.limits, **settings))
        try:
            described = await wait_for(job)
        except asyncio.CancelledError:  # the client went away (or the server stops): nobody will read the images
            server.queue.cancel(job)
            server.queue.discard_images(job)
            raise
        if described["status"] == "failed":
            raise RequestRefused(f"generation failed: {described['error']}", status=500)
        # done, or cancelled (an /sdapi/v1/interrupt, or the JSON API's cancel): A1111 answers an interrupted
        # generation with what it has; difflab writes no image of an unfinished job, so that is none
        images = [base64.b64encode(p.read_bytes()).decode() for p in job.images] if body.send_images else []
        answer = {"images": images, "parameters": body.model_dump(), "info": json.dumps(info(job, body))}
        if not body.save_images:  # A1111's default: the answer carries the images, the server keeps none
            server.queue.discard_images(job)
        return answer

    @app.get("/sdapi/v1/progress")
    async def progress(skip_current_image: bool = False):
        """A1111's progress of the generation under way (clients poll it while their txt2img call waits): the first
        running job's share of steps done, an ETA from its pace, and its x0-hat as base64 PNG."""
        running = server.queue.running()
        job = running[0] if running else None
        done = job.step / job.generation.steps if job else 0.0
        eta = (time.monotonic() - job.started) * (1 - done) / done if job and job.started and done else 0.0
        # (made off the event loop: a latent model's preview decodes its latents)
        image = None if job is None or skip_current_image else await asyncio.to_thread(job.current_preview)
        state = {"skipped": False, "interrupted": False, "job": job.id if job else "",
                 "job_count": len(running) + server.queue.pending(), "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
                 "job_no": 0, "sampling_step": job.step if job else 0,
                 "sampling_steps": job.generation.steps if job else 0}  # fmt: skip
        return {"progress": done, "eta_relative": eta, "state": state,
                "current_image": image.split(",", 1)[1] if image else None, "textinfo": None}  # fmt: skip

    @app.post("/sdapi/v1/interrupt")
    async def interrupt():
        """A1111's Interrupt button: the generations under way stop (queued ones go on); their txt2img calls answer
        with no images and `interrupted` in `info`."""
        for job in server.queue.running():
            server.queue.cancel(job)
        return {}

    @app.post("/sdapi/v1/skip")
    async def skip():
        """A1111's Skip: the image under way is dropped and the next one drawn; difflab draws a request's images in
        one batch, so skipping is interrupting it."""
        return await interrupt()

    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        return [{"title": name, "model_name": name, "hash": m.pipe.weights_hash(), "sha256": None, "filename": name,
                 "config": None} for name, m in server.models.items()]  # fmt: skip

    @app.get("/sdapi/v1/samplers")
    async def samplers():
        from difflab.sampling.aliases import SAMPLER_ALIASES

        labels = [k for k in SAMPLER_ALIASES if not k.startswith(("k_", "sample_")) and not k.endswith("Scheduler")]
        return [{"name": label, "aliases": [SAMPLER_ALIASES[label][0]], "options": {}} for label in labels]

    @app.get("/sdapi/v1/options")
    async def options():
        return {"sd_model_checkpoint": server.model(None).name}


def refuse_unsupported(body: Txt2ImgBody) -> None:
    """Refuse (422) what difflab cannot honour rather than ignore it."""
    asked = {"enable_hr": body.enable_hr, "restore_faces": body.restore_faces, "tiling": body.tiling,
             "subseed_strength": body.subseed_strength > 0, "script_name": body.script_name,
             "alwayson_scripts": body.alwayson_scripts, "styles": body.styles}  # fmt: skip
    unsupported = [name for name, value in asked.items() if value]
    if unsupported:
        raise RequestRefused(f"difflab serve does not support {', '.join(unsupported)}; drop them")
    others = set(body.override_settings) - {"sd_model_checkpoint"}
    if others:
        raise RequestRefused(f"override_settings takes only sd_model_checkpoint here, not {', '.join(sorted(others))}")


def model_name(checkpoint: str | None, models: dict) -> str | None:
    """A model named as A1111 names checkpoints: "name", "name.safetensors" or "name [hash]"."""
    if not checkpoint:
        return None
    name = re.sub(r"\s*\[[0-9a-f]+\]$", "", checkpoint.strip())
    name = re.sub(r"\.(safetensors|ckpt)$", "", name)
    return name if name in models or checkpoint not in models else checkpoint


def generation_settings(body: Txt2ImgBody, model) -> dict[str, Any]:
    """`resolve`'s keywords for an A1111 request: a class model's class read from the prompt."""
    scheduler = (body.scheduler or "automatic").lower()
    if scheduler not in SCHEDULERS:
        raise RequestRefused(f"unknown scheduler '{body.scheduler}'; use one of Automatic, Karras, Exponential, "
                             "Uniform")  # fmt: skip
    options = {k: v for k, v in {"eta": body.eta, "s_churn": body.s_churn, "s_noise": body.s_noise}.items()
               if v is not None}  # fmt: skip
    settings = {"sampler": body.sampler_name or body.sampler_index, "grid": SCHEDULERS[scheduler], "steps": body.steps,
                "seed": body.seed, "n": body.batch_size * body.n_iter, "options": options}  # fmt: skip
    if model.conditioning == "text":
        return settings | {"prompt": body.prompt, "negative_prompt": body.negative_prompt, "guidance": body.cfg_scale}
    if model.conditioning == "class" and body.prompt.strip():
        match = CLASS_PROMPT.match(body.prompt)
        if match is None:
            raise RequestRefused(f"model '{model.name}' is a class model: the prompt names a class, e.g. \"class 7\" "
                                 f"(0..{model.pipe.num_classes - 1})")  # fmt: skip
        return settings | {"class_label": int(match.group(1)), "guidance": body.cfg_scale}
    if body.negative_prompt.strip():
        raise RequestRefused(f"model '{model.name}' is {model.conditioning}: it takes no negative prompt")
    return settings


def info(job, body: Txt2ImgBody) -> dict[str, Any]:
    """A1111's `info`: what was drawn, with one infotext (the PNG's `parameters` text) per image."""
    from PIL import Image

    g = job.generation
    height, width = g.model.pipe.sample_shape[-2:]
    infotexts = []
    for path in job.images:
        with Image.open(path) as image:
            infotexts.append(image.text.get("parameters", ""))
    return {"prompt": body.prompt, "all_prompts": [body.prompt] * g.n, "negative_prompt": body.negative_prompt,
            "all_negative_prompts": [body.negative_prompt] * g.n, "seed": g.seeds[0], "all_seeds": g.seeds,
            "subseed": -1, "all_subseeds": [-1] * g.n, "subseed_strength": 0, "width": width, "height": height,
            "sampler_name": body.sampler_name or g.sampler, "cfg_scale": g.guidance, "steps": g.steps,
            "batch_size": body.batch_size, "sd_model_name": g.model.name, "sd_model_hash": g.model.pipe.weights_hash(),
            "index_of_first_image": 0, "infotexts": infotexts, "styles": [], "clip_skip": 1,
            "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "version": "difflab",
            "interrupted": job.status == "cancelled"}  # fmt: skip
