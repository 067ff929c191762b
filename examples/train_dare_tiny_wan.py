"""Train a tiny, randomly initialised Wan video transformer for a few steps with DARE switched on (CPU, nothing downloaded).

DARE parts exercised:
  * token semantic density fitted on the synthetic caption corpus with the model's own tokenizer
    (``dare_kernels.TokenDensity``) -> SRA token weights;
  * training-time dynamic suppression of low-density tokens (``TokenSuppressor``) and ordinary
    whole-prompt CFG dropout (``prompt_dropout``), drawn per global batch so data-parallel runs agree;
  * SRA-reweighted cross-attention on every ``attn2`` through the diffusers integration
    (``dare_kernels.integrations.diffusers.apply_dare``), capturing the head-averaged maps;
  * the SRA consistency loss over the maps of all layers (``sra_consistency_loss``) added to the
    rectified-flow diffusion loss; both are logged.

Run (single process):           python examples/train_dare_tiny_wan.py --steps 5
Two CPU processes with DDP:     python examples/train_dare_tiny_wan.py --steps 5 --spawn 2
or with torchrun:               torchrun --nproc_per_node 2 examples/train_dare_tiny_wan.py --steps 5
(see examples/README.md for NCCL on GPUs and FSDP2).

The text side is built locally: a word-level tokenizer trained with `tokenizers` on the synthetic
captions (wrapped as a transformers ``PreTrainedTokenizerFast`` for the Hugging Face interface) and
a tiny random transformer text encoder.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import dare_kernels
from dare_kernels import TokenDensity, TokenSuppressor, prompt_dropout, sra_consistency_loss
from dare_kernels.integrations.diffusers import DAREHandle, apply_dare
from dare_kernels.suppression import step_generator


@dataclass
class TinyConfig:
    seed: int = 0
    num_captions: int = 512
    max_length: int = 16          # M, text tokens (padded)
    text_dim: int = 32
    heads: int = 2
    head_dim: int = 16            # inner dim 32; Wan's 3-axis RoPE splits it 8/4/4
    layers: int = 2
    latent_channels: int = 4
    frames: int = 3
    height: int = 8
    width: int = 8                # N = 3 * 4 * 4 = 48 video tokens with patch (1, 2, 2)
    # DARE
    weight_floor: float = 0.1
    weight_kappa: float = 1.0
    sra_strength: float = 1.0
    tau: float = 0.5
    p_max: float = 0.3
    beta: float = 1.0
    warmup_steps: int = 4
    cfg_dropout: float = 0.1
    lambda_sra: float = 0.1
    lr: float = 1e-3


# ---------------------------------------------------------------------------------------------
# synthetic data and the local text side
# ---------------------------------------------------------------------------------------------

_ADJ = ["red", "small", "fluffy", "ancient", "shiny", "wooden", "giant", "curious", "neon", "frozen"]
_NOUN = ["cat", "dog", "robot", "castle", "boat", "dragon", "violin", "tree", "car", "owl"]
_VERB = ["walks", "flies", "spins", "sleeps", "glows", "dances", "floats", "runs"]
_PLACE = ["park", "ocean", "city", "forest", "desert", "kitchen", "moon", "street"]


def make_captions(n: int, seed: int = 0) -> list[str]:
    """n synthetic captions with a long-tailed vocabulary ('a', 'the', 'in', ',' are everywhere)."""
    g = torch.Generator().manual_seed(seed)

    def pick(words):
        # Zipf-like: the first words of each list are much more frequent
        probs = torch.tensor([1.0 / (i + 1) for i in range(len(words))])
        return words[int(torch.multinomial(probs, 1, generator=g))]

    caps = []
    for _ in range(n):
        cap = f"a {pick(_ADJ)} {pick(_NOUN)} {pick(_VERB)} in the {pick(_PLACE)}"
        if float(torch.rand(1, generator=g)) < 0.5:
            cap += f" , with a {pick(_ADJ)} {pick(_NOUN)}"
        caps.append(cap)
    return caps


def build_tokenizer(captions: list[str], max_length: int):
    """A word-level tokenizer trained locally on the captions (appends EOS), with the Hugging Face interface."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.train_from_iterator(captions, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[EOS]"]))
    # like umT5: every prompt ends with EOS, so the empty (null) prompt is [EOS, PAD, ...]
    raw.post_processor = processors.TemplateProcessing(single="$A [EOS]", special_tokens=[("[EOS]", raw.token_to_id("[EOS]"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]",
                                  model_max_length=max_length)
    return tok


def tokenize(tokenizer, captions: list[str], max_length: int):
    """ids int64 [B, M] and attention mask bool [B, M] (True = real token), padded / truncated to M."""
    enc = tokenizer(captions, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"].bool()


class TinyTextEncoder(nn.Module):
    """A random one-layer transformer standing in for umT5 (frozen during training, like Wan's)."""

    def __init__(self, vocab_size: int, dim: int, max_length: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.randn(1, max_length, dim) * 0.02)
        self.layer = nn.TransformerEncoderLayer(dim, nhead=2, dim_feedforward=2 * dim, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.layer(self.embed(ids) + self.pos[:, : ids.shape[1]], src_key_padding_mask=~mask)
        return self.norm(x) * mask.unsqueeze(-1)        # padded positions are 0, as Wan's pipeline does


def build_transformer(cfg: TinyConfig):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=cfg.heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.latent_channels, out_channels=cfg.latent_channels, text_dim=cfg.text_dim,
        freq_dim=32, ffn_dim=4 * cfg.heads * cfg.head_dim, num_layers=cfg.layers, rope_max_seq_len=64,
    )


# ---------------------------------------------------------------------------------------------
# components, batches, the training step
# ---------------------------------------------------------------------------------------------

@dataclass
class Components:
    cfg: TinyConfig
    captions: list
    tokenizer: object
    density: TokenDensity
    text_encoder: nn.Module
    transformer: nn.Module
    handle: DAREHandle               # apply_dare's handle: token weights in, per-layer maps out
    suppressor: TokenSuppressor
    null_embeds: torch.Tensor        # [M, C] text-encoder output of the empty prompt
    null_weight: torch.Tensor        # [M] SRA weights of the empty prompt


def build_components(cfg: TinyConfig) -> Components:
    """Everything a training run needs, deterministic in cfg.seed (every DDP rank builds the same)."""
    captions = make_captions(cfg.num_captions, cfg.seed)
    tok = build_tokenizer(captions, cfg.max_length)
    density = TokenDensity.fit(captions, tok, progress=False)
    torch.manual_seed(cfg.seed)
    text_encoder = TinyTextEncoder(len(tok), cfg.text_dim, cfg.max_length).eval().requires_grad_(False)
    transformer = build_transformer(cfg)
    # SRA on every text cross-attention (blocks[i].attn2), maps captured with their autograd graph
    handle = apply_dare(transformer, strength=cfg.sra_strength, capture_maps=True)
    suppressor = TokenSuppressor(density, tau=cfg.tau, p_max=cfg.p_max, beta=cfg.beta,
                                 warmup_steps=cfg.warmup_steps, seed=cfg.seed)
    null_ids, null_mask = tokenize(tok, [""], cfg.max_length)
    with torch.no_grad():
        null_embeds = text_encoder(null_ids, null_mask)[0]
    null_weight = density.weights(null_ids, cfg.weight_floor, cfg.weight_kappa, key_padding_mask=null_mask)[0]
    return Components(cfg, captions, tok, density, text_encoder, transformer, handle, suppressor, null_embeds,
                      null_weight)


@dataclass
class Batch:
    latents: torch.Tensor      # x0 [B, C, F, H, W]
    noise: torch.Tensor        # ε, same shape
    sigma: torch.Tensor        # [B] in (0, 1)
    input_ids: torch.Tensor    # [B, M]
    mask: torch.Tensor         # bool [B, M]


def make_batch(comp: Components, step: int, global_batch_size: int, batch_offset: int = 0,
               local_batch_size: int | None = None) -> Batch:
    """Rows batch_offset.. of the step's global batch: drawn for the whole global batch, then sliced."""
    cfg = comp.cfg
    B = global_batch_size if local_batch_size is None else local_batch_size
    g = step_generator(cfg.seed, step, stream=2)
    shape = (global_batch_size, cfg.latent_channels, cfg.frames, cfg.height, cfg.width)
    x0, eps = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    sigma = torch.sigmoid(torch.randn(global_batch_size, generator=g))        # logit-normal timesteps
    rows = slice(batch_offset, batch_offset + B)
    idx = [(step * global_batch_size + i) % len(comp.captions) for i in range(batch_offset, batch_offset + B)]
    ids, mask = tokenize(comp.tokenizer, [comp.captions[i] for i in idx], cfg.max_length)
    return Batch(x0[rows], eps[rows], sigma[rows], ids, mask)


def training_step(comp: Components, model: nn.Module, batch: Batch, step: int, global_batch_size: int,
                  batch_offset: int = 0) -> dict:
    """Forward + losses for one (local) batch.

    Returns {"loss" (differentiable), "diffusion", "consistency", "suppressed_tokens", "tokens", "dropped_prompts"}.

    ``model`` is ``comp.transformer`` or its DDP/FSDP wrapper. The randomness of suppression and
    dropout is drawn for the global batch and sliced, so sharded runs equal the single-process run.
    """
    cfg = comp.cfg
    with torch.no_grad():
        embeds = comp.text_encoder(batch.input_ids, batch.mask)
    weights = comp.density.weights(batch.input_ids, cfg.weight_floor, cfg.weight_kappa, key_padding_mask=batch.mask)
    sup = comp.suppressor(batch.input_ids, step, embeds=embeds, token_weight=weights, null_embeds=comp.null_embeds,
                          key_padding_mask=batch.mask, global_batch_size=global_batch_size, batch_offset=batch_offset)
    embeds, weights, dropped = prompt_dropout(sup.embeds, cfg.cfg_dropout, null_embeds=comp.null_embeds,
                                              token_weight=sup.token_weight, null_token_weight=comp.null_weight,
                                              step=step, seed=cfg.seed, global_batch_size=global_batch_size,
                                              batch_offset=batch_offset)
    # rectified flow (Wan): x_t = (1 − σ) x0 + σ ε, the model predicts ε − x0 at timestep 1000 σ
    s = batch.sigma.view(-1, 1, 1, 1, 1)
    x_t = (1 - s) * batch.latents + s * batch.noise
    comp.handle.set_token_weights(weights)          # [B, M]: one row per sample (all in the "cond" branch)
    pred = model(x_t, batch.sigma * 1000, encoder_hidden_states=embeds, return_dict=False)[0]
    diffusion = F.mse_loss(pred, batch.noise - batch.latents)
    # a dropped prompt is the null prompt: its SRA weights are the null prompt's (all padding but EOS here)
    kpm = torch.where(dropped.view(-1, 1), comp.null_weight.view(1, -1) > 0, batch.mask)
    consistency = sra_consistency_loss(list(comp.handle.maps.values()), weights, kpm)  # one [B, N, M] per layer
    loss = diffusion + cfg.lambda_sra * consistency
    return {"loss": loss, "diffusion": diffusion.detach(), "consistency": consistency.detach(),
            "suppressed_tokens": sup.mask.sum(), "tokens": batch.mask.sum(), "dropped_prompts": dropped.sum()}


# ---------------------------------------------------------------------------------------------
# running it
# ---------------------------------------------------------------------------------------------

def _dist_info():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class FSDPRoot(nn.Module):
    """The root FSDP2 unit around the transformer (its blocks are units of their own).

    diffusers' Wan forward returns its prediction as a view (of the un-patchify reshape), and FSDP2 warns
    about every view a sharded module returns (an in-place op on it would skip the pre-backward hook): the
    root returns a fresh tensor instead, a latent-sized copy, so the run prints no warning.
    """

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, *args, **kwargs):
        out = self.transformer(*args, **kwargs)
        return tuple(o.clone() for o in out) if isinstance(out, tuple) else type(out)(sample=out.sample.clone())


def train(cfg: TinyConfig, steps: int, global_batch_size: int, log=print, fsdp2: bool = False) -> list[dict]:
    """Train for ``steps`` steps; under torch.distributed (initialised by the caller) the model is wrapped
    in DDP, or sharded with FSDP2 (``fully_shard`` per block, then the whole model) when ``fsdp2``."""
    rank, world = _dist_info()
    if global_batch_size % world:
        raise ValueError(f"global batch {global_batch_size} must be divisible by the world size {world}")
    local = global_batch_size // world
    comp = build_components(cfg)
    model = comp.transformer
    if world > 1 and fsdp2:
        from torch.distributed.fsdp import fully_shard
        for block in comp.transformer.blocks:
            fully_shard(block)
        model = FSDPRoot(comp.transformer)
        fully_shard(model)
    elif world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model)
    opt = torch.optim.AdamW(comp.transformer.parameters(), lr=cfg.lr)
    history = []
    for step in range(steps):
        t0 = time.perf_counter()
        batch = make_batch(comp, step, global_batch_size, rank * local, local)
        out = training_step(comp, model, batch, step, global_batch_size, rank * local)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        keys = ["loss", "diffusion", "consistency", "suppressed_tokens", "tokens", "dropped_prompts"]
        t = torch.tensor([float(out[k].detach()) for k in keys], dtype=torch.float64)
        if world > 1:   # losses averaged over ranks (DDP already averaged the gradients), counts summed
            import torch.distributed as dist
            dist.all_reduce(t)
            t[:3] /= world
        rec = dict(zip(keys, t.tolist()))
        rec["suppressed"] = rec["suppressed_tokens"] / max(rec["tokens"], 1.0)
        rec["step"], rec["p_max"], rec["seconds"] = step, comp.suppressor.p_max_at(step), time.perf_counter() - t0
        history.append(rec)
        if rank == 0:
            log(f"step {step:3d}  loss {rec['loss']:.5f}  diffusion {rec['diffusion']:.5f}  "
                f"sra_consistency {rec['consistency']:.5f}  suppressed {rec['suppressed']:.3f}  "
                f"p_max {rec['p_max']:.3f}  ({rec['seconds']:.2f} s)")
    return history


def ddp_step_worker(rank: int, world: int, init_file: str, out_dir: str, cfg_dict: dict, step: int, gbs: int):
    """One DDP (gloo) training step on this rank's shard of the global batch; saves losses and the
    all-reduced gradients to ``out_dir/rank{rank}.pt`` (used by tests/test_ddp.py)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        comp = build_components(TinyConfig(**cfg_dict))
        model = DDP(comp.transformer)
        local = gbs // world
        batch = make_batch(comp, step, gbs, rank * local, local)
        out = training_step(comp, model, batch, step, gbs, rank * local)
        out["loss"].backward()
        torch.save({"out": {k: v.detach() for k, v in out.items()},
                    "grads": {n: p.grad for n, p in comp.transformer.named_parameters()}},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn_worker(rank: int, world: int, init_file: str, cfg_dict: dict, steps: int, gbs: int, fsdp2: bool):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        train(TinyConfig(**cfg_dict), steps, gbs, fsdp2=fsdp2)
    finally:
        dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=4, help="global batch size")
    p.add_argument("--lambda-sra", type=float, default=TinyConfig.lambda_sra)
    p.add_argument("--p-max", type=float, default=TinyConfig.p_max)
    p.add_argument("--tau", type=float, default=TinyConfig.tau)
    p.add_argument("--spawn", type=int, default=0, help="run N CPU processes with DDP (gloo) via torch.multiprocessing")
    p.add_argument("--fsdp2", action="store_true", help="with several processes: shard with FSDP2 instead of DDP")
    args = p.parse_args(argv)
    cfg = TinyConfig(lambda_sra=args.lambda_sra, p_max=args.p_max, tau=args.tau)
    print(f"dare_kernels {dare_kernels.__version__}; sra backend for CPU float32: "
          f"{'C++ kernels' if dare_kernels.info()['backends']['cpu'][0] else 'reference'}")
    if args.spawn > 1:
        import tempfile
        import torch.multiprocessing as mp
        with tempfile.TemporaryDirectory() as d:
            mp.spawn(_spawn_worker, args=(args.spawn, os.path.join(d, "init"), asdict(cfg), args.steps, args.batch_size,
                                           args.fsdp2),
                     nprocs=args.spawn, join=True)
        return
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:      # torchrun
        import torch.distributed as dist
        dist.init_process_group("gloo")
        try:
            train(cfg, args.steps, args.batch_size, fsdp2=args.fsdp2)
        finally:
            dist.destroy_process_group()
        return
    hist = train(cfg, args.steps, args.batch_size)
    if not all(math.isfinite(h["loss"]) for h in hist):
        sys.exit("non-finite loss")


if __name__ == "__main__":
    main()
