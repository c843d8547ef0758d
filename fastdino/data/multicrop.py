"""DINO multi-crop as batched torch ops, on whatever device the images are.

The torch backend of the view recipe (recipe.py, the official `DataAugmentationDINO`'s
views and draws). Pixels are floats in [0, 1] throughout, not PIL's uint8, so nothing is
rounded between steps. Two ways to compute them, from the same draws:

- the reference (CPU default): each crop its own F.interpolate (resample.resized_crops),
  then the float pixel ops of pixels.py on the images each op chose; the float reference of
  the OpenCV path (cpu_crops.py);
- the batched path (GPU default): every random choice of a batch is turned on the CPU into
  per-crop parameters (`BatchPlan`), copied to the device in one pinned buffer, and every op
  runs over all crops of a size at once, as matrices or masked blends: flips are mirrored
  resampling matrices, each colour-jitter step is a 3 x 3 colour matrix per crop (brightness,
  contrast and saturation are affine in RGB; an op an image did not draw is the identity),
  grayscale another, the blur two matmuls. A batch of 2 + 10 crops costs about 135 kernels and copies,
  whatever its size, and no host sync.
"""
import numpy as np
import torch

from fastdino.data.pixels import (IMAGENET_MEAN, IMAGENET_STD, JITTER_OPS, LUMA_WEIGHTS, box_blur, grayscale,
                                  normalize, pil_box_blur_kernels, solarize, to_device)
from fastdino.data.recipe import ViewRecipe
from fastdino.data.resample import ResamplePlan, band_matrices, device_constant, resampled_crops, resized_crops

# The ImageNet normalisation is public here too: evaluation code imports it from this module.
__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "TorchMultiCrop", "augment_view", "multicrop"]


# ---------------------------------------------------------------- the reference: each op on the images that drew it

def _apply_where(x, mask, op, *per_image_args):
    """x[mask] = op(x[mask], *args[mask]), computing op only on the chosen images."""
    chosen = mask.nonzero()[:, 0]
    if len(chosen):
        on_device = to_device(chosen, x.device)
        x[on_device] = op(x[on_device], *(to_device(arg[chosen], x.device) for arg in per_image_args))
    return x


def augment_view(x, draws, jitter_strengths):
    """Flip, colour jitter, grayscale, blur and solarize a batch of crops [N, 3, s, s] in [0, 1] in place,
    as `draws` says; jitter_strengths: the recipe's (brightness, contrast, saturation, hue)."""
    x = _apply_where(x, draws.flip, lambda v: v.flip(-1))
    for step in range(4):
        for op_index, (op, strength) in enumerate(zip(JITTER_OPS, jitter_strengths)):
            if strength > 0:  # a zero strength is ColorJitter's "off"
                mask = draws.jitter & (draws.jitter_order[:, step] == op_index)
                x = _apply_where(x, mask, op, draws.jitter_factors[:, op_index])
    x = _apply_where(x, draws.grayscale, lambda v: grayscale(v).expand(-1, 3, -1, -1))
    # kernels built on the CPU from the CPU draws: no device sync
    x = _apply_where(x, draws.blur, box_blur, pil_box_blur_kernels(draws.blur_sigma))
    return _apply_where(x, draws.solarize, solarize)


# ---------------------------------------------------------------- the batched path: the plan, on the CPU

BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # JITTER_OPS' order, and ViewDraws.jitter_factors'
NO_OP = -1
IDENTITY = np.eye(3, dtype=np.float64)
TO_GRAY = np.tile(np.array(LUMA_WEIGHTS), (3, 1))  # each channel becomes the luma: grayscale(x) as a colour matrix
# HSV -> RGB: channel c = V - C * clamp(min(k, 4 - k), 0, 1) with k = (n_c + H6) mod 6, n = these for r, g, b
HUE_CHANNEL_OFFSETS = (5.0, 3.0, 1.0)
SOLARIZE_THRESHOLD = 128 / 255
NEVER = 2.0  # a solarize threshold no pixel in [0, 1] reaches
SEXTANT_STARTS = (((0.0,),), ((2.0,),), ((4.0,),))  # [3, 1, 1]: hue sextant where r, g or b is the brightest


