"""AnyRes token counts of LLaVA-NeXT and LLaVA-OneVision images, and the image-size mixes the benchmarks assume.

AnyRes splits an image into a **base view** (the whole image resized to one view) and a grid of **tiles** (the
image resized to the best-fitting grid resolution, padded, cut into views). Each view goes through the vision
tower on its own; the tiles' features are stitched back into one grid, the padding is cut away ("unpadding"),
and one ``image_newline`` token closes every row of the grid. The LLM gets the base view's tokens, then the
grid's rows with their newline tokens.

* LLaVA-NeXT (CLIP-L/14-336): views of 336 px, 24 x 24 = 576 tokens each (CLS dropped); grid pinpoints
  336 x {672, 1008} and 672 x 672 (at most 2 x 2 or 1 x 3 tiles); no cap on the unpadded grid.
* LLaVA-OneVision (SigLIP-so400m/14-384, no CLS): views of 384 px, 27 x 27 = 729 tokens each; pinpoints every
  384 x {1..6} by 384 x {1..6}; ``anyres_max_9``: when the unpadded grid holds more than 1.1^2 x 9 views'
  tokens it is bilinearly downsized by ``ratio = sqrt(tokens / (9 x 729))`` to ``floor(rows / ratio)`` x
  ``floor(cols / ratio)`` (newline tokens follow the downsized rows). Single-image samples only: OneVision's
  multi-image and video samples are not tiled.

**V2V units.** LLaVA-NeXT's V2V budgets each view on its own (the base view, each tile's unpadded tokens:
:attr:`AnyResCounts.view_token_counts`); LLaVA-OneVision's selects after packing, per *view group* (the base view,
then the whole packed grid, unpadded and downsized; :mod:`llava.compression.onevision_v2v`). A geometry's
``v2v_per_group`` says which; :attr:`AnyResCounts.v2v_groups` gives the token counts the budgets apply to.

:func:`anyres_counts` is pure arithmetic (no model, no processor); the tests check it against transformers'
processors and models. Best resolution: among the pinpoints, the one that keeps the most of the image's pixels
after an aspect-preserving resize (capped at the original's pixels), ties to the least wasted area. Unpadding
(per axis of the stitched grid): the axis the image fills keeps all its positions; on the other,
``round(side x scale)`` positions survive and ``(positions - kept) // 2`` are cut on each end.

:data:`IMAGE_MIX` is the typical image-size mix of the ``llava-next-7b`` / ``llava-onevision-7b`` benchmark
shapes; see its docstring for where the weights come from.

CLI: ``python -m llava.bench.anyres --preset anyres_duet_third`` prints each mix image's counts and the preset's
layer-average accounting on both families; ``--size 640x480`` (width x height) adds images.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass

from llava.compression.accounting import anyres_visual_tokens_per_layer
from llava.compression.config import CompressionConfig, load_compression

__all__ = [
    "IMAGE_MIX",
    "NEXT_GEOMETRY",
    "ONEVISION_GEOMETRY",
    "AnyResCounts",
    "AnyResGeometry",
    "MixImage",
    "anyres_counts",
    "best_resolution",
    "main",
    "mix_accounting",
]


@dataclass(frozen=True)
class AnyResGeometry:
    """How a family tiles images: view side in pixels, patch size, grid pinpoints ``(height, width)``, for
    OneVision's ``anyres_max_N`` the cap ``max_views`` on the unpadded grid (``None``: no cap, LLaVA-NeXT), and
    ``v2v_per_group``: V2V budgets the base view and the packed grid (OneVision) instead of every view (NeXT)."""

    name: str
    view_size: int
    patch_size: int
    grid_pinpoints: tuple[tuple[int, int], ...]
    max_views: int | None = None
    v2v_per_group: bool = False

    @property
    def side(self) -> int:
        """Tokens per side of one view (24 for 336 / 14, 27 for 384 / 14)."""
        return self.view_size // self.patch_size

    @property
    def view_tokens(self) -> int:
        """Tokens of one view (576 / 729)."""
        return self.side**2


NEXT_GEOMETRY = AnyResGeometry(
    name="llava-next",
    view_size=336,
    patch_size=14,
    grid_pinpoints=((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)),
)
"""LLaVA-NeXT (``llava-hf/llava-v1.6-*-hf``): CLIP-L/14-336, the five v1.6 pinpoints."""
ONEVISION_GEOMETRY = AnyResGeometry(
    name="llava-onevision",
    view_size=384,
    patch_size=14,
    grid_pinpoints=tuple((384 * rows, 384 * cols) for rows in range(1, 7) for cols in range(1, 7)),
    max_views=9,
    v2v_per_group=True,
)
"""LLaVA-OneVision (``llava-hf/llava-onevision-qwen2-*-hf``): SigLIP-so400m/14-384, 6 x 6 pinpoints, anyres_max_9."""


@dataclass(frozen=True)
class AnyResCounts:
    """Tokens of one image: ``base_tokens`` (the base view), ``tile_tokens`` (each tile's positions that survive
    unpadding, row-major; before OneVision's downsizing), ``grid_tokens`` (the stitched grid after unpadding and
    downsizing: what the LLM gets of the tiles), ``newline_tokens`` (one per grid row) and the tile ``grid``
    ``(rows, cols)``; ``v2v_per_group`` as the geometry's."""

    height: int
    width: int
    grid: tuple[int, int]
    base_tokens: int
    tile_tokens: tuple[int, ...]
    grid_tokens: int
    newline_tokens: int
    downsized: bool = False
    v2v_per_group: bool = False

    @property
    def views(self) -> int:
        """Vision-tower passes: the base view plus every tile."""
        return 1 + self.grid[0] * self.grid[1]

    @property
    def total(self) -> int:
        """Visual tokens the LLM gets for the image (its placeholder count)."""
        return self.base_tokens + self.grid_tokens + self.newline_tokens

    @property
    def view_token_counts(self) -> tuple[int, ...]:
        """Tokens per view as the LLM gets them: the base view, then the tiles (their share of the downsized
        grid when OneVision downsizes, proportionally, so the views sum to ``base + grid_tokens``)."""
        if not self.downsized:
            return (self.base_tokens, *self.tile_tokens)
        before = sum(self.tile_tokens)
        shares = [self.grid_tokens * tokens // before for tokens in self.tile_tokens]
        shares[0] += self.grid_tokens - sum(shares)
        return (self.base_tokens, *shares)

    @property
    def v2v_groups(self) -> tuple[int, ...]:
        """Token counts a fractional V2V budget applies to, one by one: every view (LLaVA-NeXT,
        :attr:`view_token_counts`), or the base view and the packed grid after downsizing (LLaVA-OneVision)."""
        if self.v2v_per_group:
            return (self.base_tokens, self.grid_tokens)
        return self.view_token_counts


def best_resolution(height: int, width: int, pinpoints: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The pinpoint ``(height, width)`` that keeps the most of an image's pixels after an aspect-preserving
    resize into it (capped at the image's own pixels); ties go to the least wasted area, then the first listed."""
    best: tuple[int, int] | None = None
    best_kept, best_waste = -1, math.inf
    for pin_height, pin_width in pinpoints:
        scale = min(pin_width / width, pin_height / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        waste = pin_width * pin_height - kept
        if kept > best_kept or (kept == best_kept and waste < best_waste):
            best, best_kept, best_waste = (pin_height, pin_width), kept, waste
    if best is None:
        raise ValueError("no grid pinpoints given")
    return best


def _unpadded_span(rows: int, cols: int, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Rows ``[r0, r1)`` and columns ``[c0, c1)`` of a ``rows x cols`` token grid that survive unpadding for an
    image of ``height x width`` pixels."""
    if width / height > cols / rows:  # wider than the grid: rows were padded
        kept = int(round(height * (cols / width), 7))
        cut = (rows - kept) // 2
        return (cut, rows - cut), (0, cols)
    kept = int(round(width * (rows / height), 7))
    cut = (cols - kept) // 2
    return (0, rows), (cut, cols - cut)


def anyres_counts(geometry: AnyResGeometry, height: int, width: int) -> AnyResCounts:
    """Visual tokens of one ``height x width`` image (original pixels) under ``geometry``, per part."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height} x {width}")
    pin_height, pin_width = best_resolution(height, width, geometry.grid_pinpoints)
    grid = (pin_height // geometry.view_size, pin_width // geometry.view_size)
    side = geometry.side
    rows, cols = grid[0] * side, grid[1] * side
    (r0, r1), (c0, c1) = _unpadded_span(rows, cols, height, width)
    tiles = tuple(
        max(0, min(r1, (i + 1) * side) - max(r0, i * side)) * max(0, min(c1, (j + 1) * side) - max(c0, j * side))
        for i in range(grid[0])
        for j in range(grid[1])
    )
    kept_rows, kept_cols = r1 - r0, c1 - c0
    downsized = False
    if geometry.max_views is not None:
        ratio = math.sqrt(kept_rows * kept_cols / (geometry.max_views * side**2))
        if ratio > 1.1:
            kept_rows, kept_cols, downsized = int(kept_rows // ratio), int(kept_cols // ratio), True
    return AnyResCounts(
        height=height,
        width=width,
        grid=grid,
        base_tokens=geometry.view_tokens,
        tile_tokens=tiles,
        grid_tokens=kept_rows * kept_cols,
        newline_tokens=kept_rows,
        downsized=downsized,
        v2v_per_group=geometry.v2v_per_group,
    )


@dataclass(frozen=True)
class MixImage:
    """One image size of a mix: ``width x height`` pixels and its ``weight`` (share of samples)."""

    width: int
    height: int
    weight: float

    @property
    def label(self) -> str:
        """``640x480`` (width x height)."""
        return f"{self.width}x{self.height}"


IMAGE_MIX: tuple[MixImage, ...] = (
    MixImage(640, 480, 0.35),
    MixImage(480, 640, 0.15),
    MixImage(500, 375, 0.15),
    MixImage(1024, 768, 0.15),
    MixImage(1280, 720, 0.10),
    MixImage(336, 336, 0.10),
)
"""The benchmark shapes' typical image-size mix (width x height, share). **An assumption**, not a measurement:
COCO-sized photos dominate LLaVA's instruction data (LLaVA-665K is mostly COCO, whose images are 640 px on the
long side, landscape about twice as often as portrait), so 640x480 and 480x640 take half; 500x375 stands for
Flickr/VOC-style photos (VQAv2/GQA-era data), 1024x768 for document/OCR/TextVQA-style images, 1280x720 for
screenshots and video frames, 336x336 for small square images (icons, charts, already-resized crops). Measure
your own data's sizes and pass a mix of them where it matters."""


def mix_accounting(
    config: CompressionConfig, geometry: AnyResGeometry, num_layers: int, mix: Sequence[MixImage] = IMAGE_MIX
) -> tuple[float, float, float]:
    """``(uncompressed N0, N0 after V2V, layer-average visual tokens)``, each the weighted mean over the mix."""
    total_weight = sum(image.weight for image in mix)
    uncompressed = initial = average = 0.0
    for image in mix:
        counts = anyres_counts(geometry, image.height, image.width)
        per_layer = anyres_visual_tokens_per_layer(config, num_layers, counts.v2v_groups, counts.newline_tokens)
        share = image.weight / total_weight
        uncompressed += share * counts.total
        initial += share * per_layer[0]
        average += share * sum(per_layer) / num_layers
    return uncompressed, initial, average


def _parse_size(text: str) -> MixImage:
    width, _, height = text.lower().partition("x")
    return MixImage(int(width), int(height), 1.0)


FAMILY_LAYERS = {NEXT_GEOMETRY.name: 32, ONEVISION_GEOMETRY.name: 28}
"""LLM depth of the benchmark shapes: Vicuna-7B (NeXT) and Qwen2-7B (OneVision)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Print AnyRes token counts of the mix's images and each preset's layer-average accounting on the mix."""
    parser = argparse.ArgumentParser(prog="python -m llava.bench.anyres", description=main.__doc__)
    parser.add_argument("--preset", action="append", default=[], help="preset name or YAML path (repeatable)")
    parser.add_argument("--size", action="append", default=[], help="extra image WIDTHxHEIGHT to count (repeatable)")
    args = parser.parse_args(argv)
    for geometry in (NEXT_GEOMETRY, ONEVISION_GEOMETRY):
        print(f"== {geometry.name}: views of {geometry.view_size} px, {geometry.view_tokens} tokens each")
        for image in [*IMAGE_MIX, *(_parse_size(size) for size in args.size)]:
            counts = anyres_counts(geometry, image.height, image.width)
            print(
                f"  {image.label:>10} (weight {image.weight:.2f}): grid {counts.grid[0]}x{counts.grid[1]}, "
                f"base {counts.base_tokens} + tiles {counts.grid_tokens}{' (downsized)' if counts.downsized else ''}"
                f" + newlines {counts.newline_tokens} = {counts.total}"
            )
        for spec in args.preset:
            config = load_compression(spec)
            layers = FAMILY_LAYERS[geometry.name]
            uncompressed, initial, average = mix_accounting(config, geometry, layers)
            print(
                f"  {config.name} ({layers} layers): mix N0 {uncompressed:.1f}, after V2V {initial:.1f}, "
                f"layer average {average:.1f} = {average / uncompressed:.4f} of N0"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
