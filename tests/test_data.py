"""Data loaders: toy distributions, the sklearn digits split, image folders and load_dataset."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.cluster import KMeans
from sklearn.datasets import load_digits

from difflab.data import DATA_NAMES, Dataset, load_dataset
from difflab.data.digits import load_digits_split
from difflab.data.folder import load_image_folder
from difflab.data.toys import TOY_NAMES, sample_toy, sample_toy_labelled
from difflab.errors import DifflabError

# ---------------------------------------------------------------- toys


@pytest.mark.parametrize("name", TOY_NAMES)
def test_toy_shape_range_spread(name: str) -> None:
    points = sample_toy(name, 4000, seed=3)
    assert points.shape == (4000, 2) and points.dtype == torch.float32
    inside = (points.abs() <= 1.2).all(dim=1).float().mean().item()
    assert inside >= 0.999
    assert (points.std(dim=0) > 0.2).all()
    assert torch.isfinite(points).all()


@pytest.mark.parametrize("name", TOY_NAMES)
def test_toy_seeding(name: str) -> None:
    assert torch.equal(sample_toy(name, 300, seed=5), sample_toy(name, 300, seed=5))
    assert not torch.equal(sample_toy(name, 300, seed=5), sample_toy(name, 300, seed=6))
    rng = np.random.default_rng(9)
    first, second = sample_toy(name, 300, rng), sample_toy(name, 300, rng)
    assert not torch.equal(first, second)  # the generator advances in place
    assert torch.equal(first, sample_toy(name, 300, np.random.default_rng(9)))


@pytest.mark.parametrize("name", TOY_NAMES)
def test_toy_scale_is_a_fixed_map_not_fitted_to_the_sample(name: str) -> None:
    # A map fitted to the sample would put the max exactly at 1 or the mean exactly at 0 for every draw.
    for seed in range(3):
        points = sample_toy(name, 40, seed)
        assert abs(points.abs().max().item() - 1.0) > 1e-4
        assert points.mean(dim=0).abs().max().item() > 1e-4


def test_eight_gaussians_has_eight_balanced_tight_clusters() -> None:
    points = sample_toy("8gaussians", 4000, seed=0).numpy()
    km = KMeans(n_clusters=8, n_init=10, random_state=0).fit(points)
    sizes = np.bincount(km.labels_, minlength=8)
    assert sizes.min() > 350 and sizes.max() < 650
    within = np.sqrt(km.inertia_ / len(points))
    assert within < 0.15  # tight clusters relative to the spread (std > 0.5)
    radii = np.linalg.norm(km.cluster_centers_, axis=1)
    assert radii.std() < 0.03 and radii.mean() > 0.5  # centres on one circle
    angles = np.sort(np.arctan2(km.cluster_centers_[:, 1], km.cluster_centers_[:, 0]))
    np.testing.assert_allclose(np.diff(angles), 2 * np.pi / 8, atol=0.05)


def test_checkerboard_points_lie_on_black_squares_only() -> None:
    points = sample_toy("checkerboard", 5000, seed=1).numpy()
    cells = np.floor((points + 1.0) / 0.5).astype(int)
    assert ((cells >= 0) & (cells <= 3)).all()
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all()
    assert len({tuple(c) for c in cells}) == 8


def test_rings_are_separated_by_empty_annuli() -> None:
    radii = np.sort(np.linalg.norm(sample_toy("rings", 5000, seed=2).numpy(), axis=1))
    gaps = np.diff(radii)
    assert (gaps > 0.1).sum() >= 1  # at least two rings with empty space between them
    assert radii[0] > 0.1  # no points at the centre


def test_heart_is_mirror_symmetric_but_not_upside_down_symmetric() -> None:
    points = sample_toy("heart", 20000, seed=4).numpy()
    x_quantiles = np.quantile(points[:, 0], [0.1, 0.25, 0.5, 0.75, 0.9])
    np.testing.assert_allclose(x_quantiles, -x_quantiles[::-1], atol=0.03)
    # Wide lobes at the top, a narrow tip at the bottom.
    top, bottom = points[points[:, 1] > 0.3], points[points[:, 1] < -0.5]
    assert len(top) > 1000 and len(bottom) > 1000
    assert np.abs(top[:, 0]).mean() > 2 * np.abs(bottom[:, 0]).mean()


def test_unknown_toy_and_bad_count_raise() -> None:
    with pytest.raises(DifflabError, match="moons, swissroll, 8gaussians, checkerboard, rings, heart"):
        sample_toy("spiral", 10)
    with pytest.raises(DifflabError, match="positive integer"):
        sample_toy("moons", 0)


# ---------------------------------------------------------------- digits


def test_digits_split_is_a_fixed_disjoint_stratified_partition() -> None:
    train_x, train_y = load_digits_split("train")
    test_x, test_y = load_digits_split("test")
    assert train_x.shape == (1347, 1, 8, 8) and test_x.shape == (450, 1, 8, 8)
    assert train_y.dtype == torch.int64 and train_x.dtype == torch.float32
    train_keys = {row.tobytes() for row in train_x.numpy()}
    test_keys = {row.tobytes() for row in test_x.numpy()}
    assert len(train_keys) == 1347 and len(test_keys) == 450 and not train_keys & test_keys
    all_keys = {(r / 16 * 2 - 1).astype(np.float32)[None].tobytes() for r in load_digits().images}
    assert train_keys | test_keys == all_keys
    assert test_y[:12].tolist() == [2, 0, 4, 9, 4, 1, 2, 4, 6, 7, 9, 1]  # the fixed random_state=0 split
    counts_all = np.bincount(np.concatenate([train_y, test_y]), minlength=10)
    assert np.all(np.abs(np.bincount(test_y, minlength=10) - 0.25 * counts_all) <= 1)


def test_digits_values_labels_and_repeatability() -> None:
    x, y = load_digits_split("test")
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    assert set(y.tolist()) == set(range(10))
    x2, y2 = load_digits_split("test")
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x2.fill_(0.0)  # callers get their own copy; the cache is not corrupted
    assert torch.equal(load_digits_split("test")[0], x)


def test_digits_upsampling() -> None:
    small, _ = load_digits_split("train", 8)
    big, _ = load_digits_split("train", 24)
    assert big.shape == (1347, 1, 24, 24)
    assert big.min() >= -1.0 and big.max() <= 1.0
    # Bilinear (align_corners=False) upsampling by an integer factor keeps each image's mean ...
    torch.testing.assert_close(big.mean(dim=(1, 2, 3)), small.mean(dim=(1, 2, 3)), atol=1e-5, rtol=0)
    pooled = torch.nn.functional.avg_pool2d(big, 3)
    assert np.corrcoef(pooled.flatten().numpy(), small.flatten().numpy())[0, 1] > 0.97
    # ... and, unlike nearest-neighbour, produces in-between values (17 levels become many more).
    assert len(torch.unique(big[:50])) > 10 * len(torch.unique(small[:50]))


@pytest.mark.parametrize("resolution", [0, 4, 12, 72, 9])
def test_digits_bad_resolution(resolution: int) -> None:
    with pytest.raises(DifflabError, match="multiple of 8 between 8 and 64"):
        load_digits_split("train", resolution)


def test_digits_bad_split() -> None:
    with pytest.raises(DifflabError, match="'train' or 'test'"):
        load_digits_split("validation")


# ---------------------------------------------------------------- image folders


def _band_image(width: int, height: int, vertical: bool) -> Image.Image:
    """Black image with a wide white band across the centre (columns if vertical else rows)."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    if vertical:
        array[:, width * 2 // 9 : width * 7 // 9] = 255
    else:
        array[height * 2 // 9 : height * 7 // 9, :] = 255
    return Image.fromarray(array)


@pytest.fixture
def image_folder(tmp_path):
    _band_image(90, 30, vertical=True).save(tmp_path / "a_wide.png")
    nested = tmp_path / "sub" / "deeper"
    nested.mkdir(parents=True)
    _band_image(30, 90, vertical=False).convert("L").save(nested / "b_tall.jpg", quality=95)
    Image.new("RGB", (20, 20), (255, 0, 0)).save(tmp_path / "c_red.WEBP", lossless=True)
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def test_folder_loads_crops_and_scales(image_folder) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the .txt file must be ignored silently
        images = load_image_folder(image_folder, resolution=10)
    assert images.shape == (3, 3, 10, 10) and images.dtype == torch.float32
    assert images.min() >= -1.0 and images.max() <= 1.0
    # Centre crops of the banded images fall inside the white band: a left/top crop would include black.
    assert images[0].min().item() > 0.98
    # Sorted paths: a_wide.png, c_red.WEBP, sub/deeper/b_tall.jpg.
    red = images[1]
    assert red[0].min() > 0.98 and red[1].max() < -0.98 and red[2].max() < -0.98
    assert images[2].min().item() > 0.9  # jpeg, nearly white
    torch.testing.assert_close(images[2][0], images[2][2])  # grey converted to RGB


def test_folder_grey_channel(image_folder, tmp_path) -> None:
    images = load_image_folder(str(image_folder), resolution=8, channels=1)
    assert images.shape == (3, 1, 8, 8)
    # c_red.WEBP (pure red) is grey level round(0.299 * 255) = 76 (ITU-R 601-2 luma), not the channel mean 85
    torch.testing.assert_close(images[1], torch.full((1, 8, 8), 76 / 127.5 - 1), rtol=0, atol=1e-6)
    # an 8 x 8 RGB image (no resizing at resolution 8) of primaries, greys and random colours
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    rgb[0, :4] = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]
    rgb[1, :3] = [(0, 0, 0), (10, 200, 30), (128, 128, 128)]
    folder = tmp_path / "colours"
    folder.mkdir()
    Image.fromarray(rgb).save(folder / "rgb.png")
    grey = load_image_folder(folder, resolution=8, channels=1)
    assert grey.shape == (1, 1, 8, 8)
    luma = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # L = R 299/1000 + G 587/1000 + B 114/1000
    expected = torch.from_numpy(luma / 127.5 - 1).float()
    torch.testing.assert_close(grey[0, 0], expected, rtol=0, atol=0.51 / 127.5)  # PIL rounds to a level
    pil_grey = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.float64)
    torch.testing.assert_close(grey[0, 0], torch.from_numpy(pil_grey / 127.5 - 1).float(), rtol=0, atol=1e-6)


