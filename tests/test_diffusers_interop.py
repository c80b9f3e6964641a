"""diffusers interop (difflab.interop), offline: tiny randomly initialised diffusers components saved to tmp folders.

Equal-timestep equality of difflab's samplers and diffusers' own loops (DDIM, Euler, Stable Diffusion's and DiT's
pipelines with classifier-free guidance) is measured as max |difflab - diffusers| / max |diffusers| on the final
state, asserted <= 1e-5. Measured (diffusers 0.42.1, torch 2.13 CPU): 2e-7 .. 1.4e-6. The two compute the same map in
different float32 orders: difflab works in sigma space (x = x_t / sqrt(abar), steps in sigma) and recovers the
network's timestep from sigma (log-sigma interpolation in float64, returned in float32: t ~ 900 carries ~6e-5 of
rounding into the time embedding), diffusers steps x_t with sqrt(abar) products in float32; the untrained networks'
outputs (|x| ~ 30-50, DiT's ~120) amplify each rounding over the steps. An error in the maths (a wrong c_in,
prediction, timestep or grid) is 1e-2 or more.
"""

from __future__ import annotations

import json
import math
import shutil
import sys

import numpy as np
import pytest
import torch
from conftest import tiny_clip_tokenizer

from difflab.errors import DifflabError

diffusers = pytest.importorskip("diffusers")

from difflab.generate import generate  # noqa: E402
from difflab.interop import scheduler_sigmas  # noqa: E402
from difflab.interop.diffusers_schedule import SchedulerSpec  # noqa: E402
from difflab.sampling.ancestral import sample_ddim  # noqa: E402
from difflab.sampling.ode import sample_euler  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers' Euler
RTOL = 1e-5
SD_SCHEDULER = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False,
                "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading"}  # fmt: skip
CLIP_WORDS = ["a", "red", "blue", "circle", "square", "photo", "of", "the"]


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max()) / float(theirs.abs().max())


@pytest.fixture(scope="module")
def pixel_folder(tmp_path_factory):
    """A DDPMPipeline folder: tiny UNet2DModel (attention at 4x4, 2 heads) + SD-style DDIMScheduler, eps prediction."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=8,
    )  # fmt: skip
    scheduler = diffusers.DDIMScheduler(prediction_type="epsilon", **SD_SCHEDULER)
    folder = tmp_path_factory.mktemp("ddpm-folder")
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(folder), safe_serialization=True)
    return folder


def with_scheduler(folder, tmp_path, **changes):
    """A copy of `folder` whose scheduler config has `changes`."""
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    path = copy / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))
    return copy


def diffusers_ddim(unet, scheduler, noise, steps, **unet_kwargs):
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t, **unet_kwargs).sample, t, x, eta=0.0).prev_sample
    return x


def difflab_ddim(denoiser, scheduler, schedule, noise, cond=None):
    """difflab's ddim from diffusers' start (x_t = noise at t_0, i.e. x = noise sqrt(1 + sigma_0^2)), to diffusers' last
    level, returned as diffusers' state x_t = x / sqrt(1 + sigma^2)."""
    sigmas = scheduler_sigmas(scheduler, schedule)
    x = sample_ddim(denoiser, noise * math.sqrt(1 + float(sigmas[0]) ** 2), sigmas, cond=cond)
    return x / math.sqrt(1 + float(sigmas[-1]) ** 2)


