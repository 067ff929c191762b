"""Wan text cross-attention under diffusers' context parallelism.

Under ``ContextParallelConfig`` diffusers splits the video tokens across ranks and runs Wan's text
cross-attention locally (each rank attends its query shard to the full text). The DARE processor must
give, per rank, the rows of the single-process result — output and maps.

1. A real 2-process gloo run on CPU through ``model.enable_parallelism`` (Ulysses degree 2). diffusers
   derives the device as ``rank % torch.accelerator.device_count()``, which is 0 on a CPU-only machine, so
   the worker reports one accelerator to let ``cpu:0`` be chosen; nothing else is changed.
2. An explicit query-sharded check of the processor itself (no distributed set-up).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("diffusers")

from dare_kernels.integrations.diffusers import apply_dare  # noqa: E402
from dare_kernels.integrations.diffusers import tiny  # noqa: E402


_WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    torch.accelerator.device_count = lambda: 1  # CPU: let diffusers pick cpu:0 (it computes rank % count)
    from diffusers import ContextParallelConfig
    from dare_kernels.integrations.diffusers import apply_dare
    from dare_kernels.integrations.diffusers.tiny import tiny_wan
    rank, port, out_path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model = tiny_wan()
    torch.manual_seed(0)
    x = torch.randn(1, 4, 2, 8, 8)
    e = torch.randn(1, 512, 32)
    w = torch.rand(1, 512) + 0.05
    t = torch.tensor([500.0])
    with torch.no_grad():
        stock = model(x, t, e, return_dict=False)[0]
        h = apply_dare(model, capture_maps=True)
        h.set_token_weights(w)
        full = model(x, t, e, return_dict=False)[0]
        full_maps = {k: v.clone() for k, v in h.maps.items()}
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
        cp = model(x, t, e, return_dict=False)[0]
        cp_maps = dict(h.maps)
    torch.save({"stock": stock, "full": full, "cp": cp, "full_maps": full_maps, "cp_maps": cp_maps}, out_path)
    dist.destroy_process_group()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_wan_cross_attention_under_context_parallel_gloo(tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    port = str(_free_port())
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(script), str(r), port, str(tmp_path / f"r{r}.pt")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env) for r in range(2)]
    logs = [p.communicate(timeout=240)[0].decode(errors="replace") for p in procs]
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r][-3000:]}"
    res = [torch.load(tmp_path / f"r{r}.pt") for r in range(2)]
    for r in range(2):
        full, cp = res[r]["full"], res[r]["cp"]
        assert float((full - res[r]["stock"]).abs().max()) > 1e-4, "weights had no effect: test could not fail"
        torch.testing.assert_close(cp, full, atol=1e-5 * float(full.abs().max()), rtol=1e-5)
        for name, fmap in res[r]["full_maps"].items():
            shard = res[r]["cp_maps"][name]
            n = fmap.shape[1] // 2
            assert shard.shape == (1, n, 512), "each rank maps its own query shard to the full text"
            torch.testing.assert_close(shard, fmap[:, r * n:(r + 1) * n], atol=1e-6, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("image", [False, True])
def test_wan_processor_query_sharded_equals_full(image):
    torch.manual_seed(0)
    model = tiny.tiny_wan(image=image)
    attn = model.blocks[1].attn2
    B, N, C = 2, 37, 32
    hs = torch.randn(B, N, C)
    text = torch.randn(B, (7 if image else 0) + 512, C)
    with apply_dare(model, capture_maps=True, strength=1.3) as h:
        h.set_token_weights(torch.rand(B, 512) + 0.05)
        full = attn(hs, text)
        full_map = h.maps["blocks.1.attn2"]
        shards, shard_maps = [], []
        for lo, hi in ((0, 19), (19, 37)):  # uneven shards, as a rank's slice may be
            shards.append(attn(hs[:, lo:hi], text))
            shard_maps.append(h.maps["blocks.1.attn2"])
    torch.testing.assert_close(torch.cat(shards, 1), full, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.cat(shard_maps, 1), full_map, atol=1e-7, rtol=1e-5)
