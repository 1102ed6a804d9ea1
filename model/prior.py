"""The Fusion-Diff denoiser: a DiT over a vector, and its Control-Adapter.

Read top to bottom: embedders, the block, the prior (FusionDiffPrior), the adapter
(ControlAdapter). Section numbers refer to the Fusion-Diff paper (docs/method.md).

The vector z_n in R^d_VL is projected to a pseudo-spatial map C x H x W (4 x 32 x 32 in
the paper), cut into p x p patches (256 tokens), and run through L encoder and L decoder
blocks (14 + 14 for DiT-XL/2): AdaLN time modulation, self-attention, cross-attention to
the projected text tokens, FFN, each residual branch behind a zero-initialised gate
(section 7, eqs. 11-16). Each encoder output feeds the matching decoder block in reverse
order. The output is unpatchified and mapped back to R^d_VL, predicting the noise (the
paper's eq. 16) or, with prediction_type "sample", z_0 itself (DALL-E 2's prior).

The Control-Adapter (section 3.3, eq. 6) is a trainable copy of the encoder blocks fed
z_{r,Delta} through a zero-initialised linear (Z1); each control block's output enters
the backbone through a zero-initialised linear (Z2). With Z1 and Z2 at zero the adapter
changes nothing, bit for bit.
"""
from __future__ import annotations

