"""A text tokenizer built on HF ``tokenizers``, from an HF ``tokenizer.json`` or a GGUF vocab
(byte-level BPE here, Gemma's SentencePiece in ``gguf_sentencepiece``)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from .chat_template import render_chat_template
from .config_values import read_bool, read_int, shown
from .errors import FormatError
from .gguf_sentencepiece import GEMMA_ARCHITECTURES, gemma_tokenizer
from .json_file import read_json_object

# GGUF tokenizer.ggml.pre -> pre-tokenizer. The regexes are the ones llama.cpp uses for each type
# (the same as the original HF tokenizers').
_GPT2_PRE = ("gpt2", "default", "starcoder", "refact", "codeshell", "phi-2", "olmo", "jais")
_LLAMA3_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SUPPORTED_GGUF_PRE = (*_GPT2_PRE, "smollm", "llama-bpe", "llama3", "qwen2")

# GGUF token types (llama.cpp's llama_token_type)
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4


def _gguf_pre_tokenizer(pre: str, source: str):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in _GPT2_PRE:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        # llama.cpp splits every digit apart first, then applies the GPT-2 regex
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in ("llama-bpe", "llama3"):
        regex = _LLAMA3_RE
    elif pre == "qwen2":
        regex = _QWEN2_RE
    else:
        raise FormatError(
            f"{source}: tokenizer pre-tokenizer type {pre!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_GGUF_PRE)})"
        )
    split = pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False)
    return pre_tokenizers.Sequence([split, byte_level])


def _gguf_list(meta: dict, key: str, kind: type, source: str, required: bool = False) -> list:
    """A GGUF metadata array whose items are all ``kind``; absent is ``[]`` unless ``required``."""
    value = meta.get(key)
    if value is None:
        if required:
            raise FormatError(f"{source}: metadata key {key} is missing")
        return []
    if not isinstance(value, list) or (required and not value):
        raise FormatError(f"{source}: {key} is {shown(value)}, expected a list")
    bad = next((v for v in value if not isinstance(v, kind) or isinstance(v, bool)), None)
    if bad is not None:
        raise FormatError(f"{source}: {key} holds {shown(bad)}, expected only {kind.__name__} items")
    return value


def _byte_level_bpe(meta: dict, tokens: list[str], types: list[int], source: str) -> HFTokenizer:
    """GPT-2 style BPE over bytes spelled as characters, with the merges the file lists."""
    merges = [tuple(m.split(" ", 1)) for m in _gguf_list(meta, "tokenizer.ggml.merges", str, source)]
    if any(len(m) != 2 for m in merges):
        bad = next(" ".join(m) for m in merges if len(m) != 2)
        raise FormatError(f"{source}: tokenizer.ggml.merges holds {shown(bad)}, not two tokens")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if not isinstance(pre, str):
        raise FormatError(f"{source}: tokenizer.ggml.pre is {shown(pre)}, not a string")
    vocab = {t: i for i, t in enumerate(tokens)}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    hf.pre_tokenizer = _gguf_pre_tokenizer(pre, source)
    hf.decoder = decoders.ByteLevel()
    added = [
        AddedToken(tokens[i], special=types[i] == _TOKEN_CONTROL, normalized=False)
        for i in range(len(tokens))
        if types[i] in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)
    ]
    hf.add_tokens(added)
    return hf


class Tokenizer:
    """Encode, decode, and apply the chat template of one model."""

    def __init__(
        self,
        hf: HFTokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: tuple[int, ...],
        chat_template: str | None,
        source: str,
    ) -> None:
        self.hf = hf
        self.bos_token_id = bos_token_id
        self.eos_token_ids = eos_token_ids
        self.chat_template = chat_template
        self.source = source
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        self.special_token_ids = frozenset(i for i, t in hf.get_added_tokens_decoder().items() if t.special)

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def token_text(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.hf.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **context) -> str:
        if self.chat_template is None:
            raise FormatError(f"{self.source}: the model has no chat template")
        return render_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.token_text(self.bos_token_id) or "",
            eos_token=self.token_text(self.eos_token_id) or "",
            **context,
        )

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **context) -> list[int]:
        """Token ids of ``messages`` through the chat template (which places any special tokens)."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **context)
        return self.encode(text, add_special_tokens=False)

    # -- constructors -------------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, meta: dict, source: str) -> Tokenizer:
        kind = meta.get("tokenizer.ggml.model")
        arch = meta.get("general.architecture")
        sentencepiece = kind == "llama" and arch in GEMMA_ARCHITECTURES
        if kind != "gpt2" and not sentencepiece:
            raise FormatError(
                f"{source}: tokenizer model {shown(kind)} of architecture {shown(arch)} is not supported "
                f"(supported: 'gpt2' BPE; 'llama' SentencePiece for {', '.join(GEMMA_ARCHITECTURES)})"
            )
        tokens = _gguf_list(meta, "tokenizer.ggml.tokens", str, source, required=True)
        types = _gguf_list(meta, "tokenizer.ggml.token_type", int, source) or [1] * len(tokens)
        if len(types) != len(tokens):
            raise FormatError(
                f"{source}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens"
            )
        template = meta.get("tokenizer.chat_template")
        if template is not None and not isinstance(template, str):
            raise FormatError(f"{source}: tokenizer.chat_template is {shown(template)}, not a string")

        def token_id(key: str) -> int | None:
            value = meta.get(key)
            if value is None:
                return None
            return read_int(value, key, source, minimum=0, maximum=len(tokens) - 1)

        bos = token_id("tokenizer.ggml.bos_token_id")
        eos = [token_id(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")]
        add_bos = read_bool(meta.get("tokenizer.ggml.add_bos_token"), "tokenizer.ggml.add_bos_token", source)
        if sentencepiece:
            unk = token_id("tokenizer.ggml.unknown_token_id")
            hf = gemma_tokenizer(tokens, types, None if unk is None else tokens[unk])
            # a Gemma chat turn ends with <end_of_turn>, which the file does not mark as EOS or EOT:
            # HF's generation_config lists it beside <eos>, and llama.cpp stops on it by its text
            if "<end_of_turn>" in tokens:
                eos.append(tokens.index("<end_of_turn>"))
        else:
            hf = _byte_level_bpe(meta, tokens, types, source)
        if add_bos and bos is not None:
            b = tokens[bos]
            hf.post_processor = processors.TemplateProcessing(
                single=f"{b} $A", pair=f"{b} $A {b}:1 $B:1", special_tokens=[(b, bos)]
            )
        return cls(
            hf,
            bos_token_id=bos,
            eos_token_ids=tuple(dict.fromkeys(i for i in eos if i is not None)),
            chat_template=template,
            source=source,
        )

    @classmethod
    def from_hf_folder(cls, folder: Path, eos_token_ids: tuple[int, ...] = ()) -> Tokenizer:
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FormatError(f"{folder}: no tokenizer.json")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on a bad file
            raise FormatError(f"{path}: not a readable tokenizer ({e})") from e
        cfg_path = folder / "tokenizer_config.json"
        cfg = read_json_object(cfg_path) if cfg_path.is_file() else {}

        def token_id(entry) -> int | None:
            if isinstance(entry, dict):
                entry = entry.get("content")
            return hf.token_to_id(entry) if isinstance(entry, str) else None

        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next(
                (t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                None,
            )
        if template is not None and not isinstance(template, str):
            raise FormatError(f"{cfg_path}: chat_template is {shown(template)}, not a string")
        jinja = folder / "chat_template.jinja"
        if template is None and jinja.is_file():
            try:
                template = jinja.read_bytes().decode("utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise FormatError(f"{jinja}: not a readable UTF-8 text file ({e})") from e
        eos = token_id(cfg.get("eos_token"))
        eos_ids = tuple(dict.fromkeys([*eos_token_ids, *([eos] if eos is not None else [])]))
        return cls(
            hf,
            bos_token_id=token_id(cfg.get("bos_token")),
            eos_token_ids=eos_ids,
            chat_template=template,
            source=str(folder),
        )
