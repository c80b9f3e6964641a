"""A diffusers pipeline folder (model_index.json; unet/ or DiTPipeline's transformer/, scheduler/, optionally vae/,
text_encoder/ + tokenizer/) as a difflab `Pipeline`, offline, from local files only (safetensors weights; nothing is
downloaded).

    pipe = difflab.load("path/to/ddpm-folder")          # difflab.load delegates here for a model_index.json folder
    x = pipe.sample(4, sampler="dpmpp_2m", steps=20)

The U-Net becomes difflab's network F(x, c_noise, cond) (`DiffusersUNet`), DiTPipeline's class-conditional
DiTTransformer2DModel likewise with cond {"class_label"} (`DiffusersDiT`; PixArt, SD3 and other text transformers are
refused in one line), the scheduler config the DDPM formulation with the folder's own float32 table and timestep
spacing (`DiffusersDDPM`), CLIP's text tower a frozen text encoder encoding as diffusers' pipelines do
(`DiffusersTextEncoder`), and the AutoencoderKL an `Autoencoder` (`DiffusersAutoencoder`, in `pipe.autoencoder`).
A latent (Stable Diffusion, DiT) folder's pipeline samples latents of the network's shape (`pipe.model_shape`) and
returns them decoded by `pipe.autoencoder` (see docs/architecture.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from difflab.errors import DifflabError
from difflab.interop.diffusers_models import (
    DiffusersAutoencoder,
    DiffusersDiT,
    DiffusersTextEncoder,
    DiffusersUNet,
    check_transformer_config,
    check_unet_config,
    import_diffusers,
)
from difflab.interop.diffusers_schedule import DiffusersDDPM, SchedulerSpec
from difflab.nets import ModelConfig
from difflab.text.conditioned import FrozenTextConfig

UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
NULL_CLASS_KEY = "_difflab_null_class"  # in an exported unet/config.json: the class row that is difflab's null label


def is_diffusers_folder(path: str | Path) -> bool:
    """True for a folder holding model_index.json (a diffusers pipeline folder)."""
    p = Path(path)
    return p.is_dir() and (p / "model_index.json").is_file()


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from a file of at most 1 MiB; anything else is a one-line DifflabError."""
    if not path.is_file():
        raise DifflabError(f"'{path}' not found: {what} needs it")
    if path.stat().st_size > 1 << 20:
        raise DifflabError(f"'{path}' is larger than 1 MiB; not a diffusers config")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DifflabError(f"'{path}' is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise DifflabError(f"'{path}' must hold a JSON object")
    return data


@dataclass(frozen=True)
class DiffusersNetSettings:
    """What a diffusers network is: its folder, component and class (the weights are diffusers', not rebuilt)."""

    folder: str
    component: str  # unet, transformer
    class_name: str  # UNet2DModel, UNet2DConditionModel, DiTTransformer2DModel (or its old name Transformer2DModel)
    num_classes: int | None = None  # a DiT's classes (labels 0..K-1; difflab's null -1 is its row K)


@dataclass(frozen=True)
class DiffusersModelConfig(ModelConfig):
    """A ModelConfig for a network diffusers loaded: backbone "diffusers", settings `DiffusersNetSettings`. It is not
    built by `build_network` (nor size-checked by it): the pipeline holds the loaded denoiser."""

    def __post_init__(self):
        pass


@dataclass(frozen=True)
class DiffusersTextConfig(FrozenTextConfig):
    """The frozen text encoder of a diffusers folder (spec "diffusers:FOLDER"), already loaded (`loaded`)."""

    loaded: Any = field(default=None, compare=False, repr=False)

    def load_encoder(self) -> DiffusersTextEncoder:
        return self.loaded if self.loaded is not None else text_encoder(Path(self.encoder.removeprefix("diffusers:")))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(FrozenTextConfig)}


def text_encoder(folder: Path) -> DiffusersTextEncoder:
    """The folder's text_encoder/ + tokenizer/; its name hashes their configs, tokenizer files and weight sizes."""
    digest = hashlib.sha256()
    for sub in ("text_encoder", "tokenizer"):
        for path in sorted(p for p in (folder / sub).rglob("*") if p.is_file()):
            small = path.suffix in (".json", ".txt") and path.stat().st_size <= 16 << 20
            digest.update(f"{path.relative_to(folder).as_posix()}\0{path.stat().st_size}\0".encode())
            if small:
                digest.update(path.read_bytes())
    spec = f"diffusers:{folder}"
    return DiffusersTextEncoder(folder, spec=spec, name=f"{spec}@{digest.hexdigest()[:16]}")


def _components(folder: Path) -> dict[str, str]:
    """model_index.json's components: name -> class name (library 'diffusers' or 'transformers')."""
    index = read_json(folder / "model_index.json", "a diffusers folder")
    out = {}
    for name, value in index.items():
        if name.startswith("_") or value is None or value == [None, None]:
            continue
        if isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value):
            out[name] = value[1]
    return out


def _load_model(cls: Any, folder: Path, what: str) -> Any:
    if not any(folder.glob("*.safetensors")):
        raise DifflabError(f"'{folder}' has no .safetensors weights; difflab reads no pickled weights (re-save with "
                           "safe_serialization=True)")  # fmt: skip
    try:
        return cls.from_pretrained(str(folder), local_files_only=True, use_safetensors=True,
                                   low_cpu_mem_usage=False).eval()  # fmt: skip
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DifflabError(f"cannot load the {what} from '{folder}' ({first[:200]})") from None


