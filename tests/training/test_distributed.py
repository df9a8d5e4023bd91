"""training/distributed.py: torchrun environment parsing, Hydra worker overrides, metric reduction, and the
DDP equivalence: 2 CPU processes (gloo) with per-rank batch B follow the same loss trajectory as 1 process with B*2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from torch import nn

from core.errors import FaststyleError
from models.modelfile import unwrap_model
from models.transformer import TransformerNet
from tests.support import free_port
from training import distributed as D

TORCHRUN_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


@pytest.fixture
def no_torchrun_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in TORCHRUN_KEYS:
        monkeypatch.delenv(key, raising=False)


def test_torchrun_env_parsing() -> None:
    assert D.torchrun_env({}) is None
    assert D.torchrun_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (3, 4, 1)
    with pytest.raises(FaststyleError, match="missing LOCAL_RANK"):
        D.torchrun_env({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(FaststyleError, match="integers"):
        D.torchrun_env({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    with pytest.raises(FaststyleError, match="invalid RANK"):
        D.torchrun_env({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})


def test_worker_hydra_overrides_only_on_nonzero_ranks() -> None:
    assert D.worker_hydra_overrides({}) == []
    assert D.worker_hydra_overrides({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}) == []
    worker = D.worker_hydra_overrides({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert "hydra.run.dir=." in worker and "hydra.output_subdir=null" in worker


def test_single_process_context(no_torchrun_env: None) -> None:
    ctx = D.init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.distributed, ctx.backend) == (0, 1, True, False, None)
    assert ctx.device == torch.device("cpu")
    assert D.get_world_size() == 1
    model = nn.Linear(2, 2)
    assert D.wrap_ddp(model, ctx) is model  # nothing to wrap for one process
    assert D.broadcast_object({"a": 1}) == {"a": 1}
    D.teardown_distributed()  # no group: a no-op, not an error


def test_pinned_cuda_index_refused_under_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(FaststyleError, match="CUDA_VISIBLE_DEVICES"):
        D.init_distributed("cuda:1")


def test_all_reduce_mean_single_process(no_torchrun_env: None) -> None:
    out = D.all_reduce_mean({"loss/total": torch.tensor(2.5), "lr": 1e-3, "x": torch.tensor([4.0])})
    assert out == pytest.approx({"loss/total": 2.5, "lr": 1e-3, "x": 4.0})
    assert all(type(v) is float for v in out.values())
    assert D.all_reduce_mean({}) == {}


# --- DDP equivalence ------------------------------------------------------------------------------------------------

STEPS = 4
PER_RANK_BATCH = 2
WORLD = 2
IMAGE_SIZE = 64


def _make_images(root: Path, count: int) -> None:
    """Small photo-like JPEGs (smooth gradients plus noise) so the data pipeline does real decoding and cropping."""
    gen = torch.Generator().manual_seed(1)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        h, w = 80 + 8 * (i % 3), 96
        ramp = torch.linspace(0, 1, w).view(1, 1, w).expand(3, h, w)
        img = (0.6 * ramp + 0.4 * torch.rand(3, h, w, generator=gen)).clamp(0, 1)
        array = (img.permute(1, 2, 0) * 255).to(torch.uint8).numpy()
        Image.fromarray(array).save(root / f"img{i:02d}.jpg", quality=90)


def _train(
    rank: int, world_size: int, batch_size: int, data_root: str, out_path: str, port: int, styles: int = 1
) -> None:
    """A few training steps of a tiny TransformerNet against the random loss network, in float64 (see
    ``test_ddp_two_cpu_processes_match_single_process`` for why); rank 0 writes the loss trajectory (all-reduced
    means), the trained network's output on a fixed probe batch and every rank's parameters. Used in one process
    or as an mp.spawn target. ``styles`` > 1 trains a multi-style network, each sample in the style that
    training.loop.style_indices gives it (a function of the step, the rank and the global sample order)."""
    import os

    from data.dataset import ImageFolderDataset, make_train_loader
    from models.loss import PerceptualLoss
    from training.loop import style_indices

    torch.set_num_threads(1)
    if world_size > 1:
        os.environ.update(
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
    ctx = D.init_distributed("cpu")
    try:
        assert (ctx.rank, ctx.world_size) == (rank, world_size)
        assert ctx.backend == ("gloo" if world_size > 1 else None)
        # Different seeds per rank on purpose: DDP must broadcast rank 0's initial parameters.
        torch.manual_seed(0 + 100 * rank)
        net = TransformerNet(base_width=8, residual_blocks=2, num_styles=styles).double()
        model = D.wrap_ddp(net, ctx)
        loss_fn = PerceptualLoss("random", ["relu2_2"], {"relu1_2": 1.0, "relu2_2": 1.0}, 1.0, 10.0, 1.0).double()
        gen = torch.Generator().manual_seed(7)
        loss_fn.set_styles([torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen).double() for _ in range(styles)])
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        dataset = ImageFolderDataset(data_root, IMAGE_SIZE)
        loader = make_train_loader(dataset, batch_size, num_workers=0, seed=5, rank=rank, world_size=world_size)
        trajectory = []
        for step in range(1, STEPS + 1):
            batch = next(loader).double()
            if styles == 1:
                losses = loss_fn(model(batch), batch)
            else:
                numbers = style_indices(step, batch.shape[0], styles, rank, world_size)
                index = torch.arange(numbers.start, numbers.stop) % styles
                losses = loss_fn(model(batch, index), batch, index)
            optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
            optimizer.step()
            trajectory.append(D.all_reduce_mean({k: losses[k] for k in ("total", "content", "style", "tv")}))
        flat = torch.cat([p.detach().flatten() for p in unwrap_model(model).parameters()])
        every_rank = [torch.empty_like(flat) for _ in range(world_size)]
        if world_size > 1:
            torch.distributed.all_gather(every_rank, flat)
        else:
            every_rank = [flat]
        if ctx.is_main:
            probe = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(11)).double()
            with torch.no_grad():
                output = unwrap_model(model).eval()(probe, *([0] if styles > 1 else []))
            torch.save({"trajectory": trajectory, "output": output, "params": every_rank}, out_path)
    except BaseException:
        D.teardown_distributed()
        raise
    D.teardown_distributed(wait_for_peers=True)


@pytest.mark.slow
@pytest.mark.parametrize("styles", [1, 3])
def test_ddp_two_cpu_processes_match_single_process(tmp_path: Path, no_torchrun_env: None, styles: int) -> None:
    """Two gloo processes with batch B train exactly as one process with batch 2B; with 3 styles, each sample gets
    the same style in both (the ranks' slices of the global batch).

    Why float64: in float32 this comparison measures rounding noise, not DDP. The two runs add the same numbers
    in a different order (batch 2 + all-reduce vs batch 4), so activations differ in the last bit; a ReLU input
    within that distance of 0, or a near-tie in a max-pool window of the loss network (the output is close to
    mid-grey after 4 steps), then routes a gradient differently, and Adam's first steps (~lr * sign(g)) turn
    relative gradient differences into parameter differences, most of all for the conv biases in front of an
    instance norm, whose true gradient is exactly zero. Measured in float32: outputs differ by up to 1.8e-3
    depending on the style seed and the CPU's kernels (8.3e-4 on a Xeon with this seed), growing roughly tenfold
    per step. In float64 the same runs agree to ~3e-15 (unit roundoff 1.1e-16), so a tolerance of 1e-10 leaves
    five orders of magnitude of headroom for that growth while any DDP mistake (unsynchronised or summed
    gradients, ranks training on the same shard, no parameter broadcast) changes the results by 1e-4 or more.
    """
    data_root = tmp_path / "images"
    _make_images(data_root, 12)
    single, multi = tmp_path / "single.pt", tmp_path / "ddp.pt"

    _train(0, 1, PER_RANK_BATCH * WORLD, str(data_root), str(single), 0, styles)
    args = (WORLD, PER_RANK_BATCH, str(data_root), str(multi), free_port(), styles)
    mp.spawn(_train, args=args, nprocs=WORLD, join=True)

    a, b = torch.load(single, weights_only=True), torch.load(multi, weights_only=True)
    assert len(a["trajectory"]) == len(b["trajectory"]) == STEPS
    # Logged losses travel as float32 (all_reduce_mean: one fp32 tensor), so they agree to float32 rounding: the
    # float64 values round to fp32 (u = 6e-8) and the two rank means are summed and halved once more.
    for step, (sa, sb) in enumerate(zip(a["trajectory"], b["trajectory"], strict=True)):
        for key in sa:
            assert sb[key] == pytest.approx(sa[key], rel=1e-6, abs=1e-9), (step, key, sa[key], sb[key])
    # The losses must actually move, or equal trajectories would prove nothing.
    assert a["trajectory"][-1]["total"] < a["trajectory"][0]["total"]
    # Every rank holds the same parameters, bit for bit: DDP broadcast rank 0's start and applied one update.
    assert len(b["params"]) == WORLD and torch.equal(b["params"][0], b["params"][1])
    # ... and they compute the single process's function,
    torch.testing.assert_close(b["output"], a["output"], rtol=1e-10, atol=1e-10)
    # with the single process's parameters, except the inert biases: a per-channel constant that the next
    # instance norm subtracts again (the bias of every conv but the last, and norm2's bias, which the residual
    # stream carries into the next conv + norm) has a true gradient of 0, so Adam moves it by noise / eps.
    net = TransformerNet(base_width=8, residual_blocks=2, num_styles=styles)
    inert = [
        name.endswith("conv.bias")
        and not name.startswith(f"decoder.{len(net.decoder) - 1}.")
        or name.endswith("norm2.bias")
        for name, _ in net.named_parameters()
    ]
    sizes = [p.numel() for p in net.parameters()]
    for name, flag, pa, pb in zip(
        [n for n, _ in net.named_parameters()],
        inert,
        a["params"][0].split(sizes),
        b["params"][0].split(sizes),
        strict=True,
    ):
        if not flag:
            torch.testing.assert_close(pb, pa, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")
