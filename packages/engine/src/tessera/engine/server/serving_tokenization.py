"""POST /tokenize and /detokenize (vLLM's extras): the server's tokenizer and chat template."""

from __future__ import annotations

from .errors import APIError
from .protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from .serving_chat import ServingChat


class ServingTokenization(ServingChat):
    async def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        self.check_model(req.model)
        if req.messages is not None:
            ids = await self.chat_ids(req.messages, req.add_generation_prompt)
        elif req.prompt is not None:
            try:
                ids = await self.llm.encode(req.prompt, add_special_tokens=req.add_special_tokens)
            except ValueError as e:
                raise APIError(400, str(e), param="prompt") from e
        else:
            raise APIError(400, "give prompt or messages", param="prompt")
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=self.llm.max_model_len)

    async def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        self.check_model(req.model)
        vocab = self.llm.vocab_size
        if len(req.tokens) > self.llm.max_model_len:
            raise APIError(
                400, f"tokens holds more than the context length of {self.llm.max_model_len}", param="tokens"
            )
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(
                400, f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="tokens"
            )
        return DetokenizeResponse(prompt=self.llm.decode(req.tokens, skip_special_tokens=False))
