"""`difflab serve`: the JSON API (models, samplers, generate with progress previews, cancel, PNGs with metadata), the
AUTOMATIC1111 txt2img endpoint, batching of compatible requests with each sample's seed kept, and refusals (limits,
unknown model or fields, queue full, token, paths)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import difflab
from difflab.cli.main import main
from difflab.serve import build_server, create_app
from difflab.serve.jobs import MAX_BACKLOG, Job, deliver
from difflab.serve.requests import Generation, Limits
from tests.conftest import assert_one_line_error, run_cli

STEPS = 4


@pytest.fixture(scope="module")
def models(tmp_path_factory, text_run, digits_class_run):
    """A folder of runs: a class model on the digits, the text model on the shapes, and a 2-D toy (not servable)."""
    folder = tmp_path_factory.mktemp("served") / "models"
    folder.mkdir()
    (folder / "digits").symlink_to(digits_class_run, target_is_directory=True)
    assert main(["train", "--data", "moons", "--steps", "2", "--out", str(folder / "moons"), "--no-progress"]) == 0
    (folder / "shapes").symlink_to(text_run, target_is_directory=True)
    return folder


@pytest.fixture
def server(models, tmp_path):
    server = build_server(models, out_dir=tmp_path / "out", limits=Limits(max_n=4, max_steps=50, max_work=60,
                                                                           max_queue=3, keep_jobs=4))  # fmt: skip
    yield server
    server.queue.stop()


@pytest.fixture
def client(server):
    return TestClient(create_app(server))


def events(client, job_id):
    """The job's server-sent events as (name, data) pairs, to the final one."""
    out, name = [], None
    with client.stream("GET", f"/api/jobs/{job_id}/events") as stream:
        for line in stream.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                out.append((name, json.loads(line[6:])))
    return out


def png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def generate(client, **body):
    response = client.post("/api/generate", json=body)
    assert response.status_code == 202, response.text
    return response.json()


def test_the_models_and_samplers_are_listed_by_name(client):
    listed = client.get("/api/models").json()
    kinds = {m["name"]: m["conditioning"] for m in listed["models"]}
    assert kinds == {"digits": "class", "shapes": "text"}  # the 2-D toy is not an image model: skipped
    digits = next(m for m in listed["models"] if m["name"] == "digits")
    assert digits["num_classes"] == 10 and digits["size"] == [8, 8] and digits["channels"] == 1
    assert listed["default"] == "digits"
    samplers = {s["name"]: s for s in client.get("/api/samplers").json()["samplers"]}
    assert "Euler a" in samplers["euler_ancestral"]["aliases"] and "eta" in samplers["ddim"]["options"]
    assert client.get("/api/limits").json()["max_n"] == 4


def events_from_the_start(client, server, **body):
    """Generate with the queue paused until a subscriber listens: it sees every step, however slow the machine."""
    heard: list = []
    with server.queue.paused():
        job = generate(client, **body)
        listener = threading.Thread(target=lambda: heard.extend(events(client, job["id"])))
        listener.start()
        deadline = time.monotonic() + 30
        while server.queue.jobs[job["id"]].watchers() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.queue.jobs[job["id"]].watchers() == 1, "the listener did not subscribe within 30 s"
    listener.join(timeout=120)
    assert not listener.is_alive(), "the job's events did not end within 120 s"
    return job, heard


