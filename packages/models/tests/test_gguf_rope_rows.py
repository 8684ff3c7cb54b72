"""The Llama model's GGUF loading undoes llama.cpp's q/k row permutation as transformers does."""

import gguf
import numpy as np

from tessera.formats import GGUFCheckpoint


def test_unpermuted_q_and_k_rows_equal_transformers_reverse_permutation(default_model_path):
    """llama.cpp permutes q/k rows for its rotary layout; we restore HF's order on load."""
    from tessera.models.llama import unpermute_rope_rows

    ck = GGUFCheckpoint(default_model_path)
    c = ck.config
    weights = dict(ck.weights())
    reader = gguf.GGUFReader(default_model_path)
    raw = {t.name: t for t in reader.tensors}

    def hf_reverse_permute(w: np.ndarray, n_head: int) -> np.ndarray:
        # transformers.integrations.ggml's reverse_permute_weights, written out
        dim = w.shape[0] // n_head // 2
        return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)

    for name, heads in [
        ("blk.3.attn_q.weight", c.num_attention_heads),
        ("blk.3.attn_k.weight", c.num_key_value_heads),
    ]:
        t = raw[name]
        expected = hf_reverse_permute(gguf.quants.dequantize(t.data, t.tensor_type), heads)
        ours = unpermute_rope_rows(weights[name], heads)
        np.testing.assert_array_equal(ours.dequantize().numpy(), expected)
