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


def gpu_index(local_rank: int, visible: int) -> int:
    """This rank's GPU among the `visible` ones it sees: LOCAL_RANK where every rank sees all of the node's
    GPUs (torchrun alone); 0 where a scheduler hands each rank its own GPU (CUDA_VISIBLE_DEVICES of one,
    as Slurm's --gpus-per-task=1 does), where cuda:LOCAL_RANK would not exist. Anything else would put two
    ranks on one GPU, which NCCL refuses with an obscure error: say so here instead."""
    if local_rank < visible:
        return local_rank
    if visible == 1:
        return 0
    raise RuntimeError(f"LOCAL_RANK {local_rank}, but this process sees {visible} GPU(s): train.nproc_per_node must "
                       "not exceed the GPUs on a node (or give each rank exactly one GPU through CUDA_VISIBLE_DEVICES)")


def local_device():
    """This process's device: its GPU on a GPU machine (one GPU per rank, `gpu_index`), else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", gpu_index(int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()))
    return torch.device("cpu")


def one_gpu_per_process(args) -> None:
    """A process not started by torchrun trains on one GPU. On a host with several visible GPUs,
    transformers' TrainingArguments set n_gpu to all of them and the Trainer then wraps the model in
    nn.DataParallel and multiplies the batch by their number: a different run from the one configured, and
    slower than DDP. n_gpu is set after the arguments' device setup (a cached property that sets it), as the
    Trainer itself does for a model split across GPUs; train.nproc_per_node runs DDP over several."""
    import torch

    if in_worker() or not torch.cuda.is_available() or args.device.type != "cuda" or args.n_gpu <= 1:
        return
    log.warning("%d GPUs visible to one process: training on %s alone (train.nproc_per_node: %d trains on all "
                "of them with DDP)", args.n_gpu, args.device, args.n_gpu)
    args._n_gpu = 1


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
    if settings.deepspeed:
        from ftq.training.deepspeed_ops import clear_stale_locks

        clear_stale_locks()  # every rank would wait on a killed compile's lock forever
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