class Staging:
    """Named numpy arrays packed into one float32 and one bool host buffer, copied to the device in one
    copy each: pinned (page-locked) buffers from torch's caching host allocator where the device is a
    GPU, which reuses a buffer once the copy that read it has run."""

    def __init__(self):
        self.floats, self.bools = {}, {}

    def add(self, name, *parts):
        """Stages the arrays `parts` as one array `name`: the first's shape, or 1-D for several."""
        parts = [np.asarray(part) for part in parts]
        (self.bools if parts[0].dtype == bool else self.floats)[name] = parts

    def upload(self, device):
        """{name: tensor of the array's shape on `device`}, without a host sync."""
        out = {}
        for arrays, dtype in ((self.floats, torch.float32), (self.bools, torch.bool)):
            if not arrays:
                continue
            total = sum(part.size for parts in arrays.values() for part in parts)
            host = torch.empty(total, dtype=dtype, pin_memory=device.type == "cuda")
            host_array, offset, spans = host.numpy(), 0, {}
            for name, parts in arrays.items():
                start = offset
                for part in parts:  # written straight into the pinned buffer: no concatenated copy first
                    host_array[offset: offset + part.size] = part.ravel()
                    offset += part.size
                spans[name] = (start, offset, parts[0].shape if len(parts) == 1 else (offset - start,))
            flat = torch.empty(total, dtype=dtype, device=device).copy_(host, non_blocking=True)
            out.update({name: flat[start: end].view(shape) for name, (start, end, shape) in spans.items()})
        return out