# ---- the schedule ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"])
def test_the_schedule_table_is_diffusers_own(schedule):
    config = {"beta_schedule": schedule, "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}
    theirs = diffusers.DDPMScheduler(**config).alphas_cumprod  # DDPM: the one with all four
    spec = SchedulerSpec.from_config(config)
    assert torch.equal(spec.float32_alpha_bars(), theirs)
    torch.testing.assert_close(spec.discrete_schedule().alpha_bars, theirs.double(), rtol=1e-12, atol=0)


def test_scaled_linear_schedule_follows_its_closed_form():
    from difflab.schedules import DiscreteSchedule

    s = DiscreteSchedule.from_name("scaled_linear", 1000)
    root = s.betas.sqrt()
    assert root[0].item() == pytest.approx(0.00085**0.5, rel=1e-12) and s.betas[-1].item() == pytest.approx(0.012)
    torch.testing.assert_close(root.diff(), torch.full((999,), (0.012**0.5 - 0.00085**0.5) / 999, dtype=torch.float64))
    spec = SchedulerSpec.from_config(SD_SCHEDULER)
    assert spec.matches_difflab_schedule() and spec.ddpm_config().schedule == "scaled_linear"
    other = SchedulerSpec.from_config(SD_SCHEDULER | {"beta_end": 0.02})
    assert not other.matches_difflab_schedule()


@pytest.mark.parametrize(
    ("change", "message"),
    [({"beta_schedule": "exotic"}, "beta_schedule 'exotic' is not supported"),
     ({"prediction_type": "flow"}, "prediction_type 'flow' is not supported"),
     ({"rescale_betas_zero_snr": True}, "sigma_max = infinity"),
     ({"timestep_spacing": "karras"}, "timestep_spacing 'karras'"),
     ({"num_train_timesteps": 1}, "num_train_timesteps")],
)  # fmt: skip
def test_scheduler_configs_difflab_cannot_run_are_refused_in_one_line(change, message):
    with pytest.raises(DifflabError, match=message) as err:
        SchedulerSpec.from_config(SD_SCHEDULER | change)
    assert "\n" not in str(err.value)


# ---- pixel-space folders: DDIM and Euler against diffusers' loops ------------------------------------------------
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_ddim_matches_diffusers_at_equal_timesteps(pixel_folder, tmp_path, prediction):
    import difflab

    folder = with_scheduler(pixel_folder, tmp_path, prediction_type=prediction)
    pipe = difflab.load(folder)
    unet = diffusers.UNet2DModel.from_pretrained(str(folder / "unet")).eval()
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    for steps in (5, 20):
        scheduler = diffusers.DDIMScheduler.from_pretrained(str(folder / "scheduler"))
        theirs = diffusers_ddim(unet, scheduler, noise, steps)
        ours = difflab_ddim(pipe.denoiser, scheduler, pipe.formulation.discrete_schedule, noise)
        assert rel_err(ours, theirs) <= RTOL, (steps, rel_err(ours, theirs))
    # the guard has teeth: the neighbouring timesteps' grid is far off
    wrong = scheduler_sigmas(scheduler, pipe.formulation.discrete_schedule)
    x = sample_ddim(pipe.denoiser, noise * math.sqrt(1 + float(wrong[1]) ** 2), wrong[1:])
    assert rel_err(x / math.sqrt(1 + float(wrong[-1]) ** 2), theirs) > 1e-3


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_euler_matches_diffusers_at_equal_timesteps(pixel_folder, tmp_path, spacing):
    import difflab

    folder = with_scheduler(pixel_folder, tmp_path, prediction_type="v_prediction")
    pipe = difflab.load(folder)
    unet = diffusers.UNet2DModel.from_pretrained(str(folder / "unet")).eval()
    scheduler = diffusers.EulerDiscreteScheduler.from_pretrained(str(folder / "scheduler"), timestep_spacing=spacing)
    scheduler.set_timesteps(10)
    assert bool((scheduler.timesteps == scheduler.timesteps.round()).all())  # integer t: difflab's t(sigma) is t
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    x = noise * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(scheduler.scale_model_input(x, t), t).sample, t, x).prev_sample
    ours = sample_euler(pipe.denoiser, noise * scheduler.init_noise_sigma, scheduler_sigmas(scheduler, None))
    assert rel_err(ours, x) <= RTOL, rel_err(ours, x)


