"""Process-group setup: one process by default; `torchrun` sets WORLD_SIZE and we join its group. With
`train.strategy: fsdp` the model is sharded over the processes (`shard`) and gathered back whole after training
(`gather`)."""
from __future__ import annotations

import copy
import itertools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from tunelab.models import pick_device


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    sharded: bool = False  # train.strategy fsdp over more than one process: the model's weights are shards

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup(device: str, strategy: str = "ddp") -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(0, 1, pick_device(device))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, dev, sharded=strategy == "fsdp")


def teardown(d: Dist) -> None:
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: the modules of the classes transformers names in `_no_split_modules` (a
    transformer layer, the embeddings), the units FSDP gathers one at a time — except a block with a parameter that
    a module outside it uses too (BERT's embeddings, tied to its masked-LM decoder): a tie must stay within one
    unit, so that block stays with the rest of the model."""
    names = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or ())}
    found = [(name, m) for name, m in model.named_modules() if type(m).__name__ in names and m is not model]
    owners: dict[int, set[str]] = {}  # parameter -> the modules that hold it directly
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(name)

    def self_contained(prefix: str, block: nn.Module) -> bool:
        return all(o == prefix or o.startswith(prefix + ".") for p in block.parameters() for o in owners[id(p)])
    return [m for name, m in found if self_contained(name, m)]


def shard(model: nn.Module, d: Dist) -> nn.Module:
    """Shard `model` in place over every process with FSDP2 (torch.distributed.fsdp.fully_shard): each block
    (`blocks`), then the rest as one unit. Each process keeps 1/world of each parameter (a DTensor), so of its
    gradient and its optimizer state; a block's full weights exist only while it runs forward or backward, and
    gradients are reduce-scattered (averaged, as DDP's are). Returns a copy of the plain model on the meta device
    (no memory), for `gather`."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    skeleton = _meta_copy(model)
    mesh = init_device_mesh(d.device.type, (d.world,))
    for block in blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return skeleton


def gather(model: nn.Module, skeleton: nn.Module, d: Dist) -> nn.Module:
    """The sharded `model`'s weights gathered whole into `skeleton` (from `shard`), on every process: the plain
    model that evaluation, the baselines and the export read. Collective: every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    skeleton.load_state_dict(full, strict=True, assign=True)  # (takes the gathered tensors: no second copy)
    del full
    for name, buf in model.named_buffers():  # buffers are not sharded; those outside the state dict are still meta
        owner, _, leaf = name.rpartition(".")
        holder = skeleton.get_submodule(owner)
        if holder._buffers[leaf].is_meta:
            holder._buffers[leaf] = buf.clone()
    if hasattr(skeleton, "tie_weights"):  # tied weights came back as two tensors (input and output embeddings)
        skeleton.tie_weights()
    return skeleton


def _meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` whose parameters and buffers are empty tensors on the meta device: the copy costs
    no memory, keeps every module, flag and tie of the original, and `to_empty` gives it storage."""
    memo = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        empty = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty
    return copy.deepcopy(model, memo)
