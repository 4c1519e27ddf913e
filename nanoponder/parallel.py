"""
Training one model in several processes (torchrun sets RANK, LOCAL_RANK and WORLD_SIZE, on one node or many):

  ddp   every process holds the whole model, its gradients and its AdamW state; gradients are all-reduced
        once per iteration (DistributedDataParallel). The fastest while the model fits.
  fsdp  FSDP2 (torch.distributed.fsdp.fully_shard, as torchtitan uses it): weights, gradients and AdamW state
        are sharded over the processes; each Block's weights are all-gathered just before it runs (in every
        pass of the thought loop) and freed after, and its gradients reduce-scattered. For models whose
        training state does not fit one GPU under ddp.

Both train to the same weights as one process. The checkpoint is one portable file either way: full_state()
gathers the model and AdamW state to rank 0 in the layout of an unwrapped model and torch.optim, so a run resumes
at another world size or under the other parallelism (load_optimizer_state).
"""
import gc
import inspect
import os

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from nanoponder.runtime import UserError

PARALLELISMS = ('ddp', 'fsdp')


def setup_distributed(device, gradient_accumulation_steps):
    """-> (distributed, rank, world_size, device string). One process unless torchrun started us."""
    distributed = 'RANK' in os.environ
    rank, local_rank, world_size = 0, 0, 1
    if distributed:
        rank, local_rank, world_size = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
    if device.startswith('cuda'):
        if distributed:
            device = f'cuda:{local_rank}'  # one GPU per process
        torch.cuda.set_device(device)
    if gradient_accumulation_steps % world_size:
        raise UserError(f"gradient_accumulation_steps ({gradient_accumulation_steps}) must be divisible by "
                        f"the number of processes ({world_size})")
    if distributed:
        dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
    return distributed, rank, world_size, device


def all_ranks_agree(ok, distributed):
    """True when ok is True on every rank (one all-reduce): a check that only some ranks make (rank 0's lock,
    a shard's weights) must stop every rank, or the others would wait for them forever."""
    if not distributed:
        return ok
    flag = torch.tensor(float(ok))
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def teardown_distributed(finished):
    """Leave the process group so that no rank aborts on the way out. The ranks first wait for each other
    (rank 0 may still be saving the last checkpoint while the others are done): a rank that tears down early
    closes connections its peers still use. Then every object holding the process group is collected and the
    group destroyed while the interpreter is fully alive: gloo's worker threads may still hold the last
    collectives' tensors, and if they are left for the interpreter's exit to destroy, a thread that needs the
    GIL during finalization ends the process with 'terminate called without an active exception' (SIGABRT)."""
    if finished:
        dist.barrier()
    gc.collect()
    dist.destroy_process_group()


# -----------------------------------------------------------------------------
# wrapping the model

def wrap(model, parallelism, device, dtype):
    """model (on the CPU) -> what the training loop calls, on device. Under fsdp that is model itself, sharded in
    place (its parameters become DTensors, and fully_shard moves each shard to the device: no GPU ever holds the
    whole model); build the optimizer after this. ddp returns a DDP wrapper. One process (no torchrun): model."""
    if not dist.is_initialized():
        return model.to(device)
    device_type = device.split(':')[0]
    if parallelism == 'ddp':
        # the rope tables are the only buffers and every rank computes the same ones: no need to broadcast them
        # in every forward (torch 2.13 renamed broadcast_buffers, now a FutureWarning, to forward_sync_buffers);
        # gradients live in DDP's all-reduce buckets instead of beside them (4 bytes per parameter less)
        no_sync = ('forward_sync_buffers' if 'forward_sync_buffers' in inspect.signature(DDP).parameters
                   else 'broadcast_buffers')
        return DDP(model.to(device), device_ids=[device] if device_type == 'cuda' else None,
                   gradient_as_bucket_view=True, **{no_sync: False})
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    block_policy = MixedPrecisionPolicy()
    if device_type == 'cuda' and dtype == torch.bfloat16:
        # blocks gather their weights in bf16 (half the traffic) and reduce-scatter gradients in fp32. The inputs
        # stay as they are, so the residual stream is fp32 under autocast, as with ddp
        block_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                            cast_forward_inputs=False)
    for block in model.layers:  # one all-gather / reduce-scatter unit per Block
        fully_shard(block, mesh=mesh, mp_policy=block_policy)
    fully_shard(model, mesh=mesh)  # the root: embeddings and final LayerNorm, fp32 as with ddp
    return model


def gather_dtype(parallelism, device, dtype):
    """The dtype fsdp gathers block weights in (for the memory plan)."""
    return torch.bfloat16 if parallelism == 'fsdp' and device.startswith('cuda') and dtype == torch.bfloat16 \
        else torch.float32


def is_sharded(net):
    from torch.distributed.fsdp import FSDPModule
    return isinstance(net, FSDPModule)


def set_gradient_sync(net, sync):
    """Whether this micro-step's backward reduces gradients across processes: only the last one of an iteration
    does, the others accumulate locally (under fsdp: unsharded, 4 bytes per parameter until that last one)."""
    if isinstance(net, DDP):
        net.require_backward_grad_sync = sync
    elif is_sharded(net):
        net.set_requires_gradient_sync(sync)


def clip_gradients(parameters, max_norm):
    """clip_grad_norm_ over plain or sharded (DTensor) gradients; returns the total norm as a plain tensor."""
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def local_tensors(model):
    """This process's part of every parameter: the whole tensor, or its shard under fsdp."""
    return [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()]


# -----------------------------------------------------------------------------
# the portable checkpoint: full state on rank 0, keyed as for the unwrapped model

FULL_ON_RANK0 = dict(full_state_dict=True, cpu_offload=True)


def full_state(model, optimizer):
    """-> (model state dict, optimizer state dict) of the whole model, as model.state_dict() and torch.optim's
    state_dict() give them for an unwrapped model (the optimizer's state keyed by parameter index). Under fsdp
    every rank must call this (it all-gathers); rank 0 gets the state, the other ranks empty dicts."""
    if not is_sharded(model):
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(**FULL_ON_RANK0)
    model_state = get_model_state_dict(model, options=options)
    optim_state = get_optimizer_state_dict(model, optimizer, options=options)  # keyed by parameter name
    if not optim_state:  # not rank 0
        return model_state, optim_state
    index = {name: i for i, name in enumerate(parameter_names(model, optimizer))}
    return model_state, rekey(optim_state, index)


def load_optimizer_state(model, optimizer, state):
    """Load a checkpoint's AdamW state (full, keyed by parameter index) into the optimizer of model, plain or
    sharded: under fsdp each rank keeps its shard of every moment."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    names = dict(enumerate(parameter_names(model, optimizer)))
    set_optimizer_state_dict(model, optimizer, rekey(state, names),
                             options=StateDictOptions(full_state_dict=True))


def parameter_names(model, optimizer):
    """The names of the optimizer's parameters in torch.optim's index order (groups, then params in each)."""
    name_of = {p: name for name, p in model.named_parameters()}
    return [name_of[p] for group in optimizer.param_groups for p in group['params']]


def rekey(optim_state, key):
    """torch.optim's state dict with every parameter key k replaced by key[k] (index <-> name)."""
    return {'state': {key[k]: v for k, v in optim_state['state'].items()},
            'param_groups': [{**g, 'params': [key[k] for k in g['params']]} for g in optim_state['param_groups']]}