def test_a_pixel_folder_is_a_pipeline_whose_default_grid_is_the_schedulers(pixel_folder):
    import difflab
    from difflab.interop import DiffusersDDPM

    pipe = difflab.load(pixel_folder)
    assert isinstance(pipe.formulation, DiffusersDDPM) and pipe.sample_shape == (3, 8, 8) and pipe.accepts == set()
    assert pipe.config.formulation.schedule == "scaled_linear" and pipe.autoencoder is None
    scheduler = diffusers.DDIMScheduler.from_pretrained(str(pixel_folder / "scheduler"))
    scheduler.set_timesteps(10)
    expected = torch.cat([pipe.formulation.discrete_schedule.sigmas[scheduler.timesteps], torch.zeros(1)]).float()
    torch.testing.assert_close(pipe.sigmas(10), expected)
    for sampler in ("dpmpp_2m", "heun", "euler_ancestral"):
        x = pipe.sample(2, sampler=sampler, steps=4, seed=3)
        assert x.shape == (2, 3, 8, 8) and bool(x.isfinite().all())
    torch.testing.assert_close(pipe.sample(1, steps=4, seed=4), pipe.sample(2, steps=4, seed=4)[:1], atol=1e-5, rtol=0)


def test_difflab_sample_runs_on_a_diffusers_folder(pixel_folder, tmp_path, capsys):
    from conftest import run_cli

    import difflab

    code, out, err = run_cli(capsys, "sample", "--ckpt", pixel_folder, "--n", "2", "--steps", "3", "--sampler",
                             "euler", "--out", tmp_path / "x.png")  # fmt: skip
    assert code == 0 and (tmp_path / "x.png").is_file(), err
    scheduler = diffusers.DDPMScheduler.from_pretrained(str(pixel_folder / "scheduler"))
    scheduler.set_timesteps(4)  # a DDPMScheduler ends at sigma = 0 (no final_alpha_cumprod)
    assert float(scheduler_sigmas(scheduler, difflab.load(pixel_folder).formulation.discrete_schedule)[-1]) == 0


def tiny_vae():
    """An AutoencoderKL with factor 2 and 4 latent channels, for 16x16 RGB images (random weights)."""
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4,
        layers_per_block=1, sample_size=16,
    )  # fmt: skip


# ---- Stable Diffusion-like folders: text, guidance, VAE ------------------------------------------------------------
@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """A StableDiffusionPipeline folder: tiny UNet2DConditionModel, CLIPTextModel with a BPE tokenizer of a few words
    (context 16), AutoencoderKL with factor 2, SD's DDIMScheduler."""
    import transformers

    src = tmp_path_factory.mktemp("clip-src")
    tokenizer, vocab = tiny_clip_tokenizer(src, CLIP_WORDS)
    torch.manual_seed(0)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    ))  # fmt: skip
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=4, attention_head_dim=4,
    )  # fmt: skip
    vae = tiny_vae()
    scheduler = diffusers.DDIMScheduler(prediction_type="epsilon", **SD_SCHEDULER)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("sd-folder")
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def model_shape(pipe):
    """The shape the denoiser works at (Pipeline.model_shape where the pipeline has it: latents for SD)."""
    return getattr(pipe, "model_shape", pipe.sample_shape)


@pytest.fixture(scope="module")
def sd_pair(sd_folder):
    import difflab

    theirs = diffusers.StableDiffusionPipeline.from_pretrained(str(sd_folder), safety_checker=None)
    theirs.set_progress_bar_config(disable=True)
    return difflab.load(sd_folder), theirs