def test_a_job_streams_each_steps_preview_then_its_pngs_with_metadata(client, server, models):
    job, stream = events_from_the_start(client, server, model="digits", class_label=3, seed=5, n=2, steps=STEPS,
                                        sampler="euler")  # fmt: skip
    assert job["seeds"] == [5, 6]
    progress = [data for name, data in stream if name == "progress"]
    assert [p["step"] for p in progress] == list(range(1, STEPS + 1))  # every step, in order
    previews = [np.asarray(png(base64.b64decode(p["preview"].split(",")[1]))) for p in progress]
    assert previews[0].shape == (8, 16)  # the job's two x0-hat images side by side
    assert not np.array_equal(previews[0], previews[-1])  # the prediction changes as the noise falls
    name, done = stream[-1]
    assert name == "done" and done["status"] == "done" and len(done["images"]) == 2
    first = client.get(done["images"][0])
    image = png(first.content)
    meta = json.loads(image.text["difflab"])
    assert meta["seed"] == 5 and meta["class"] == "3" and meta["sampler"] == "euler" and meta["steps"] == STEPS
    assert "Seed: 5" in image.text["parameters"] and image.text["parameters"].startswith("class 3")
    pipe = difflab.load(models / "digits")
    alone = pipe.to_pil(pipe.sample(seeds=[5], cond={"class_label": 3}, sampler="euler", steps=STEPS))[0]
    assert np.array_equal(np.asarray(image), np.asarray(alone))  # the served image is the library's, bit for bit


def test_a_subscriber_arriving_mid_job_is_shown_the_latest_step_with_its_preview():
    job = Job(Generation(model=None, sampler="euler", grid=None, steps=STEPS, seeds=[0]))
    made = []
    job.progress(2, lambda: made.append(2) or "data:image/png;base64,two")
    assert made == []  # nobody listening: no preview drawn
    loop = asyncio.new_event_loop()
    try:
        kind, latest = job.subscribe(loop).get_nowait()
    finally:
        loop.close()
    assert (kind, latest["step"], latest["preview"]) == ("progress", 2, "data:image/png;base64,two") and made == [2]
    assert job.current_preview() == "data:image/png;base64,two" and made == [2]  # kept, not made again


def test_a_served_png_is_drawn_again_from_its_metadata(client, tmp_path, capsys):
    job = generate(client, model="digits", class_label=7, seed=11, steps=STEPS, guidance=2.0)
    done = events(client, job["id"])[-1][1]
    served = tmp_path / "served.png"
    served.write_bytes(client.get(done["images"][0]).content)
    code, _, _ = run_cli(capsys, "sample", "--from-png", served, "--out", tmp_path / "again.png")
    assert code == 0
    assert np.array_equal(np.asarray(png(served.read_bytes())), np.asarray(Image.open(tmp_path / "again.png")))


def test_compatible_requests_share_each_denoiser_call_and_keep_their_images(server, client):
    pipe = server.models["digits"].pipe
    calls = []
    hook = pipe.denoiser.net.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        with server.queue.paused():  # three requests arrive together
            jobs = [generate(client, model="digits", class_label=label, seed=seed, n=n, steps=STEPS)
                    for label, seed, n in ((1, 40, 1), (2, 50, 2), (3, 60, 1))]  # fmt: skip
        together = [events(client, job["id"])[-1][1] for job in jobs]
        assert calls == [4] * STEPS  # one call of all four samples per step
        calls.clear()
        for done in together:
            params = done["parameters"]
            alone = generate(client, model="digits", class_label=params["class_label"], seed=params["seeds"][0],
                             n=params["n"], steps=STEPS)  # fmt: skip
            again = events(client, alone["id"])[-1][1]
            for a, b in zip(done["images"], again["images"], strict=True):
                batched, single = (np.asarray(png(client.get(u).content)).astype(int) for u in (a, b))
                assert np.abs(batched - single).max() <= 1  # the same image, up to the last bit's rounding
        assert calls == [1] * STEPS + [2] * STEPS + [1] * STEPS
    finally:
        hook.remove()


def test_clients_that_send_again_once_answered_are_gathered_into_one_batch(models, tmp_path):
    server = build_server(models, out_dir=tmp_path)
    server.queue.batch_wait = 30.0  # long, so that the test's own pace cannot split the batch
    pipe = server.models["digits"].pipe
    calls = []
    hook = pipe.denoiser.net.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        client = TestClient(create_app(server))
        with server.queue.paused():
            first = [generate(client, model="digits", class_label=1, seed=s, steps=STEPS)["id"] for s in (1, 2)]
        assert [events(client, job)[-1][0] for job in first] == ["done", "done"]
        calls.clear()
        again = []
        for seed in (3, 4):  # the two answered clients send again, one after the other
            again.append(generate(client, model="digits", class_label=1, seed=seed, steps=STEPS)["id"])
        assert [events(client, job)[-1][0] for job in again] == ["done", "done"]
        assert calls == [2] * STEPS  # drawn together: the worker waited for the second
    finally:
        hook.remove()
        server.queue.stop()


