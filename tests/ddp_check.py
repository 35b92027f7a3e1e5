"""Runs train.py (same arguments) and then, before the process group goes, checks that every rank
holds bitwise the same parameters and router biases; rank 0 saves them to out_dir/state.pt.
FORCE_ONE_EXPERT=1 starts every router with a huge bias towards expert 0."""
import os
import runpy
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model  # noqa: E402

loads_seen = []
update = model.Transformer.update_router_biases


def recording_update(self, load):
    loads_seen.append(load.detach().clone())
    update(self, load)


model.Transformer.update_router_biases = recording_update
if os.environ.get('FORCE_ONE_EXPERT') == '1':
    init = model.Transformer.__init__

    def forced_init(self, cfg):
        init(self, cfg)
        for moe in self.moe_layers():
            moe.gate.bias[0] = 1e4

    model.Transformer.__init__ = forced_init

destroy = dist.destroy_process_group
dist.destroy_process_group = lambda: None  # keep the group for the check below
sys.argv = [str(Path(model.__file__).with_name('train.py'))] + sys.argv[1:]
g = runpy.run_path(sys.argv[0], run_name='__main__')

on_device = g['raw_model'].state_dict()  # gathered where it lives: NCCL takes GPU tensors only
flat = torch.cat([v.flatten().double() for v in on_device.values()])
state = {k: v.detach().cpu() for k, v in on_device.items()}
world_size = dist.get_world_size() if dist.is_initialized() else 1
gathered = [torch.empty_like(flat) for _ in range(world_size)]
if world_size > 1:
    dist.all_gather(gathered, flat)
else:
    gathered = [flat]
if g['master']:
    torch.save({'state': state, 'world_size': world_size,
                'ranks_bitwise_equal': all(torch.equal(gathered[0], t) for t in gathered),
                'loads_seen': torch.stack(loads_seen).sum(0)}, os.path.join(g['out_dir'], 'state.pt'))
if dist.is_initialized():
    destroy()