def test_stable_diffusion_with_guidance_matches_the_diffusers_pipeline(sd_pair):
    """difflab's ddim + classifier-free guidance (w = diffusers' guidance_scale) from the same latents, prompt and
    negative prompt as StableDiffusionPipeline(output_type="latent"): the empty negative prompt is difflab's null
    caption, which the wrapper gives the empty prompt's embedding, as diffusers' unconditional branch."""
    ours, theirs = sd_pair
    assert ours.accepts == {"text_embed", "text_mask", "text_pooled"} and model_shape(ours) == (4, 8, 8)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    for negative in (None, "a blue square"):
        expected = theirs(
            prompt="a red circle",
            negative_prompt=negative,
            num_inference_steps=5,
            guidance_scale=3.0,
            latents=noise,
            height=16,
            width=16,
            num_images_per_prompt=2,
            output_type="latent",
        ).images
        cond, guided = ours.prepare(2, prompt="a red circle", negative_prompt=negative, guidance=3.0)
        got = difflab_ddim(guided, theirs.scheduler, ours.formulation.discrete_schedule, noise, cond)
        assert rel_err(got, expected) <= RTOL, (negative, rel_err(got, expected))
    unguided = ours.prepare(2, prompt="a red circle", guidance=1.0)  # guidance matters: w = 1 is far from w = 3
    got = difflab_ddim(unguided[1], theirs.scheduler, ours.formulation.discrete_schedule, noise, unguided[0])
    assert rel_err(got, expected) > 1e-2


def test_txt2img_on_a_stable_diffusion_folder_writes_the_decoded_images(sd_pair, sd_folder, tmp_path, capsys):
    """`difflab txt2img --ckpt sd-folder`: the pipeline samples 4x8x8 latents and decodes them with the folder's VAE
    into 16x16 RGB images; decoding by hand gives the same images."""
    from conftest import run_cli

    ours, _ = sd_pair
    assert ours.sample_shape == (3, 16, 16) and ours.model_shape == (4, 8, 8)
    code, _, err = run_cli(capsys, "txt2img", "--ckpt", sd_folder, "a red circle", "--guidance", 3, "--steps", 4,
                           "--n", 2, "--out", tmp_path / "sd.npy")  # fmt: skip
    assert code == 0, err
    images = torch.from_numpy(np.load(tmp_path / "sd.npy"))
    cond, guided = ours.prepare(2, prompt="a red circle", guidance=3.0)
    latents = generate(guided, (4, 8, 8), ours.sigmas(4), [0, 1], sampler="ddim", cond=cond)
    with torch.no_grad():
        torch.testing.assert_close(images, ours.autoencoder.decode(latents), rtol=0, atol=1e-5)
    assert images.shape == (2, 3, 16, 16)


def test_info_describes_a_diffusers_folder(sd_folder, capsys):
    from conftest import run_cli

    code, out, err = run_cli(capsys, "info", sd_folder)
    assert code == 0, err
    assert "shape (3, 16, 16); the network works at (4, 8, 8)" in out and "scale factor 0.18215" in out


def test_the_text_encoder_encodes_as_stable_diffusion_does(sd_pair):
    ours, theirs = sd_pair
    embed, _ = theirs.encode_prompt(["a red circle", ""], "cpu", 1, False)
    cond = ours.text_cond(["a red circle", "the photo of a blue square"], 2)
    torch.testing.assert_close(cond["text_embed"][0], embed[0], rtol=0, atol=0)
    assert bool(cond["text_mask"].all()) and cond["text_pooled"].shape == (2, 32)
    torch.testing.assert_close(ours.denoiser.net.null_text[0], embed[1], rtol=0, atol=0)
    assert ours.text_cond("", 1)["text_mask"].any() == False  # noqa: E712  the empty prompt is the null caption


def test_the_vae_wrapper_is_the_diffusers_vae_scaled(sd_pair):
    from difflab.autoencoder.base import latent_shape

    ours, theirs = sd_pair
    ae, vae = ours.autoencoder, theirs.vae
    assert (ae.factor, ae.latent_channels, ae.image_channels, ae.scale_factor) == (2, 4, 3, 0.18215)
    assert latent_shape(ae, (3, 16, 16)) == model_shape(ours)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(6)) * 2 - 1
    with torch.no_grad():
        z = ae.encode(images)
        torch.testing.assert_close(z, vae.encode(images).latent_dist.mean * 0.18215, rtol=0, atol=0)
        torch.testing.assert_close(ae.decode(z), vae.decode(z / 0.18215).sample, rtol=0, atol=0)


