"""Render captured DARE attention maps: for chosen text tokens, a heat map over each latent frame.

    handle = apply_dare(pipe, capture_maps=True); pipe(...)
    render_maps(handle, tokens=[2, 5, 9], token_labels=["cat", "red", "hat"], path="maps.png")

The figure is a grid: one row per latent frame, one column per token; each cell is the map
A[b, frame, :, :, token] (head-averaged attention probability of the video positions on that token,
averaged over the chosen layers). Each column shares one colour scale (0 … the token's maximum over
frames), so a token's attention can be compared across frames.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

__all__ = ["maps_to_grid", "render_maps"]


def _collect(maps, grids, branch):
    """(maps dict, grids dict) from a DAREHandle, a dict of maps, or one tensor."""
    if hasattr(maps, "maps") and hasattr(maps, "map_grids"):  # a DAREHandle
        handle = maps
        src = handle.branch_maps.get(branch) if branch is not None else None
        if branch is not None and src is None:
            raise ValueError(f"no maps were captured for branch {branch!r}; have {sorted(handle.branch_maps)}")
        return dict(src if src is not None else handle.maps), dict(handle.map_grids)
    if isinstance(maps, torch.Tensor):
        return {"map": maps}, {"map": grids if isinstance(grids, tuple) else None}
    if isinstance(maps, Mapping):
        if grids is None or isinstance(grids, tuple):
            grids = {k: grids for k in maps}
        return dict(maps), dict(grids)
    raise TypeError(f"maps must be a DAREHandle, a dict of [B, N, M] tensors or a tensor, got {type(maps).__name__}")


def maps_to_grid(maps, tokens: Sequence[int], *, grid=None, sample: int = 0, layers: Sequence[str] | None = None,
                 branch: str | None = None) -> torch.Tensor:
    """Layer-averaged maps of ``tokens`` as float32 [frames, len(tokens), height, width].

    Args:
        maps: a DAREHandle (after a forward with capture_maps=True), {layer: [B, N, M]}, or a [B, N, M] / [N, M] tensor.
        tokens: text-token indices (columns of the maps).
        grid: (frames, height, width) of N when ``maps`` does not carry it (a DAREHandle does).
        sample: which row of the batch (for CFG-batched forwards: uncond rows come first; or use ``branch``).
        layers: layer names to average (default all); maps at a coarser resolution (UNet levels) are
            upsampled bilinearly to the finest grid first.
        branch: with a DAREHandle, take the maps of this CFG branch ("cond", "uncond", "degraded").
    """
    import torch.nn.functional as F

    mdict, gdict = _collect(maps, grid, branch)
    if layers is not None:
        missing = [name for name in layers if name not in mdict]
        if missing:
            raise ValueError(f"no captured maps for layers {missing}; have {list(mdict)[:8]}...")
        mdict = {k: mdict[k] for k in layers}
    if not mdict:
        raise ValueError("no maps to render (was the model run with capture_maps=True?)")
    tokens = [int(t) for t in tokens]
    if not tokens:
        raise ValueError("tokens must name at least one text token")
    cells = []
    for name, amap in mdict.items():
        amap = amap.detach().float().cpu()
        if amap.dim() == 2:
            amap = amap.unsqueeze(0)
        if amap.dim() != 3:
            raise ValueError(f"map {name} must be [B, N, M], got {list(amap.shape)}")
        if not 0 <= sample < amap.shape[0]:
            raise ValueError(f"sample {sample} out of range for map {name} with batch {amap.shape[0]}")
        bad = [t for t in tokens if not 0 <= t < amap.shape[2]]
        if bad:
            raise ValueError(f"tokens {bad} out of range: map {name} has {amap.shape[2]} text tokens")
        g = gdict.get(name)
        if g is None:
            raise ValueError(f"the token grid of map {name} is unknown; pass grid=(frames, height, width)")
        f, h, w = g
        if f * h * w != amap.shape[1]:
            raise ValueError(f"grid {g} does not match the {amap.shape[1]} video positions of map {name}")
        cells.append(amap[sample][:, tokens].T.reshape(len(tokens), f, h, w).permute(1, 0, 2, 3))
    f = cells[0].shape[0]
    if any(c.shape[0] != f for c in cells):
        raise ValueError("the chosen layers have different frame counts; choose layers with layers=[...]")
    hh = max(c.shape[2] for c in cells)
    ww = max(c.shape[3] for c in cells)
    ups = [c if c.shape[2:] == (hh, ww) else F.interpolate(c, size=(hh, ww), mode="bilinear", align_corners=False)
           for c in cells]
    return torch.stack(ups).mean(0)


def render_maps(maps, tokens: Sequence[int], *, token_labels: Sequence[str] | None = None, grid=None,
                sample: int = 0, layers: Sequence[str] | None = None, branch: str | None = None,
                path=None, title: str | None = None, cmap: str = "magma", dpi: int = 120):
    """Draw the frames × tokens grid of heat maps; save it as PNG when ``path`` is given. Returns the Figure.

    Arguments as :func:`maps_to_grid`; ``token_labels`` name the columns (default "token j").
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    data = maps_to_grid(maps, tokens, grid=grid, sample=sample, layers=layers, branch=branch)
    frames, ntok, h, w = data.shape
    labels = list(token_labels) if token_labels is not None else [f"token {t}" for t in tokens]
    if len(labels) != ntok:
        raise ValueError(f"token_labels has {len(labels)} names for {ntok} tokens")
    cell = 1.6 * max(1.0, min(2.0, 8.0 / max(h, w)))
    aspect = w / h
    fig, axes = plt.subplots(frames, ntok, figsize=(0.6 + cell * aspect * ntok + 0.5, 0.6 + cell * frames),
                             squeeze=False, constrained_layout=True)
    for j in range(ntok):
        vmax = float(data[:, j].max())
        empty = vmax == 0.0
        for i in range(frames):
            ax = axes[i][j]
            im = ax.imshow(data[i, j].numpy(), cmap=cmap, vmin=0.0, vmax=vmax if not empty else 1.0,
                           interpolation="nearest")
            if empty:
                ax.text(0.5, 0.5, "no attention", color="white", ha="center", va="center",
                        transform=ax.transAxes, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"{labels[j]}\n(#{tokens[j]})", fontsize=10)
            if j == 0:
                ax.set_ylabel(f"frame {i}", fontsize=10)
        fig.colorbar(im, ax=[axes[i][j] for i in range(frames)], location="bottom", shrink=0.9, pad=0.02,
                     label="attention", format="%.2g")
    fig.suptitle(title or f"DARE cross-attention maps (sample {sample}, {frames} latent frames, {h}x{w})",
                 fontsize=11)
    if path is not None:
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
    return fig
