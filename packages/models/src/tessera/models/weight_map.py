"""Checkpoint names -> the layer that loads each tensor. A model declares its parameters here
under their HF and GGUF names; loading checks every name and shape and reports what is missing,
for any architecture alike."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tessera.formats import FormatError

from .parallel import shape_of


@dataclass
class _Slot:
    key: str  # the parameter, whichever name supplied it
    shape: tuple[int, ...]
    load: Callable
    required: bool
    style: str  # "hf" | "gguf"
    covers: tuple[str, ...] = ()  # a fused tensor: the parameters (keys) it holds
    other_shapes: tuple[tuple[int, ...], ...] = ()  # further shapes a converter may write


class WeightMap:
    def __init__(self, architecture: str) -> None:
        self.architecture = architecture
        self._slots: dict[str, _Slot] = {}
        self._keys: dict[str, dict[str, str]] = {}  # key -> style -> name
        self._ignored: list[re.Pattern] = []
        self._fused_names: dict[tuple[str, str], str] = {}  # (key, style) -> fused tensor holding it

    def add(
        self,
        shape: tuple[int, ...],
        load: Callable,
        hf: str,
        gguf: str | None = None,
        *,
        gguf_load: Callable | None = None,
        required: bool = True,
    ) -> None:
        """A parameter of ``shape`` (``[out, in]`` as torch holds it) named ``hf`` in HF
        checkpoints and ``gguf`` in GGUF files; ``load(tensor)`` (``gguf_load`` for GGUF, where
        the converter changed the tensor) receives it."""
        names = {"hf": hf} | ({"gguf": gguf} if gguf else {})
        self._keys[hf] = names
        for style, name in names.items():
            fn = gguf_load if style == "gguf" and gguf_load is not None else load
            self._slots[name] = _Slot(hf, tuple(shape), fn, required, style)

    def add_linear(self, layer, hf: str, gguf: str | None, shard=None, gguf_load: Callable | None = None):
        """A linear layer's weight (and bias, if it has one) under ``<name>.weight`` / ``.bias``."""
        self.add(
            layer.weight_shape(shard),
            lambda t: layer.load_weight(t, shard),
            f"{hf}.weight",
            f"{gguf}.weight" if gguf else None,
            gguf_load=None if gguf_load is None else lambda t: layer.load_weight(gguf_load(t), shard),
        )
        if layer.has_bias:
            self.add(
                layer.bias_shape(shard),
                lambda t: layer.load_bias(t, shard),
                f"{hf}.bias",
                f"{gguf}.bias" if gguf else None,
                gguf_load=None if gguf_load is None else lambda t: layer.load_bias(gguf_load(t), shard),
            )

    def add_norm(self, norm, hf: str, gguf: str | None, gguf_load: Callable | None = None) -> None:
        self.add(
            norm.weight_shape(),
            norm.load_weight,
            f"{hf}.weight",
            f"{gguf}.weight" if gguf else None,
            gguf_load=gguf_load,
        )

    def add_fused(
        self,
        name: str,
        shape: tuple[int, ...],
        load: Callable,
        covers: list[str],
        style: str,
        other_shapes: tuple[tuple[int, ...], ...] = (),
    ) -> None:
        """A tensor that holds in one the parameters declared under the HF names ``covers``
        (a stack of experts: GGUF's ``ffn_*_exps``, transformers 5's ``experts.gate_up_proj``;
        or one parameter a converter reshaped, ``other_shapes``): loading it counts as loading
        them, and a ``style`` file that lacks them is told this name."""
        self._slots[name] = _Slot(
            name, tuple(shape), load, False, style, tuple(covers), tuple(map(tuple, other_shapes))
        )
        for key in covers:
            self._fused_names.setdefault((key, style), name)

    def shapes(self, style: str = "hf") -> dict[str, tuple[int, ...]]:
        """The required tensors' names (in ``style``: "hf" or "gguf") and shapes."""
        out = {}
        for key, names in self._keys.items():
            slot = self._slots[names["hf"]]
            if slot.required and style in names:
                out[names[style]] = slot.shape
            elif slot.required and (key, style) in self._fused_names:  # a GGUF expert stack
                name = self._fused_names[key, style]
                out[name] = self._slots[name].shape
        return out

    def ignore(self, pattern: str) -> None:
        """Tensors some checkpoints carry that the model recomputes or does not use."""
        self._ignored.append(re.compile(pattern))

    def load(self, weights: Iterable, progress: Callable[[int, int], None] | None = None) -> None:
        total = sum(1 for names in self._keys.values() if self._slots[names["hf"]].required)
        done: set[str] = set()
        styles: set[str] = set()
        for name, value in weights:
            slot = self._slots.get(name)
            if slot is None:
                if any(p.fullmatch(name) for p in self._ignored):
                    continue
                raise FormatError(f"unexpected tensor {name} for a {self.architecture} model")
            keys = slot.covers or (slot.key,)
            if any(k in done for k in keys):
                raise FormatError(f"tensor {name} appears twice")
            if shape_of(value) != slot.shape and shape_of(value) not in slot.other_shapes:
                got, want = list(shape_of(value)), list(slot.shape)
                raise FormatError(f"tensor {name} has shape {got}, expected {want} from the config")
            try:
                slot.load(value)
            except FormatError as e:  # a rank's part that can't be cut, a converter's quirk
                raise FormatError(f"tensor {name}: {e}") from None
            done.update(keys)
            styles.add(slot.style)
            if progress is not None:
                progress(len(done), total)
        style = "gguf" if styles == {"gguf"} else "hf"
        missing = [
            names.get(style) or self._fused_names.get((key, style)) or names["hf"]
            for key, names in self._keys.items()
            if key not in done and self._slots[names["hf"]].required
        ]
        missing = list(dict.fromkeys(missing))  # the experts of one fused tensor, named once
        if missing:
            raise FormatError(f"tensor {missing[0]} is missing ({len(missing)} missing)")
