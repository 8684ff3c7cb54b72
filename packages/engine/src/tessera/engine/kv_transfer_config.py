"""``--kv-transfer-config``: an engine's role in disaggregated prefill/decode and its connector,
named as vLLM names them, checked at start before any weight is loaded."""

from __future__ import annotations

import json

import msgspec

ROLES = ("kv_producer", "kv_consumer", "kv_both")
CONNECTORS = ("TCPConnector",)


class KVTransferConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    kv_role: str  # kv_producer: computes prompts; kv_consumer: decodes them; kv_both: either
    kv_connector: str = "TCPConnector"
    kv_ip: str = "127.0.0.1"  # producer: the address its block server listens on and names in answers
    kv_port: int = 0  # producer: its port (0: any free one, named in each answer)
    kv_hold_timeout: float = 60.0  # producer: seconds a finished prompt's blocks wait for a consumer
    kv_transfer_timeout: float = 30.0  # consumer: seconds a pull may wait on the producer (connect, reads)

    def __post_init__(self) -> None:
        if self.kv_role not in ROLES:
            raise ValueError(
                f"kv_transfer_config.kv_role must be one of {', '.join(map(repr, ROLES))}, "
                f"got {self.kv_role!r}"
            )
        if self.kv_connector not in CONNECTORS:
            raise ValueError(
                f"kv_transfer_config.kv_connector {self.kv_connector!r} is not a connector this build has "
                f"(known: {', '.join(CONNECTORS)})"
            )
        if not 0 <= self.kv_port <= 65535:
            raise ValueError(
                f"kv_transfer_config.kv_port must be in 0..65535 (0: any free port), got {self.kv_port}"
            )
        for name in ("kv_hold_timeout", "kv_transfer_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(
                    f"kv_transfer_config.{name} must be a positive number of seconds, "
                    f"got {getattr(self, name)}"
                )

    @property
    def is_producer(self) -> bool:
        return self.kv_role in ("kv_producer", "kv_both")

    @property
    def is_consumer(self) -> bool:
        return self.kv_role in ("kv_consumer", "kv_both")

    @classmethod
    def parse(cls, value: str | dict | KVTransferConfig | None) -> KVTransferConfig | None:
        """From JSON text (the command line), a dict (``LLM(kv_transfer_config=...)``) or a config;
        None stays None (an ordinary engine)."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"kv_transfer_config is not valid JSON ({e}): {value!r}") from None
        if not isinstance(value, dict):
            raise ValueError(
                'kv_transfer_config must be a JSON object such as {"kv_role": "kv_producer", '
                f'"kv_connector": "TCPConnector"}}, got {value!r}'
            )
        try:
            return msgspec.convert(value, cls)
        except msgspec.ValidationError as e:
            text = str(e)
            if text.startswith("kv_transfer_config"):
                raise ValueError(text) from None
            if " - at `$." in text:
                what, where = text.rsplit(" - at `$.", 1)
                raise ValueError(f"kv_transfer_config.{where.rstrip('`')}: {what}") from None
            raise ValueError(f"kv_transfer_config: {text}") from None
