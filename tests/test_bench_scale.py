"""The cluster step-time model (llava.bench.scale): its communication against DeepSpeed's own comms logger, its
LLaVA layout against the project's model, and unit tests of the pure model.

The DeepSpeed check trains, on two CPU ranks (``DS_ACCELERATOR=cpu``, gloo) in one launch, a toy model (a frozen
"tower", a trained projector, three checkpointed blocks, a head) and the project's tiny LLaVA and Video-LLaVA
under ZeRO-2 and several ZeRO-3 settings: this file, run as a script by each rank process, trains every setting
for three steps, and rank 0 writes the comms logger's record of the third step (ZeRO-3 records its module trace
in the first two). The test then asks :func:`llava.bench.zero_traffic.step_collectives`, the function the cluster tables
use, for the same step and requires every collective to match: op, message size and count.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

if __name__ != "__main__":  # the rank processes (this file as a script) import what they use in run_rank/_setup
    from llava.bench.scale import GPUS, Network, markdown_tables, predict_grid, predict_step
    from llava.bench.zero_traffic import (
        Call,
        Collective,
        Layout,
        Module,
        Param,
        comms_summary,
        hook_order,
        llava_layout,
        step_collectives,
        zero_settings,
    )

REPO = Path(__file__).resolve().parents[1]
LAUNCH_LIMIT_S = 120
HIDDEN = 24
STEPS = 3  # the third step is ZeRO-3's first with a complete trace: the steady state the model describes


class Block(nn.Module):
    """Pre-norm MLP block with a residual: norm -> up -> relu -> down (its last module saves the last tensor)."""

    def __init__(self, width: int, inner: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, inner)
        self.down = nn.Linear(inner, width, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.down(torch.relu(self.up(self.norm(hidden))))


class Tiny(nn.Module):
    """A LLaVA in miniature: frozen tower (no grad), trained projector (Linear-GELU-Linear), checkpointed blocks
    (both ways of checkpointing), head; odd sizes (41) so that partitions need padding."""

    def __init__(self, checkpointing: bool) -> None:
        super().__init__()
        self.tower = nn.Sequential(nn.Linear(12, 16), nn.Linear(16, 16))
        self.projector = nn.Sequential(nn.Linear(16, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN))
        self.layers = nn.ModuleList(Block(HIDDEN, 41) for _ in range(3))
        self.head = nn.Linear(HIDDEN, 11, bias=False)
        self.checkpointing = checkpointing
        self.tower.requires_grad_(False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self.tower(pixels)
        hidden = self.projector(features)
        for index, layer in enumerate(self.layers):
            if not self.checkpointing:
                hidden = layer(hidden)
                continue
            # block 1 as transformers checkpoints a layer (its forward: its own hooks are not replayed)
            hidden = checkpoint(layer.forward if index == 1 else layer, hidden, use_reentrant=False)
        return self.head(hidden).float().pow(2).mean()


def tiny_layout(model: Tiny) -> Layout:
    """The tiny model as the step model sees it: its modules with their real parameter counts, and its forward."""
    modules = []
    for name, module in model.named_modules():
        params = tuple(
            Param(f"{name}.{key}", p.numel(), p.requires_grad, decay=p.ndim > 1)
            for key, p in module.named_parameters(recurse=False)
        )
        modules.append(Module(name, params))
    blocks = tuple(
        Call(
            f"layers.{i}",
            True,
            tuple(Call(f"layers.{i}.{name}", True) for name in ("norm", "up", "down")),
            block=True,
            recompute_hooks=i != 1,
        )
        for i in range(len(model.layers))
    )
    linears = (Call("projector.0", True, grad_input=False), Call("projector.1", True), Call("projector.2", True))
    projector = Call("projector", True, linears, grad_input=False)
    tower = Call("tower", children=(Call("tower.0"), Call("tower.1")))
    root = Call("", True, (tower, projector, *blocks, Call("head", True)), grad_input=False)
    return Layout(tuple(modules), (root,))


TINY_DUET = {  # V2V and T2V sized for the "tiny" shape (16 patches, 2 decoder layers)
    "name": "tiny_duet",
    "v2v": {"method": "duet", "dominant": 6, "contextual": 2, "cluster_width": 2},
    "t2v": {"boundaries": [0.5], "keep_ratios": [0.5], "query": "last"},
}


def deepspeed_config(stage: int, overrides: dict[str, Any], hidden: int = HIDDEN) -> dict[str, Any]:
    """scripts/zero{stage}.json as transformers would complete it for a model of width ``hidden`` (bf16, clipping
    1.0, 2 x 2 samples), plus ``overrides`` and the comms logger."""
    config = json.loads((REPO / "scripts" / f"zero{stage}.json").read_text())
    settings = zero_settings(config, hidden)
    zero = config["zero_optimization"]
    zero["reduce_bucket_size"] = settings.reduce_bucket_size
    if stage == 3:
        zero["stage3_prefetch_bucket_size"] = settings.prefetch_bucket_size
        zero["stage3_param_persistence_threshold"] = settings.param_persistence_threshold
    zero.update(overrides)
    config.update(
        fp16={"enabled": False},
        bf16={"enabled": True},
        train_micro_batch_size_per_gpu=2,
        train_batch_size=4,
        gradient_accumulation_steps=1,
        gradient_clipping=1.0,
        comms_logger={"enabled": True, "prof_all": True, "verbose": False, "debug": False},
    )
    return config


# name -> (ZeRO stage, zero_optimization overrides, gradient checkpointing)
_RELEASE = {"stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 0, "stage3_param_persistence_threshold": 30}
VARIANTS: dict[str, tuple[str, int, dict[str, Any], bool]] = {
    # ZeRO-2 first: a ZeRO-3 engine replaces torch.nn.functional.linear for the rest of the process (DeepSpeed says
    # so), which changes the order in which a Linear's weight and bias gradients reach ZeRO-2's buckets
    "zero2": ("toy", 2, {}, True),
    # the project's LLaVA ("tiny" shape, V2V + T2V) as the trainer sets it up: llava_layout is what is checked
    "llava_zero2": ("llava", 2, {}, True),
    # the repository's zero3.json: nothing is ever released (reuse distance 1e9 > the model)
    "zero3": ("toy", 3, {}, True),
    # release after every use: gathers again for the recomputation and for backward
    "zero3_release": ("toy", 3, _RELEASE, True),
    # the prefetcher runs ahead (it steps on every module, containers too) and its marks keep parameters
    "zero3_prefetch": ("toy", 3, _RELEASE | {"stage3_prefetch_bucket_size": 200}, True),
    # a reuse window at the forward/backward turn, no checkpointing
    "zero3_window": ("toy", 3, _RELEASE | {"stage3_max_reuse_distance": 1500}, False),
    "llava_zero3": ("llava", 3, {}, True),
    "llava_zero3_release": ("llava", 3, _RELEASE | {"stage3_param_persistence_threshold": 64}, True),
    "llava_zero3_prefetch": ("llava", 3, {"stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 3000}, True),
    # Video-LLaVA ("tiny-video"): the idle image pass, the projector called twice, two towers
    "video_zero3_release": ("video", 3, _RELEASE | {"stage3_param_persistence_threshold": 64}, True),
}
"""name -> (model, ZeRO stage, zero_optimization overrides, gradient checkpointing)"""


SHAPE_OF = {"llava": "tiny", "video": "tiny-video"}


def _setup(kind: str, checkpointing: bool) -> tuple[nn.Module, Any]:
    """The model of a variant in bf16, and a function making its loss."""
    torch.manual_seed(0)
    if kind == "toy":
        toy = Tiny(checkpointing).to(torch.bfloat16)
        return toy, lambda engine: engine(torch.randn(2, 5, 12, dtype=torch.bfloat16))
    from llava.bench.shapes import build_model, get_shape
    from llava.bench.workload import build_training_batch, move_batch
    from llava.hf_adapter import enable_activation_checkpointing
    from llava.model.stages import freeze_for_stage

    shape = get_shape(SHAPE_OF[kind])
    model = build_model(shape, TINY_DUET, dtype=torch.bfloat16)
    freeze_for_stage(model, "finetune")
    if checkpointing:
        enable_activation_checkpointing(model, use_reentrant=False)
        model.enable_input_require_grads()
    batch = move_batch(build_training_batch(shape, "finetune", 2), torch.device("cpu"), torch.bfloat16)
    return model, lambda engine: engine(**batch).loss


def run_rank(configs: Path, out: Path) -> None:
    """One CPU rank (its environment names it): every variant for ``STEPS`` steps; rank 0 writes the comms
    logger's counts of the last step."""
    import deepspeed
    import deepspeed.comm as dist
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    # The CPU shared-memory op serves only inference_all_reduce; without it there is no JIT build and no /dev/shm
    # file, and training collectives go through gloo (the comms logger wraps them above the backend either way).
    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
    deepspeed.init_distributed(dist_backend="gloo")
    results: dict[str, dict[str, dict[str, int]]] = {}
    for name, (kind, config, checkpointing) in json.loads(configs.read_text()).items():
        model, loss_of = _setup(kind, checkpointing)
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in trainable if p.ndim > 1]}, {"params": [p for p in trainable if p.ndim <= 1]}]
        optimizer = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.0)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        for _ in range(STEPS):
            dist.comms_logger.comms_dict.clear()
            engine.backward(loss_of(engine))
            engine.step()
        logged = dist.comms_logger.comms_dict
        results[name] = {op: {str(size): record[0] for size, record in sizes.items()} for op, sizes in logged.items()}
        engine.destroy()
    if dist.get_rank() == 0:
        out.write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def deepspeed_counts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, dict[int, int]]]:
    """DeepSpeed's comms-logger counts of the third step of each variant (one two-rank launch for all)."""
    folder = tmp_path_factory.mktemp("scale")
    configs, out = folder / "configs.json", folder / "comms.json"
    configs.write_text(
        json.dumps(
            {
                name: (kind, deepspeed_config(stage, overrides, _hidden(kind)), checkpointing)
                for name, (kind, stage, overrides, checkpointing) in VARIANTS.items()
            }
        )
    )
    base = dict(
        os.environ,
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        WORLD_SIZE="2",
    )
    logs = [folder / f"rank{r}.log" for r in range(2)]  # files, not pipes: a full pipe would stall its rank
    ranks = []
    for rank, log in enumerate(logs):
        with log.open("w") as sink:
            env = base | {"RANK": str(rank), "LOCAL_RANK": str(rank)}
            command = [sys.executable, __file__, str(configs), str(out)]
            ranks.append(
                subprocess.Popen(
                    command, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
                )
            )
    try:
        for process in ranks:
            process.wait(timeout=LAUNCH_LIMIT_S)
    except subprocess.TimeoutExpired:
        for process in ranks:
            os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"the two DeepSpeed CPU ranks did not finish in {LAUNCH_LIMIT_S} s:\n{logs[0].read_text()[-4000:]}")
    for process, log in zip(ranks, logs, strict=True):
        assert process.returncode == 0, f"a DeepSpeed rank failed:\n{log.read_text()[-6000:]}"
    raw = json.loads(out.read_text())
    return {
        name: {op: {int(size): count for size, count in sizes.items()} for op, sizes in ops.items()}
        for name, ops in raw.items()
    }


