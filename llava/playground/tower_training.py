"""Supervised pretraining of the tiny playground vision tower on generated scenes.

A random CLIP tower's patch features barely separate a red circle from a blue cross, and its CLS
query attends almost uniformly, so CLS-ranked compression (DUET, VisionZip) would pick tokens at
random. A real CLIP-L has both: patch features that say what is where, and a CLS token that attends
to the objects. A few hundred steps of supervision give the tiny tower the same two properties:

* every patch at LLaVA's feature layer predicts the colour and the shape (or "dot") of the object
  covering it, and its grid cell (position is what a real CLIP's patch features also carry);
* the CLS token at that layer predicts which colours and shapes are present, how many large objects
  there are and the colour of the small dot, which it can only do by attending to the objects.

Only the layers LLaVA runs (up to ``vision_feature_layer``) are trained; the heads are thrown away.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm
from transformers import CLIPVisionModel

from llava.compression.v2v import cls_attention_and_keys
from llava.hf_adapter import call_clip_layer
from llava.model.vision_tower import layers_to_run
from llava.playground.scenes import (
    CANVAS,
    CELL,
    GRID,
    SCENE_COLORS,
    SCENE_SHAPES,
    Scene,
    draw_label_map,
    draw_scene,
    random_scene,
)
from llava.playground.tiny_models import CLIP_MEAN, CLIP_STD

logger = logging.getLogger(__name__)

_COLOR_NAMES = sorted(SCENE_COLORS)
_NUM_COLORS = len(_COLOR_NAMES) + 1  # + background
_NUM_SHAPES = len(SCENE_SHAPES) + 2  # + background + dot
_MAX_OBJECTS = 4


@dataclass
class TowerTrainingResult:
    """What pretraining reached on held-out scenes (fractions in 0-1) and its last training loss."""

    steps: int
    final_loss: float
    patch_color_accuracy: float
    """Over the patches an object covers (background patches are easy and would hide failures)."""
    patch_shape_accuracy: float
    object_patch_attention: float
    """Share of the CLS query's attention (feature layer, summed over heads) that lands on object patches."""


