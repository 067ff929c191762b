"""dare_kernels.viz: maps -> frames x tokens grid (numbers) and PNG; the `dare-kernels maps` command."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("matplotlib")

from dare_kernels.integrations.diffusers import apply_dare, tiny  # noqa: E402
from dare_kernels.viz import maps_to_grid, render_maps  # noqa: E402



def test_maps_to_grid_layout_and_layer_mean():
    B, F, H, W, M = 2, 3, 4, 5, 7
    a = torch.rand(B, F * H * W, M)
    b = torch.rand(B, F * H * W, M)
    g = maps_to_grid({"l0": a, "l1": b}, [6, 2], grid=(F, H, W), sample=1)
    assert g.shape == (F, 2, H, W)
    # position n = (f*H + y)*W + x, as Wan / LTX / CogVideoX flatten their latent grid
    f, y, x = 2, 3, 1
    n = (f * H + y) * W + x
    torch.testing.assert_close(g[f, 0, y, x], (a[1, n, 6] + b[1, n, 6]) / 2)
    torch.testing.assert_close(g[f, 1, y, x], (a[1, n, 2] + b[1, n, 2]) / 2)
    with pytest.raises(ValueError, match="out of range"):
        maps_to_grid({"l0": a}, [M], grid=(F, H, W))
    with pytest.raises(ValueError, match="does not match"):
        maps_to_grid({"l0": a}, [0], grid=(F, H, W + 1))
    with pytest.raises(ValueError, match="grid"):
        maps_to_grid({"l0": a}, [0])


@torch.no_grad()
def test_render_from_handle_animatediff_levels(tmp_path):
    """UNet levels at different resolutions are upsampled to the finest grid before averaging."""
    torch.manual_seed(0)
    model = tiny.tiny_animatediff()
    B, F, M = 1, 2, 6
    x = torch.randn(B, 4, F, 8, 8)
    e = torch.randn(B, M, 32).repeat_interleave(F, dim=0)
    with apply_dare(model, capture_maps=True) as h:
        h.set_token_weights(torch.tensor([[1.0, 3.0, 1.0, 0.0, 1.0, 1.0]]))
        model(x, torch.tensor([500.0]), e)
        grid = maps_to_grid(h, [1, 3])
        assert grid.shape == (F, 2, 8, 8)
        assert bool((grid[:, 1] == 0).all()), "token with weight 0 must have an empty map"
        path = tmp_path / "maps.png"
        fig = render_maps(h, [0, 1, 3], token_labels=["a", "b", "dropped"], path=path)
    assert fig is not None
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_maps_command_writes_png(tmp_path):
    from dare_kernels.cli import main

    out = tmp_path / "m.png"
    assert main(["maps", "--model", "cogvideox", "--tokens", "0,2", "--frames", "5", "--height", "64",
                 "--width", "64", "--steps", "1", "--layers", "1", "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_import_dare_kernels_does_not_import_diffusers():
    import subprocess
    import sys

    code = ("import sys, dare_kernels; assert 'diffusers' not in sys.modules and 'matplotlib' not in sys.modules; "
            "dare_kernels.apply_dare; assert 'diffusers' not in sys.modules; "
            "dare_kernels.DAREGuidance; assert 'diffusers' in sys.modules; print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]
