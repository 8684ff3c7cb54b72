"""The architecture parameters a model needs, read from GGUF metadata or an HF config.json."""

from __future__ import annotations

from dataclasses import dataclass, field

from .exl2 import EXL2Config
from .gptq import GPTQConfig

# The architectures whose config tessera reads (our names: HF's model_type, "gemma3" for
# Gemma 3's text model); which of them have a model class is tessera.models' registry.
SUPPORTED_ARCHITECTURES = (
    "llama",
    "mistral",
    "qwen2",
    "gemma3",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "llava",
    "qwen2_vl",
)


@dataclass(frozen=True)
class VisionConfig:
    """A CLIP vision transformer: square images of ``image_size`` cut into ``patch_size`` patches."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class Qwen2VLVisionConfig:
    """Qwen2-VL's vision transformer (HF's field names): images of any size (multiples of
    ``patch_size * spatial_merge_size``) and videos cut into patches ``temporal_patch_size``
    frames deep; each ``spatial_merge_size``-square window of patches becomes one token of
    ``hidden_size`` (the language model's)."""

    depth: int
    embed_dim: int
    num_heads: int
    mlp_ratio: float
    hidden_size: int
    patch_size: int = 14
    temporal_patch_size: int = 2
    in_channels: int = 3
    spatial_merge_size: int = 2
    hidden_act: str = "quick_gelu"
    rope_theta: float = 10000.0  # of the 2-D rotary over patch rows and columns
    layer_norm_eps: float = 1e-6

    @property
    def patch_features(self) -> int:
        """Numbers per patch row of pixel_values: channels x frames x pixels."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)


@dataclass(frozen=True)
class MultiModalConfig:
    """What a vision-language model (LLaVA, Qwen2-VL) adds to its language model, whose
    parameters are the ModelConfig's own fields (Qwen2-VL's M-RoPE sections are in its
    ``rope_scaling``: ``{"rope_type": "mrope", "mrope_section": (t, h, w)}``)."""

    vision: VisionConfig | Qwen2VLVisionConfig
    text_architecture: str  # the language model's: llama | mistral | qwen2
    image_token_id: int
    video_token_id: int | None = None  # Qwen2-VL: a video's placeholder token
    vision_start_token_id: int | None = None  # Qwen2-VL: the token before each image or video
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    # the encoder's hidden states (0: the embeddings, -1: the last layer's output) whose
    # concatenation the projector takes
    vision_feature_layers: tuple[int, ...] = (-2,)
    vision_feature_select_strategy: str = "default"  # "default" drops the class token, "full" keeps it

    @property
    def tokens_per_image(self) -> int | None:
        """Placeholder tokens of every image; None where it depends on the image's size (Qwen2-VL)."""
        if isinstance(self.vision, Qwen2VLVisionConfig):
            return None
        return self.vision.num_patches + (self.vision_feature_select_strategy == "full")

    @property
    def spatial_merge_size(self) -> int:
        """Patches per side of the window that becomes one token (1: none merged)."""
        return getattr(self.vision, "spatial_merge_size", 1)


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # HF's rope_scaling dict ("rope_type": "llama3" | "linear" | "dynamic", "factor", ...; or
    # "mrope" with "mrope_section": (t, h, w), Qwen2-VL's 3-D positions)
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"
    # per layer "full_attention" | "sliding_attention" where layers differ (else all are full,
    # or all slide when sliding_window is set)
    layer_types: tuple[str, ...] | None = None
    hidden_act: str = "silu"  # the MLP's gate activation: silu | gelu_pytorch_tanh
    qk_norm: bool = False  # RMSNorm over each head of q and k before rotary (Gemma 3, Qwen3)
    query_pre_attn_scalar: float | None = None  # attention scale is this ** -0.5 (else head_dim)
    rope_local_theta: float | None = None  # rope base of sliding layers where it differs (Gemma 3)
    final_logit_softcapping: float | None = None  # logits = cap * tanh(logits / cap)
    # mixture of experts: num_experts == 0 is a dense model
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0  # per expert
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's always-on expert (0: none)
    norm_topk_prob: bool = True  # renormalise the chosen experts' weights to sum 1
    dense_layers: tuple[int, ...] = ()  # layers of a MoE model with an ordinary MLP
    # GPTQ / AWQ / EXL2 quantization_config of the checkpoint (None: its linears are plain weights)
    quantization: GPTQConfig | EXL2Config | None = None
    multimodal: MultiModalConfig | None = None  # a vision-language model's encoder and projector
    extra: dict = field(default_factory=dict)

    def layer_type(self, layer: int) -> str:
        if self.layer_types is not None:
            return self.layer_types[layer]
        return "sliding_attention" if self.sliding_window is not None else "full_attention"

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of ``layer`` in tokens, None for full attention."""
        return self.sliding_window if self.layer_type(layer) == "sliding_attention" else None

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim
