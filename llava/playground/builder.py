"""Build the whole shapes playground: images, then videos, then the tiny models, a manifest and a README.

This is the layer above the image data (:mod:`llava.playground.synthetic`) and the video data
(:mod:`llava.playground.synthetic_video`): it uses both, and neither knows about the other (the video data
take the already generated image specs as an argument). ``python -m llava.tools.make_playground`` calls
:func:`build_playground`; the scenes playground has its own builder, :mod:`llava.playground.scene_builder`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llava.data.video import DEFAULT_NUM_FRAMES
from llava.playground import synthetic_video as sv
from llava.playground.output import prepare_out_dir, write_json, write_jsonl
from llava.playground.synthetic import corpus_texts, demo_requests, generate_data, write_images
from llava.playground.tiny_models import LLM_DEFAULTS, VISION_DEFAULTS, save_llm, save_video_tower, save_vision_tower
from llava.playground.tokenizer import train_playground_tokenizer

GENERATED_ENTRIES: tuple[str, ...] = (
    "images",
    "pretrain.json",
    "finetune.json",
    "image_metadata.json",
    "vision_tower",
    "llm",
    "manifest.json",
    "README.md",
    "demo_requests.jsonl",
    "videos",
    "video_pretrain.json",
    "video_finetune.json",
    "video_metadata.json",
    "video_demo_requests.jsonl",
    "video_tower",
)
"""Top-level names the builder writes; ``force`` removes only these, never other files."""


def build_playground(
    out_dir: str | Path,
    num_pretrain: int = 600,
    num_finetune: int = 600,
    seed: int = 0,
    force: bool = False,
    vocab_size: int = 1000,
    num_video_pretrain: int = 160,
    num_video_finetune: int = 160,
) -> dict[str, Any]:
    """Write images, videos, LLaVA / Video-LLaVA JSON, tiny image and video CLIP towers, tiny LLaMA
    + tokenizer and a manifest.

    ``video_finetune.json`` mixes video, image (reusing ``images/``), video+image and text-only
    samples. ``num_video_pretrain = num_video_finetune = 0`` writes no videos (the video tower is
    still saved). Offline and deterministic for a given ``seed``. Refuses a non-empty ``out_dir``
    unless ``force``. Returns the manifest dict (also written to ``out_dir/manifest.json``).
    """
    out = Path(out_dir)
    prepare_out_dir(out, force, GENERATED_ENTRIES)
    data = generate_data(num_pretrain, num_finetune, seed)
    write_images(data.all_images, out / "images")
    write_json(out / "pretrain.json", data.pretrain)
    write_json(out / "finetune.json", data.finetune)
    write_json(out / "image_metadata.json", {spec.file: spec.to_json() for spec in data.all_images})
    demo_specs, demo = demo_requests(seed)
    write_images(demo_specs, out / "images", desc="demo images")
    write_jsonl(out / "demo_requests.jsonl", demo)

    vdata = sv.generate_video_data(num_video_pretrain, num_video_finetune, seed, images=data.all_images)
    video_demo_specs: list[sv.VideoSpec] = []
    video_demo: list[dict[str, Any]] = []
    if vdata.pretrain or vdata.finetune:
        sv.write_videos(vdata.all_videos, out / "videos")
        video_demo_specs, video_demo = sv.video_demo_requests(seed)
        sv.write_videos(video_demo_specs, out / "videos", desc="demo videos")
        write_json(out / "video_pretrain.json", vdata.pretrain)
        write_json(out / "video_finetune.json", vdata.finetune)
        write_json(out / "video_metadata.json", {spec.file: spec.to_json() for spec in vdata.all_videos})
        write_jsonl(out / "video_demo_requests.jsonl", video_demo)

    tokenizer = train_playground_tokenizer(corpus_texts(data) + sv.video_corpus_texts(vdata), vocab_size=vocab_size)
    vision = save_vision_tower(out / "vision_tower", seed=seed)
    video_tower = save_video_tower(out / "video_tower", seed=seed)
    llm = save_llm(out / "llm", tokenizer, seed=seed)

    vcfg, tcfg = vision.config, video_tower.config
    num_patches = (vcfg.image_size // vcfg.patch_size) ** 2
    frame_tokens = (tcfg.image_size // tcfg.patch_size) ** 2 + 1
    vft = vdata.finetune
    manifest: dict[str, Any] = {
        "seed": seed,
        "images": {
            "dir": "images",
            "count": len(data.all_images) + len(demo_specs),
            "demo": len(demo_specs),
            "pretrain": len(data.pretrain_images),
            "finetune": len(data.finetune_images),
            "metadata": "image_metadata.json",
        },
        "pretrain": {"file": "pretrain.json", "samples": len(data.pretrain)},
        "demo_requests": {"file": "demo_requests.jsonl", "requests": len(demo), "images": "held out from training"},
        "finetune": {
            "file": "finetune.json",
            "samples": len(data.finetune),
            "text_only": sum("image" not in s for s in data.finetune),
            "two_image": sum(isinstance(s.get("image"), list) for s in data.finetune),
        },
        "vision_tower": {
            "dir": "vision_tower",
            "class": type(vision).__name__,
            **{k: getattr(vcfg, k) for k in VISION_DEFAULTS},
            "tokens_per_image": num_patches + 1,
            "parameters": vision.num_parameters(),
        },
        "videos": {
            "dir": "videos",
            "count": len(vdata.all_videos) + len(video_demo_specs),
            "demo": len(video_demo_specs),
            "pretrain": len(vdata.pretrain_videos),
            "finetune": len(vdata.finetune_videos),
            "frames_per_video": list(sv.VIDEO_FRAME_RANGE),
            "fps": sv.VIDEO_FPS,
            "sizes": [list(size) for size in sv.VIDEO_SIZES],
            "codec": sv.VIDEO_CODEC,
            "metadata": "video_metadata.json" if vdata.all_videos else None,
        },
        "video_pretrain": {"file": "video_pretrain.json", "samples": len(vdata.pretrain)},
        "video_finetune": {
            "file": "video_finetune.json",
            "samples": len(vft),
            "video": sum("video" in s and "image" not in s for s in vft),
            "image": sum("image" in s and "video" not in s for s in vft),
            "video_and_image": sum("video" in s and "image" in s for s in vft),
            "text_only": sum("video" not in s and "image" not in s for s in vft),
        },
        "video_demo_requests": {
            "file": "video_demo_requests.jsonl",
            "requests": len(video_demo),
            "videos": "held out from training",
        },
        "video_tower": {
            "dir": "video_tower",
            "class": type(video_tower).__name__,
            **{k: getattr(tcfg, k) for k in VISION_DEFAULTS},
            "tokens_per_frame": frame_tokens,
            "frames_per_video": DEFAULT_NUM_FRAMES,
            "tokens_per_video": DEFAULT_NUM_FRAMES * frame_tokens,
            "parameters": video_tower.num_parameters(),
        },
        "llm": {
            "dir": "llm",
            "class": type(llm).__name__,
            **{k: getattr(llm.config, k) for k in LLM_DEFAULTS},
            "vocab_size": len(tokenizer),
            "parameters": llm.num_parameters(),
        },
    }
    write_json(out / "manifest.json", manifest)
    (out / "README.md").write_text(_readme(manifest), encoding="utf-8")
    return manifest


def _readme(m: dict[str, Any]) -> str:
    v, lm, ft = m["vision_tower"], m["llm"], m["finetune"]
    return (
        "# duet-vlm playground\n\n"
        "Synthetic, offline data and tiny random models for smoke-testing LLaVA-1.5 training and\n"
        f"inference (generated by `python -m llava.tools.make_playground`, seed {m['seed']}).\n"
        "The models are random: they exercise the code paths, not quality.\n\n"
        f"- `images/`: {m['images']['count']} PNGs (96-192 px, non-square), 1-2 coloured shapes each;\n"
        "  per-image shapes/colours/positions in `image_metadata.json`.\n"
        f"- `pretrain.json`: {m['pretrain']['samples']} caption samples (LCS-558K style).\n"
        f"- `finetune.json`: {ft['samples']} multi-turn samples (mix665k style): {ft['text_only']} "
        f"text-only, {ft['two_image']} with two images, the rest single-image VQA.\n"
        f"- `vision_tower/`: tiny random CLIPVisionModel, image {v['image_size']}, patch {v['patch_size']} "
        f"({v['tokens_per_image']} tokens), hidden {v['hidden_size']}, {v['num_hidden_layers']} layers, "
        "plus its CLIPImageProcessor.\n"
        f"- `llm/`: tiny random LlamaForCausalLM, hidden {lm['hidden_size']}, {lm['num_hidden_layers']} "
        f"layers, {lm['num_attention_heads']} heads / {lm['num_key_value_heads']} KV heads, "
        f"vocab {lm['vocab_size']}, plus its locally trained tokenizer.\n"
        f"{_readme_video(m)}"
        "- `manifest.json`: the counts and model sizes above, machine-readable.\n"
    )


def _readme_video(m: dict[str, Any]) -> str:
    vids, vft, t = m["videos"], m["video_finetune"], m["video_tower"]
    tower = (
        f"- `video_tower/`: the same tiny CLIPVisionModel at Video-LLaVA frame geometry: image "
        f"{t['image_size']}, patch {t['patch_size']} ({t['tokens_per_frame']} tokens per frame, "
        f"{t['frames_per_video']} sampled frames = {t['tokens_per_video']} tokens per video), plus its processor.\n"
    )
    if not vids["count"]:
        return tower
    lo, hi = vids["frames_per_video"]
    sizes = ", ".join(f"{w}x{h}" for w, h in vids["sizes"])
    return (
        f"- `videos/`: {vids['count']} {vids['codec']} MP4s ({lo}-{hi} frames at {vids['fps']} fps, {sizes}) of a "
        "coloured shape moving left/right/up/down, sometimes changing colour or next to a still shape;\n"
        "  per-video specs in `video_metadata.json`. Use as `--video_folder`; image samples refer to `images/`.\n"
        f"- `video_pretrain.json`: {m['video_pretrain']['samples']} video caption samples.\n"
        f"- `video_finetune.json`: {vft['samples']} samples (Video-LLaVA style): {vft['video']} video QA, "
        f"{vft['image']} image VQA, {vft['video_and_image']} video+image, {vft['text_only']} text-only.\n"
        f"- `video_demo_requests.jsonl`: {m['video_demo_requests']['requests']} questions on held-out videos "
        "with expected answers.\n"
        f"{tower}"
    )
