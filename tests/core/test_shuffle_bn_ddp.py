"""Two real gloo processes: shuffle-BN, identical queues, per-rank loss against a single-process computation."""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from moco_helpers import free_port
from torch.nn.parallel import DistributedDataParallel as DDP

from moco_ray.core import MoCo
from moco_ray.core.encoders import build_encoder
from moco_ray.core.shuffle_bn import batch_shuffle_ddp, batch_unshuffle_ddp
from moco_ray.core.step import train_step

WORLD = 2
B = 4  # per-rank batch


def _data(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(B, 3, 16, 16, generator=g), torch.randn(B, 3, 16, 16, generator=g)


def _model(bn_mode: str) -> MoCo:
    torch.manual_seed(0)  # identical initial weights and queue on every rank
    enc = build_encoder("resnet18", True, "mlp", 16, 32)
    return MoCo(enc, dim=16, queue_size=20, momentum=0.9, temperature=0.2, bn_mode=bn_mode)


def _run_steps(model: MoCo, rank: int, steps: int = 3) -> list[dict]:
    model.wrap_trainable(DDP)  # what the training loop does
    opt = torch.optim.SGD(model.encoder_q.parameters(), lr=0.1)
    records = []
    for step in range(steps):
        im_q, im_k = _data(step, rank)
        state = {  # what a single process needs to recompute this rank's step
            "q": copy.deepcopy(model.query_module.state_dict()),
            "k": copy.deepcopy(model.encoder_k.state_dict()),
            "queue": model.queue.keys.clone(),
            "ptr": model.queue.ptr.clone(),
        }
        out = train_step(model, opt, im_q, im_k)
        records.append({"state": state, "loss": out["loss"], "queue_after": model.queue.keys.clone()})
    return records


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.manual_seed(123 + rank)
    try:
        # 1. shuffle / unshuffle round trip on raw rows
        x = torch.arange(B * 3, dtype=torch.float32).reshape(B, 3) + 100 * rank
        shuffled, unshuffle = batch_shuffle_ddp(x)
        restored = batch_unshuffle_ddp(shuffled, unshuffle)

        # 2. shuffle-BN through the key encoder: with per-sample (eval) BN, keys come back in input order
        probe = _model("ddp")
        probe.encoder_k.eval()
        im = _data(99, rank)[1]
        keys_shuffled = probe.encode_keys(im)
        keys_direct = F.normalize(probe.encoder_k(im), dim=1)

        # 3. training steps with shuffle-BN (queues must stay identical) and without (exactly recomputable)
        ddp_model = _model("ddp")
        _run_steps(ddp_model, rank)
        plain_records = _run_steps(_model("none"), rank)
        torch.save(
            {
                "x": x,
                "shuffled": shuffled,
                "restored": restored,
                "keys_shuffled": keys_shuffled,
                "keys_direct": keys_direct,
                "queue": ddp_model.queue.keys,
                "ptr": ddp_model.queue.ptr,
                "encoder_k": ddp_model.encoder_k.state_dict(),
                "records": plain_records,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_two_process_ddp(tmp_path):
    mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn")
    r = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(WORLD)]

    # shuffle-BN: each rank's slice is a permutation of the global batch, and unshuffle restores its own rows
    for i in range(WORLD):
        torch.testing.assert_close(r[i]["restored"], r[i]["x"])
        torch.testing.assert_close(r[i]["keys_shuffled"], r[i]["keys_direct"], rtol=1e-5, atol=1e-6)
    glob = torch.cat([r[0]["x"], r[1]["x"]])
    shuf = torch.cat([r[0]["shuffled"], r[1]["shuffled"]])
    assert sorted(shuf[:, 0].tolist()) == sorted(glob[:, 0].tolist())
    assert not torch.equal(shuf, glob)  # 8! permutations: the identity has probability 1/40320

    # identical queues, pointer advanced by the global batch each step, identical key encoder weights
    assert torch.equal(r[0]["queue"], r[1]["queue"])
    assert int(r[0]["ptr"]) == int(r[1]["ptr"]) == (3 * WORLD * B) % 20
    # parameters: BN running statistics legitimately differ, each rank normalised a different key slice
    params = [k for k in r[0]["encoder_k"] if not k.endswith(("running_mean", "running_var", "batches_tracked"))]
    for key in params:
        assert torch.equal(r[0]["encoder_k"][key], r[1]["encoder_k"][key])

    # without shuffle-BN each rank's loss is exactly the single-process MoCo loss on that rank's data, and the
    # queue after the step holds both ranks' keys in rank order
    for step in range(3):
        keys = []
        for i in range(WORLD):
            rec = r[i]["records"][step]
            ref = _model("none")
            ref.query_module.load_state_dict(rec["state"]["q"])
            ref.encoder_k.load_state_dict(rec["state"]["k"])
            ref.queue.keys.copy_(rec["state"]["queue"])
            ref.queue.ptr.copy_(rec["state"]["ptr"])
            im_q, im_k = _data(step, i)
            out = ref(im_q, im_k)
            torch.testing.assert_close(rec["loss"], out["loss"].detach(), rtol=1e-5, atol=1e-6)
            ref.encoder_k.train()
            keys.append(F.normalize(ref.encoder_k(im_k), dim=1).detach())
        rec0 = r[0]["records"][step]
        ptr = int(rec0["state"]["ptr"])
        both = torch.cat(keys)
        for j in range(WORLD * B):
            torch.testing.assert_close(rec0["queue_after"][(ptr + j) % 20], both[j], rtol=1e-5, atol=1e-6)
        assert torch.equal(rec0["queue_after"], r[1]["records"][step]["queue_after"])