def test_folder_skips_corrupt_file_with_one_warning(image_folder) -> None:
    (image_folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    with pytest.warns(UserWarning) as record:
        images = load_image_folder(image_folder, resolution=8)
    assert images.shape[0] == 3
    messages = [str(w.message) for w in record]
    assert len(messages) == 1 and "broken.png" in messages[0]


def test_folder_errors(tmp_path) -> None:
    with pytest.raises(DifflabError, match="does not exist"):
        load_image_folder(tmp_path / "missing", 8)
    (tmp_path / "file.png").write_bytes(b"junk")
    with pytest.raises(DifflabError, match="is a file"):
        load_image_folder(tmp_path / "file.png", 8)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("hello")
    with pytest.raises(DifflabError, match="no readable png/jpg/jpeg/webp image"):
        load_image_folder(empty, 8)
    with pytest.warns(UserWarning, match="file.png"), pytest.raises(DifflabError, match="no readable"):
        load_image_folder(tmp_path, 8)  # the only image file is corrupt


def test_folder_progress_bar_only_for_many_files(tmp_path, capsys) -> None:
    for i in range(501):
        Image.new("L", (2, 2), i % 256).save(tmp_path / f"{i:04d}.png")
    images = load_image_folder(tmp_path, 2, channels=1)
    assert images.shape == (501, 1, 2, 2)
    assert "loading images" in capsys.readouterr().err
    small = tmp_path / "small"
    small.mkdir()
    Image.new("L", (2, 2), 0).save(small / "x.png")
    load_image_folder(small, 2, channels=1)
    assert "loading images" not in capsys.readouterr().err


# ---------------------------------------------------------------- load_dataset


def test_load_dataset_toy_train_and_test() -> None:
    train = load_dataset("moons", toy_size=500, seed=2)
    test = load_dataset("moons", split="test", toy_size=500, seed=2)
    assert train.kind == "points" and train.sample_shape == (2,)
    assert train.labels.shape == (500,) and set(train.labels.tolist()) == {0, 1}  # which moon
    assert train.data.shape == (500, 2)
    assert torch.equal(train.data, sample_toy("moons", 500, 2))
    assert torch.equal(test.data, sample_toy("moons", 500, 2 + 1_000_003))
    with pytest.raises(dataclasses.FrozenInstanceError):
        train.name = "other"  # type: ignore[misc]


def test_toy_labels_name_the_mixture_component_of_each_point() -> None:
    """Labels follow from the geometry: the nearest of the 8 centres, the nearest ring radius, the board square,
    the upper (0) or lower (1) moon; the points are the unlabelled sampler's, draw for draw."""
    points, labels = sample_toy_labelled("8gaussians", 2000, 3)
    angles = torch.arange(8) * 2 * torch.pi / 8
    centres = 0.8 * torch.stack([angles.cos(), angles.sin()], dim=1)
    assert torch.equal(torch.cdist(points, centres).argmin(1), labels)
    points, labels = sample_toy_labelled("rings", 2000, 3)
    assert torch.equal((points.norm(dim=1)[:, None] - torch.tensor([0.3, 0.6, 0.9])).abs().argmin(1), labels)
    points, labels = sample_toy_labelled("checkerboard", 2000, 3)
    row, col = ((points + 1) / 0.5).floor().long().unbind(1)[::-1]
    assert torch.equal(2 * row + col // 2, labels)
    points, labels = sample_toy_labelled("moons", 2000, 3)
    assert points[labels == 0, 1].mean() > points[labels == 1, 1].mean() + 0.3
    assert torch.equal(points, sample_toy("moons", 2000, 3))
    assert sample_toy_labelled("heart", 10, 0)[1] is None and sample_toy_labelled("swissroll", 10, 0)[1] is None


def test_load_dataset_digits_and_folder(image_folder) -> None:
    digits = load_dataset("digits", split="test", resolution=16)
    assert digits.kind == "images" and digits.sample_shape == (1, 16, 16)
    assert digits.labels is not None and digits.labels.shape == (450,)
    assert load_dataset("digits").data.shape == (1347, 1, 8, 8)
    folder = load_dataset(str(image_folder), channels=1)
    assert isinstance(folder, Dataset) and folder.sample_shape == (1, 32, 32) and folder.labels is None
    assert folder.name == str(image_folder)


def test_load_dataset_errors() -> None:
    assert DATA_NAMES[-1] == "digits" and set(TOY_NAMES) < set(DATA_NAMES)
    with pytest.raises(DifflabError) as info:
        load_dataset("mnist")
    message = str(info.value)
    assert "unknown data set 'mnist'" in message and "moons" in message and "digits" in message
    assert "path to an image folder" in message
    with pytest.raises(DifflabError, match="does not exist"):
        load_dataset("no/such/folder")
    with pytest.raises(DifflabError, match="split"):
        load_dataset("moons", split="val")