# ---- DiTPipeline folders: a class-conditional transformer, learned sigma, VAE ------------------------------------
@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory):
    """A DiTPipeline folder: tiny DiTTransformer2DModel (2 layers, 2 heads of 8, patch 2, 8x8 latents, learned sigma:
    out_channels 8 = 2 x 4, num_embeds_ada_norm 1000 as DiTPipeline's hard-coded null label 1000 needs), the SD test's
    AutoencoderKL (factor 2: 16x16 images) and DiT's DDIMScheduler (linear 1e-4..0.02, set_alpha_to_one, no clip)."""
    torch.manual_seed(0)
    transformer = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=1000,
    )  # fmt: skip
    vae = tiny_vae()
    scheduler = diffusers.DDIMScheduler(beta_schedule="linear", clip_sample=False, set_alpha_to_one=True)
    folder = tmp_path_factory.mktemp("dit-folder")
    diffusers.DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler).save_pretrained(
        str(folder), safe_serialization=True
    )
    return folder


def test_dit_with_guidance_matches_the_dit_pipeline(dit_folder):
    """difflab's ddim + classifier-free guidance (w = DiTPipeline's guidance_scale) on DiTPipeline's own initial
    latents, at its timesteps: the final latents (recorded where DiTPipeline hands them to vae.decode; it has no
    output_type="latent") and the decoded images (output_type="pt": (x / 2 + 0.5).clamp(0, 1)) are diffusers'.

    diffusers 0.42's DiTPipeline guides all latent channels of the eps half (noise_pred[:, :in_channels]), which is
    difflab's CFG exactly; the first 3 channels only (facebookresearch/DiT's forward_with_cfg, "for exact
    reproducibility", and early diffusers ports) would leave channel 4 unguided, not reproduced by difflab. Its null
    label is a hard-coded 1000; difflab's null -1 is row num_embeds_ada_norm (the same row here and in every published
    DiT). w = 1 is the conditional model alone in both (no guidance branch), and is asserted too.
    Measured (diffusers 0.42.1, torch 2.13 CPU): latents 2e-7 .. 5e-7 relative (|x| ~ 120), images 4e-7 absolute,
    float32 rounding as in the module docstring; asserted RTOL = 1e-5. w = 1 against w = 4 differs by far more."""
    import difflab

    ours = difflab.load(dit_folder)
    theirs = diffusers.DiTPipeline.from_pretrained(str(dit_folder))
    theirs.set_progress_bar_config(disable=True)
    assert ours.accepts == {"class_label"} and ours.num_classes == 1000 and ours.denoiser.net.null_class == 1000
    assert ours.sample_shape == (3, 16, 16) and model_shape(ours) == (4, 8, 8)
    seen = {}

    def record_start(_module, args):  # the first step's input: DiTPipeline's initial latents (returns None: unchanged)
        seen.setdefault("start", args[0].clone())

    theirs.transformer.register_forward_pre_hook(record_start)
    vae_decode = theirs.vae.decode
    theirs.vae.decode = lambda z, **kw: vae_decode(seen.setdefault("end", z.clone()), **kw)  # the final latents
    labels = [3, 7]
    results = {}
    for w in (4.0, 1.0):
        seen.clear()
        images = theirs(class_labels=labels, guidance_scale=w, num_inference_steps=5, output_type="pt",
                        generator=torch.Generator().manual_seed(9)).images  # fmt: skip
        noise, expected = seen["start"][:2], seen["end"][:2] * theirs.vae.config.scaling_factor
        cond, guided = ours.prepare(2, cond={"class_label": torch.tensor(labels)}, guidance=w)
        got = difflab_ddim(guided, theirs.scheduler, ours.formulation.discrete_schedule, noise, cond)
        assert rel_err(got, expected) <= RTOL, (w, rel_err(got, expected))
        with torch.no_grad():
            decoded = (ours.autoencoder.decode(got) / 2 + 0.5).clamp(0, 1)
        assert float((decoded - images).abs().max()) <= RTOL, (w, float((decoded - images).abs().max()))
        results[w] = got
    assert rel_err(results[1.0], results[4.0]) > 1e-2  # guidance matters


