"""``dare-kernels maps``: run a tiny random diffusers pipeline with DARE and write a PNG of its attention maps.

    dare-kernels maps --model wan --tokens 1,4,7 --weights 4:3.0 --out maps.png

Nothing is downloaded: the pipeline is built from a small config with random weights and random prompt
embeddings, so the maps show the mechanics (reweighting, per-frame maps), not a trained model's semantics.
"""

from __future__ import annotations

import argparse

_MODELS = ("wan", "ltx", "cogvideox")


def _parse_weights(spec: str) -> dict[int, float]:
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        try:
            k, v = part.split(":")
            out[int(k)] = float(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--weights expects 'index:weight,...', got {part!r}") from None
    return out


def _cmd_maps(args: argparse.Namespace) -> int:
    # the optional dependencies first, so that a missing one stops before any work (dare_kernels.cli turns
    # the ModuleNotFoundError into a one-line message saying what to install)
    import diffusers  # noqa: F401
    import matplotlib  # noqa: F401
    import torch

    from .integrations.diffusers import apply_dare, tiny
    from .viz import render_maps

    torch.manual_seed(args.seed)
    tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
    if args.text_len is not None and args.text_len < 1:
        raise SystemExit(f"dare-kernels maps: --text-len must be >= 1, got {args.text_len}")
    if args.model == "wan":
        m = 512 if args.text_len is None else args.text_len  # WanPipeline's default max_sequence_length
        pipe = tiny.tiny_wan_pipeline(seed=args.seed, num_layers=args.layers)
        extra = {}
    elif args.model == "ltx":
        m = args.text_len or 16
        pipe = tiny.tiny_ltx_pipeline(seed=args.seed, num_layers=args.layers)
        extra = {"prompt_attention_mask": torch.ones(1, m), "negative_prompt_attention_mask": torch.ones(1, m)}
    else:
        m = args.text_len or 16
        pipe = tiny.tiny_cogvideox_pipeline(seed=args.seed, num_layers=args.layers, text_len=m)
        extra = {}
    bad = [t for t in tokens if not 0 <= t < m]
    if bad:
        raise SystemExit(f"dare-kernels maps: tokens {bad} out of range for {m} text tokens")
    pe, ne = torch.randn(1, m, 32), torch.randn(1, m, 32)
    w = torch.ones(1, m)
    for k, v in _parse_weights(args.weights).items():
        if not 0 <= k < m:
            raise SystemExit(f"dare-kernels maps: weight index {k} out of range for {m} text tokens")
        w[0, k] = v
    with apply_dare(pipe, strength=args.strength, capture_maps=True) as handle:
        handle.set_token_weights(w, only_cond=True)
        pipe(prompt_embeds=pe, negative_prompt_embeds=ne, height=args.height, width=args.width,
             num_frames=args.frames, num_inference_steps=args.steps, guidance_scale=4.0, output_type="latent",
             generator=torch.Generator().manual_seed(args.seed), **extra)
        labels = [f"token {t}, w={w[0, t]:.2g}" for t in tokens]
        render_maps(handle, tokens, token_labels=labels, branch="cond", path=args.out,
                    title=f"tiny random {args.model}: conditional-branch maps, last step, mean of "
                          f"{len(handle.layers)} layers")
    print(f"wrote {args.out}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("maps", help="run a tiny random pipeline with DARE and save its attention maps as PNG",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=_MODELS, default="wan", help="which tiny pipeline (default wan)")
    p.add_argument("--tokens", default="0,1,2,3", help="comma-separated text-token indices to draw")
    p.add_argument("--weights", default="1:4.0,3:0.25", help="token weights 'index:w,...' (others 1)")
    p.add_argument("--strength", type=float, default=1.0, help="SRA strength γ")
    p.add_argument("--frames", type=int, default=9, help="video frames (latent frames = (frames-1)/4+1)")
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=192)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--text-len", type=int, default=None,
                   help="text tokens of the prompt (default 512 for wan, as WanPipeline pads; 16 for ltx / cogvideox)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="dare_maps.png", help="PNG path")
    p.set_defaults(func=_cmd_maps)
