"""Densitometry of a region crop: what the fitted finding detector reads besides the encoders' latents.

Optional, not in the published model (``Reg2RGConfig.finding_density``). Quantitative CT reads a region by the
distribution of its attenuation — the share of lung below -950 HU for emphysema, of coronary voxels above
130 HU for calcium, of dense tissue in the lung for consolidation — and, for a lesion that fills a
neighbourhood rather than a thin vessel, by the same distribution after a grey erosion (a minimum filter):
thin bright structures (vessels, the partial volume along the region's edge) fall to the darker tissue around
them while a ground-glass or solid patch a few voxels across keeps its value. These are computed on exactly
the tensors the model reads (the region's crop, scaled to [-1, 1] from -1000..200 HU with the -1 fill outside
the region's mask, and its mask in the global box), so they change with the image and nothing else.

Per region crop, `DENSITY_FEATURES` numbers:

* the histogram (`BINS` bins over [-1, 1]) of the crop's content voxels (above the fill), as shares of them;
* the same counts as shares of the whole crop box, then the content's share of the box;
* the region mask's share of its (global) box — the organ's size relative to the body;
* for an erosion of 3 and of 5 voxels (a cube): the histogram of the eroded crop's content, as shares of that
  content and of the box.

`occluded_density` gives the features with each patch of the crop (the ViT's patches) or of the mask (the mask
encoder's) emptied, for the relevance maps' occlusion (`engine.explain.relevance.call_occlusion`).
"""

from __future__ import annotations

import torch

BINS = 32
EROSIONS = (3, 5)
#: A crop voxel carries content when it is above the fill (-1: the -1024 HU outside the region's mask).
CONTENT_ABOVE = -1.0 + 1e-4
DENSITY_FEATURES = 2 * BINS + 2 + 2 * BINS * len(EROSIONS)


