"""Put on PYTHONPATH by tests that compare the collective calls of the ranks of a job: each process appends
the name of every collective it calls (torch.distributed's Python functions, and DDP's broadcast of its
buffers in a forward) to $DTRAIN_COLLECTIVES/rank<RANK>.txt. (TORCH_DISTRIBUTED_DEBUG=DETAIL would check
the same inside gloo, but with torch 2.14 it crashes DDP processes now and then.)"""
import os

folder = os.environ.get("DTRAIN_COLLECTIVES")
if folder and "RANK" in os.environ:
    import functools

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    log = open(os.path.join(folder, f"rank{os.environ['RANK']}.txt"), "a", buffering=1)

    def logged(name, fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            log.write(name + "\n")
            return fn(*args, **kwargs)
        return call

    for name in ("broadcast", "all_reduce", "reduce", "all_gather", "all_gather_into_tensor", "gather", "scatter",
                 "reduce_scatter_tensor", "all_to_all_single", "barrier", "broadcast_object_list",
                 "all_gather_object", "gather_object", "monitored_barrier"):
        setattr(dist, name, logged(name, getattr(dist, name)))
    DistributedDataParallel._distributed_broadcast_coalesced = logged(
        "ddp_broadcast_buffers", DistributedDataParallel._distributed_broadcast_coalesced)