class BatchPlan:
    """Every random choice of a batch, as the per-crop parameters of the batched ops (numpy, CPU).

    recipe: the ViewRecipe; groups: (size, views) per crop size, views being indices into
    recipe.views; sizes: long [B, 2] (h, w); draws: recipe.draw's ViewDraws per view; blur_taps:
    the width of the blur kernels. Crops of a group are view-major ([V * B]). `staging` holds
    the arrays to copy (resampling rows and columns, then per group g: slot colour matrices
    `g.pre{i}` / `g.post{i}` [N, 3, 3] with contrast matrices `...c` [N, 3, 3] where a slot holds a
    contrast step, the hue mask and channel offsets `g.hue_mask` [N, 1, 1, 1] / `g.hue` [N, 3, 1, 1],
    `g.gray` [N, 3, 3], `g.blur` [N, T] with `g.blur_mask` [N, 1, 1, 1], `g.solarize` [N, 1, 1, 1]),
    and `steps[g]` says which of them a group runs (a step no crop of the group drew is left out).
    The colour jitter of a crop is its ops before hue, hue, then its ops after hue: up to three
    colour-matrix slots on each side of one hue step, every slot the identity for crops without
    an op there. Source of the maths: pixels.py (the reference ops), torchvision's ColorJitter.
    """

    def __init__(self, recipe, groups, sizes, draws, blur_taps):
        self.staging, self.steps = Staging(), []
        batch = len(sizes)
        boxes = [d.boxes.numpy() for d in draws]  # [B, 4] per view: top, left, height, width

        def image_major(views, column):  # [B * V]: image by image, the group's views of each
            return np.stack([boxes[v][:, column] for v in views], axis=1).ravel()

        def view_major(views, column):  # [V * B]: view by view, as the crops of a group are laid out
            return np.concatenate([boxes[v][:, column] for v in views])

        rows = [(image_major(views, 0), image_major(views, 2), size) for size, views in groups]
        cols = [(view_major(views, 1), view_major(views, 3), size,
                 np.concatenate([draws[v].flip.numpy() for v in views])) for size, views in groups]
        self.rows, self.cols = ResamplePlan(rows, images=batch), ResamplePlan(cols)
        self.taps = max(self.rows.taps, self.cols.taps)
        for name in ("first", "count", "a", "d"):
            self.staging.add(name, self.rows.arrays()[name], self.cols.arrays()[name])
        strengths = np.array(recipe.jitter_strengths)
        for g, (size, views) in enumerate(groups):
            def cat(field):
                return torch.cat([getattr(draws[v], field) for v in views]).numpy()
            self.steps.append(self._group_steps(f"{g}.", strengths, cat, blur_taps))

    def _group_steps(self, prefix, strengths, cat, blur_taps):
        staging, steps = self.staging, {"pre": [], "post": []}
        jitter, factors, order = cat("jitter"), cat("jitter_factors").astype(np.float64), cat("jitter_order")
        n = len(jitter)
        hue_on = strengths[HUE] > 0 and jitter.any()
        hue_at = np.argmax(order == HUE, axis=1) if hue_on else np.full(n, 4)
        # the op of each crop at each position, NO_OP where it drew no jitter or the op's strength is 0
        ops = np.where(jitter[:, None] & (strengths[order] > 0), order, NO_OP)
        position = np.arange(4)[None]
        before = np.where(position < hue_at[:, None], ops, NO_OP)
        after = np.full((n, 3), NO_OP)
        for j in range(3):  # crop i's j-th op after hue sits at hue_at[i] + 1 + j
            at = hue_at + 1 + j
            after[:, j] = np.where(at < 4, ops[np.arange(n), np.minimum(at, 3)], NO_OP)
        for side, slots in (("pre", before.T), ("post", after.T)):
            for i, slot_ops in enumerate(slots):
                if (slot_ops == NO_OP).all():
                    continue
                name = f"{side}{i}"
                factor = factors[np.arange(n), np.maximum(slot_ops, 0)][:, None, None]
                acting = slot_ops[:, None, None] != NO_OP
                # brightness f: f x; contrast f: f x + (1 - f) mean-luma; saturation f: f x + (1 - f) luma(x)
                staging.add(prefix + name, np.where(acting, factor * IDENTITY, IDENTITY)
                            + np.where(slot_ops[:, None, None] == SATURATION, (1 - factor) * TO_GRAY, 0))
                has_contrast = (slot_ops == CONTRAST).any()
                if has_contrast:
                    contrast = np.where(slot_ops[:, None, None] == CONTRAST, (1 - factor) * TO_GRAY, 0)
                    staging.add(prefix + name + "c", contrast)
                steps[side].append((name, has_contrast))
        steps["hue"] = hue_on
        if hue_on:
            staging.add(prefix + "hue_mask", jitter[:, None, None, None])
            shift = 6 * factors[:, HUE]  # in sextants of the hue circle
            staging.add(prefix + "hue", (np.array(HUE_CHANNEL_OFFSETS)[None] + shift[:, None])[..., None, None])
        gray = cat("grayscale")
        steps["gray"] = gray.any()
        if steps["gray"]:
            staging.add(prefix + "gray", np.where(gray[:, None, None], TO_GRAY, IDENTITY))
        blur = cat("blur")
        steps["blur"] = blur.any()
        if steps["blur"]:
            kernels = pil_box_blur_kernels(torch.from_numpy(cat("blur_sigma"))).numpy()
            pad = (blur_taps - kernels.shape[1]) // 2  # centred in the recipe's widest kernel
            staging.add(prefix + "blur", np.pad(kernels, ((0, 0), (pad, pad))))
            staging.add(prefix + "blur_mask", blur[:, None, None, None])
        chosen = cat("solarize")
        steps["solarize"] = chosen.any()
        if steps["solarize"]:
            staging.add(prefix + "solarize", np.where(chosen, SOLARIZE_THRESHOLD, NEVER)[:, None, None, None])
        return steps


# ---------------------------------------------------------------- the batched path: the ops, on the device

def colour_step(x, matrix, contrast=None):
    """One colour-jitter slot: clamp(matrix @ x + contrast @ mean(x), 0, 1) per crop; x: [N, 3, P];
    matrix, contrast: [N, 3, 3]. 2 kernels, 4 with a contrast step (which blends with the mean luma)."""
    if contrast is None:
        return torch.bmm(matrix, x).clamp_(0, 1)
    return torch.baddbmm(torch.bmm(contrast, x.mean(dim=2, keepdim=True)), matrix, x).clamp_(0, 1)


