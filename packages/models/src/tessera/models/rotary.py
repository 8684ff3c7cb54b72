"""Rotary position embeddings: inverse frequencies for the default, linear, llama3 and dynamic
(NTK) scalings, and per-token cos/sin; Qwen2-VL's multimodal RoPE (M-RoPE) from three position
rows."""

from __future__ import annotations

import math

import torch

from tessera.formats import ModelConfig


def base_inv_freq(base: float, dim: int, device=None) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1's frequency-dependent scaling: low frequencies divided by ``factor``, high ones
    kept, the band between interpolated."""
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding:
    """cos/sin ``[T, D/2]`` for each token from its position (and, for dynamic NTK, the length of
    its sequence).

    With M-RoPE (``rope_type`` "mrope", ``mrope_section`` [t, h, w] summing to D/2) positions may
    be ``[3, T]`` (temporal, height, width): the first t frequencies turn with row 0, the next h
    with row 1, the last w with row 2 (transformers' ``apply_multimodal_rotary_pos_emb``).
    ``[T]`` positions are all three rows equal, which is plain RoPE."""

    def __init__(self, config: ModelConfig, device: torch.device) -> None:
        self.dim = config.head_dim
        self.base = config.rope_theta
        self.scaling = config.rope_scaling or {}
        self.kind = self.scaling.get("rope_type", "default")
        self.max_positions = config.max_position_embeddings
        self.device = device
        self.freq_factors: torch.Tensor | None = None  # GGUF rope_freqs (llama3 baked in)
        # M-RoPE: for each of the D/2 frequencies, the position row (0 t, 1 h, 2 w) it turns with
        self.mrope_rows: torch.Tensor | None = None
        if self.kind == "mrope":
            section = self.scaling["mrope_section"]
            rows = torch.repeat_interleave(torch.arange(3), torch.tensor(section))
            if rows.numel() != self.dim // 2:
                raise ValueError(
                    f"mrope_section {list(section)} does not sum to head_dim / 2 = {self.dim // 2}"
                )
            self.mrope_rows = rows.to(device)
        self._build()

    def _build(self) -> None:
        inv = base_inv_freq(self.base, self.dim, self.device)
        if self.kind == "linear":
            inv = inv / self.scaling["factor"]
        elif self.kind == "llama3":
            inv = llama3_inv_freq(inv, self.scaling)
        if self.freq_factors is not None:
            inv = inv / self.freq_factors.to(inv)
        self.inv_freq = inv

    def set_freq_factors(self, factors: torch.Tensor) -> None:
        self.freq_factors = factors.float().to(self.device)
        self._build()

    def _dynamic_inv_freq(self, seq_len: torch.Tensor) -> torch.Tensor:
        """NTK-aware base per token, as HF computes it for a sequence of ``seq_len`` tokens."""
        factor = self.scaling["factor"]
        seq = torch.clamp(seq_len.double(), min=self.max_positions)
        base = self.base * ((factor * seq / self.max_positions) - (factor - 1)) ** (self.dim / (self.dim - 2))
        exponents = torch.arange(0, self.dim, 2, dtype=torch.int64, device=self.device).float() / self.dim
        return 1.0 / (base.float()[:, None] ** exponents[None, :])

    def cos_sin(
        self, positions: torch.Tensor, token_seq_lens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.dim() == 2:
            return self._mrope_cos_sin(positions)
        pos = positions.float()
        if (
            self.kind == "dynamic"
            and token_seq_lens is not None
            and bool((token_seq_lens > self.max_positions).any())
        ):
            freqs = pos[:, None] * self._dynamic_inv_freq(token_seq_lens)
        else:
            freqs = pos[:, None] * self.inv_freq[None, :]
        return freqs.cos(), freqs.sin()

    def _mrope_cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mrope_rows is None or positions.shape[0] != 3:
            raise ValueError(
                f"positions of shape {list(positions.shape)}: only an M-RoPE model takes [3, T] positions"
            )
        freqs = positions.float()[:, :, None] * self.inv_freq  # [3, T, D/2]
        rows = self.mrope_rows.view(1, 1, -1).expand(1, positions.shape[1], -1)
        freqs = freqs.gather(0, rows)[0]
        return freqs.cos(), freqs.sin()
