"""Data-parallel training under ``torchrun``: the process group and a model whose steps match one process's.

``torchrun --nproc_per_node N`` starts N copies of the command with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT`` set; :func:`setup` joins them into one process group (gloo on CPU, nccl with
CUDA, one GPU per local rank). Without those variables nothing here does anything: one process, no process group,
every helper answers as for a single process (rank 0 of 1).

Plain DistributedDataParallel averages gradients but is *not* one big process: batch norm normalises each rank's
slice of the batch with that slice's statistics, and each rank draws its own dropout masks. :func:`prepare_replica`
closes both gaps so that a step of N ranks over a global batch computes what one process's step over the same
batch computes: batch norm is synchronised (torch's :class:`~torch.nn.SyncBatchNorm` on CUDA; on the CPU, where
torch's refuses to run, :class:`SyncBatchNorm2d`) and :class:`ShardDropout` draws the mask of the whole global
batch from the generator every rank seeded identically and keeps the rows of this rank's slice.

Equal in arithmetic, not bit for bit: the batch-norm sums run in another order than torch's single-process kernel,
so activations differ by ~1e-6 and a gradient can differ more where that moves an activation across a ReLU or
max-pool kink. tests/test_ddp.py measures it (2 CPU processes, one step: loss 4e-7 relative, gradient 1.4e-2).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from malaria_cells.errors import ConfigError


def launched() -> bool:
    """Whether a launcher (torchrun) started this process as one of several ranks: ``RANK`` and ``WORLD_SIZE`` set."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def active() -> bool:
    """Whether this process is in an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank: the process group's, else ``$RANK``, else 0."""
    return dist.get_rank() if active() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    """Number of processes training together: the process group's, else ``$WORLD_SIZE``, else 1."""
    return dist.get_world_size() if active() else int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    """This process's index on its machine (``$LOCAL_RANK``, else 0): which GPU it uses."""
    return int(os.environ.get("LOCAL_RANK", 0))