def test_difflab_sample_on_a_dit_folder_writes_decoded_images(dit_folder, tmp_path, capsys):
    """`difflab sample --ckpt dit-folder --class 3 --guidance 2`: 4x8x8 latents decoded by the folder's VAE into 16x16
    RGB PNGs; other samplers run on the pipeline, and the null label (CFG's unconditional branch) is row 1000."""
    from conftest import run_cli
    from PIL import Image

    import difflab

    code, _, err = run_cli(capsys, "sample", "--ckpt", dit_folder, "--class", 3, "--guidance", 2, "--n", 2, "--steps",
                           3, "--out-dir", tmp_path / "dit")  # fmt: skip
    assert code == 0, err
    pngs = sorted((tmp_path / "dit").glob("*.png"))
    assert len(pngs) == 2 and all(Image.open(f).size == (16, 16) and Image.open(f).mode == "RGB" for f in pngs)
    pipe = difflab.load(dit_folder)
    x = pipe.sample(2, sampler="dpmpp_2m", steps=3, seed=1, cond={"class_label": 5}, guidance=3.0)
    assert x.shape == (2, 3, 16, 16) and bool(x.isfinite().all())
    net, t = pipe.denoiser.net, torch.tensor([10.0, 500.0])
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        theirs = net.transformer(z, timestep=t, class_labels=torch.tensor([1000, 2])).sample[:, :4]
        torch.testing.assert_close(net(z, t, {"class_label": torch.tensor([-1, 2])}), theirs, rtol=0, atol=0)
    with pytest.raises(DifflabError, match="class labels must lie in 0..999"):
        pipe.sample(1, steps=2, cond={"class_label": 1000})


# ---- export ---------------------------------------------------------------------------------------------------------
def difflab_pipeline(formulation=None, **unet):
    from difflab.config import DataConfig, RunConfig
    from difflab.formulations import DDPMConfig
    from difflab.nets import ModelConfig
    from difflab.nets.unet import UNetConfig
    from difflab.pipeline import Pipeline

    cfg = UNetConfig(**({"in_channels": 3, "resolution": 8, "channels": 8, "channel_mult": (1, 2),
                         "num_res_blocks": 1, "attention_resolutions": (4,), "norm_groups": 4} | unet))  # fmt: skip
    data = DataConfig("toy", "images", (cfg.in_channels, cfg.resolution, cfg.resolution), cfg.resolution,
                      cfg.in_channels)  # fmt: skip
    pipe = Pipeline(RunConfig(data, ModelConfig("unet", cfg), formulation or DDPMConfig("cosine", 1000, "v")))
    with torch.no_grad():  # every weight random: difflab zero-initialises its output layers
        g = torch.Generator().manual_seed(7)
        for p in pipe.denoiser.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return pipe


