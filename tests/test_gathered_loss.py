"""The gathered contrastive loss under data parallelism: two processes (gloo on CPU, DDP) with half the
batch each give the loss and the parameter gradients (after DDP's averaging, the learnable temperature
and SigLIP's bias included) of one process with the whole batch, for CLIP's and SigLIP's loss, with and
without open_clip's local_loss, and with extra negative captions that only one process has."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from multimodal_models.models.dual_encoder import DualEncoder, DualEncoderConfig
from multimodal_models.models.text import TextEncoderConfig
from multimodal_models.models.vision import VisionConfig
from multimodal_models.training.tasks import ContrastiveOptions, ContrastiveTask, contrastive_loss

WORLD, BATCH, VOCAB, TOKENS = 2, 8, 50, 7
NEGATIVES = 3  # extra captions, all on rank 0: rank 1 has none and still takes part in their gather
CASES = [(loss, local, negatives) for loss in ("clip", "siglip") for local in (False, True) for negatives in (False, True)]


def case_id(case) -> str:
    loss, local, negatives = case
    return f"{loss}{'-local' if local else ''}{'-negatives' if negatives else ''}"


def tiny_model(loss: str) -> DualEncoder:
    torch.manual_seed(0)
    config = DualEncoderConfig(vision=VisionConfig(image_size=16, patch_size=8, width=16, depth=1, heads=2),
                               text=TextEncoderConfig(vocab_size=VOCAB, max_length=TOKENS, width=16, depth=1, heads=2),
                               embed_dim=8, loss=loss)
    model = DualEncoder(config).train()
    if loss == "siglip":  # away from the init (bias -10, every pair far negative) so that every gradient is sizeable
        with torch.no_grad():
            model.criterion.logit_bias.fill_(-1.0)
    return model


def data() -> dict:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, VOCAB, (BATCH, TOKENS), generator=generator)
    mask = torch.ones_like(ids)
    mask[::3, -2:] = 0  # some padding
    negatives = torch.randint(5, VOCAB, (NEGATIVES, TOKENS), generator=generator)
    return {"pixels": torch.randn(BATCH, 3, 16, 16, generator=generator), "ids": ids, "mask": mask,
            "negative_ids": negatives, "negative_mask": torch.ones_like(negatives)}


def forward(model, batch: dict, rows: slice, negatives: bool):
    extra = {"negative_ids": batch["negative_ids"], "negative_mask": batch["negative_mask"]} if negatives else {}
    return model(batch["pixels"][rows], batch["ids"][rows], batch["mask"][rows], **extra)


@dataclass
class Result:
    loss: float
    grads: dict[str, torch.Tensor]


def one_process(case) -> Result:
    loss_name, _, negatives = case
    model = tiny_model(loss_name)
    loss = contrastive_loss(model, forward(model, data(), slice(0, BATCH), negatives))
    loss.backward()
    return Result(float(loss.detach()), {name: p.grad.clone() for name, p in model.named_parameters()})


def worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        batch, share = data(), BATCH // WORLD
        rows = slice(rank * share, (rank + 1) * share)
        results = {}
        for case in CASES:
            loss_name, local, negatives = case
            model = tiny_model(loss_name)
            runner = torch.nn.parallel.DistributedDataParallel(model)
            loss = contrastive_loss(runner, forward(runner, batch, rows, negatives and rank == 0),
                                    gather=True, local_loss=local)
            loss.backward()  # DDP averages the parameter gradients over the two processes
            losses = [torch.zeros(()) for _ in range(WORLD)]
            dist.all_gather(losses, loss.detach())
            results[case] = ([float(x) for x in losses], {name: p.grad.clone() for name, p in model.named_parameters()})
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> list[dict]:
    """Every case run once by two processes with half the batch each: per rank, case -> (both ranks' losses, grads)."""
    out = tmp_path_factory.mktemp("gathered")
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_two_processes_with_half_the_batch_equal_one_with_the_whole_batch(case, two_processes):
    loss_name, local, _ = case
    single = one_process(case)
    losses, grads = two_processes[0][case]
    if local:  # each process's loss is its rows' share times 2: their mean is the batch's loss
        assert sum(losses) / WORLD == pytest.approx(single.loss, abs=1e-5)
        assert losses[0] != pytest.approx(losses[1], abs=1e-4)
    else:  # every process computes the whole batch's loss
        assert losses == pytest.approx([single.loss] * WORLD, abs=1e-5)
    assert grads.keys() == single.grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, single.grads[name], atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(grad, two_processes[1][case][1][name], atol=0, rtol=0)  # DDP: the same on both
    # the learnable temperature (and SigLIP's bias), which lie outside the gather, get the whole batch's gradient
    scalars = ["criterion.logit_scale"] + (["criterion.logit_bias"] if loss_name == "siglip" else [])
    for name in scalars:
        assert abs(float(single.grads[name])) > 1e-3
        assert float(grads[name]) == pytest.approx(float(single.grads[name]), abs=1e-5)


def test_without_gathering_each_process_sees_only_its_half(two_processes):
    """What gathering fixes: the loss of each half alone is not the whole batch's, nor is the gradient."""
    model = tiny_model("clip")
    batch = data()
    halves = [contrastive_loss(model, forward(model, batch, slice(r * 4, r * 4 + 4), False)) for r in range(WORLD)]
    whole = one_process(("clip", False, False)).loss
    assert sum(float(h) for h in halves) / WORLD < whole - 0.1  # fewer negatives: an easier task


def test_options_gather_by_default_under_torchrun_only():
    task = object.__new__(ContrastiveTask)  # the option logic alone, without data
    task.options = ContrastiveOptions()
    assert task.gathering() == {"gather": False, "local_loss": False}  # one process: nothing to gather
    task.options = ContrastiveOptions(gather=True, local_loss=True)
    assert task.gathering() == {"gather": True, "local_loss": True}
    task.options = ContrastiveOptions(gather=False, local_loss=True)
    assert task.gathering() == {"gather": False, "local_loss": False}


def test_gathering_in_one_process_is_the_plain_loss():
    for loss_name in ("clip", "siglip"):
        model = tiny_model(loss_name)
        out = forward(model, data(), slice(0, BATCH), True)
        assert torch.equal(contrastive_loss(model, out, gather=True, local_loss=True), contrastive_loss(model, out))


@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_shares_of_rows_add_up_to_the_loss(loss_name):
    """The local_loss path's arithmetic without processes: the rows' shares of the loss sum to the loss."""
    from multimodal_models.models.losses import clip_loss, siglip_loss

    generator = torch.Generator().manual_seed(2)
    image, text = torch.randn(6, 8, generator=generator), torch.randn(9, 8, generator=generator)
    if loss_name == "clip":
        def loss(rows=None):
            return clip_loss(image, text, 2.0, rows=rows)
    else:
        def loss(rows=None):
            return siglip_loss(image, text, 2.0, -1.0, rows=rows)
    shares = loss(slice(0, 2)) + loss(slice(2, 5)) + loss(slice(5, 6))
    torch.testing.assert_close(shares, loss(), atol=1e-6, rtol=1e-6)


def test_torchrun_contrastive_training_equals_one_process(tmp_path):
    """The loop end to end: `torchrun --nproc_per_node=2` trains the contrastive task (gathered by default) to the
    weights and logged losses of one process with the same (global) batch_size. One caption per image, so that
    each process's batch holds exactly its half of the single process's (captions are drawn per process)."""
    import json
    import subprocess
    import sys

    import yaml
    from safetensors.torch import load_file

    from multimodal_models.shapes.generate import ShapesConfig, generate
    from multimodal_models.training.config import config_from_raw
    from multimodal_models.training.loop import train

    from .conftest import tiny_config

    data_root = tmp_path / "data"
    generate(ShapesConfig(seed=5, train=32, val=8, test=8, test_compositional=8, captions_per_image=1), data_root,
             workers=1, progress=False)
    model = {"vision": {"image_size": 32, "patch_size": 8, "width": 16, "depth": 1, "heads": 2},
             "text": {"max_length": 48, "width": 16, "depth": 1, "heads": 2}, "embed_dim": 16, "loss": "siglip"}

    def config(name: str) -> dict:
        raw = tiny_config("contrastive", data_root, tmp_path / name, steps=2, eval_every=2, log_every=1,
                          precision="fp32")
        raw["model"] = model
        return raw

    train(config_from_raw(config("single")), progress=False)
    config_file = tmp_path / "ddp.yaml"
    config_file.write_text(yaml.safe_dump(config("ddp")))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", "-m",
         "multimodal_models.cli", "train", str(config_file), "--quiet"],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    def losses(name: str) -> list[float]:
        lines = (tmp_path / name / "log.jsonl").read_text().splitlines()
        return [record["loss"] for record in map(json.loads, lines) if "loss" in record]

    assert len(losses("single")) == 2
    assert losses("ddp") == pytest.approx(losses("single"), abs=1e-4)  # rank 0 logs the whole batch's loss
    a = load_file(str(tmp_path / "single/checkpoints/last/model.safetensors"))
    b = load_file(str(tmp_path / "ddp/checkpoints/last/model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4, msg=lambda m: f"{key}: {m}")
