"""Data-parallel training with PyTorch's own engine: torchrun (torch.distributed.run) starts one
process per GPU in a pod, c10d joins the pods of an Indexed Job, DDP averages gradients.

A process started by torchrun finds RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in
its environment; a process started any other way trains alone, exactly as before this module.
"""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from finetune_api.contract import ExitCode
from finetune_trainer.errors import TrainerError

# Indexed Job pods: batch/v1 sets JOB_COMPLETION_INDEX, the operator sets the rest.
ENV_COMPLETION_INDEX = "JOB_COMPLETION_INDEX"
ENV_WORKERS = "FINETUNE_WORKERS"  # pods in the group (spec.resources.workers)
ENV_RENDEZVOUS_TIMEOUT = "FINETUNE_RENDEZVOUS_TIMEOUT"  # seconds to wait for every peer
# Processes per pod; default max(spec.resources.gpus, 1). Lets CPU tests run several gloo ranks.
ENV_PROCESSES_PER_POD = "FINETUNE_PROCESSES_PER_POD"
DEFAULT_RENDEZVOUS_TIMEOUT = 600
DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1
    launched: bool = False  # started by torchrun: the process group exists

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = World()


def world_from_env(environ=os.environ) -> World:
    if "WORLD_SIZE" not in environ or "RANK" not in environ:
        return SINGLE
    return World(rank=int(environ["RANK"]), local_rank=int(environ.get("LOCAL_RANK", 0)),
                 size=int(environ["WORLD_SIZE"]), launched=True)


def init_process_group(world: World) -> torch.device | None:
    """NCCL on GPUs, gloo on CPU. The timeout bounds every collective: a peer that died makes
    the others fail instead of holding their GPUs forever. Returns this rank's GPU, if any."""
    if not world.launched or dist.is_initialized():
        return None
    timeout = datetime.timedelta(seconds=int(os.environ.get(ENV_RENDEZVOUS_TIMEOUT,
                                                            DEFAULT_RENDEZVOUS_TIMEOUT)))
    device = None
    if torch.cuda.is_available():
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    return device


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.launched:
        dist.barrier()


def broadcast_value(world: World, value):
    """Rank 0's value (a decision: stop, which candidates go on), so that every rank acts on
    the same one."""
    if not world.launched:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def any_rank(world: World, flag: bool) -> bool:
    """True on every rank when `flag` is true on any (one all-reduce)."""
    if not world.launched:
        return flag
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def lr_factor(rule: str, world_size: int) -> float:
    """The learning-rate scaling rule for a global batch world_size times spec.batchSize."""
    return {"None": 1.0, "Linear": float(world_size),
            "Sqrt": math.sqrt(world_size)}[rule]


def processes_per_pod(spec: dict, environ=os.environ) -> int:
    if environ.get(ENV_PROCESSES_PER_POD):
        return max(1, int(environ[ENV_PROCESSES_PER_POD]))
    return max(1, int((spec.get("resources") or {}).get("gpus", 1)))


def launch_arguments(spec: dict, *, run_id: str, program: list[str],
                     environ=os.environ) -> list[str] | None:
    """torchrun's arguments when this pod must start a process group, else None (one process
    in one pod: the trainer runs directly, as it always did).

    Pods: --nnodes=workers, --node-rank=$JOB_COMPLETION_INDEX, static c10d rendezvous on
    MASTER_ADDR (the index-0 pod) with a timeout. --max-restarts=0: one process dying stops
    the pod's others, the pod fails, and the Job restarts the group from the last checkpoint."""
    nproc = processes_per_pod(spec, environ)
    workers = int(environ.get(ENV_WORKERS) or (spec.get("resources") or {}).get("workers", 1))
    if nproc == 1 and workers == 1:
        return None
    timeout = environ.get(ENV_RENDEZVOUS_TIMEOUT, str(DEFAULT_RENDEZVOUS_TIMEOUT))
    arguments = [f"--nproc-per-node={nproc}", "--max-restarts=0", f"--rdzv-id={run_id}"]
    if workers == 1:
        arguments.append("--standalone")
    else:
        arguments += [f"--nnodes={workers}",
                      f"--node-rank={int(environ.get(ENV_COMPLETION_INDEX, '0'))}",
                      f"--master-addr={environ.get('MASTER_ADDR', '127.0.0.1')}",
                      f"--master-port={environ.get('MASTER_PORT', DEFAULT_MASTER_PORT)}",
                      f"--rdzv-conf=timeout={timeout}"]
    return arguments + program


def launch(arguments: list[str], environ=os.environ) -> int:
    """Run torchrun in this process; the exit code of the first rank that failed (so that the
    operator's podFailurePolicy still sees the trainer's own codes), else 0. Peers that did not
    all join in time raise a TrainerError (retryable) that says so."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import get_args_parser, run
    try:
        run(get_args_parser().parse_args(arguments))
    except SignalException:
        # torchrun passed the SIGTERM on to its ranks and waited for them (up to 30 s): they
        # stopped at one step and rank 0 checkpointed it.
        return int(ExitCode.PREEMPTED)
    except ChildFailedError as error:
        first = min(error.failures.values(), key=lambda failure: failure.timestamp)
        return int(first.exitcode) if first.exitcode and first.exitcode > 0 else 1
    except (dist.DistError, RendezvousError) as error:
        workers = environ.get(ENV_WORKERS, "?")
        timeout = environ.get(ENV_RENDEZVOUS_TIMEOUT, str(DEFAULT_RENDEZVOUS_TIMEOUT))
        raise TrainerError(ExitCode.TRANSIENT, (
            f"the {workers} worker pods did not all join the rendezvous at "
            f"{environ.get('MASTER_ADDR', '?')}:{environ.get('MASTER_PORT', DEFAULT_MASTER_PORT)} "
            f"within {timeout} s (a peer not scheduled, not started or unreachable): "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"),
            field="spec.resources.workers") from error
    return 0


def backend() -> str | None:
    return dist.get_backend() if dist.is_initialized() else None


def sum_epoch_stats(world: World, stats):
    """The epoch's loss and images over every rank (each rank saw its own shard)."""
    if not world.launched:
        return stats
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    totals = torch.tensor([stats.loss * stats.images, float(stats.images)], dtype=torch.float64,
                          device=device)
    dist.all_reduce(totals)
    images = int(totals[1].item())
    return type(stats)(loss=float(totals[0] / max(1, images)), images=images,
                       seconds=stats.seconds, data_wait_seconds=stats.data_wait_seconds)
