"""
Sharded training, for models past one GPU's memory, on torch.distributed's own engine:
- FSDP2 (torch.distributed.fsdp.fully_shard, per Block and the root): parameters, gradients and
  optimizer state sharded over all ranks, gathered one block at a time.
- Expert parallelism (ep): the ranks form a ('dp', 'ep') mesh; each rank of an 'ep' group owns
  E/ep routed experts of every MoE layer. A token's copies, sorted by expert by ops.moe_permute
  (so already grouped by the rank that owns the expert), travel there with all_to_all_single and
  come back the same way; the rest of the model stays data-parallel (DDP) or FSDP.
- Checkpoints of a sharded run: torch.distributed.checkpoint (DCP) directories, loadable under any
  world size and parallelism, and `python convert.py to_plain` for the single-file checkpoint that
  sample.py, eval.py and serve.py read.
The router's bias update and balance statistics stay global: train.py all-reduces the loads.
torch.distributed's DCP, FSDP and DTensor modules are imported where they are used: together they
take ~0.7 s to import, which every train.py start would pay, sharded or not.
"""
import os
import shutil

import torch
import torch.distributed as dist

import ops
from checkpoint import SHARDED_FILES
from prepare import atomic_path


class ExpertParallel:
    """Stands in for a MoE layer's routed_experts(x_sorted, offsets): sends each row to the rank
    that owns its expert, runs the local experts there, and brings the results back in order."""
    def __init__(self, moe, group):
        from torch.distributed._functional_collectives import all_to_all_single_autograd
        self.all_to_all = all_to_all_single_autograd  # imported here: __call__ runs inside compiled blocks
        self.local_experts, self.group = moe.routed_experts, group
        self.ep = dist.get_world_size(group)
        self.n_local = moe.cfg.n_routed_experts // self.ep

    def __call__(self, x_sorted, offsets):
        counts = torch.diff(offsets, prepend=offsets.new_zeros(1)).long()  # rows per global expert
        received = torch.empty_like(counts)  # [source rank, my expert]: rows each rank sends me
        dist.all_to_all_single(received, counts, group=self.group)
        send = counts.view(self.ep, self.n_local).sum(1).tolist()
        recv = received.view(self.ep, self.n_local).sum(1).tolist()
        rows = self.all_to_all(x_sorted, recv, send, self.group)
        # rows arrive by source rank, then expert: one more permute sorts them by expert alone
        expert_of_row = torch.arange(self.n_local, device=rows.device).repeat(self.ep).repeat_interleave(received)
        rows_sorted, local_offsets, row_map = ops.moe_permute(rows, expert_of_row[:, None], self.n_local)
        y = self.local_experts(rows_sorted, local_offsets)
        y = ops.moe_unpermute(y, row_map, torch.ones(len(rows), 1, device=y.device, dtype=y.dtype))
        return self.all_to_all(y, send, recv, self.group)


