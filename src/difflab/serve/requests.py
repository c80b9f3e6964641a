"""A generation request as the server checks it: the model, its condition (prompt or class), the sampler and its
options, steps, guidance, seeds and n, each checked against the model and the server's limits before it is queued.
What may share one denoiser call is what shares `batch_key`: same model, sampler, grid, options, steps, guidance
and negative prompt; prompts, classes and seeds differ per sample."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from difflab.errors import DifflabError
from difflab.generate import check_seeds
from difflab.serve.models import ServedModel


class RequestRefused(DifflabError):
    """A request the server refuses: `status` is the HTTP status (404 unknown model, 422 bad or too large)."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """What one request may ask for and how much the server holds: samples per request, steps, total work (samples
    x steps), jobs waiting in the queue, samples in one denoiser call, finished jobs remembered."""

    max_n: int = 16
    max_steps: int = 200
    max_work: int = 1600
    max_queue: int = 32
    max_batch: int = 16
    keep_jobs: int = 256

    def check(self, n: int, steps: int) -> None:
        """Refuse (422, naming the limit) a request over max_n, max_steps or max_work."""
        for name, value, limit in (("n", n, self.max_n), ("steps", steps, self.max_steps)):
            if not 1 <= value <= limit:
                raise RequestRefused(f"{name} must lie in 1..{limit} on this server (max_{name}), got {value}")
        if n * steps > self.max_work:
            raise RequestRefused(f"n x steps = {n * steps} is over this server's limit of {self.max_work} "
                                 "(max_work); ask for fewer images or steps")  # fmt: skip


@dataclass
class Generation:
    """A checked request: everything resolved (defaults filled in, random seeds drawn)."""

    model: ServedModel
    sampler: str  # the registered name
    grid: str | None
    steps: int
    seeds: list[int]
    prompt: str | None = None
    negative_prompt: str | None = None
    class_label: int | None = None
    guidance: float | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.seeds)

    def batch_key(self) -> tuple:
        """Generations with equal keys are drawn in one denoiser call per step (each sample keeps its own seed)."""
        return (self.model.name, self.sampler, self.grid, self.steps, self.guidance, self.negative_prompt,
                self.class_label is None, tuple(sorted(self.options.items())))  # fmt: skip

    def parameters(self) -> dict[str, Any]:
        """What the job reports and the PNGs record of the request."""
        return {"model": self.model.name, "prompt": self.prompt, "negative_prompt": self.negative_prompt,
                "class_label": self.class_label, "sampler": self.sampler, "grid": self.grid, "steps": self.steps,
                "guidance": self.guidance, "seeds": self.seeds, "n": self.n, "options": self.options}  # fmt: skip


def resolve(
    model: ServedModel,
    limits: Limits,
    *,
    prompt: str | None = None,
    negative_prompt: str | None = None,
    class_label: int | None = None,
    sampler: str | None = None,
    grid: str | None = None,
    options: dict[str, Any] | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int | None = None,
    n: int = 1,
) -> Generation:
    """A request checked against its model and the limits; seed None or -1 draws a random one (AUTOMATIC1111's
    convention). Every refusal is a RequestRefused naming what to change."""
    from difflab.sampling import resolve_sampler
    from difflab.sampling.aliases import is_tuned_grid, resolve_grid

    pipe = model.pipe
    defaults = pipe.sampling_defaults()
    try:
        spec, implied_grid = resolve_sampler(sampler or defaults["sampler"])
        pipe.formulation.check_sampler(spec)
        grid = resolve_grid(grid) if grid else implied_grid
    except DifflabError as err:
        raise RequestRefused(str(err)) from None
    options = dict(options or {})
    unknown = set(options) - set(spec.options)
    if unknown:
        raise RequestRefused(f"sampler '{spec.name}' does not take {', '.join(sorted(unknown))}; it takes "
                             f"{', '.join(spec.options) or 'no options'}")  # fmt: skip
    steps = defaults["steps"] if steps is None else steps
    limits.check(n, steps)
    if is_tuned_grid(grid):  # levels stored with the checkpoint: refused now if there are none, not in the queue
        try:
            pipe.sigmas(steps, grid, spec.name)
        except DifflabError as err:
            raise RequestRefused(str(err)) from None
    seed = secrets.randbelow(2**31) if seed is None or seed == -1 else seed
    try:
        check_seeds(seed, n)
    except DifflabError as err:
        raise RequestRefused(str(err)) from None
    _check_condition(model, prompt, negative_prompt, class_label)
    return Generation(model, spec.name, grid, steps, list(range(seed, seed + n)), prompt or None,
                      negative_prompt or None, class_label, guidance, options)  # fmt: skip


def _check_condition(model: ServedModel, prompt: str | None, negative: str | None, label: int | None) -> None:
    """A text model takes a prompt (its words known to a scratch tokenizer), a class model a label in range, an
    unconditional model neither."""
    kind = model.conditioning
    if kind != "text" and (prompt or negative):
        raise RequestRefused(f"model '{model.name}' is {kind}: it takes no prompt"
                             + ("; pass class_label" if kind == "class" else ""))  # fmt: skip
    if kind != "class" and label is not None:
        raise RequestRefused(f"model '{model.name}' is {kind}: it takes no class_label")
    k = model.pipe.num_classes
    if kind == "class" and label is not None and not 0 <= label < k:
        raise RequestRefused(f"class_label must lie in 0..{k - 1} for model '{model.name}', got {label}")
    text = model.pipe.config.model.text
    if kind == "text" and hasattr(text, "tokenizer"):  # a scratch tokenizer knows its words: an unknown one is named
        try:
            text.tokenizer().encode([p for p in (prompt, negative) if p])
        except DifflabError as err:
            raise RequestRefused(str(err)) from None
