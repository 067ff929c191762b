"""Attention and latent shapes of the models dare_kernels targets: the one table that benchmarks, tests
and the GPU self-check draw from.

Cross-attention shapes are (B, H, N, M, D): N video tokens attend M text tokens. On CPU the query
length is divided by ``CPU_SCALE`` (the key side, heads and head dim stay real) so a suite finishes
on a 2-core machine; every CPU row records the factor it was run at. Correctness checks that need the
float64 reference whole cut the query length instead (``TEST_CUT_SHAPES``): the key side, which sets the
map's magnitude (about 1/M per entry), stays real.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

CPU_SCALE = 8  # N on CPU = N_real // CPU_SCALE


@dataclass(frozen=True)
class AttnShape:
    name: str
    B: int
    H: int
    N: int
    M: int
    D: int
    map_keys: tuple[int, int] | None = None  # key range of the map (joint attention: text columns only)
    note: str = ""

    def scaled(self, factor: int) -> "AttnShape":
        """N (and the video part of M for joint attention) divided by ``factor``, at least 64 tokens."""
        if factor == 1:
            return self
        n = max(64, self.N // factor)
        keys = self.map_keys
        m = self.M
        if keys is not None:  # joint attention: keys are video + text, scale the video part too
            text = keys[1] - keys[0]
            m = max(64, (self.M - text) // factor) + text
            keys = (m - text, m)
        return AttnShape(self.name, self.B, self.H, n, m, self.D, keys, f"{self.note} N/{factor}".strip())

    def cut(self, *, N: int, H: int | None = None, B: int | None = None, video_keys: int | None = None,
            name: str | None = None) -> "AttnShape":
        """The same key side (M, map range, D) with fewer queries / heads / batch: a float64-checkable size.

        ``video_keys`` shortens the video part of joint attention's keys (the text range stays whole).
        """
        m, keys = self.M, self.map_keys
        if video_keys is not None and keys is not None:
            text = keys[1] - keys[0]
            m, keys = video_keys + text, (video_keys, video_keys + text)
        return replace(self, name=name or self.name, N=N, H=H or self.H, B=B or self.B, M=m, map_keys=keys)


# real sizes (per CFG branch, batch 1 unless the model batches frames)
ATTN_SHAPES: dict[str, AttnShape] = {
    # Wan 2.1 T2V 1.3B, 81 frames 480x832: 21x30x52 latent tokens, 512 umT5 tokens
    "wan-1.3b": AttnShape("wan-1.3b", 1, 12, 32760, 512, 128),
    # Wan 2.1 T2V 14B, same video, 40 heads
    "wan-14b": AttnShape("wan-14b", 1, 40, 32760, 512, 128),
    # LTX-Video, 121 frames 512x768 -> 6144 tokens, 128 T5 tokens
    "ltx-video": AttnShape("ltx-video", 1, 32, 6144, 128, 64),
    # CogVideoX-5B joint attention: 17550 video + 226 text tokens attend each other; map over text
    "cogvideox-5b": AttnShape("cogvideox-5b", 1, 48, 17550 + 226, 17550 + 226, 64, (17550, 17550 + 226), "joint"),
    # AnimateDiff (SD1.5 UNet) spatial cross-attention, 16 frames batched, 64x64 latent, 77 CLIP tokens
    "animatediff-d40": AttnShape("animatediff-d40", 16, 8, 4096, 77, 40),
    "animatediff-d80": AttnShape("animatediff-d80", 16, 8, 1024, 77, 80),
    "animatediff-d160": AttnShape("animatediff-d160", 16, 8, 256, 77, 160),
}

# the three shapes the GPU self-check runs whole (correctness against the chunked reference, benchmarks)
SELFTEST_SHAPES: tuple[str, ...] = ("wan-1.3b", "ltx-video", "cogvideox-5b")

# tiny stand-ins with the same structure (joint attention included), for the interpreter run on CPU
TINY_SHAPES: dict[str, AttnShape] = {
    "wan-tiny": AttnShape("wan-tiny", 1, 2, 40, 24, 32),
    "ltx-tiny": AttnShape("ltx-tiny", 1, 3, 36, 16, 16),
    "cogvideox-tiny": AttnShape("cogvideox-tiny", 1, 2, 30 + 6, 30 + 6, 16, (30, 36), "joint"),
}

# model shapes with the query length cut so that a whole float64 reference fits a test
TEST_CUT_SHAPES: dict[str, AttnShape] = {
    "wan-1.3b": ATTN_SHAPES["wan-1.3b"].cut(N=1024),
    "ltx-video": ATTN_SHAPES["ltx-video"].cut(N=1024),
    "cogvideox-5b-joint": ATTN_SHAPES["cogvideox-5b"].cut(N=600, H=4, video_keys=600, name="cogvideox-5b-joint"),
    "animatediff-d40": ATTN_SHAPES["animatediff-d40"].cut(N=512, B=2),
    "animatediff-d160": ATTN_SHAPES["animatediff-d160"].cut(N=256, B=2),
}

# the two CPU shapes the foundation issue names
CPU_ATTN_SHAPES: dict[str, AttnShape] = {
    "cpu-d128-m512": AttnShape("cpu-d128-m512", 2, 12, 4096, 512, 128),
    "cpu-d40-m77": AttnShape("cpu-d40-m77", 2, 8, 4096, 77, 40),
}

# CFG branch predictions stacked as diffusers batches them: [K*B, C, F, H, W] video latents
LATENT_SHAPES: dict[str, tuple[int, ...]] = {
    "wan-81f-480p": (16, 21, 60, 104),
    "wan-49f-480x720": (16, 13, 60, 90),
}