def test_requests_that_differ_in_steps_or_sampler_are_drawn_apart(server, client):
    pipe = server.models["digits"].pipe
    calls = []
    hook = pipe.denoiser.net.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        with server.queue.paused():
            a = generate(client, model="digits", class_label=1, seed=1, steps=STEPS)
            b = generate(client, model="digits", class_label=1, seed=2, steps=STEPS + 1)
            c = generate(client, model="digits", class_label=1, seed=3, steps=STEPS, sampler="euler")
        for job in (a, b, c):
            assert events(client, job["id"])[-1][0] == "done"
        assert calls == [1] * (3 * STEPS + 1)
    finally:
        hook.remove()


def test_a_text_model_takes_prompts_and_refuses_an_unknown_word(client):
    job = generate(client, model="shapes", prompt="a red circle", negative_prompt="a blue square", seed=1,
                   steps=STEPS, guidance=3.0)  # fmt: skip
    done = events(client, job["id"])[-1][1]
    image = png(client.get(done["images"][0]).content)
    assert image.size == (16, 16) and image.mode == "RGB"
    assert image.text["parameters"].startswith("a red circle\nNegative prompt: a blue square")
    refused = client.post("/api/generate", json={"model": "shapes", "prompt": "a red zeppelin"})
    assert refused.status_code == 422 and "zeppelin" in refused.json()["detail"]


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"model": "mnist"}, 404, "unknown model 'mnist'; this server offers digits, shapes"),
        ({"model": "../digits"}, 404, "unknown model '../digits'"),
        ({"model": "digits", "n": 5}, 422, "max_n"),
        ({"model": "digits", "steps": 51}, 422, "max_steps"),
        ({"model": "digits", "steps": 0}, 422, "steps must lie in 1..50"),
        ({"model": "digits", "n": 2, "steps": 31}, 422, "max_work"),
        ({"model": "digits", "sampler": "turbo"}, 422, "unknown sampler 'turbo'"),
        ({"model": "digits", "sampler": "ddim", "options": {"s_churn": 1}}, 422, "does not take s_churn"),
        ({"model": "digits", "prompt": "a seven"}, 422, "takes no prompt; pass class_label"),
        ({"model": "digits", "class_label": 10}, 422, "class_label must lie in 0..9"),
        ({"model": "digits", "seed": 2**63}, 422, "seeds must lie in 0..2**63 - 1"),
        ({"model": "digits", "grid": "tuned", "steps": 4}, 422, "no grid tuned for ddim at 4 steps"),
    ],
)
def test_bad_requests_are_refused_with_what_to_change(client, body, status, fragment):
    response = client.post("/api/generate", json=body)
    assert response.status_code == status and fragment in response.json()["detail"]