class _Heads(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.patch_color = nn.Linear(width, _NUM_COLORS)
        self.patch_shape = nn.Linear(width, _NUM_SHAPES)
        self.patch_cell = nn.Linear(width, GRID * GRID)
        self.present = nn.Linear(width, len(_COLOR_NAMES) + len(SCENE_SHAPES))
        self.count = nn.Linear(width, _MAX_OBJECTS + 1)
        self.dot_color = nn.Linear(width, _NUM_COLORS)


def scene_targets(scene: Scene, patch_size: int) -> dict[str, np.ndarray]:
    """Per-patch colour / shape / cell labels and per-image presence, count and dot-colour labels.

    A patch takes the label of the object covering at least a fifth of it (the dot: any tenth, so a dot
    straddling patch borders still labels them), background otherwise.
    """
    label_map = draw_label_map(scene)
    side = label_map.shape[0] // patch_size
    label_map = label_map.reshape(side, patch_size, side, patch_size).transpose(0, 2, 1, 3)
    label_map = label_map.reshape(side * side, patch_size * patch_size)
    num_labels = len(scene.objects) + 2
    coverage = np.stack([(label_map == k).mean(axis=1) for k in range(num_labels)], axis=1)
    owner = np.where(coverage[:, 1:].max(axis=1) >= 0.2, coverage[:, 1:].argmax(axis=1) + 1, 0)
    if scene.dot is not None:
        owner = np.where(coverage[:, num_labels - 1] >= 0.1, num_labels - 1, owner)
    colors = [0] + [1 + _COLOR_NAMES.index(o.color) for o in scene.objects]
    shapes = [0] + [1 + SCENE_SHAPES.index(o.shape) for o in scene.objects]
    if scene.dot is not None:
        colors.append(1 + _COLOR_NAMES.index(scene.dot.color))
        shapes.append(_NUM_SHAPES - 1)
    else:
        colors.append(0)
        shapes.append(0)
    rows, cols = np.divmod(np.arange(side * side), side)
    cells = (rows * patch_size // CELL) * GRID + cols * patch_size // CELL
    present = np.zeros(len(_COLOR_NAMES) + len(SCENE_SHAPES), dtype=np.float32)
    for obj in scene.objects:
        present[_COLOR_NAMES.index(obj.color)] = 1
        present[len(_COLOR_NAMES) + SCENE_SHAPES.index(obj.shape)] = 1
    return {
        "patch_color": np.asarray(colors)[owner],
        "patch_shape": np.asarray(shapes)[owner],
        "patch_cell": cells,
        "present": present,
        "count": np.asarray(len(scene.objects)),
        "dot_color": np.asarray(0 if scene.dot is None else 1 + _COLOR_NAMES.index(scene.dot.color)),
    }


def scene_batch(
    scenes: Sequence[Scene], patch_size: int, image_size: int = CANVAS
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CLIP-normalised pixels [N, 3, image_size, image_size] and stacked targets of ``scenes``.

    A tower smaller than the 336 px canvas (e.g. the AnyRes playground's 112 px views) sees each scene resized
    to its input; its targets are those of the canvas at the patch size one of its patches covers there."""
    if CANVAS % image_size or (patch_size * CANVAS) % image_size:
        raise ValueError(f"image size {image_size} must divide the {CANVAS} px canvas (patch {patch_size})")
    drawn = [draw_scene(s) for s in scenes]
    if image_size != CANVAS:
        drawn = [image.resize((image_size, image_size), Image.Resampling.BILINEAR) for image in drawn]
    pixels = torch.from_numpy(np.stack([np.asarray(image) for image in drawn])).permute(0, 3, 1, 2)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    pixels = (pixels.float() / 255.0 - mean) / std
    targets = [scene_targets(s, patch_size * CANVAS // image_size) for s in scenes]
    stacked = {key: torch.from_numpy(np.stack([t[key] for t in targets])) for key in targets[0]}
    return pixels, stacked


def _feature_layer_states(
    tower: CLIPVisionModel, pixels: torch.Tensor, num_layers: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input to the feature layer, its output), as :class:`llava.model.vision_tower.VisionTower` runs it."""
    vision = tower
    hidden = vision.pre_layrnorm(vision.embeddings(pixels))
    for layer in vision.encoder.layers[: num_layers - 1]:
        hidden = call_clip_layer(layer, hidden)
    return hidden, call_clip_layer(vision.encoder.layers[num_layers - 1], hidden)


def _losses(heads: _Heads, features: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
    cls, patches = features[:, 0], features[:, 1:]
    return (
        F.cross_entropy(heads.patch_color(patches).flatten(0, 1), targets["patch_color"].flatten().long())
        + F.cross_entropy(heads.patch_shape(patches).flatten(0, 1), targets["patch_shape"].flatten().long())
        + 2.0 * F.cross_entropy(heads.patch_cell(patches).flatten(0, 1), targets["patch_cell"].flatten().long())
        + F.binary_cross_entropy_with_logits(heads.present(cls), targets["present"])
        + F.cross_entropy(heads.count(cls), targets["count"].long())
        + F.cross_entropy(heads.dot_color(cls), targets["dot_color"].long())
    )


def pretrain_tower(
    tower: CLIPVisionModel,
    steps: int = 300,
    batch_size: int = 24,
    learning_rate: float = 2e-3,
    feature_layer: int = -2,
    seed: int = 0,
    progress: bool = True,
) -> TowerTrainingResult:
    """Train ``tower`` in place on freshly drawn scenes (never the playground's own images)."""
    torch.manual_seed(seed)
    rng = random.Random(f"tower-{seed}")
    config = tower.config
    num_layers = layers_to_run(config.num_hidden_layers, feature_layer)
    if num_layers == 0:
        raise ValueError("tower pretraining needs at least one encoder layer before the feature layer")
    heads = _Heads(config.hidden_size)
    trained = [p for layer in tower.encoder.layers[:num_layers] for p in layer.parameters()]
    trained += [*tower.embeddings.parameters(), *tower.pre_layrnorm.parameters()]
    optimizer = torch.optim.AdamW([*trained, *heads.parameters()], lr=learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps, pct_start=0.1)
    tower.train()
    loss_value = float("nan")
    for step in tqdm(range(steps), desc="tower pretraining", unit="step", disable=not progress):
        scenes = [random_scene(rng, f"tower_{step}_{i}.png") for i in range(batch_size)]
        pixels, targets = scene_batch(scenes, config.patch_size, config.image_size)
        _, features = _feature_layer_states(tower, pixels, num_layers)
        loss = _losses(heads, features, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        loss_value = float(loss.detach())
    tower.eval()
    result = _evaluate(tower, heads, num_layers, rng, config.patch_size, config.image_size)
    result.steps, result.final_loss = steps, loss_value
    logger.info(
        "tower pretraining: %d steps, loss %.3f; held-out patch colour %.1f %%, shape %.1f %%, "
        "CLS attention on objects %.1f %%",
        steps, loss_value, 100 * result.patch_color_accuracy, 100 * result.patch_shape_accuracy,
        100 * result.object_patch_attention,
    )  # fmt: skip
    return result


@torch.no_grad()
def _evaluate(
    tower: CLIPVisionModel,
    heads: _Heads,
    num_layers: int,
    rng: random.Random,
    patch_size: int,
    image_size: int = CANVAS,
) -> TowerTrainingResult:
    scenes = [random_scene(rng, f"tower_eval_{i}.png") for i in range(32)]
    pixels, targets = scene_batch(scenes, patch_size, image_size)
    layer_input, features = _feature_layer_states(tower, pixels, num_layers)
    patches = features[:, 1:]
    on_object = targets["patch_color"] > 0
    color_ok = heads.patch_color(patches).argmax(-1) == targets["patch_color"]
    shape_ok = heads.patch_shape(patches).argmax(-1) == targets["patch_shape"]
    cls_attention, _ = cls_attention_and_keys(tower.encoder.layers[num_layers - 1], layer_input)
    share = (cls_attention * on_object).sum() / cls_attention.sum()
    return TowerTrainingResult(
        steps=0,
        final_loss=float("nan"),
        patch_color_accuracy=float(color_ok[on_object].float().mean()),
        patch_shape_accuracy=float(shape_ok[on_object].float().mean()),
        object_patch_attention=float(share),
    )