import copy
import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from model.kinds import PREDICTION_TYPES


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_positions(num_tokens_side: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine positions of the patch grid (as DiT), shape (side*side, dim)."""
    def one_axis(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(
        np.arange(num_tokens_side, dtype=np.float64), np.arange(num_tokens_side, dtype=np.float64)
    )
    emb = np.concatenate([one_axis(dim // 2, grid[0]), one_axis(dim // 2, grid[1])], axis=1)
    return torch.from_numpy(emb).float()


class TimestepEmbedder(nn.Module):
    """Scalar timestep -> vector: sinusoidal frequencies, then an MLP (as DiT)."""

    def __init__(self, hidden_size: int, frequency_size: int):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class Attention(nn.Module):
    """Multi-head attention through scaled_dot_product_attention; `kv` None = self-attention."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(hidden_size, hidden_size)
        self.kv = nn.Linear(hidden_size, 2 * hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)

    def project_kv(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `kv` (B, K, hidden), each (B, heads, K, hidden / heads)."""
        b, n, d = kv.shape
        h = self.num_heads
        k, v = self.kv(kv).view(b, n, 2, h, d // h).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(
        self,
        x: torch.Tensor,
        kv: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        kv_proj: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """kv_proj: keys and values already projected from `kv` (project_kv), reused."""
        b, n, d = x.shape
        h = self.num_heads
        q = self.q(x).view(b, n, h, d // h).transpose(1, 2)
        k, v = kv_proj if kv_proj is not None else self.project_kv(x if kv is None else kv)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class FusionDiffBlock(nn.Module):
    """X' = X + g1 MHSA(AdaLN(X)); X'' = X' + g2 MHCA(AdaLN(X'), c); X''' = X'' + g3 FFN(AdaLN(X''))
    (eqs. 13-15). Shifts, scales and gates are regressed from the timestep embedding; the
    regressor starts at zero, so every gate starts at zero and the block at identity."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.self_attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.cross_attn = Attention(hidden_size, num_heads)
        self.norm3 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        hidden_mlp = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, hidden_mlp),
            nn.GELU(approximate="tanh"),
            nn.Linear(hidden_mlp, hidden_size),
        )
        self.ada_ln = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 9 * hidden_size))

    def forward(
        self,
        x: torch.Tensor,
        t_emb: torch.Tensor,
        cond: torch.Tensor,
        cond_mask: torch.Tensor,
        cond_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """cond_kv: the cross-attention's keys and values of `cond`, if already computed."""
        s1, c1, g1, s2, c2, g2, s3, c3, g3 = self.ada_ln(t_emb).chunk(9, dim=-1)
        x = x + g1.unsqueeze(1) * self.self_attn(modulate(self.norm1(x), s1, c1))
        x = x + g2.unsqueeze(1) * self.cross_attn(modulate(self.norm2(x), s2, c2), cond, cond_mask, cond_kv)
        return x + g3.unsqueeze(1) * self.mlp(modulate(self.norm3(x), s3, c3))


COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune-no-cudagraphs")


def compile_mode(name: str, key: str, allowed: tuple[str, ...] = COMPILE_MODES) -> str | None:
    """conf's compile setting -> torch.compile's `mode` (None = its default); refuses others."""
    if name not in allowed:
        raise ValueError(f"{key}={name!r}: expected one of {', '.join(allowed)}")
    return None if name == "default" else name


def compile_blocks(module: nn.Module, mode: str | None) -> nn.Module:
    """Compiles every FusionDiffBlock of `module` in place (regional compilation).

    The blocks are where the time goes and all share one code path, so one compiled
    graph serves all 28 (42 with the adapter) and compiling takes seconds, not the
    minutes of a whole-model graph; module wrappers around them (DDP, the adapter's
    row selection) stay eager and untouched. `mode` is torch.compile's.
    """
    for block in module.modules():
        if isinstance(block, FusionDiffBlock):
            block.compile(mode=mode)
    return module


class TextCondition(NamedTuple):
    """The text side of one batch, as the blocks consume it (FusionDiffPrior.text_condition).

    tokens, mask: the projected text tokens with the null token first, and their key mask.
    kv, adapter_kv: each cross-attention's keys and values of `tokens`, one pair per
        prior block (encoder then decoder) and per control block; None = projected in
        every forward. The text does not change over a sampling run's steps, so the
        sampler computes them once (conf sampling.cache_text).
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    kv: tuple | None = None
    adapter_kv: tuple | None = None


class FusionDiffPrior(ModelMixin, ConfigMixin):
    """epsilon_theta(z_n, n, c_T): the Stage 1 diffusion prior over fused embeddings.

    Args (all in conf `prior`, and saved in the checkpoint's config.json):
        d_vl: size of the fused embedding (1536 for GME-Qwen2-VL-2B).
        cond_dim: size of the text encoder's tokens (projected to hidden_size by an MLP).
        map_channels, map_size: the pseudo-spatial map C x H x W = map_channels x map_size^2.
        patch_size: p; tokens = (map_size / p)^2.
        hidden_size, num_heads, mlp_ratio: the transformer width (1152, 16, 4 for DiT-XL/2).
        num_encoder_blocks, num_decoder_blocks: L each (14 and 14); they must be equal,
            each encoder output feeding one decoder block.
        frequency_size: sinusoidal features of the timestep before its MLP.
        prediction_type: what the output is: "epsilon", the noise (eqs. 3 and 16), or
            "sample", z_0 (see conf/base.yaml `prior.prediction_type`). It is the
            network's meaning, so it lives in the checkpoint's config: the loss and the
            sampler read it from there, and a checkpoint is never sampled as the other.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        d_vl: int = 1536,
        cond_dim: int = 2048,
        map_channels: int = 4,
        map_size: int = 32,
        patch_size: int = 2,
        hidden_size: int = 1152,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_encoder_blocks: int = 14,
        num_decoder_blocks: int = 14,
        frequency_size: int = 256,
        prediction_type: str = "epsilon",
    ):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            expected = ", ".join(PREDICTION_TYPES)
            raise ValueError(f"prior.prediction_type={prediction_type!r}: expected one of {expected}")
        if num_encoder_blocks != num_decoder_blocks:
            raise ValueError(
                f"num_encoder_blocks ({num_encoder_blocks}) must equal num_decoder_blocks "
                f"({num_decoder_blocks}): each encoder output feeds one decoder block"
            )
        if map_size % patch_size or hidden_size % num_heads:
            raise ValueError(
                f"map_size ({map_size}) must divide by patch_size ({patch_size}) and "
                f"hidden_size ({hidden_size}) by num_heads ({num_heads})"
            )
        self.side = map_size // patch_size
        patch_dim = map_channels * patch_size * patch_size
        # P: R^d_VL -> C x H x W (eq. 10), then patches -> tokens (eq. 11).
        self.projector = nn.Linear(d_vl, map_channels * map_size * map_size)
        self.patch_embed = nn.Linear(patch_dim, hidden_size)
        # On the projector's device: built under `with torch.device(...)` the model is born there.
        self.register_buffer(
            "pos_embed",
            sincos_positions(self.side, hidden_size).unsqueeze(0).to(self.projector.weight.device),
            persistent=False,
        )
        self.t_embedder = TimestepEmbedder(hidden_size, frequency_size)
        # The text tokens' projection MLP (section 7, "Text Conditioning").
        self.cond_proj = nn.Sequential(
            nn.Linear(cond_dim, hidden_size), nn.GELU(approximate="tanh"), nn.Linear(hidden_size, hidden_size)
        )
        # The unconditional branch's condition (CFG's "none"): one learned token.
        self.null_cond = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.encoder_blocks = nn.ModuleList(
            FusionDiffBlock(hidden_size, num_heads, mlp_ratio) for _ in range(num_encoder_blocks)
        )
        self.decoder_blocks = nn.ModuleList(
            FusionDiffBlock(hidden_size, num_heads, mlp_ratio) for _ in range(num_decoder_blocks)
        )
        self.final_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.final_ada_ln = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.unpatch = nn.Linear(hidden_size, patch_dim)  # P^-1, eq. 16
        self.out = nn.Linear(map_channels * map_size * map_size, d_vl)  # Linear_out, eq. 16
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def xavier(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

        # Xavier for every linear (as DiT), then the exceptions below.
        self.apply(xavier)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.null_cond, std=0.02)
        # AdaLN regressors at zero: every gate starts closed, every block is the identity
        # at initialisation (DiT's adaLN-Zero; the paper's zero-initialised gating).
        for block in [*self.encoder_blocks, *self.decoder_blocks]:
            nn.init.zeros_(block.ada_ln[-1].weight)
            nn.init.zeros_(block.ada_ln[-1].bias)
        nn.init.zeros_(self.final_ada_ln[-1].weight)
        nn.init.zeros_(self.final_ada_ln[-1].bias)
        # Output layers at zero: the untrained model predicts zero noise (DiT's choice).
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    # -- pieces shared with the Control-Adapter --------------------------------------
    def tokens(self, z: torch.Tensor) -> torch.Tensor:
        """R^d_VL -> (B, tokens, hidden): project, patchify, embed, add positions."""
        c, p = self.config.map_channels, self.config.patch_size
        h = self.projector(z).view(-1, c, self.side, p, self.side, p)
        patches = h.permute(0, 2, 4, 1, 3, 5).reshape(-1, self.side * self.side, c * p * p)
        return self.patch_embed(patches) + self.pos_embed.to(patches.dtype)

    def condition(
        self, cond: torch.Tensor | None, cond_mask: torch.Tensor | None, batch: int, drop: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected text tokens and their key mask, with the null token prepended.

        The null token is always present and always attendable, so a row whose text is
        dropped (drop=True, or no text at all) attends to it alone, and no row ever has
        all its keys masked.
        """
        null = self.null_cond.expand(batch, 1, -1)
        if cond is None:
            return null, torch.ones(batch, 1, dtype=torch.bool, device=null.device)
        if cond.shape[-1] != self.config.cond_dim:
            raise ValueError(
                f"text condition has tokens of size {cond.shape[-1]}, "
                f"the prior expects cond_dim={self.config.cond_dim}"
            )
        tokens = self.cond_proj(cond.to(null.dtype))
        mask = (
            torch.ones(cond.shape[:2], dtype=torch.bool, device=cond.device)
            if cond_mask is None
            else cond_mask.bool()
        )
        if drop is not None:
            mask = mask & ~drop[:, None]
        ones = torch.ones(batch, 1, dtype=torch.bool, device=mask.device)
        return torch.cat([null, tokens], dim=1), torch.cat([ones, mask], dim=1)

    def text_condition(
        self,
        cond: torch.Tensor | None,
        cond_mask: torch.Tensor | None,
        batch: int,
        drop: torch.Tensor | None = None,
        adapter: "ControlAdapter | None" = None,
        cache_kv: bool = False,
    ) -> TextCondition:
        """`condition`, and with cache_kv every cross-attention's keys and values of it."""
        tokens, mask = self.condition(cond, cond_mask, batch, drop)
        if not cache_kv:
            return TextCondition(tokens, mask)
        kv = tuple(b.cross_attn.project_kv(tokens) for b in [*self.encoder_blocks, *self.decoder_blocks])
        adapter_kv = (
            None
            if adapter is None
            else tuple(b.cross_attn.project_kv(tokens) for b in adapter.control_blocks)
        )
        return TextCondition(tokens, mask, kv, adapter_kv)

    def forward(
        self,
        z_n: torch.Tensor,
        timesteps: torch.Tensor,
        cond: torch.Tensor | None = None,
        cond_mask: torch.Tensor | None = None,
        drop_cond: torch.Tensor | None = None,
        adapter: "ControlAdapter | None" = None,
        z_query: torch.Tensor | None = None,
        control_rows: torch.Tensor | int | None = None,
        control_scale: float = 1.0,
        text: TextCondition | None = None,
    ) -> torch.Tensor:
        """The prediction (B, d_VL): the noise, or z_0 (config.prediction_type).

        cond, cond_mask: text tokens (B, K, cond_dim) and their mask (True = real token).
        drop_cond: (B,) rows whose text is replaced by the null condition (CFG).
        adapter, z_query, control_rows, control_scale: Stage 2 (see ControlAdapter);
            control_rows selects the rows the adapter acts on (see ControlAdapter.forward);
            z_query holds either one row per batch row or one per selected row (the
            guided sampler passes the latter: the conditional half only).
        text: the text side computed beforehand (text_condition); cond, cond_mask and
            drop_cond are then not read.
        """
        if z_n.shape[-1] != self.config.d_vl:
            raise ValueError(f"z_n has size {z_n.shape[-1]}, the prior expects d_vl={self.config.d_vl}")
        b = z_n.shape[0]
        t_emb = self.t_embedder(timesteps.expand(b) if timesteps.dim() == 0 else timesteps)
        if text is None:
            text = self.text_condition(cond, cond_mask, b, drop_cond)
        c, c_mask = text.tokens, text.mask
        n_enc = len(self.encoder_blocks)
        kv = text.kv or (None,) * (n_enc + len(self.decoder_blocks))
        x = self.tokens(z_n)
        x0 = x
        skips = []
        for block, block_kv in zip(self.encoder_blocks, kv[:n_enc]):
            x = block(x, t_emb, c, c_mask, block_kv)
            skips.append(x)
        if adapter is not None:
            skips = adapter(
                self, x0, skips, t_emb, c, c_mask, z_query, control_rows, control_scale, text.adapter_kv
            )
        # Decoder: block j takes the running stream plus the j-th encoder output from the
        # end (eq. 6's y_c,L-j+1); the first decoder block starts from the last one.
        x = skips[-1]
        for j, (block, block_kv) in enumerate(zip(self.decoder_blocks, kv[n_enc:])):
            if j:
                x = x + skips[-1 - j]
            x = block(x, t_emb, c, c_mask, block_kv)
        shift, scale = self.final_ada_ln(t_emb).chunk(2, dim=-1)
        x = self.unpatch(modulate(self.final_norm(x), shift, scale))
        cm, s, p = self.config.map_channels, self.config.map_size, self.config.patch_size
        h = x.view(b, self.side, self.side, cm, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, cm * s * s)
        return self.out(h)


class ControlAdapter(ModelMixin, ConfigMixin):
    """Stage 2: steers the frozen prior with z_{r,Delta} (eq. 6).

    For encoder block l with input h_{l-1} and output F_l(h_{l-1}):
        control input   h_c,0 = h_0 + Z1(tokens(z_{r,Delta}))      (l = 1)
                        h_c,l-1 = y_c,l-1                            (l > 1)
        y_c,l = F_l(h_{l-1}) + Z2_l(Fc_l(h_c,l-1))
    and the decoder receives F_l(h_{l-1}) + delta * Z2_l(Fc_l(h_c,l-1)) where the bare
    prior receives F_l(h_{l-1}): delta (the control scale) scales the adapter's
    residual, so at delta = 1 the decoder gets y_c,l exactly, and with Z1 = Z2 = 0 the
    adapter changes nothing whatever delta is. z_{r,Delta} is tokenised by the prior's
    own frozen projector and patch embedding, then Z1 (a zero-initialised linear on
    each token) brings it in: a linear from R^d_VL to all tokens at once would cost
    d_VL x tokens x hidden parameters (453M at DiT-XL/2 size).
    """

    @register_to_config
    def __init__(
        self,
        hidden_size: int = 1152,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_blocks: int = 14,
        d_vl: int = 1536,
        prior_config: dict | None = None,
    ):
        super().__init__()
        self.control_blocks = nn.ModuleList(
            FusionDiffBlock(hidden_size, num_heads, mlp_ratio) for _ in range(num_blocks)
        )
        self.z1 = nn.Linear(hidden_size, hidden_size)
        self.z2 = nn.ModuleList(nn.Linear(hidden_size, hidden_size) for _ in range(num_blocks))
        for layer in [self.z1, *self.z2]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @classmethod
    def from_prior(cls, prior: FusionDiffPrior) -> "ControlAdapter":
        """A fresh adapter: control blocks copied from the prior's encoder blocks, Z1 = Z2 = 0."""
        cfg = prior.config
        adapter = cls(
            hidden_size=cfg.hidden_size,
            num_heads=cfg.num_heads,
            mlp_ratio=cfg.mlp_ratio,
            num_blocks=cfg.num_encoder_blocks,
            d_vl=cfg.d_vl,
            prior_config=dict(cfg),
        )
        for ctrl, enc in zip(adapter.control_blocks, prior.encoder_blocks):
            ctrl.load_state_dict(copy.deepcopy(enc.state_dict()))
        adapter.to(prior.device)
        if prior.dtype != adapter.dtype:
            adapter.to(prior.dtype)
        return adapter

    def check_compatible(self, prior: FusionDiffPrior) -> None:
        ours = {k: v for k, v in (self.config.prior_config or {}).items() if not k.startswith("_")}
        theirs = {k: v for k, v in dict(prior.config).items() if not k.startswith("_")}
        diff = {
            k: (ours.get(k), theirs.get(k)) for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k)
        }
        if diff:
            detail = ", ".join(f"{k}: adapter {a!r}, prior {b!r}" for k, (a, b) in sorted(diff.items()))
            raise ValueError(f"this Control-Adapter was built for another prior ({detail})")

    def forward(
        self,
        prior: FusionDiffPrior,
        x0: torch.Tensor,
        enc_outs: list[torch.Tensor],
        t_emb: torch.Tensor,
        c: torch.Tensor,
        c_mask: torch.Tensor,
        z_query: torch.Tensor | None,
        rows: torch.Tensor | int | None,
        control_scale: float,
        cond_kv: tuple | None = None,
    ) -> list[torch.Tensor]:
        """The decoder's skip inputs: the encoder outputs plus delta times the control residuals.

        Only `rows` run the control branch: None = all rows, a boolean mask (training,
        where dropped rows are scattered), or an int n = the first n rows (the guided
        sampler, whose conditional half comes first: slicing has a fixed shape, so it
        compiles and never waits on the GPU, where a mask needs `nonzero`). The rest
        (the unconditional half of guidance, where z_{r,Delta} is "none") get the
        encoder outputs untouched, and cost nothing. cond_kv: the control blocks' cross-
        attention keys and values of all rows (TextCondition.adapter_kv), or None.
        """
        if z_query is None:
            return enc_outs
        if isinstance(rows, torch.Tensor) and not bool(rows.any()):
            return enc_outs
        if z_query.shape[-1] != self.config.d_vl:
            raise ValueError(
                f"z_query has size {z_query.shape[-1]}, the adapter expects d_vl={self.config.d_vl}"
            )
        if rows is None:
            pick = lambda t: t
            merge = lambda full, part: full + part
        elif isinstance(rows, int):
            pick = lambda t: t[:rows]
            merge = lambda full, part: torch.cat([full[:rows] + part, full[rows:]])
        else:
            idx = rows.nonzero(as_tuple=True)[0]
            pick = lambda t: t.index_select(0, idx)
            merge = lambda full, part: full.index_add(0, idx, part)
        n = pick(x0).shape[0]
        zq = z_query if z_query.shape[0] == n else pick(z_query)
        t_c, c_c, m_c = pick(t_emb), pick(c), pick(c_mask)
        h = pick(x0) + self.z1(prior.tokens(zq))
        kvs = [
            None if cond_kv is None else (pick(cond_kv[l][0]), pick(cond_kv[l][1]))
            for l in range(len(self.z2))
        ]
        out = []
        for l, (block, z2) in enumerate(zip(self.control_blocks, self.z2)):
            residual = z2(block(h, t_c, c_c, m_c, kvs[l]))
            h = pick(enc_outs[l]) + residual  # y_c,l feeds the next control block (eq. 6)
            out.append(merge(enc_outs[l], control_scale * residual))
        return out