def hue_step(x, mask, offsets):
    """pixels.adjust_hue on the crops of `mask` ([N, 1, 1, 1]), the others kept; x: [N, 3, S, S];
    offsets: [N, 3, 1, 1], the HSV -> RGB channel offsets plus 6 x the hue shift. The sextant
    is read at the brightest channel (torch.max's first index on ties, the reference's r, g, b
    precedence) from all three channels' candidates: 15 kernels."""
    value, brightest = x.max(dim=1, keepdim=True)
    chroma = value - x.amin(dim=1, keepdim=True)
    wrapped = torch.cat([x, x[:, :2]], dim=1)  # channel c's next two: (g, b), (b, r), (r, g)
    candidates = torch.addcdiv(device_constant(SEXTANT_STARTS, x.dtype, x.device),
                               wrapped[:, 1:4] - wrapped[:, 2:5], chroma.clamp_min(1e-12))
    k = torch.remainder(candidates.gather(1, brightest) + offsets, 6)
    rotated = torch.addcmul(value, chroma, torch.minimum(k, 4 - k).clamp_(0, 1), value=-1)
    return torch.where(mask, rotated, x)


def blur_step(x, kernels, mask, taps_to_pixels):
    """pixels.box_blur on the crops of `mask` ([N, 1, 1, 1]), the others kept; x: [N, 3, S, S]; kernels:
    [N, T]; taps_to_pixels: [T, S * S], 1 where tap t of output pixel o reads pixel s (t, o * S + s),
    edges replicated. A matmul with it builds each crop's one-pass matrix, which the reference
    scatter-adds (atomics on a GPU: not bitwise reproducible). 7 kernels."""
    n, _, size, _ = x.shape
    one_pass = (kernels @ taps_to_pixels).view(n, size, size)
    three = one_pass @ one_pass @ one_pass
    columns = x.reshape(n, 3 * size, size) @ three.transpose(1, 2)
    rows = three @ columns.view(n, 3, size, size).transpose(1, 2).reshape(n, size, 3 * size)
    return torch.where(mask, rows.view(n, size, 3, size).transpose(1, 2), x)