def test_a_unet_exports_to_diffusers_and_loads_back(tmp_path):
    import difflab
    from difflab.interop import export_diffusers

    pipe = difflab_pipeline(num_classes=3, attention_heads=2, channel_mult=(1, 2, 2), attention_resolutions=(4, 2))
    out = export_diffusers(pipe, tmp_path / "exported")
    unet = diffusers.UNet2DModel.from_pretrained(str(out / "unet")).eval()
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["beta_schedule"] == "squaredcos_cap_v2" and scheduler["prediction_type"] == "v_prediction"
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(8))
    t, labels = torch.tensor([3.0, 500.0, 998.5]), torch.tensor([0, 2, -1])
    with torch.no_grad():
        ours = pipe.denoiser.net(x, t, {"class_label": labels})
        theirs = unet(x, t, class_labels=torch.where(labels < 0, 3, labels)).sample
        assert float(ours.abs().max()) > 0.1 and rel_err(ours, theirs) <= 1e-5
        back = difflab.load(out)
        sigma = torch.tensor([0.05, 1.0, 60.0])
        d_ours = pipe.denoiser(x, sigma, {"class_label": labels})
        d_back = back.denoiser(x, sigma, {"class_label": labels})
    assert back.accepts == {"class_label"} and rel_err(d_back, d_ours) <= 1e-5


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"patch_size": 2, "resolution": 16}, "patch_size 2"),
     ({"channel_mult": (2, 2)}, "channel_mult starts with 2"),
     ({"context_dim": 16}, "text conditioning"),
     ({"norm_groups": 16, "channel_mult": (1,), "attention_resolutions": (8,)}, "norm_groups 16 > channels 8"),
     ({"attention_heads": 2, "channel_mult": (1, 2, 4), "attention_resolutions": (4,)}, "one attention_head_dim")],
)  # fmt: skip
def test_unets_without_a_diffusers_twin_are_refused_with_the_reason(tmp_path, settings, message):
    from difflab.interop import export_diffusers

    with pytest.raises(DifflabError, match=message) as err:
        export_diffusers(difflab_pipeline(**settings), tmp_path / "out")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_only_ddpm_models_export(tmp_path):
    from difflab.formulations import EDMConfig
    from difflab.interop import export_diffusers

    with pytest.raises(DifflabError, match="cannot export a edm model"):
        export_diffusers(difflab_pipeline(EDMConfig()), tmp_path / "out")


# ---- errors ---------------------------------------------------------------------------------------------------------
def test_a_missing_extra_is_one_line_naming_the_install(pixel_folder, monkeypatch, capsys):
    from conftest import assert_one_line_error, run_cli

    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    code, _, err = run_cli(capsys, "sample", "--ckpt", pixel_folder, "--n", "1", "--out", "x.png")
    assert_one_line_error(code, err, "pip install 'difflab[diffusers]'")


def test_folders_difflab_cannot_run_are_refused_in_one_line(pixel_folder, tmp_path):
    from difflab.interop import load_diffusers

    folder = tmp_path / "copy"
    shutil.copytree(pixel_folder, folder)
    config = folder / "unet" / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"time_embedding_type": "fourier"}))
    with pytest.raises(DifflabError, match="time_embedding_type 'fourier'"):
        load_diffusers(folder)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline", "scheduler": ["diffusers",
                                                         "DDIMScheduler"]}))  # fmt: skip
    with pytest.raises(DifflabError, match="no unet/ or transformer/"):
        load_diffusers(folder)


@pytest.mark.parametrize(
    ("config", "message"),
    [({"_class_name": "PixArtTransformer2DModel", "norm_type": "ada_norm_single"}, "holds a PixArtTransformer2DModel;"),
     ({"_class_name": "SD3Transformer2DModel"}, "holds a SD3Transformer2DModel;"),
     ({"_class_name": "Transformer2DModel", "norm_type": "ada_norm_single", "num_embeds_ada_norm": None},
      "(norm_type 'ada_norm_single')")],
)  # fmt: skip
def test_text_conditional_transformers_are_refused_naming_dit(dit_folder, tmp_path, config, message):
    """PixArt and SD3 folders (T5 / CLIP text transformers): one line naming what is read, DiTPipeline's DiT. DiT
    folders saved under the old name Transformer2DModel (norm_type ada_norm_zero, facebook/DiT-XL-2-*) are DiT."""
    from difflab.interop import load_diffusers
    from difflab.interop.diffusers_models import check_transformer_config

    folder = tmp_path / "copy"
    shutil.copytree(dit_folder, folder)
    (folder / "transformer" / "config.json").write_text(json.dumps(config | {"patch_size": 2}))
    with pytest.raises(DifflabError, match="DiTPipeline's class-conditional DiTTransformer2DModel") as err:
        load_diffusers(folder)
    assert message in str(err.value) and "\n" not in str(err.value)
    dit_config = json.loads((dit_folder / "transformer" / "config.json").read_text())
    check_transformer_config(dit_config | {"_class_name": "Transformer2DModel"}, "Transformer2DModel")  # accepted
