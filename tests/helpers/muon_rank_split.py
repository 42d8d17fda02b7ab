"""Run by tests/test_muon.py under torchrun: a few Muon steps on fixed matrices, split across ranks."""
import os
import sys

import torch
import torch.distributed as dist

from train_gpt2 import Muon  # (conftest's torchrun puts the repository root on PYTHONPATH)

SHAPES = [(24, 16), (16, 24), (16, 16), (3, 16, 24), (8, 16)]  # a 3-D stack of experts among them


def run_steps(rank: int, world_size: int, steps: int = 3) -> list[torch.Tensor]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*shape)) for shape in SHAPES]
    opt = Muon(params, lr=0.05, momentum=0.9, ns_dtype=torch.float32, rank=rank, world_size=world_size)
    for step in range(steps):
        gen = torch.Generator().manual_seed(100 + step)  # the same gradients on every rank
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return [p.detach().clone() for p in params]


if __name__ == "__main__":
    dist.init_process_group("gloo")
    params = run_steps(dist.get_rank(), dist.get_world_size())
    if dist.get_rank() == 0:
        torch.save(params, sys.argv[1])
    dist.barrier()  # gloo aborts if a peer tears down while rank 0 is still saving
    dist.destroy_process_group()
    # skip the interpreter's teardown, where gloo's threads abort ~1 process in 20 (as train_gpt2.py's exit)
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)