def _counts(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(M, BINS) histogram counts of each row of ``values`` (M, V) over [-1, 1], only where ``keep``."""
    M = values.shape[0]
    bins = ((values.float().clamp(-1.0, 1.0) + 1.0) * (BINS / 2)).long().clamp_(max=BINS - 1)
    bins = torch.where(keep, bins, BINS)                        # the values not kept go to a bin of their own
    index = bins + torch.arange(M, device=values.device)[:, None] * (BINS + 1)
    return torch.bincount(index.flatten(), minlength=M * (BINS + 1)).view(M, BINS + 1)[:, :BINS].float()


def _erode3(x: torch.Tensor) -> torch.Tensor:
    """Grey erosion of (M, H, W, D) by a 3-voxel cube (the minimum over each voxel's neighbours within the
    volume; the edge is not padded): one pass of shifted minima per axis."""
    for axis in (1, 2, 3):
        out = x.clone()
        n = x.shape[axis]
        torch.minimum(out.narrow(axis, 1, n - 1), x.narrow(axis, 0, n - 1), out=out.narrow(axis, 1, n - 1))
        torch.minimum(out.narrow(axis, 0, n - 1), x.narrow(axis, 1, n - 1), out=out.narrow(axis, 0, n - 1))
        x = out
    return x


def _histograms(crops: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For M crops (M, H, W, D): [(counts (M, BINS), content voxels (M,)) of the crop, then of each erosion]."""
    M = crops.shape[0]
    out = []
    volume, radius = crops.float(), 0
    for size in (1, *EROSIONS):                 # a (2r+1)-voxel cube's minimum is a 3-voxel one's, r times
        while radius < size // 2:
            volume, radius = _erode3(volume), radius + 1
        flat = volume.reshape(M, -1)
        kept = flat > CONTENT_ABOVE
        out.append((_counts(flat, kept), kept.sum(1).float()))
    return out


def _assemble(histograms: list[tuple[torch.Tensor, torch.Tensor]], mask_share: torch.Tensor, box: float) -> torch.Tensor:
    """(M, DENSITY_FEATURES) from `_histograms`' counts, the masks' shares of their box (M,) and the crop's size."""
    (counts, n), *eroded = histograms
    parts = [counts / n.clamp(min=1)[:, None], counts / box, (n / box)[:, None], mask_share.float().reshape(-1, 1)]
    for counts, n in eroded:
        parts += [counts / n.clamp(min=1)[:, None], counts / box]
    return torch.cat(parts, dim=1)


@torch.no_grad()
def region_density(region_images: torch.Tensor, region_masks: torch.Tensor) -> torch.Tensor:
    """(N, DENSITY_FEATURES) float32 of N region crops (N, C, H, W, D; channel 0 is read, the others repeat it)
    and their masks (N, 1, h, w, d)."""
    if region_images.shape[0] == 0:
        return region_images.new_zeros(0, DENSITY_FEATURES, dtype=torch.float32)
    shares = (region_masks[:, 0].float() > 0.5).flatten(1).float().mean(1)
    crops = region_images[:, 0].float()
    return _assemble(_histograms(crops), shares, float(crops[0].numel()))


def _blocks(shape: tuple[int, int, int], patch: tuple[int, int, int]):
    """The (h, w, d) patch grid's blocks of a volume, in the ViT's patch order (h, then w, then d fastest)."""
    ph, pw, pd = patch
    for i in range(shape[0] // ph):
        for j in range(shape[1] // pw):
            for k in range(shape[2] // pd):
                yield slice(i * ph, (i + 1) * ph), slice(j * pw, (j + 1) * pw), slice(k * pd, (k + 1) * pd)


@torch.no_grad()
def occluded_density(region_image: torch.Tensor, region_mask: torch.Tensor, crop_patch: tuple[int, int, int],
                     mask_patch: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The features of one region with each patch emptied: (P + 1, F) for the crop (row 0 as it is, row p + 1 with
    crop patch p at the fill, -1) and (Pm + 1, F) for the mask (row q + 1 with mask patch q at 0). ``crop_patch`` /
    ``mask_patch``: the ViT's and the mask encoder's patch sizes."""
    crop = region_image[0].float()
    mask = region_mask[0].float() > 0.5
    box = float(crop.numel())
    share = mask.float().mean().reshape(1)
    # Emptying a crop patch (to the fill) removes its voxels from the content; after an erosion of radius r it
    # removes every eroded voxel within r of the patch (each now has a fill voxel in its cube) and changes no
    # other: each histogram loses the counts of that box of its volume, exactly.
    volumes, radius = [crop], 0
    for size in EROSIONS:
        eroded = volumes[-1]
        while radius < size // 2:
            eroded, radius = _erode3(eroded[None])[0], radius + 1
        volumes.append(eroded)
    whole = _histograms(crop[None])
    blocks = list(_blocks(tuple(crop.shape), crop_patch))
    shape = crop.shape
    per_volume = []
    for (counts, n), size, volume in zip(whole, (1, *EROSIONS), volumes):
        r = size // 2
        boxes = [tuple(slice(max(b.start - r, 0), min(b.stop + r, dim)) for b, dim in zip(block, shape))
                 for block in blocks]
        lost = torch.cat([_counts(volume[b].reshape(1, -1), volume[b].reshape(1, -1) > CONTENT_ABOVE)
                          for b in boxes])
        lost = torch.cat([lost.new_zeros(1, BINS), lost])
        per_volume.append((counts - lost, n - lost.sum(1)))
    crop_rows = _assemble(per_volume, share.expand(len(blocks) + 1), box)
    # a mask patch changes only the mask's share of its box; the crop is the same tensor
    mask_blocks = list(_blocks(tuple(mask.shape), mask_patch))
    removed = torch.tensor([0.0] + [float(mask[b].sum()) for b in mask_blocks])
    mask_rows = crop_rows[:1].repeat(len(mask_blocks) + 1, 1)
    mask_rows[:, 2 * BINS + 1] = share - removed / mask.numel()
    return crop_rows, mask_rows
