"""Images and video frames for vision-language models: loading under a media policy, processors
equal to transformers' (LLaVA-1.5's CLIP, Qwen2-VL's dynamic resolution), placeholder expansion,
M-RoPE positions, and an encoder cache keyed by content hash."""

from .clip_processor import ClipImageProcessor
from .content_hash import ContentHash, content_hash
from .encoder_cache import EncoderCache, EncoderCacheStats
from .errors import MediaError
from .image_decode import DEFAULT_MAX_PIXELS, SUPPORTED_FORMATS, check_image, decode_image
from .image_source import ImageSource, decode_data_url, load_image, media_bytes, read_local_media
from .media_fetch import DEFAULT_MAX_BYTES, DEFAULT_TIMEOUT_S, check_url_host, fetch_url
from .mrope import mrope_positions
from .pixel_ops import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PixelNormalization
from .placeholders import PlaceholderRange, expand_placeholders
from .prefix_keys import block_extra_keys
from .processed import ProcessedImage, batch_grid_thw, batch_pixel_values
from .qwen2_vl_processor import Qwen2VLImageProcessor, patchify, smart_resize
from .video_decode import decode_video, load_video
from .video_frames import load_video_frames, sample_frame_indices, sample_frames

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_TIMEOUT_S",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "SUPPORTED_FORMATS",
    "ClipImageProcessor",
    "ContentHash",
    "EncoderCache",
    "EncoderCacheStats",
    "ImageSource",
    "MediaError",
    "PixelNormalization",
    "PlaceholderRange",
    "ProcessedImage",
    "Qwen2VLImageProcessor",
    "batch_grid_thw",
    "batch_pixel_values",
    "block_extra_keys",
    "check_image",
    "check_url_host",
    "content_hash",
    "decode_data_url",
    "decode_image",
    "decode_video",
    "expand_placeholders",
    "fetch_url",
    "load_image",
    "load_video",
    "load_video_frames",
    "media_bytes",
    "mrope_positions",
    "patchify",
    "read_local_media",
    "sample_frame_indices",
    "sample_frames",
    "smart_resize",
]
