"""Figures: image grids with generation parameters in their PNG metadata, scatter plots, loss curves, the
denoising-process figure (`figures`), the Poisson-flow figures (`pfgm`) and the text-to-image figures (`text`)."""

from difflab.viz.figures import (
    images_to_uint8,
    make_grid,
    read_png_metadata,
    save_denoising_figure,
    save_image_gif,
    save_image_grid,
    save_loss_curve,
    save_quality_vs_nfe,
    save_scatter,
)

__all__ = [
    "images_to_uint8",
    "make_grid",
    "read_png_metadata",
    "save_denoising_figure",
    "save_image_gif",
    "save_image_grid",
    "save_loss_curve",
    "save_quality_vs_nfe",
    "save_scatter",
]
