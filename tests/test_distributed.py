"""Our layers under torch.distributed on the CPU (gloo, 2 processes): DDP gives one process' gradients (LoRA, DoRA,
QLoRA), and FSDP2 (``fully_shard``) shards the NF4 codes like any parameter and trains QLoRA to the same gradients."""
from __future__ import annotations

import os
import tempfile
import time

import pytest
import torch
from torch import nn

import peftkern as pk


def _model(kind: str) -> nn.Sequential:
    torch.manual_seed(0)
    if kind == "lora":
        model = nn.Sequential(pk.nn.LoRALinear(16, 24, r=4), nn.GELU(), pk.nn.LoRALinear(24, 8, r=4, use_dora=True))
    else:
        model = nn.Sequential(pk.nn.QLoRALinear.from_linear(nn.Linear(64, 96), r=4, lora_alpha=8), nn.GELU(),
                              pk.nn.QLoRALinear.from_linear(nn.Linear(96, 16), r=4, lora_alpha=8))
    for layer in (model[0], model[2]):
        nn.init.normal_(layer.lora_B, std=0.1)
    return model


def _worker(rank, world, init_file, mode, kind, x, target, out_dir):
    import gc

    import torch.distributed as dist

    model = _model(kind)  # built here, so this frame holds its only reference (spawn's caller keeps its args alive)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    shard = slice(rank * x.shape[0] // world, (rank + 1) * x.shape[0] // world)
    info = {}
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in (model[0], model[2]):
            fully_shard(layer)
        wrapped = fully_shard(model)
        info["weight_local"] = tuple(model[0].weight.to_local().shape)
        info["weight_is_dtensor"] = type(model[0].weight).__name__ == "DTensor"
    loss = (wrapped(x[shard]) - target[shard]).square().mean()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    if mode == "fsdp2":
        grads = {n: g.full_tensor() for n, g in grads.items()}
    torch.save({"grads": grads, **info}, os.path.join(out_dir, f"rank{rank}.pt"))
    # neither the reducer nor FSDP2's sharded parameters (their device mesh) may hold the last reference to the
    # process group past destroy_process_group: freed at interpreter exit, gloo's threads are destroyed still
    # joinable (std::terminate, SIGABRT), and a destructor run with the GIL held can deadlock on them
    del wrapped, model, loss, grads
    gc.collect()
    dist.destroy_process_group()


def _run(mode: str, kind: str, x, target) -> list[dict]:
    with tempfile.TemporaryDirectory() as d:
        procs = torch.multiprocessing.spawn(_worker, args=(2, os.path.join(d, "init"), mode, kind, x, target, d),
                                            nprocs=2, join=False)
        deadline = time.monotonic() + 180
        while not procs.join(timeout=5):
            if time.monotonic() > deadline:  # a hang fails the test instead of stalling the suite
                for proc in procs.processes:
                    proc.kill()
                pytest.fail(f"the {mode} workers did not finish within 180 s")
        return [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(2)]


@pytest.mark.parametrize("mode,kind", [("ddp", "lora"), ("ddp", "qlora"), ("fsdp2", "qlora")])
def test_two_processes_match_one(mode, kind):
    model = _model(kind)
    fin = model[0].in_features
    x, target = torch.randn(8, 5, fin), torch.randn(8, 5, model[2].out_features)
    results = _run(mode, kind, x, target)
    (model(x) - target).square().mean().backward()
    for res in results:
        for n, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(res["grads"][n], p.grad, rtol=1e-5, atol=1e-7)
    if mode == "fsdp2":  # the packed NF4 codes are a parameter FSDP2 shards: each rank holds half
        full = tuple(model[0].weight.shape)
        assert all(r["weight_is_dtensor"] and r["weight_local"] == (full[0] // 2, 1) for r in results)