class TorchMultiCrop:
    """The views of `recipe` for batches of decoded images, as torch ops on `device`.

    Call with (canvases, sizes, generator): canvases uint8 [B, max_h, max_w, 3] with image i
    in its top-left sizes[i] = (h, w), on any device; sizes long [B, 2] on the CPU. Returns
    [global1, global2, local1, ..., localN], normalised `dtype` tensors [B, 3, s, s] on `device`.
    batched_resize (default: on GPUs) takes the batched path (a fixed number of kernels per batch,
    no host sync; pixels resampled in half precision on GPUs); otherwise each crop is its own
    F.interpolate and each op runs on the images that drew it, the float reference of the
    OpenCV path (cpu_crops.py).
    """

    def __init__(self, recipe, *, device="cpu", dtype=torch.float32, batched_resize=None):
        self.recipe, self.device, self.dtype = recipe, torch.device(device), dtype
        self.batched_resize = self.device.type == "cuda" if batched_resize is None else batched_resize
        sizes = [view.size for view in recipe.views]
        # the views resampled together: those of one size, globals first, then locals (if another size)
        self.size_groups = [(size, [v for v, s in enumerate(sizes) if s == size]) for size in dict.fromkeys(sizes)]
        # the widest PIL blur kernel of the recipe's sigma range: every batch's kernels are padded to it
        self.blur_taps = pil_box_blur_kernels(torch.tensor([float(recipe.augment.blur_sigma[1])])).shape[1]
        # constants of the batched path, copied once (blocking: any stream may read them at once)
        augment = recipe.augment
        self.scale = torch.tensor([1 / s for s in augment.std]).view(3, 1, 1).to(self.device)
        self.shift = torch.tensor([-m / s for m, s in zip(augment.mean, augment.std)]).view(3, 1, 1).to(self.device)
        self.taps_to_pixels = {size: self._taps_to_pixels(size).to(self.device) for size, _ in self.size_groups}

    def __call__(self, canvases, sizes, generator):
        draws = self.recipe.draw(sizes, generator)
        if self.batched_resize:
            return self._batched(canvases, sizes, draws)
        canvases = canvases.to(self.device, non_blocking=True)
        views = resized_crops(canvases, sizes, [d.boxes for d in draws], [view.size for view in self.recipe.views])
        return [normalize(augment_view(view, view_draws, self.recipe.jitter_strengths), self.recipe.augment.mean,
                          self.recipe.augment.std, self.dtype) for view, view_draws in zip(views, draws)]

    def _batched(self, canvases, sizes, draws):
        plan = BatchPlan(self.recipe, self.size_groups, sizes, draws, self.blur_taps)
        params = plan.staging.upload(self.device)
        # integers 0..255 are exact in half, and GPU matmuls accumulate in fp32
        work = torch.float16 if self.device.type == "cuda" else torch.float32
        height, width = sizes.max(dim=0).values.tolist()  # the batch's canvas: less to copy than the file's
        pixels = to_device(canvases[:, :height, :width], self.device).to(work)
        batch = len(sizes)
        matrices = band_matrices(params["first"], params["count"], params["a"], params["d"], plan.taps,
                                 max(height, width), work)
        rows = matrices[: plan.rows.rows].view(batch, -1, matrices.shape[1])[..., :height]
        cols, start = [], plan.rows.rows
        for size, views in self.size_groups:
            count = len(views) * batch
            cols.append(matrices[start: start + count * size].view(count, size, -1)[..., :width])
            start += count * size
        crops = resampled_crops(pixels, rows, [(len(views), size) for size, views in self.size_groups], cols)
        out = [None] * len(self.recipe.views)
        for g, ((size, views), x, steps) in enumerate(zip(self.size_groups, crops, plan.steps)):
            prefix = f"{g}."
            group_params = {name[len(prefix):]: t for name, t in params.items() if name.startswith(prefix)}
            x = self._augment(x, steps, group_params)
            normalised = torch.addcmul(self.shift, x, self.scale,
                                       out=torch.empty(x.shape, dtype=self.dtype, device=self.device))
            for k, v in enumerate(views):
                out[v] = normalised[k * batch: (k + 1) * batch]
        return out

    def _augment(self, x, steps, params):
        """The colour jitter, grayscale, blur and solarize of a group's crops x [N, 3, S, S] in [0, 1]."""
        n, _, size, _ = x.shape
        flat = x.view(n, 3, size * size)
        for name, has_contrast in steps["pre"]:
            flat = colour_step(flat, params[name], params[name + "c"] if has_contrast else None)
        if steps["hue"]:
            flat = hue_step(flat.view(n, 3, size, size), params["hue_mask"], params["hue"]).view(n, 3, size * size)
        for name, has_contrast in steps["post"]:
            flat = colour_step(flat, params[name], params[name + "c"] if has_contrast else None)
        if steps["gray"]:
            flat = torch.bmm(params["gray"], flat)
        x = flat.view(n, 3, size, size)
        if steps["blur"]:
            x = blur_step(x, params["blur"], params["blur_mask"], self.taps_to_pixels[size])
        if steps["solarize"]:
            x = torch.where(x >= params["solarize"], 1 - x, x)
        return x

    def _taps_to_pixels(self, size):
        """[T, S * S]: 1 where tap t of output pixel o reads source pixel s, edges replicated (blur_step)."""
        reach = (self.blur_taps - 1) // 2
        sources = np.clip(np.arange(size)[:, None] + np.arange(-reach, reach + 1)[None], 0, size - 1)  # [S, T]
        one_hot = torch.zeros(self.blur_taps, size, size)
        one_hot[np.arange(self.blur_taps)[None], np.arange(size)[:, None], sources] = 1
        return one_hot.view(self.blur_taps, size * size)


def multicrop(canvases, sizes, generator, *, n_local_crops=8, global_size=224, local_size=96, augment=None,
              device="cpu", dtype=torch.float32, batched_resize=None):
    """DINO's views of one batch without a loader (tests, one-off batches): `TorchMultiCrop` of the
    recipe ViewRecipe(n_local_crops, global_size, local_size, augment), made for this call."""
    recipe = ViewRecipe(n_local_crops, global_size, local_size, augment)
    return TorchMultiCrop(recipe, device=device, dtype=dtype, batched_resize=batched_resize)(canvases, sizes, generator)
