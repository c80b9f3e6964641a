"""`difflab inpaint` and `difflab img2img`: the known region survives exactly, the strength controls how far an edit
goes, and every bad image, mask or option is one line and exit code 2. The maths of Inpainting, RePaint and
SDEdit are tested against exact denoisers in tests/test_guidance.py; these tests are about the command and its I/O."""

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run_cli
from PIL import Image

from difflab.cli.main import main
from difflab.data.digits import load_digits_split
from difflab.errors import DifflabError
from difflab.images import read_image, read_mask
from difflab.viz import read_png_metadata


def save(array, path, mode):
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode).save(path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A digits model (30 training steps), a PFGM++ and a moons model (1 step each), a test digit and masks."""
    root = tmp_path_factory.mktemp("edit")
    train = ["train", "--resolution", "8", "--no-progress"]
    assert main([*train, "--data", "digits", "--steps", "30", "--batch-size", "16", "--out", str(root / "ddpm")]) == 0
    assert main([*train, "--data", "digits", "--steps", "1", "--batch-size", "4", "--process", "pfgmpp",
                 "--aug-dim", "128", "--out", str(root / "pfgmpp")]) == 0  # fmt: skip
    assert main(["train", "--data", "moons", "--steps", "1", "--out", str(root / "moons"), "--no-progress"]) == 0
    digit = np.round((load_digits_split("test", 8)[0][0, 0].numpy() + 1) * 127.5).astype(np.uint8)
    right = np.zeros((8, 8), np.uint8)
    right[:, 4:] = 255
    return {
        "root": root, "ddpm": root / "ddpm", "pfgmpp": root / "pfgmpp", "moons": root / "moons", "pixels": digit,
        "image": save(digit, root / "digit.png", "L"), "mask": save(right, root / "right.png", "L"),
        "fill": right == 255,
    }  # fmt: skip


def expected(pixels):
    return torch.from_numpy(pixels.astype(np.float32) / 127.5 - 1)


@pytest.mark.parametrize(
    ("model", "argv"),
    [("ddpm", ()), ("ddpm", ("--sampler", "ddim")), ("ddpm", ("--repaint-jump", 2, "--repaint-resamplings", 3)),
     ("pfgmpp", ())],
)  # fmt: skip
def test_inpaint_keeps_the_known_pixels_exactly_and_changes_the_masked_ones(files, model, argv, tmp_path, capsys):
    out = tmp_path / "fills.npy"
    code, stdout, err = run_cli(capsys, "inpaint", "--ckpt", files[model], "--image", files["image"], "--mask",
                                files["mask"], "--out", out, "--steps", 10, "--n", 3, *argv)  # fmt: skip
    assert code == 0, err
    assert "wrote 3 fills" in stdout
    fills, original, fill = torch.from_numpy(np.load(out)), expected(files["pixels"]), files["fill"]
    assert fills.shape == (3, 1, 8, 8)
    for result in fills[:, 0]:
        torch.testing.assert_close(result[~fill], original[~fill], rtol=0, atol=1e-6)
        assert (result[fill] - original[fill]).abs().max() > 0.1
    assert (fills[0] - fills[1]).abs().max() > 0.1  # different seeds, different fills


def test_seed_s_plus_i_reproduces_fill_i(files, tmp_path, capsys):
    base = ["inpaint", "--ckpt", files["ddpm"], "--image", files["image"], "--mask", files["mask"], "--steps", 8]
    assert run_cli(capsys, *base, "--n", 3, "--out", tmp_path / "all.npy")[0] == 0
    assert run_cli(capsys, *base, "--n", 1, "--seed", 2, "--out", tmp_path / "one.npy")[0] == 0
    np.testing.assert_allclose(np.load(tmp_path / "one.npy")[0], np.load(tmp_path / "all.npy")[2], atol=1e-5)


def test_png_grid_shows_original_mask_and_fills_with_metadata(files, tmp_path, capsys):
    out = tmp_path / "grid.png"
    code, _, err = run_cli(capsys, "inpaint", "--ckpt", files["ddpm"], "--image", files["image"], "--mask",
                           files["mask"], "--out", out, "--steps", 5, "--n", 2, "--seed", 7)  # fmt: skip
    assert code == 0, err
    grid = np.asarray(Image.open(out))
    assert grid.shape == ((8 + 2) * 4, (4 * 9 + 1) * 4)  # 4 cells of 8 px, 1 px padding, upscaled x4
    cells = [grid[4:36:4, 4 + 36 * k : 36 + 36 * k : 4] for k in range(4)]  # one sample pixel per original pixel
    np.testing.assert_array_equal(cells[0], files["pixels"])
    np.testing.assert_array_equal(cells[1], np.where(files["fill"], 255, 0))
    for cell in cells[2:]:
        np.testing.assert_array_equal(cell[~files["fill"]], files["pixels"][~files["fill"]])
    meta = read_png_metadata(out)
    assert meta["command"] == "inpaint" and meta["sampler"] == "ddpm" and meta["seed"] == 7 and meta["nfe"] == 5
    assert meta["mask"] == str(files["mask"]) and meta["repaint_jump"] is None


def test_img2img_stays_close_at_small_strength_and_departs_at_strength_one(files, tmp_path, capsys):
    original = expected(files["pixels"])
    distances = {}
    for strength in (0.05, 1.0):
        out = tmp_path / f"s{strength}.npy"
        code, _, err = run_cli(capsys, "img2img", "--ckpt", files["ddpm"], "--image", files["image"], "--out", out,
                               "--strength", strength, "--steps", 20, "--n", 3)  # fmt: skip
        assert code == 0, err
        distances[strength] = (torch.from_numpy(np.load(out))[:, 0] - original).abs().mean(dim=(1, 2))
    assert distances[0.05].max() < 0.05, distances
    assert distances[1.0].min() > 0.3, distances
    code, _, err = run_cli(capsys, "img2img", "--ckpt", files["pfgmpp"], "--image", files["image"], "--out",
                           tmp_path / "p.png", "--steps", 6)  # fmt: skip
    assert code == 0, err
    assert read_png_metadata(tmp_path / "p.png")["sampler"] == "ddim"  # the deterministic default for Poisson


BAD_INPUTS = {
    "wrong size": ("image", ("big.png", np.zeros((8, 10)), "L"), ["is 10x8 pixels but the model makes 8x8"]),
    "wrong mode": ("image", ("rgb.png", np.zeros((8, 8, 3)), "RGB"), ["has mode RGB", "needs mode L", "convert"]),
    "palette mode": ("image", ("p.png", np.zeros((8, 8)), "P"), ["has mode P", "needs mode L"]),
    "transparent": ("image", ("la.png", np.zeros((8, 8, 2)), "LA"), ["transparent pixels", "flatten"]),
    "unreadable": ("image", ("junk.png", None, None), ["is not a readable image"]),
    "missing": ("image", ("nowhere.png", False, None), ["image", "does not exist"]),
    "missing mask": ("mask", ("nowhere.png", False, None), ["mask", "does not exist"]),
    "non-binary mask": ("mask", ("grey.png", np.full((8, 8), 128), "L"), ["not binary", "128"]),
    "empty mask": ("mask", ("black.png", np.zeros((8, 8)), "L"), ["all black", "nothing to regenerate"]),
    "mask size": ("mask", ("small.png", np.full((4, 4), 255), "L"), ["is 4x4 pixels but the image is 8x8"]),
    "mask mode": ("mask", ("rgbmask.png", np.full((8, 8, 3), 255), "RGB"), ["has mode RGB", "mode L"]),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_images_and_masks_are_one_line_errors(files, case, tmp_path, capsys):
    which, (name, pixels, mode), fragments = BAD_INPUTS[case]
    path = tmp_path / name
    if pixels is None:
        path.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    elif pixels is not False:
        save(pixels, path, mode)
    paths = {"image": files["image"], "mask": files["mask"], which: path}
    code, _, err = run_cli(capsys, "inpaint", "--ckpt", files["ddpm"], "--image", paths["image"], "--mask",
                           paths["mask"], "--out", tmp_path / "o.png", "--steps", 2)  # fmt: skip
    assert_one_line_error(code, err, *fragments)
    if which == "image":
        code, _, err = run_cli(capsys, "img2img", "--ckpt", files["ddpm"], "--image", path, "--out", tmp_path / "o.png")
        assert_one_line_error(code, err, *fragments)


BAD_OPTIONS = {
    "strength 0": ("img2img", "ddpm", ("--strength", 0), ["--strength must lie in (0, 1], got 0.0"]),
    "strength > 1": ("img2img", "ddpm", ("--strength", 1.5), ["--strength must lie in (0, 1], got 1.5"]),
    "repaint deterministic": ("inpaint", "ddpm", ("--sampler", "ddim", "--repaint-jump", 2),
                              ["RePaint", "deterministic sampler 'ddim'", "--sampler ddpm"]),
    "repaint other sampler": ("inpaint", "ddpm", ("--sampler", "ddim", "--eta", 1, "--repaint-resamplings", 2),
                              ["RePaint takes its own DDPM steps"]),
    "repaint zero": ("inpaint", "ddpm", ("--repaint-jump", 0), ["--repaint-jump", "at least 1"]),
    "repaint poisson": ("inpaint", "pfgmpp", ("--repaint-jump", 2), ["RePaint", "poisson-kernel"]),
    "poisson stochastic inpaint": ("inpaint", "pfgmpp", ("--sampler", "ddpm"), ["adds Gaussian noise", "poisson"]),
    "poisson stochastic img2img": ("img2img", "pfgmpp", ("--sampler", "euler_ancestral"), ["adds Gaussian noise"]),
    "points model": ("img2img", "moons", (), ["editing needs an image model"]),
    "output suffix": ("inpaint", "ddpm", ("--out", "o.jpg"), ["must end in .png"]),
    "foreign option": ("img2img", "ddpm", ("--variance", "large"), ["does not take --variance"]),
    "sampler family": ("inpaint", "ddpm", ("--sampler", "consistency"), ["is for consistency models; a ddpm model"]),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_OPTIONS)
def test_bad_options_are_one_line_errors(files, case, tmp_path, capsys):
    command, model, argv, fragments = BAD_OPTIONS[case]
    mask = ("--mask", files["mask"]) if command == "inpaint" else ()
    out = () if "--out" in argv else ("--out", tmp_path / "o.png")
    code, _, err = run_cli(capsys, command, "--ckpt", files[model], "--image", files["image"], *mask, *out, *argv)
    assert_one_line_error(code, err, *fragments)


def test_image_modes_and_pixel_mapping(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[0, 0] = (0, 128, 255)
    image = read_image(save(rgb, tmp_path / "rgb.png", "RGB"), 8, 3)
    assert image.shape == (1, 3, 8, 8)
    torch.testing.assert_close(image[0, :, 0, 0], torch.tensor([-1.0, 128 / 127.5 - 1, 1.0]))
    opaque = np.concatenate([rgb, np.full((8, 8, 1), 255, np.uint8)], axis=2)
    assert torch.equal(read_image(save(opaque, tmp_path / "rgba.png", "RGBA"), 8, 3), image)  # opaque alpha: read
    with pytest.raises(DifflabError, match="has mode L but this model is colour"):
        read_image(save(rgb[..., 0], tmp_path / "grey.png", "L"), 8, 3)
    bilevel = Image.fromarray(np.eye(8, dtype=bool))
    bilevel.save(tmp_path / "bilevel.png")
    torch.testing.assert_close(read_mask(tmp_path / "bilevel.png", 8)[0, 0], torch.eye(8))  # mode 1: white = fill


def test_help_states_the_conventions(capsys):
    for command in ("inpaint", "img2img"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "resolution exactly" in text and "mode L for 1-channel" in text and "p / 127.5 - 1" in text
    with pytest.raises(SystemExit):
        main(["inpaint", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "white (255) = regenerate, black (0) = keep" in text and "--repaint-jump" in text


@pytest.mark.parametrize("command", ["img2img", "inpaint"])
def test_grid_tuned_edits_record_the_levels_used(files, command, tmp_path, capsys):
    """`--grid tuned` is written into the PNG as the levels themselves, so `--from-png` outlives a retuned grid."""
    import shutil

    import difflab

    run = shutil.copytree(files["ddpm"], tmp_path / "ddpm")
    pipe = difflab.load(run)
    difflab.tune_grid(pipe, "ddim", 4, n=8, check_n=0, max_evaluations=6)
    levels = pipe.sigmas(4, "tuned", "ddim")[:-1].tolist()
    where = ["--mask", files["mask"]] if command == "inpaint" else ["--strength", "1"]
    out = tmp_path / "edit.png"
    code, _, err = run_cli(capsys, command, "--ckpt", run, "--image", files["image"], *where, "--sampler", "ddim",
                           "--steps", 4, "--grid", "tuned", "--n", 2, "--out", out)  # fmt: skip
    assert code == 0, err
    recorded = read_png_metadata(out)["grid"]
    assert [float(v) for v in recorded.split(",")] == levels
