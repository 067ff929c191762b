"""torch.compile(fullgraph=True) of a patched diffusers model: no graph break, same outputs, maps and gradients.

Training with DARE compiles the transformer; the patched processors, the handle's weights and the map capture
must trace into one graph, and new token weights set after compiling must be used (not baked in as constants).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from dare_kernels.integrations.diffusers import apply_dare  # noqa: E402

from test_diffusers_patch import CASES  # noqa: E402


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("name", ["wan", "cogvideox"])
def test_compiled_patched_model_matches_eager(name):
    """Forward + backward with maps: compiled (fullgraph) equals eager patched, for two sets of weights."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    case = CASES[name]()
    model, call, B, M = case["model"], case["call"], case["B"], case["M"]
    weights = [torch.rand(B, M) * 2 + 0.05 for _ in range(2)]
    weights[1][:, 3] = 0.0  # a dropped key

    with apply_dare(model, capture_maps=True) as h:
        eager = []
        for w in weights:
            h.set_token_weights(w)
            model.zero_grad()
            out = call()
            out.square().mean().backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            eager.append((out.detach(), {k: v.detach().clone() for k, v in h.maps.items()}, grads))

        torch._dynamo.reset()
        counters.clear()
        stock_forward = model.forward
        model.forward = torch.compile(stock_forward, fullgraph=True)  # fullgraph: a graph break raises
        try:
            for w, (out_e, maps_e, grads_e) in zip(weights, eager):
                h.set_token_weights(w)
                model.zero_grad()
                out = call()
                out.square().mean().backward()
                assert _rel(out.detach(), out_e) < 1e-5
                assert maps_e.keys() == h.maps.keys() and len(maps_e) > 0
                for k in maps_e:
                    torch.testing.assert_close(h.maps[k], maps_e[k], rtol=1e-5, atol=1e-6)
                assert grads_e.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
                for n, g in grads_e.items():
                    assert _rel(dict(model.named_parameters())[n].grad, g) < 1e-4, n
        finally:
            model.forward = stock_forward
        # the second set of weights reused the first graph: weights are graph inputs, not constants
        assert counters["stats"]["unique_graphs"] == 1