def _hidden(kind: str) -> int:
    return HIDDEN if kind == "toy" else 64  # the tiny shapes' LLM width (transformers' "auto" sizes)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_step_collectives_equal_deepspeeds_comms_logger(deepspeed_counts, variant):
    """Every collective of a training step (op, bytes, count) as DeepSpeed 0.19.8 logs it on two ranks."""
    kind, stage, overrides, checkpointing = VARIANTS[variant]
    settings = zero_settings(deepspeed_config(stage, overrides, _hidden(kind)), _hidden(kind))
    if kind == "toy":
        layout = tiny_layout(Tiny(checkpointing))
    else:
        layout = llava_layout(SHAPE_OF[kind], "finetune", TINY_DUET, checkpointing)
    predicted = comms_summary(step_collectives(layout, settings, 2, checkpointing))
    measured = deepspeed_counts[variant]
    assert predicted == measured
    # and so the bytes per collective type, the quantity the step-time model prices
    for op, sizes in measured.items():
        assert sum(s * c for s, c in predicted[op].items()) == sum(s * c for s, c in sizes.items())


def test_the_check_exercises_what_the_cluster_model_relies_on(deepspeed_counts):
    """ZeRO-2 all-reduces exactly the trainable bf16 gradients; ZeRO-3 reduce-scatters them with padding to the
    world, and gathers more when it releases parameters than with the repository's config."""
    layout = tiny_layout(Tiny(True))
    zero2 = deepspeed_counts["zero2"]["all_reduce"]
    scalars = 1 + 4 + 4
    assert sum(s * c for s, c in zero2.items()) - scalars == 2 * layout.numel(trainable=True)
    padded = sum(2 * -(-p.numel // 2) for p in layout.params if p.trainable)
    assert sum(s * c for s, c in deepspeed_counts["zero3"]["reduce_scatter_tensor"].items()) == 2 * padded
    gathered = {
        name: sum(s * c for s, c in counts["all_gather_into_tensor"].items())
        for name, counts in deepspeed_counts.items()
        if name != "zero2"
    }
    assert gathered["zero3_release"] > gathered["zero3_window"] > gathered["zero3"]


# ----- the pure model -----


def _llava_volume(stage: int, world: int, **overrides: Any) -> dict[str, float]:
    """Bytes each GPU sends per step, per op: LLaVA-1.5-7B finetune, duet_192, scripts/zero{stage}.json."""
    config = json.loads((REPO / "scripts" / f"zero{stage}.json").read_text())
    config["zero_optimization"].update(overrides)
    volume: dict[str, float] = {}
    for collective in step_collectives(
        llava_layout("llava-7b", "finetune", "duet_192"), zero_settings(config, 4096), world
    ):
        volume[collective.op] = volume.get(collective.op, 0.0) + collective.wire_bytes(world)
    return volume


@pytest.mark.parametrize(("shape", "stage"), [("tiny", "finetune"), ("tiny", "pretrain"), ("tiny-video", "finetune")])
def test_llava_layout_is_the_models_own_structure(shape, stage):
    """The layout the cluster tables use, built from a shape, against the project's LLaVA of that shape: the same
    modules and parameters in registration order, and the same module hooks in a forward + backward (checkpointed
    decoder layers recomputed inside backward), with V2V and T2V scoring."""
    from llava.bench.shapes import build_model, get_shape
    from llava.bench.workload import build_training_batch
    from llava.hf_adapter import enable_activation_checkpointing
    from llava.model.stages import freeze_for_stage

    torch.manual_seed(0)
    model = build_model(shape, TINY_DUET)
    freeze_for_stage(model, stage)
    model.train()
    enable_activation_checkpointing(model, use_reentrant=False)
    model.enable_input_require_grads()
    layout = llava_layout(shape, stage, TINY_DUET)
    real = [
        (name, [(p.numel(), p.requires_grad) for p in module.parameters(recurse=False)])
        for name, module in model.named_modules()
    ]
    modelled = [(module.name, [(p.numel, p.trainable) for p in module.params]) for module in layout.modules]
    assert [entry for entry in modelled if entry[1]] == [entry for entry in real if entry[1]]

    names = {id(module): name for name, module in model.named_modules()}
    hooks: list[tuple[str, str]] = []
    for module in model.modules():
        module.register_forward_pre_hook(lambda m, _: hooks.append(("forward", names[id(m)])))
        module.register_full_backward_pre_hook(lambda m, _: hooks.append(("backward", names[id(m)])))
    with pytest.warns(UserWarning):  # torch: the top-level module returns a dataclass, its backward hook cannot run
        model(**build_training_batch(get_shape(shape), stage, 2)).loss.backward()
    expected = [("forward" if phase == "recompute" else phase, name) for phase, name in hook_order(layout)]
    assert hooks == [(phase, name) for phase, name in expected if (phase, name) != ("backward", "")]


def test_wire_bytes_follow_the_ring_factor():
    gather, reduce = Collective("all_gather_into_tensor", 100, "forward"), Collective("all_reduce", 800, "backward")
    assert gather.buffer_bytes(8) == 800 and gather.wire_bytes(8) == 700
    assert reduce.wire_bytes(8) == 1400 and reduce.wire_bytes(1) == 0
    # per-GPU traffic of the whole step grows as (n - 1) / n: 2 -> 8 GPUs is 1/2 -> 7/8
    two, eight = _llava_volume(2, 2)["all_reduce"], _llava_volume(2, 8)["all_reduce"]
    assert eight / two == pytest.approx((7 / 8) / (1 / 2), rel=1e-4)


def test_zero2_and_zero3_volumes_and_only_trainable_gradients_are_reduced():
    layout = llava_layout("llava-7b", "finetune")
    trainable = layout.numel(trainable=True)
    assert 6.7e9 < trainable < 6.8e9 and layout.numel() - trainable > 3e8  # CLIP-L is frozen
    zero2, zero3 = _llava_volume(2, 8), _llava_volume(3, 8)
    # DeepSpeed's ZeRO-2 all-reduces the bf16 gradients (ring: 2 (n-1)/n) and all-gathers the parameters after
    # the step ((n-1)/n): three times the trainable bytes, not the textbook two
    assert zero2["all_reduce"] == pytest.approx(2 * trainable * 2 * 7 / 8, rel=1e-6)
    assert zero2["all_gather_into_tensor"] == pytest.approx(2 * trainable * 7 / 8, rel=1e-6)
    # ZeRO-3 reduce-scatters once and gathers every parameter (frozen CLIP too) in forward, most again for the
    # recomputation; the reuse window and the prefetcher keep ~1e9 parameters over the forward/backward turn
    assert zero3["reduce_scatter_tensor"] == pytest.approx(2 * trainable * 7 / 8, rel=1e-4)
    assert 2 * layout.numel() * 7 / 8 < zero3["all_gather_into_tensor"] < 2 * 2 * layout.numel() * 7 / 8
    released = _llava_volume(3, 8, stage3_max_reuse_distance=0, stage3_prefetch_bucket_size=0)
    assert sum(released.values()) > 1.25 * max(sum(zero2.values()), sum(zero3.values()))
    zero = zero_settings(REPO / "scripts/zero2.json", 4096)
    pretrain = step_collectives(llava_layout("llava-7b", "pretrain"), zero, 8)
    assert sum(c.wire_bytes(8) for c in pretrain) < 0.01 * sum(zero2.values())  # projector only


def test_checkpointing_regathers_for_the_recomputation():
    layout = llava_layout("llava-7b", "finetune")
    settings = {"stage": 3, "stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 0}
    zero = zero_settings({"zero_optimization": settings}, 4096)
    with_ckpt = [c for c in step_collectives(layout, zero, 8, True) if c.op == "all_gather_into_tensor"]
    without = [c for c in step_collectives(layout, zero, 8, False) if c.op == "all_gather_into_tensor"]
    assert sum(c.logged_bytes for c in with_ckpt) > sum(c.logged_bytes for c in without)


def test_saving_shrinks_when_the_cluster_spans_nodes():
    rows = predict_grid(["llava-7b"], "finetune", ["A100-80G"], [3], [1, 8, 16, 64], presets=["none", "duet_64"])
    saving = {
        r.world: 1 - r.step_s / next(b.step_s for b in rows if b.world == r.world and b.preset == "none")
        for r in rows
        if r.preset == "duet_64"
    }
    assert saving[16] < saving[8] - 0.05 and saving[64] <= saving[16]
    flops = {r.preset: r.tflops for r in rows}
    assert all(value < 1 - flops["duet_64"] / flops["none"] for value in saving.values())


def test_step_time_parts_and_overrides():
    zero = zero_settings(REPO / "scripts/zero3.json", 4096)
    row = predict_step("llava-7b", "none", "finetune", "H100", 8, zero, 16, tflops=400.0)
    assert row.achieved_tflops == 400.0
    assert row.forward_s + row.backward_s == pytest.approx(row.tflops / 400.0)
    assert 0 <= row.exposed_comm_s <= row.comm_s
    assert row.step_s == pytest.approx(row.forward_s + row.backward_s + row.exposed_comm_s + row.optimizer_s)
    slow = predict_step(
        "llava-7b", "none", "finetune", "H100", 16, zero, 16, tflops=400.0, network=Network(link_efficiency=0.2)
    )
    assert slow.exposed_comm_s > row.exposed_comm_s
    assert set(GPUS) == {"A100-80G", "H100", "H200", "MI300X"}


def test_table_renders_every_preset_and_gpu_count():
    rows = predict_grid(["video-llava-7b"], "finetune", ["MI300X"], [2], [1, 8, 16])
    text = "\n".join(markdown_tables(rows))
    assert "video-llava-7b finetune, MI300X, ZeRO-2" in text
    for preset in ("duet_video_53", "duet_video_93"):
        assert f"{preset} s (saving)" in text
    assert text.count("\n| 16 |") == 1 and "FLOPs only" in text


def test_cli_writes_tables_json_and_plot(tmp_path, capsys):
    from llava.bench.scale import main

    args = ["--shapes", "llava-7b", "--gpus", "A100-80G", "--zero", "3", "--world", "8,16", "--presets", "none,duet_64"]
    assert main([*args, "--paper", "--json", str(tmp_path / "rows.json"), "--plot", str(tmp_path / "saving.png")]) == 0
    printed = capsys.readouterr().out
    assert "llava-7b finetune, A100-80G, ZeRO-3" in printed and "| A100-80G | duet_64 |" in printed
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert {row["world"] for row in rows} == {8, 16} and all("saving_vs_none" in row for row in rows)
    assert (tmp_path / "saving.png").stat().st_size > 0


def test_a_text_heavier_length_mix_shrinks_the_saving():
    zero = zero_settings(REPO / "scripts/zero3.json", 4096)
    fixed, mixed = (
        {
            preset: predict_step(
                "llava-7b", preset, "finetune", "A100-80G", 8, zero, 16, length_mix=mix, mix_samples=64
            )
            for preset in ("none", "duet_192")
        }
        for mix in (None, "llava665k")
    )
    assert mixed["none"].tflops > fixed["none"].tflops  # the mix's conversations are longer than 100 tokens
    assert 1 - mixed["duet_192"].step_s / mixed["none"].step_s < 1 - fixed["duet_192"].step_s / fixed["none"].step_s


def test_auto_values_are_filled_as_transformers_fills_them():
    settings = zero_settings(REPO / "scripts/zero3.json", 4096)
    assert settings.reduce_bucket_size == 4096**2
    assert settings.prefetch_bucket_size == int(0.9 * 4096**2)
    assert settings.param_persistence_threshold == 40960
    assert settings.max_reuse_distance == settings.max_live_parameters == 10**9
    with pytest.raises(ValueError, match="stages 2 and 3"):
        zero_settings({"zero_optimization": {"stage": 1}}, 4096)


if __name__ == "__main__":
    run_rank(Path(sys.argv[1]), Path(sys.argv[2]))