class Sharding:
    """What train.py needs of a sharded run: the wrapped model, the gradient steps FSDP and EP
    leave to the loop, and DCP state dicts in which experts are global tensors."""
    def __init__(self, model, fsdp, ep, device_type, dtype=None):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        world = dist.get_world_size()
        self.fsdp, self.ep, self.world = fsdp, ep, world
        self.mesh = init_device_mesh(device_type, (world // ep, ep), mesh_dim_names=('dp', 'ep'))
        for t in model.state_dict().values():  # every rank starts from rank 0's weights, as DDP does
            dist.broadcast(t, 0)
        self.expert_params = set()
        if ep > 1:
            rank = self.mesh['ep'].get_local_rank()
            for moe in model.moe_layers():
                n = moe.cfg.n_routed_experts // ep
                for name in ('w1', 'w2', 'w3'):
                    setattr(moe, name, torch.nn.Parameter(getattr(moe, name)[rank * n:(rank + 1) * n].clone()))
                    self.expert_params.add(getattr(moe, name))
                moe.routed_experts = ExpertParallel(moe, self.mesh['ep'].get_group())
        self.expert_names = {n for n, p in model.named_parameters() if p in self.expert_params}
        if fsdp:
            # weights in the run's dtype (bf16) in the matmuls, gradients reduced in fp32; CPUs compute in fp32
            low = dtype if device_type == 'cuda' and dtype != torch.float32 else None
            policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32)
            world_mesh = init_device_mesh(device_type, (world,))
            for block in model.layers:
                fully_shard(block, mesh=world_mesh, mp_policy=policy, ignored_params=self.expert_params)
            self.model = fully_shard(model, mesh=world_mesh, mp_policy=policy, ignored_params=self.expert_params)
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP
            DDP._set_params_and_buffers_to_ignore_for_model(model, list(self.expert_names))
            self.model = DDP(model, device_ids=[torch.cuda.current_device()] if device_type == 'cuda' else None,
                             broadcast_buffers=False)

    def set_gradient_sync(self, sync):
        """Gradient accumulation: reduce (FSDP) or all-reduce (DDP) only on the last micro-step."""
        if self.fsdp:
            self.model.set_requires_gradient_sync(sync)
        else:
            self.model.require_backward_grad_sync = sync

    def sync_expert_grads(self):
        """An expert's gradient holds every 'ep' rank's tokens: sum it over the 'dp' replicas and
        divide by all ranks, the mean that DDP and FSDP take of the other gradients."""
        for p in self.expert_params:
            if self.world // self.ep > 1:
                dist.all_reduce(p.grad, group=self.mesh['dp'].get_group())
            p.grad.div_(self.world)

    def clip_grad_norm(self, parameters, max_norm):
        """torch's clip_grad_norm_ over FSDP's sharded and EP's local gradients together -> the norm."""
        from torch.distributed.tensor import DTensor
        params = [p for p in parameters if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p not in self.expert_params])
        norm = (norm.full_tensor() if isinstance(norm, DTensor) else norm) ** 2
        if self.expert_params:
            experts = torch.nn.utils.get_total_norm([p.grad for p in self.expert_params]) ** 2
            dist.all_reduce(experts, group=self.mesh['ep'].get_group())
            norm = norm + experts
        norm = norm.sqrt()
        coef = min(1.0, max_norm / (norm.item() + 1e-6))
        for p in params:
            p.grad.mul_(coef)
        return norm

    def state_dicts(self, model, optimizer):
        """Model and optimizer state dicts for DCP, the local experts as shards of global tensors."""
        from torch.distributed.checkpoint.state_dict import get_state_dict
        from torch.distributed.tensor import DTensor, Replicate, Shard
        weights, optim = get_state_dict(model, optimizer)
        self._map_experts(weights, optim, lambda t: DTensor.from_local(t, self.mesh, [Replicate(), Shard(0)],
                                                                       run_check=False))
        return weights, optim

    def to_local(self, weights, optim):
        """The inverse of state_dicts' wrapping, in place, for set_state_dict."""
        self._map_experts(weights, optim, lambda t: t.to_local())

    def _map_experts(self, weights, optim, f):
        """New entries, never changed ones: the optimizer's own state dicts may be what get_state_dict returned."""
        for name in self.expert_names:
            weights[name] = f(weights[name])
            if name in optim['state']:
                optim['state'][name] = {k: f(v) if k in ('exp_avg', 'exp_avg_sq') else v
                                        for k, v in optim['state'][name].items()}


def save_sharded(out_dir, which, iter_num, model, optimizer, sharding, meta):
    """Every rank writes its shards to a fresh directory; rank 0 adds meta.pt and only then points
    the link (ckpt.dcp or best.dcp) at it, by an atomic rename: a crash mid-write leaves the link
    at the previous complete checkpoint."""
    import torch.distributed.checkpoint as dcp
    name = f"{SHARDED_FILES[which][:-len('.dcp')]}.{iter_num:07d}.dcp"
    target = os.path.join(out_dir, name)
    weights, optim = sharding.state_dicts(model, optimizer)
    dcp.save({'model': weights, 'optimizer': optim}, checkpoint_id=target)
    if dist.get_rank() == 0:
        torch.save(meta, os.path.join(target, 'meta.pt'))
        relink(out_dir, which, name)
    dist.barrier()


def relink(out_dir, which, name=None):
    """Points out_dir's link for `which` (ckpt.dcp, best.dcp) at the directory `name` by an atomic
    rename, or removes it (name None); the directory it pointed at goes unless the other link holds it."""
    link = os.path.join(out_dir, SHARDED_FILES[which])
    old = os.readlink(link) if os.path.islink(link) else None
    if name:
        with atomic_path(link) as tmp:
            os.symlink(name, tmp)
    elif old:
        os.remove(link)
    held = [os.readlink(p) for p in (os.path.join(out_dir, n) for n in SHARDED_FILES.values()) if os.path.islink(p)]
    if old and old not in held:
        shutil.rmtree(os.path.join(out_dir, old), ignore_errors=True)


def sharded_checkpoint(out_dir, which='latest'):
    """The directory of out_dir's sharded checkpoint, or None."""
    link = os.path.join(out_dir, SHARDED_FILES[which])
    return link if os.path.isfile(os.path.join(link, 'meta.pt')) else None


def read_sharded_meta(path):
    """Everything but the tensors: model_args, tokenizer, iter_num, best_val_loss, config, scaler."""
    return torch.load(os.path.join(path, 'meta.pt'), weights_only=False)


def load_sharded(path, model, optimizer, sharding=None):
    """Loads a DCP checkpoint into model and optimizer however they are sharded now (a plain model
    in one process too): DCP reads the pieces each rank needs."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    weights, optim = sharding.state_dicts(model, optimizer) if sharding else get_state_dict(model, optimizer)
    dcp.load({'model': weights, 'optimizer': optim}, checkpoint_id=path, no_dist=not dist.is_initialized())
    if sharding:
        sharding.to_local(weights, optim)
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optim)
