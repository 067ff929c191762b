"""Which rows the device-check bench runs, and in which order: ``plan(part, tiny)``.

The table runs unit by unit (a unit = one kernel at one shape and dtype), the headline unit first: Wan-1.3B
cross-attention (B1 H12 N32760 M512 D128) in bfloat16. Inside a unit it runs mode by mode, and inside a mode
the peers a dare row is judged against come FIRST, then dare's rows, then the other peers:

    fwd          sdpa_flash, sdpa_bias | dare_triton, dare_cuda | sdpa, sdpa_bias_efficient, sdpa_bias_cudnn,
                                                                   flex_compiled
    fwd+map      eager_maps            | dare_triton, dare_cuda |
    fwd+bwd      sdpa_flash, sdpa_bias | dare_triton, dare_cuda | sdpa, sdpa_bias_efficient, sdpa_bias_cudnn,
                                                                   flex_compiled
    fwd+map+bwd  eager_maps            | dare_triton, dare_cuda |

so a run cut anywhere (time budget, a killed stage) has the reference of every dare row it reached.
Provider names: ``sdpa_flash`` SDPA pinned to FlashAttention, no bias; ``sdpa_bias`` SDPA as users call it
(default backend choice) with γ·log w as attn_mask; ``sdpa`` the same without the bias; ``sdpa_bias_efficient``
/ ``sdpa_bias_cudnn`` pinned backends with the bias; ``flex_compiled`` compiled FlexAttention with a per-key-bias
score_mod; ``eager_maps`` matmul-softmax-matmul returning the head-averaged map. Backward modes differentiate
the bias (dare: the weights w) wherever the provider takes one.

Parts (the device check runs them as two calls):
    1    the headline unit, then rectified_cfg (rescale 0.7) on the Wan 81-frame latent:
         torch_eager, copy | dare_triton, dare_cuda | diffusers_guider
    2    LTX-Video, CogVideoX-5B joint attention, AnimateDiff D40 / D80 / D160 (M 77), the headline shape in
         float16, then one real-size diffusers attention layer (Wan-1.3B ``attn2``: stock | dare | eager maps)
    all  1 then 2
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dare_kernels.benchmarking.shapes import ATTN_SHAPES, LATENT_SHAPES, AttnShape

HEADLINE = "wan-1.3b"
PART2_SHAPES = ("ltx-video", "cogvideox-5b", "animatediff-d40", "animatediff-d80", "animatediff-d160")
LATENT_NAME = "wan-81f-480p"
ATTN_MODES = ("fwd", "fwd+map", "fwd+bwd", "fwd+map+bwd")
DARE = ("dare_triton", "dare_cuda")
# per mode: the peers of the headline ratios (run before dare's rows), then the other peers (after them)
REFERENCE_PEERS = {"fwd": ("sdpa_flash", "sdpa_bias"), "fwd+map": ("eager_maps",),
                   "fwd+bwd": ("sdpa_flash", "sdpa_bias"), "fwd+map+bwd": ("eager_maps",)}
OTHER_PEERS = {"fwd": ("sdpa", "sdpa_bias_efficient", "sdpa_bias_cudnn", "flex_compiled"), "fwd+map": (),
               "fwd+bwd": ("sdpa", "sdpa_bias_efficient", "sdpa_bias_cudnn", "flex_compiled"), "fwd+map+bwd": ()}
CFG_MODE = "cfg+rescale"
CFG_REFERENCE = ("torch_eager", "copy")
CFG_OTHER = ("diffusers_guider",)
LAYER_MODES = ("fwd", "fwd+map")
LAYER_REFERENCE = {"fwd": ("stock",), "fwd+map": ("eager_maps",)}
# the real-size layer: Wan 2.1 T2V 1.3B text cross-attention (blocks[i].attn2), one CFG branch
LAYER_DIMS = dict(heads=12, head_dim=128, ffn=8960, text_dim=4096, frames=21, height=30, width=52, text=512)
LAYER_TINY_DIMS = dict(heads=2, head_dim=16, ffn=64, text_dim=32, frames=2, height=4, width=4, text=16)
PARTS = ("1", "2", "all")


@dataclass(frozen=True)
class Row:
    """One row of the plan. ``role``: "reference" (a peer the headline ratio is judged against), "dare" or
    "peer". ``attn``: the attention shape (sra_attention rows); ``extra``: the unit's other dimensions."""

    part: int
    kernel: str  # sra_attention | rectified_cfg | diffusers_layer
    shape: str
    dtype: str  # bfloat16 | float16
    provider: str
    mode: str
    role: str
    dims: str = ""
    attn: AttnShape | None = field(default=None, compare=False)
    extra: tuple = field(default=(), compare=False)

    @property
    def unit(self) -> tuple[str, str, str]:
        return (self.kernel, self.shape, self.dtype)

    def base(self) -> dict:
        """The row's identifying columns, as the table writes them."""
        return dict(part=self.part, kernel=self.kernel, shape=self.shape, dims=self.dims, dtype=self.dtype,
                    provider=self.provider, mode=self.mode, role=self.role)


