"""Multi-process launch through torchrun (torch.distributed.run): several processes on one machine,
or several machines with the usual rendezvous arguments. DeepSpeed runs under the same launcher."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from ftq.training.settings import TrainSettings

log = logging.getLogger(__name__)


def in_worker() -> bool:
    """True inside a process started by torchrun / the DeepSpeed launcher."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def local_device():
    """This process's device: cuda:LOCAL_RANK on a GPU machine (one GPU per rank), else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def start_worker(deepspeed: bool = False):
    """Pin this rank's GPU, then join the process group. The order matters: NCCL binds a communicator to
    the current device, so a collective before set_device puts every rank on cuda:0. DeepSpeed's own
    communication layer wraps the same group (ZeRO-3's partitioned init asks it for the world size)."""
    import torch
    import torch.distributed as dist

    device = local_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    if deepspeed:
        import deepspeed as ds

        ds.init_distributed(dist_backend=backend)
    return device


def needs_launcher(settings: TrainSettings) -> bool:
    # DeepSpeed wants an initialized process group even for a single process
    return not in_worker() and (settings.world_size > 1 or bool(settings.deepspeed))


def torchrun_command(settings: TrainSettings, ftq_args: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc_per_node={settings.nproc_per_node}",
        f"--nnodes={settings.nnodes}",
        f"--node_rank={settings.node_rank}",
        f"--master_addr={settings.master_addr}",
        f"--master_port={settings.master_port}",
        "-m", "ftq", *ftq_args,
    ]


def launch(settings: TrainSettings, ftq_args: list[str]) -> int:
    command = torchrun_command(settings, ftq_args)
    log.info("launching %d process(es) on node %d of %d: %s", settings.nproc_per_node, settings.node_rank,
             settings.nnodes, " ".join(command))
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(settings.torch_threads or 1))
    return subprocess.call(command, env=env)


def finish() -> None:
    """Tear the process group down explicitly: on CPU (gloo) rank 0 aborts at exit otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