def test_malformed_json_and_unknown_fields_are_refused(client):
    bad = client.post("/api/generate", content=b"{model: digits", headers={"content-type": "application/json"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["type"] == "json_invalid"
    extra = client.post("/api/generate", json={"model": "digits", "path": "/etc/passwd"})
    assert extra.status_code == 422 and extra.json()["detail"][0]["loc"] == ["body", "path"]


def test_a_full_queue_answers_429_with_retry_after_and_cancels_leave_it(server, client):
    with server.queue.paused():
        jobs = [generate(client, model="digits", class_label=1, seed=s, steps=STEPS) for s in range(3)]
        full = client.post("/api/generate", json={"model": "digits", "class_label": 1})
        assert full.status_code == 429 and int(full.headers["Retry-After"]) >= 1
        cancelled = client.post(f"/api/jobs/{jobs[0]['id']}/cancel").json()
        assert cancelled["status"] == "cancelled"
        generate(client, model="digits", class_label=1, seed=9, steps=STEPS)  # room again
    assert events(client, jobs[0]["id"]) == [("cancelled", client.get(f"/api/jobs/{jobs[0]['id']}").json())]
    assert [events(client, job["id"])[-1][0] for job in jobs[1:]] == ["done", "done"]


def test_cancelling_a_running_job_stops_its_batch(server, client):
    pipe = server.models["digits"].pipe
    calls = []

    def cancel_on_third_call(module, args, out):
        calls.append(1)
        if len(calls) == 3:
            client.post(f"/api/jobs/{job['id']}/cancel")

    hook = pipe.denoiser.net.register_forward_hook(cancel_on_third_call)
    try:
        with server.queue.paused():
            job = generate(client, model="digits", class_label=2, seed=1, steps=40)
        assert events(client, job["id"])[-1][0] == "cancelled"
        assert len(calls) == 3  # the sampler stopped at the next step
        assert client.get(f"/api/jobs/{job['id']}").json()["images"] == []
    finally:
        hook.remove()


def test_no_request_reaches_a_file_outside_the_output_folder(server, client, tmp_path):
    job = generate(client, model="digits", class_label=0, seed=3, steps=STEPS)
    events(client, job["id"])
    images = f"/api/jobs/{job['id']}/images"
    for url in (f"{images}/1", f"{images}/-1", "/api/jobs/..%2F..%2Fetc/images/0", "/api/jobs/../../config.json"):
        assert client.get(url).status_code == 404
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and all(p.is_relative_to(tmp_path / "out") for p in written)


def test_finished_jobs_are_forgotten_beyond_keep_jobs(server, client):
    ids = []
    for seed in range(6):
        ids.append(generate(client, model="digits", class_label=1, seed=seed, steps=1)["id"])
        assert events(client, ids[-1])[-1][0] == "done"
    assert len(server.queue.jobs) <= 4 and ids[-1] in server.queue.jobs  # keep_jobs 4: the oldest are forgotten
    assert client.get(f"/api/jobs/{ids[0]}").status_code == 404


def test_the_a1111_txt2img_endpoint_answers_as_automatic1111_does(server, client):
    body = {"prompt": "class 7", "negative_prompt": "", "steps": STEPS, "cfg_scale": 2.5, "seed": 3, "batch_size": 2,
            "sampler_name": "DPM++ 2M Karras", "width": 512, "height": 512}  # fmt: skip
    answer = client.post("/sdapi/v1/txt2img", json=body).json()
    images = [png(base64.b64decode(b)) for b in answer["images"]]
    info = json.loads(answer["info"])
    assert len(images) == 2 and images[0].size == (8, 8)
    assert info["all_seeds"] == [3, 4] and info["width"] == 8 and info["sd_model_name"] == "digits"
    assert "Sampler: dpmpp_2m, Schedule type: karras, CFG scale: 2.5, Seed: 4" in info["infotexts"][1]
    assert answer["parameters"]["cfg_scale"] == 2.5
    text = {"prompt": "a green cross", "steps": STEPS, "sampler_name": "Euler a", "seed": -1,
            "override_settings": {"sd_model_checkpoint": "shapes [0123abcd]"}}  # fmt: skip
    info = json.loads(client.post("/sdapi/v1/txt2img", json=text).json()["info"])
    assert info["sd_model_name"] == "shapes" and 0 <= info["seed"] < 2**31  # -1: a random seed, reported
    assert "Sampler: euler_ancestral" in info["infotexts"][0]
    assert client.get("/sdapi/v1/sd-models").json()[1]["model_name"] == "shapes"
    assert not list(server.queue.out_dir.rglob("*.png"))  # save_images false (A1111's default): nothing kept
    saved = client.post("/sdapi/v1/txt2img", json=body | {"save_images": True, "batch_size": 1}).json()
    kept = list(server.queue.out_dir.rglob("*.png"))
    assert len(kept) == 1 and base64.b64decode(saved["images"][0]) == kept[0].read_bytes()
    assert {"name": "Euler a", "aliases": ["euler_ancestral"], "options": {}} in client.get("/sdapi/v1/samplers").json()


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"prompt": "class 3", "enable_hr": True}, "does not support enable_hr"),
        ({"prompt": "a cat"}, 'the prompt names a class, e.g. \\"class 7\\"'),
        ({"prompt": "class 3", "scheduler": "SGM Uniform"}, "unknown scheduler 'SGM Uniform'"),
        ({"prompt": "class 3", "override_settings": {"CLIP_stop_at_last_layers": 2}}, "takes only sd_model_checkpoint"),
        ({"prompt": "class 3", "override_settings": {"sd_model_checkpoint": "sdxl"}}, "unknown model 'sdxl'"),
        ({"prompt": "class 3", "hypernetwork": "x"}, "Extra inputs are not permitted"),
    ],
)
def test_a1111_requests_difflab_cannot_honour_are_refused(client, body, fragment):
    response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code in (404, 422) and fragment in response.text


