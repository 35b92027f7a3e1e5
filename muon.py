"""
Muon (Keller Jordan, 2024): SGD with Nesterov momentum whose update of each weight matrix is
orthogonalized by a Newton-Schulz iteration, so that every direction of the matrix moves by about the
same amount. For the hidden matrices; embeddings, head, router, norms and biases stay with AdamW.
torch.optim.Muon takes 2-D parameters only: this one also takes the MoE's stacked [E, rows, cols]
expert weights and orthogonalizes each expert's matrix on its own (one batched iteration for all E).
"""
import torch


def orthogonalize(g, steps=5, eps=1e-7):
    """About U V^T for each matrix U S V^T of g [..., rows, cols]: a quintic Newton-Schulz iteration
    whose coefficients (Jordan's) push every singular value into ~[0.7, 1.2] in 5 steps, which
    trains as well as the exact U V^T. bf16 on GPU, where the iteration is stable and fast."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)  # singular values <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for matrices [rows, cols] and stacks of them [..., rows, cols]. The orthogonalized
    update is scaled by 0.2 sqrt(max(rows, cols)) (Moonshot's rule), which gives it AdamW's typical
    update size: the learning rate and weight decay that suit AdamW suit it too."""
    def __init__(self, params, lr, weight_decay=0.0, momentum=0.95):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum))
        for p in (p for group in self.param_groups for p in group['params']):
            self.state[p]['momentum_buffer'] = torch.zeros_like(p)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, momentum = group['lr'], group['momentum']
            same_shape = {}  # one batched iteration per shape: launches per step ~ shapes, not matrices
            for p in group['params']:
                if p.grad is not None:
                    same_shape.setdefault(p.shape, []).append(p)
            for shape, params in same_shape.items():
                grads = [p.grad for p in params]
                bufs = [self.state[p]['momentum_buffer'] for p in params]
                torch._foreach_lerp_(bufs, grads, 1 - momentum)
                nesterov = torch._foreach_lerp(grads, bufs, momentum)  # a step ahead
                update = orthogonalize(torch.stack(nesterov))
                torch._foreach_mul_(params, 1 - lr * group['weight_decay'])
                torch._foreach_add_(params, list(update.unbind()), alpha=-lr * 0.2 * max(shape[-2:]) ** 0.5)


class Optimizers:
    """Several optimizers that the training loop, GradScaler and checkpoints see as one: one list of
    param_groups (a group's 'lr' is set in place), one step, one state_dict."""
    def __init__(self, **optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def step(self):
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none=True):
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state):
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])
