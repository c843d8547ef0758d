"""The DINO optimizer: AdamW with per-parameter gradient clipping and a frozen-group switch.

Both DINO details live inside `step()` so they act on whatever gradient the
optimizer is handed: full per-parameter gradients (one process, or DeepSpeed
stage 0), or the flat fp32 gradient partition that DeepSpeed ZeRO stage 1/2 gives
its base optimizer one parameter group at a time.

- Clipping (official): each parameter's gradient is scaled to norm <= clip_grad on
  its own, not by the global norm. Under ZeRO a parameter may be split across
  ranks, so its squared norm is summed from the fragments with one all-reduce per
  parameter group (a few floats per parameter).
- Frozen last layer (official: `param.grad = None` during the first epochs): the
  head's last layer has its own parameter groups; while `group["frozen"]` is set,
  step() leaves them out entirely, so the weights stay bit-identical and AdamW
  keeps no moments and no step count for them, exactly as with grad=None. This
  works for partitioned gradients too, where setting grad=None cannot.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class DINOAdamW(torch.optim.AdamW):
    def __init__(self, params, *, clip_grad: float, **kwargs):
        super().__init__(params, **kwargs)
        self.clip_grad = clip_grad
        # Set by the ZeRO wiring: id(flat fp32 partition) -> its parameters' fragments.
        self.partition_fragments: dict[int, "PartitionFragments"] = {}

    @torch.no_grad()
    def step(self, closure=None):
        active = [g for g in self.param_groups if not g.get("frozen", False)]
        if self.clip_grad > 0:
            for group in active:
                self._clip_group(group)
        every_group = self.param_groups
        self.param_groups = active
        try:
            return super().step(closure)
        finally:
            self.param_groups = every_group

    def _clip_group(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        fragments = self.partition_fragments.get(id(params[0])) if len(params) == 1 else None
        if fragments is None:
            grads = [p.grad for p in params]
            norms = torch.stack(torch._foreach_norm(grads, 2.0)).float()
        else:
            grads = fragments.views(params[0].grad)
            norms = fragments.squared_norms(grads).sqrt()
        scales = (self.clip_grad / (norms + 1e-6)).clamp(max=1.0)
        if grads:
            torch._foreach_mul_(grads, list(scales.to(grads[0].dtype).unbind()))


class PartitionFragments:
    """Where each parameter of one ZeRO parameter group lies in this rank's flat partition."""

    def __init__(self, params: list[torch.Tensor], flat: torch.Tensor, partition: torch.Tensor, process_group):
        start = (partition.data_ptr() - flat.data_ptr()) // flat.element_size()
        end = start + partition.numel()
        self.process_group = process_group
        self.num_params = len(params)
        self.slices: list[tuple[int, int]] = []  # (offset in the partition, length), this rank's fragments
        self.owner: list[int] = []  # index of the parameter each fragment belongs to
        for index, param in enumerate(params):
            offset = (param.data_ptr() - flat.data_ptr()) // flat.element_size()
            lo, hi = max(offset, start), min(offset + param.numel(), end)
            if hi > lo:
                self.slices.append((lo - start, hi - lo))
                self.owner.append(index)
        self._owner_index = torch.tensor(self.owner, dtype=torch.long)

    def views(self, flat_grad: torch.Tensor) -> list[torch.Tensor]:
        return [flat_grad.narrow(0, offset, length) for offset, length in self.slices]

    def squared_norms(self, views: list[torch.Tensor]) -> torch.Tensor:
        """Squared norm of every parameter of the group, summed over all ranks' fragments,
        one entry per local fragment (a collective: every rank calls it, even with no fragment)."""
        device = views[0].device if views else torch.device("cpu")
        per_param = torch.zeros(self.num_params, dtype=torch.float32, device=device)
        if views:
            local = torch.stack(torch._foreach_norm(views, 2.0)).float().square()
            per_param.index_add_(0, self._owner_index.to(device), local)
        dist.all_reduce(per_param, group=self.process_group)
        return per_param[self._owner_index.to(device)]
