"""The DINO optimizer: AdamW with per-parameter gradient clipping and a frozen-group switch.

Both DINO details live inside `step()` so they act on whatever gradient the
optimizer is handed: full per-parameter gradients (one process, or DeepSpeed
stage 0), or the flat fp32 gradient partition that DeepSpeed ZeRO stage 1/2 gives
its base optimizer one parameter group at a time.

- Clipping (official `utils.clip_gradients`): each parameter's gradient is scaled to
  norm <= clip_grad on its own, not by the global norm. Under ZeRO a parameter may be
  split across ranks, so its squared norm is summed from the fragments with one
  all-reduce per parameter group (a few floats per parameter).
- Frozen last layer (official: `param.grad = None` during the first epochs): the
  head's last layer has its own parameter groups; while `group["frozen"]` is set,
  step() leaves them out entirely, so the weights stay bit-identical and AdamW
  keeps no moments and no step count for them, exactly as with grad=None. This
  works for partitioned gradients too, where setting grad=None cannot.
- The AdamW update (`impl`, decided once at construction and logged): "fused" (per
  parameter group and dtype, one pass over each parameter's weight, gradient and moments, instead
  of foreach's dozen multi-tensor ops on CUDA or the for-loop's six passes per parameter on the
  CPU: 27 against 135 ms for ViT-S/16 with its K = 65536 head on 2 CPU cores) wherever torch has a
  fused kernel for every parameter (CUDA and the CPU among others), else torch's default. Both
  DINO details compose with any of them: clipping rewrites the gradients before the
  update, and every implementation walks `self.param_groups`, which step() narrows
  to the groups that are not frozen.

Launches of the clipping on CUDA, per parameter group, whatever the number of parameters:
the norms are one multi-tensor `_foreach_norm`, the scales a few elementwise ops over all
parameters, and the multiply by the per-parameter scales one launch of
`fastdino_kernels.clip.scale_tensors_` (torch, checked up to 2.13, has no multi-tensor
multiply by a different device scalar per tensor: `_foreach_mul_` with a list of 0-d tensors
runs one kernel per gradient). Where that kernel cannot run (`clip_impl`, resolved by
`fastdino._dispatch.resolve_impl` and logged once: the CPU) its PyTorch twin multiplies with
`_foreach_mul_` as before, bit-identical on fp32 gradients (fastdino's: the weights are fp32).
bf16 gradients, on both paths, are multiplied by the fp32 scale and rounded once; before, the
scale itself was first rounded to bf16.
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from fastdino._dispatch import resolve_impl
from fastdino_kernels import clip as clip_kernels

logger = logging.getLogger(__name__)

ADAMW_IMPLS = ("fused", "foreach", "for_loop")


def adamw_impl(name: str, params: list[torch.Tensor]) -> tuple[str, str]:
    """(implementation, why) of the AdamW update `name` ("auto" or one of ADAMW_IMPLS) for `params`.

    "auto" picks "fused" when every parameter is a floating-point tensor on a device torch has a
    fused AdamW kernel for (CUDA, the CPU, ...: one pass per parameter, the same update up to float
    rounding), else torch's default: "foreach" when every parameter is on a device with
    multi-tensor kernels, "for_loop" otherwise.
    Raises ValueError for an unknown name, and for "fused" when torch has no fused kernel for
    some parameter's device or dtype.
    """
    from torch.utils._foreach_utils import (_get_foreach_kernels_supported_devices,
                                            _get_fused_kernels_supported_devices)

    if name not in ("auto", *ADAMW_IMPLS):
        raise ValueError(f"unknown AdamW implementation {name!r}; choose one of auto, {', '.join(ADAMW_IMPLS)}")
    unsupported = [p for p in params if not (p.is_floating_point()
                                             and p.device.type in _get_fused_kernels_supported_devices())]
    if name == "fused":
        if unsupported:
            raise ValueError(f"AdamW impl 'fused' cannot run: torch has no fused kernel for {unsupported[0].dtype} "
                             f"parameters on {unsupported[0].device.type}; use 'auto'")
        return "fused", "asked for"
    if name != "auto":
        return name, "asked for"
    if params and not unsupported:
        return "fused", "torch has a fused kernel for every parameter's device and dtype"
    why = (f"torch has no fused kernel for {unsupported[0].dtype} parameters on {unsupported[0].device.type}"
           if params else "no parameters")
    if params and all(p.device.type in _get_foreach_kernels_supported_devices() for p in params):
        return "foreach", why
    return "for_loop", why


class DINOAdamW(torch.optim.AdamW):
    """torch.optim.AdamW plus DINO's per-parameter clipping (`clip_grad` > 0; 0 turns it off)
    and frozen groups (`group["frozen"]`), both applied inside step(). `impl`: the AdamW update,
    "auto" or one of ADAMW_IMPLS (see `adamw_impl`); other keyword arguments go to AdamW
    (which owns `fused` and `foreach`: pass `impl` instead). `clip_impl`: the clipping's multiply,
    "auto" (the Triton kernel on CUDA, the twin elsewhere), "triton" or "torch"; set it on the
    instance to ask for one by name (an error where it cannot run)."""

    clip_impl = "auto"

    def __init__(self, params, *, clip_grad: float, impl: str = "auto", **kwargs):
        if "fused" in kwargs or "foreach" in kwargs:
            raise TypeError("DINOAdamW chooses fused/foreach itself: pass impl='fused', 'foreach' or 'for_loop'")
        if isinstance(params, torch.Tensor):
            raise TypeError("DINOAdamW wants an iterable of tensors or parameter-group dicts, got one tensor")
        # Listed once: the choice below looks at the parameters, then AdamW takes the same groups.
        params = [dict(g, params=[g["params"]] if isinstance(g["params"], torch.Tensor) else list(g["params"]))
                  if isinstance(g, dict) else g for g in params]
        tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
        self.impl, why = adamw_impl(impl, tensors)
        self._impl_flags = {"fused": self.impl == "fused", "foreach": self.impl == "foreach"}
        super().__init__(params, **self._impl_flags, **kwargs)
        # Fused AdamW would let a GradScaler hand it still-scaled gradients to unscale inside the
        # kernel, after clipping had measured them: keep unscaling before step().
        self._step_supports_amp_scaling = False
        self.clip_grad = clip_grad
        # Set by the ZeRO wiring: id(flat fp32 partition) -> its parameters' fragments.
        self.partition_fragments: dict[int, "PartitionFragments"] = {}
        logger.info("AdamW %s on %s (%s)", self.impl.replace("_", "-"),
                    ", ".join(sorted({p.device.type for p in tensors})), why)

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

    def load_state_dict(self, state_dict: dict) -> None:
        """AdamW's, except that the update implementation stays this optimizer's: a checkpoint
        written by another one (a CPU run resumed on a GPU, or the reverse) carries its own
        `fused`/`foreach` flags, and the step counts where that one keeps them (fused: on the
        parameter's device, else on the CPU)."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group.update(self._impl_flags)
            for p in group["params"]:
                state = self.state.get(p)
                if state and torch.is_tensor(state.get("step")):
                    device = p.device if self.impl == "fused" else torch.device("cpu")
                    state["step"] = state["step"].to(device=device, dtype=torch.float32)

    def _clip_group(self, group: dict) -> None:
        """Scales each gradient of `group` (each ZeRO fragment by its whole parameter's norm) by
        min(1, clip_grad / (norm + 1e-6)), in place, with no host sync: a constant number of
        launches on CUDA (see the module docstring)."""
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
        if grads:
            # The official coefficient, clip / (norm + 1e-6), applied only where it is below 1: a scale
            # of 1 leaves the gradient alone (the kernel does not even read it). fp32 on every path.
            scales = (self.clip_grad / (norms + 1e-6)).clamp(max=1.0)
            impl = resolve_impl("DINOAdamW clipping", self.clip_impl, clip_kernels._scale_kernel, grads[0].device,
                                logger)
            scale = clip_kernels.scale_tensors_ if impl == "triton" else clip_kernels.scale_tensors_reference_
            scale(grads, scales)


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