def local_world_size() -> int:
    """Number of ranks on this machine (``$LOCAL_WORLD_SIZE``, else 1): they share its CPU cores."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def is_main() -> bool:
    """Whether this is rank 0, the only process that writes files and prints."""
    return rank() == 0


def setup() -> bool:
    """Join the process group described by torchrun's environment variables; a no-op without them.

    The backend is nccl when CUDA is available (each local rank then uses GPU ``LOCAL_RANK``), else gloo.
    ``MASTER_ADDR`` and ``MASTER_PORT`` are read by torch's ``env://`` rendezvous.

    Returns:
        True when this call created the process group (the caller then calls :func:`cleanup`), else False.
    """
    if not launched() or active():
        return False
    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        if local_rank() >= gpus:
            # nccl needs one GPU per process; CUDA's own error here is "invalid device ordinal".
            raise ConfigError(
                f"torchrun started rank {local_rank()} on a machine with {gpus} GPU(s): use --nproc_per_node {gpus}"
                " (one process per GPU), or CUDA_VISIBLE_DEVICES= to train on CPUs (gloo)",
                code="ddp_too_many_processes",
            )
        torch.cuda.set_device(local_rank())  # "cuda" without an index now means this rank's GPU
        dist.init_process_group(backend="nccl")
    else:
        dist.init_process_group(backend="gloo")
    return True


def cleanup() -> None:
    """Leave and destroy the process group, if there is one."""
    if active():
        dist.destroy_process_group()


def device(default: torch.device) -> torch.device:
    """The device this rank computes on: ``default``, with a CUDA device pinned to GPU ``LOCAL_RANK``.

    Args:
        default: the single-process choice (``cuda`` or ``cpu``).

    Returns:
        The device.
    """
    if default.type == "cuda" and active():
        return torch.device("cuda", local_rank())
    return default


def barrier() -> None:
    """Wait until every rank gets here (no-op in a single process)."""
    if active():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[local_rank()])
        else:
            dist.barrier()


def _tensor_device() -> torch.device:
    # nccl reduces only CUDA tensors, gloo CPU ones.
    return torch.device("cuda", local_rank()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_mean(value: float) -> float:
    """The mean of ``value`` over all ranks (``value`` itself in a single process).

    Args:
        value: this rank's number (e.g. its mean training loss).

    Returns:
        The mean over ranks, the same on every rank.
    """
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_tensor_device())
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself in a single process).

    Args:
        obj: a picklable object; only rank 0's value matters.

    Returns:
        Rank 0's object.
    """
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward is also a sum over ranks: each rank's input feeds every rank's output."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class SyncBatchNorm2d(nn.BatchNorm2d):
    """Batch norm over the global batch of all ranks, for the CPU (torch's SyncBatchNorm runs on GPUs only).

    In training with more than one rank the per-channel mean and (biased) variance are those of every rank's
    slice together: two passes (mean, then mean squared deviation), each summed over ranks by a differentiable
    all-reduce, so the backward pass also sees the whole batch. The running statistics get the same update as a
    single process's over the same batch (unbiased variance over all ranks' elements). Everywhere else (eval mode,
    one process) this is :class:`torch.nn.BatchNorm2d`. Statistics are computed in float32.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` (N, C, H, W) with the global batch's statistics in training, else as BatchNorm2d."""
        if not (self.training and active() and dist.get_world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        xf = x.float()
        count = x.numel() // x.shape[1] * dist.get_world_size()  # every rank's slice has the same size
        mean = _AllReduceSum.apply(xf.sum((0, 2, 3))) / count
        centred = xf - mean.view(1, -1, 1, 1)
        var = _AllReduceSum.apply(centred.square().sum((0, 2, 3))) / count
        y = centred * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                # The update nn.BatchNorm2d makes: cumulative average when momentum is None.
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                unbiased = var.detach() * count / max(1, count - 1)
                self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
        return y.to(x.dtype)


class ShardDropout(nn.Dropout):
    """Dropout whose mask is the rows of this rank's slice in the mask of the whole global batch.

    Every rank seeds the default generator identically, so drawing the global batch's mask (the same call, shape
    and generator as a single process's dropout) gives each sample the mask a single process gives it, and the
    generators stay in step. Assumes equal slices in rank order: rank r holds rows ``r*n .. (r+1)*n``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply this rank's rows of the global mask in training; identity in eval mode."""
        if not (self.training and active() and dist.get_world_size() > 1 and self.p > 0):
            return super().forward(x)
        n, r = x.shape[0], dist.get_rank()
        ones = torch.ones((n * dist.get_world_size(), *x.shape[1:]), dtype=x.dtype, device=x.device)
        mask = nn.functional.dropout(ones, self.p, training=True)  # 0 or 1/(1-p), as dropout scales
        return x * mask[r * n : (r + 1) * n]


def prepare_replica(model: nn.Module) -> nn.Module:
    """Make a model's batch-dependent layers behave as in one process over the global batch (see module doc).

    Batch norm becomes synchronised (torch's on CUDA, :class:`SyncBatchNorm2d` on the CPU) and ``nn.Dropout``
    becomes :class:`ShardDropout`; parameters and buffers are the same tensors, so the optimizer, the state dict's
    keys and saved weights do not change. A no-op with fewer than two ranks.

    Args:
        model: the model, already on its device.

    Returns:
        The same model, modified in place.

    Raises:
        ValueError: on the CPU, a batch norm subclass (e.g. timm's fused BatchNormAct2d) that cannot be synced.
    """
    if world_size() < 2:
        return model
    on_cuda = next(model.parameters()).is_cuda
    if on_cuda:
        from timm.layers import convert_sync_batchnorm  # also converts timm's BatchNormAct2d

        model = convert_sync_batchnorm(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, ShardDropout(child.p))
            elif not on_cuda and type(child) is nn.BatchNorm2d:
                sync = SyncBatchNorm2d(
                    child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
                )
                # The same parameter and buffer tensors: nothing to copy, the optimizer's references stay valid.
                sync.weight, sync.bias = child.weight, child.bias
                sync.running_mean, sync.running_var = child.running_mean, child.running_var
                sync.num_batches_tracked = child.num_batches_tracked
                sync.train(child.training)
                setattr(parent, name, sync)
            elif not on_cuda and isinstance(child, nn.modules.batchnorm._BatchNorm):
                raise ValueError(
                    f"{type(child).__name__} ({name}) cannot be synchronised across CPU ranks; multi-process CPU "
                    "training supports models with plain BatchNorm2d (custom-cnn)"
                )
    return model


def wrap(model: nn.Module, *, device: torch.device) -> nn.Module:
    """Wrap a prepared model in DistributedDataParallel (gradients averaged over ranks during backward).

    Args:
        model: the model after :func:`prepare_replica`, on ``device``.
        device: this rank's device.

    Returns:
        The DDP module; call it for the training forward pass, and keep ``model`` for saving and evaluation.
    """
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