def tiny_shape(s: AttnShape) -> AttnShape:
    """The rehearsal stand-in of a model shape: same structure (joint map range or not), interpreter-sized."""
    if s.map_keys is not None:
        video, text = 40, 8
        return AttnShape(f"{s.name}-tiny", 1, 2, video + text, video + text, 16, (video, video + text), "joint")
    return AttnShape(f"{s.name}-tiny", 1, 2, 32, min(s.M, 16), min(s.D, 16))


def _attn_unit(part: int, shape: AttnShape, dtype: str) -> list[Row]:
    dims = f"B={shape.B} H={shape.H} N={shape.N} M={shape.M} D={shape.D}"
    rows = []
    for mode in ATTN_MODES:
        groups = ((REFERENCE_PEERS[mode], "reference"), (DARE, "dare"), (OTHER_PEERS[mode], "peer"))
        for providers, role in groups:
            rows += [Row(part, "sra_attention", shape.name, dtype, p, mode, role, dims, shape) for p in providers]
    return rows


def _cfg_unit(part: int, tiny: bool) -> list[Row]:
    c, f, h, w = LATENT_SHAPES[LATENT_NAME]
    lat = (2, c, 2, 8, 8) if tiny else (2, c, f, h, w)
    name = LATENT_NAME + ("-tiny" if tiny else "")
    dims = "x".join(map(str, lat))
    groups = ((CFG_REFERENCE, "reference"), (DARE, "dare"), (CFG_OTHER, "peer"))
    return [Row(part, "rectified_cfg", name, "bfloat16", p, CFG_MODE, role, dims, None, lat)
            for providers, role in groups for p in providers]


def _layer_unit(part: int, tiny: bool) -> list[Row]:
    d = LAYER_TINY_DIMS if tiny else LAYER_DIMS
    n = d["frames"] * d["height"] * d["width"]
    name = "wan-1.3b-attn2" + ("-tiny" if tiny else "")
    dims = f"dim={d['heads'] * d['head_dim']} heads={d['heads']} N={n} M={d['text']}"
    rows = []
    for mode in LAYER_MODES:
        groups = ((LAYER_REFERENCE[mode], "reference"), (DARE, "dare"))
        rows += [Row(part, "diffusers_layer", name, "bfloat16", p, mode, role, dims, None, tuple(sorted(d.items())))
                 for providers, role in groups for p in providers]
    return rows


def plan(part: str | int = "all", tiny: bool = False) -> list[Row]:
    """The rows of ``part`` ("1", "2" or "all") in the order they run; ``tiny``: the rehearsal's stand-ins."""
    part = str(part)
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")

    def shape(name: str) -> AttnShape:
        return tiny_shape(ATTN_SHAPES[name]) if tiny else ATTN_SHAPES[name]

    rows: list[Row] = []
    if part in ("1", "all"):
        rows += _attn_unit(1, shape(HEADLINE), "bfloat16")
        rows += _cfg_unit(1, tiny)
    if part in ("2", "all"):
        for name in PART2_SHAPES:
            rows += _attn_unit(2, shape(name), "bfloat16")
        rows += _attn_unit(2, shape(HEADLINE), "float16")
        rows += _layer_unit(2, tiny)
    return rows


def order_violations(rows: list[Row]) -> list[str]:
    """What breaks the bench order in ``rows`` (empty when none): a unit split up or not contiguous; a dare row
    before one of its mode's reference peers; a map mode's dare row before the peers its ratios use from the
    mode without the map (measured earlier in the unit)."""
    bad = []
    seen_units: list[tuple] = []
    for r in rows:
        if not seen_units or seen_units[-1] != r.unit:
            if r.unit in seen_units:
                bad.append(f"unit {r.unit} is split: it comes back after another unit")
            seen_units.append(r.unit)
    index = {(r.unit, r.provider, r.mode): i for i, r in enumerate(rows)}
    for i, r in enumerate(rows):
        if r.role != "dare":
            continue
        for peer, mode in _references(r):
            j = index.get((r.unit, peer, mode))
            if j is None:
                bad.append(f"{r.unit} {r.provider} {r.mode}: its reference {peer} {mode} is not in the plan")
            elif j > i:
                bad.append(f"{r.unit} {r.provider} {r.mode} runs before its reference {peer} {mode}")
    return bad


def _references(r: Row) -> list[tuple[str, str]]:
    """(provider, mode) of the peers a dare row's headline ratios use: its mode's reference peers and, for a
    map mode, those of the mode without the map."""
    table = {"sra_attention": REFERENCE_PEERS, "diffusers_layer": LAYER_REFERENCE}.get(r.kernel)
    if table is None:  # rectified_cfg: one mode
        return [(p, r.mode) for p in CFG_REFERENCE]
    refs = [(p, r.mode) for p in table[r.mode]]
    base = base_mode(r.mode)
    if base is not None:
        refs += [(p, base) for p in table[base]]
    return refs


def base_mode(mode: str) -> str | None:
    """The mode a map mode's dare row is also compared at (its cost over the same call without the map)."""
    return mode.replace("+map", "") if "+map" in mode else None