def load_autoencoder(folder: str | Path) -> DiffusersAutoencoder:
    """The AutoencoderKL of a diffusers folder (its vae/, or the folder itself if it is a vae folder)."""
    diffusers = import_diffusers("a diffusers autoencoder")
    folder = Path(folder)
    vae_folder = folder / "vae" if (folder / "vae").is_dir() else folder
    config = read_json(vae_folder / "config.json", "a diffusers autoencoder")
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise DifflabError(f"'{vae_folder}' holds a {config['_class_name']}; difflab reads AutoencoderKL")
    return DiffusersAutoencoder(_load_model(diffusers.AutoencoderKL, vae_folder, "autoencoder"))


def load_diffusers(path: str | Path, *, device: str | torch.device = "cpu") -> Any:
    """The difflab Pipeline of a diffusers pipeline folder (DDPMPipeline-like: unet + scheduler; Stable Diffusion-like:
    + vae, text_encoder, tokenizer; DiTPipeline: transformer + vae + scheduler), on `device`. What difflab cannot run
    is a one-line DifflabError."""
    from difflab.config import DataConfig, RunConfig
    from difflab.pipeline import Pipeline

    diffusers = import_diffusers()
    folder = Path(path).expanduser().resolve()
    if not is_diffusers_folder(folder):
        raise DifflabError(f"'{path}' is not a diffusers folder (no model_index.json)")
    components = _components(folder)
    component = next((name for name in ("unet", "transformer") if name in components), None)
    if component is None:
        found = ", ".join(sorted(components)) or "none"
        raise DifflabError(f"'{folder}' has no unet/ or transformer/ (components: {found}); difflab loads diffusers "
                           "U-Net pipelines and DiTPipeline")  # fmt: skip
    net_config = read_json(folder / component / "config.json", f"the {component}")
    class_name = net_config.get("_class_name", components[component])
    if component == "unet":
        if class_name not in UNET_CLASSES:
            raise DifflabError(f"'{folder / 'unet'}' holds a {class_name}; difflab loads "
                               f"{' and '.join(UNET_CLASSES)}")  # fmt: skip
        check_unet_config(net_config, class_name)
    else:
        check_transformer_config(net_config, class_name, f"'{folder / 'transformer'}'")
    if "scheduler" not in components:
        raise DifflabError(f"'{folder}' has no scheduler/; its config gives the noise schedule")
    scheduler_config = read_json(folder / "scheduler" / "scheduler_config.json", "the noise schedule")
    spec = SchedulerSpec.from_config(scheduler_config, str(folder / "scheduler" / "scheduler_config.json"))
    in_channels = int(net_config.get("in_channels", 3 if component == "unet" else 4))
    out_channels = int(net_config.get("out_channels") or in_channels)
    # a learned variance: the U-Net's scheduler says so; DiTPipeline splits whenever out_channels = 2 in_channels
    learned = component == "transformer" or scheduler_config.get("variance_type") in ("learned", "learned_range")
    if out_channels != in_channels and not (learned and out_channels == 2 * in_channels):
        raise DifflabError(f"'{folder / component}' maps {in_channels} channels to {out_channels}; difflab takes "
                           "models predicting the input's channels (or 2x with a learned variance)")  # fmt: skip

    text_config, num_classes = None, None
    if component == "transformer":
        net = DiffusersDiT(_load_model(diffusers.DiTTransformer2DModel, folder / "transformer", "transformer"))
        num_classes = net.num_classes
    else:
        unet = _load_model(getattr(diffusers, class_name), folder / "unet", "U-Net")
        null_text = None
        if class_name == "UNet2DConditionModel":
            if not {"text_encoder", "tokenizer"} <= set(components):
                raise DifflabError(f"'{folder}' has a text U-Net but no text_encoder/ and tokenizer/")
            encoder = text_encoder(folder)
            if encoder.dim != int(net_config.get("cross_attention_dim") or 0):
                raise DifflabError(f"the text encoder gives {encoder.dim}-d tokens but the U-Net's "
                                   f"cross_attention_dim is {net_config.get('cross_attention_dim')}")  # fmt: skip
            null_text = encoder.encode([""]).embed
            text_config = DiffusersTextConfig(encoder.spec, encoder.name, encoder.dim, encoder.pooled_dim,
                                              encoder.max_length, loaded=encoder)  # fmt: skip
        null_class = net_config.get(NULL_CLASS_KEY)
        net = DiffusersUNet(unet, null_text=null_text, null_class=null_class, out_channels=in_channels)

    size = net_config.get("sample_size") or 32
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    autoencoder = load_autoencoder(folder) if "vae" in components else None
    channels = in_channels
    if autoencoder is not None:  # the samples are the decoded images; the network's shape is their latents'
        if autoencoder.latent_channels != in_channels:
            raise DifflabError(f"'{folder / 'vae'}' has {autoencoder.latent_channels} latent channels but the "
                               f"{component} takes {in_channels}")  # fmt: skip
        channels, height, width = autoencoder.image_channels, height * autoencoder.factor, width * autoencoder.factor
    data = DataConfig(name=f"diffusers:{folder}", kind="images", sample_shape=(channels, height, width),
                      resolution=height if height == width else None, channels=channels)  # fmt: skip
    settings = DiffusersNetSettings(str(folder), component, class_name, num_classes)
    model = DiffusersModelConfig("diffusers", settings, preset=class_name, text=text_config)
    formulation = DiffusersDDPM(spec)
    config = RunConfig(data=data, model=model, formulation=formulation.config)
    weights = folder / component / "diffusion_pytorch_model.safetensors"  # what from_pretrained reads (no variant)
    weights = weights if weights.is_file() else sorted((folder / component).glob("*.safetensors"))[0]
    pipe = Pipeline(config, formulation.denoiser(net).to(device), checkpoint=folder, weights=weights,
                    autoencoder=autoencoder)  # fmt: skip
    pipe.formulation = formulation  # the folder's own table and timestep spacing (config.formulation names its kind)
    return pipe