def test_with_a_token_every_api_call_needs_it(models, tmp_path):
    token = "0123456789abcdef0123"
    server = build_server(models, out_dir=tmp_path, token=token)
    try:
        client = TestClient(create_app(server))
        assert client.get("/").status_code == 200 and "<html" in client.get("/").text  # the page itself is public
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token}):
            answer = client.get("/api/models", headers=headers)
            assert answer.status_code == 401 and answer.headers["WWW-Authenticate"] == "Bearer"
        assert client.post("/sdapi/v1/txt2img", json={"prompt": "class 1"}).status_code == 401
        assert client.get("/api/models", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    finally:
        server.queue.stop()


def test_serving_beyond_loopback_needs_a_token_file(models, tmp_path, capsys):
    code, _, err = run_cli(capsys, "serve", "--models", models, "--host", "0.0.0.0")
    assert_one_line_error(code, err, "binding to 0.0.0.0 (beyond this machine) needs --token-file")
    short = tmp_path / "token.txt"
    short.write_text("secret\n")
    code, _, err = run_cli(capsys, "serve", "--models", models, "--host", "0.0.0.0", "--token-file", short)
    assert_one_line_error(code, err, "is 6 characters; use at least 16")
    code, _, err = run_cli(capsys, "serve", "--models", models, "--token-file", tmp_path / "none.txt")
    assert_one_line_error(code, err, "cannot read --token-file")


def test_a_folder_without_servable_models_is_refused(tmp_path, capsys):
    code, _, err = run_cli(capsys, "serve", "--models", tmp_path / "missing")
    assert_one_line_error(code, err, "is not a folder")
    code, _, err = run_cli(capsys, "serve", "--models", tmp_path)
    assert_one_line_error(code, err, "no model the server can run under")


def test_the_page_is_one_offline_file(client):
    page = client.get("/").text
    assert "<script" in page and 'id="generate"' in page
    assert "http://" not in page and "https://" not in page  # nothing fetched from elsewhere


def test_a_running_server_answers_over_http(server):
    import urllib.request

    from difflab.serve import running

    with running(server) as url, urllib.request.urlopen(f"{url}/api/models") as answer:
        assert json.load(answer)["default"] == "digits"


def test_the_serve_command_answers_until_interrupted(models, tmp_path):
    import signal
    import subprocess
    import sys
    import urllib.request

    command = [sys.executable, "-m", "difflab", "serve", "--models", str(models), "--port", "0", "--out",
               str(tmp_path / "out"), "--threads", "1"]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = [proc.stdout.readline()]
        while " at http://" not in lines[-1] and lines[-1]:
            lines.append(proc.stdout.readline())
        assert lines[0].startswith("difflab serve: skipping moons: it needs inputs other than a prompt or a class")
        line = lines[-1]
        assert line.startswith("difflab serve: digits, shapes at http://127.0.0.1:"), lines
        url = line.split(" at ")[1].split()[0]
        with urllib.request.urlopen(f"{url}/api/models", timeout=60) as answer:
            assert [m["name"] for m in json.load(answer)["models"]] == ["digits", "shapes"]
        busy = subprocess.run([*command[:-4], "--port", url.rsplit(":", 1)[1]], capture_output=True, text=True)
        assert busy.returncode == 2 and "cannot listen on 127.0.0.1:" in busy.stderr  # the port is taken
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0


def test_a1111_progress_reports_the_generation_under_way(server, client):
    idle = client.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["current_image"] is None and idle["state"]["job_count"] == 0
    pipe = server.models["digits"].pipe
    seen = []

    def look(module, args, out):  # the third network call: two of eight steps are done
        if len(seen) == 2:
            seen.append(client.get("/sdapi/v1/progress").json())
        else:
            seen.append(None)

    hook = pipe.denoiser.net.register_forward_hook(look)
    try:
        job = generate(client, model="digits", class_label=4, seed=2, steps=8, sampler="euler")
        assert events(client, job["id"])[-1][0] == "done"
    finally:
        hook.remove()
    during = seen[2]
    assert during["progress"] == 0.25 and during["state"]["sampling_step"] == 2 and during["eta_relative"] > 0
    assert during["state"]["job"] == job["id"] and png(base64.b64decode(during["current_image"])).size == (8, 8)


@pytest.mark.parametrize("endpoint", ["interrupt", "skip"])
def test_a1111_interrupt_stops_the_generation_under_way_and_the_next_is_drawn(server, client, endpoint):
    pipe = server.models["digits"].pipe
    calls = []

    def count_and_stop_at_the_second_call(module, args, out):
        calls.append(len(calls))
        if len(calls) == 2 and stopping:
            assert client.post(f"/sdapi/v1/{endpoint}").json() == {}

    body = {"prompt": "class 4", "seed": 3, "steps": 8, "sampler_name": "Euler"}
    hook = pipe.denoiser.net.register_forward_hook(count_and_stop_at_the_second_call)
    try:
        stopping = True
        stopped = client.post("/sdapi/v1/txt2img", json=body)
        interrupted_calls, stopping = len(calls), False
        calls.clear()
        again = client.post("/sdapi/v1/txt2img", json=body).json()
    finally:
        hook.remove()
    assert stopped.status_code == 200 and stopped.json()["images"] == []
    assert json.loads(stopped.json()["info"])["interrupted"] is True
    per_step = len(calls) // 8  # network calls per step of the whole run
    assert len(calls) == 8 * per_step and interrupted_calls <= 2 * per_step  # stopped at the end of step 2 of 8
    assert len(again["images"]) == 1 and json.loads(again["info"])["interrupted"] is False
    assert client.post(f"/sdapi/v1/{endpoint}").json() == {}  # nothing under way: nothing to stop, no error


def test_a_job_cancelled_while_its_pngs_are_written_leaves_no_files(server, client, monkeypatch):
    from difflab.serve import jobs as jobs_module

    write = jobs_module.write_images

    def write_then_cancel(job, images, out_dir):
        paths = write(job, images, out_dir)
        assert all(p.is_file() for p in paths)
        server.queue.cancel(job)  # (an /sdapi/v1/interrupt arriving just then)
        return paths

    monkeypatch.setattr(jobs_module, "write_images", write_then_cancel)
    job = generate(client, model="digits", class_label=1, seed=0, n=2, steps=STEPS)
    assert events(client, job["id"])[-1][0] == "cancelled"
    assert not (server.queue.out_dir / job["id"]).exists()  # nothing left that no API can reach


def test_a_stopping_server_refuses_new_requests(server, client):
    server.queue.stop()
    refused = client.post("/api/generate", json={"model": "digits", "class_label": 1, "steps": STEPS})
    assert refused.status_code == 503 and "stopping" in refused.json()["detail"]


def test_a_reader_that_stopped_reading_skips_progress_but_gets_the_end():
    queue: asyncio.Queue = asyncio.Queue()
    for step in range(MAX_BACKLOG + 10):
        deliver(queue, ("progress", {"step": step}))
    deliver(queue, ("done", {"status": "done"}))
    events = [queue.get_nowait() for _ in range(queue.qsize())]
    assert [e[1]["step"] for e in events[:-1]] == list(range(MAX_BACKLOG))  # the first ones, in order; no more
    assert events[-1] == ("done", {"status": "done"})
