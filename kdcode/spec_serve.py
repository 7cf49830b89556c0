"""Specs of the commands that answer completions (`kdcode complete`, `kdcode serve`), beside :mod:`kdcode.spec`,
whose runtime fields they share. Imports neither torch nor any plugin."""

from __future__ import annotations

from pydantic import Field

from kdcode.spec import _FimPrompt, _RunsOn


class EngineSpec(_RunsOn, _FimPrompt):
    """A model loaded to answer completions (`kdcode complete`, `kdcode serve`)."""


class CompleteSpec(EngineSpec):
    """`kdcode complete`: one completion at a cursor."""

    line: int | None = Field(None, ge=1, description="cursor line, 1-based (default: the end of the text: it is all "
                             "prefix)")
    column: int | None = Field(None, ge=1, description="cursor column, 1-based characters (default: after the line's "
                               "indentation)")
    beams: int = Field(1, ge=1, description="1 = greedy; >1 = beam search")
    n: int = Field(1, ge=1, description="alternatives: the n best distinct beams (fewer if beams agree)")
    max_tokens: int = Field(48, ge=1, description="longest completion in tokens")
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy / beams; >0 samples")
    seed: int | None = Field(None, description="seed of the sampling")


class ServeSpec(EngineSpec):
    """`kdcode serve`: where it listens and what one request may ask of it."""

    host: str = Field("127.0.0.1", description="address to listen on (loopback: only this machine)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port")
    max_prompt_tokens: int | None = Field(None, ge=1, description="longest prompt accepted, in tokens (default: the "
                                          "model's context)")
    max_tokens_limit: int = Field(128, ge=1, description="largest max_tokens a request may ask for")
    body_timeout: float = Field(10.0, gt=0, description="seconds a client has to send a request's body (then 408 "
                                "and the connection closed)")
    max_context_chars: int = Field(65_536, ge=1, description="longest prefix and suffix (each, in characters) an "
                                   "infill request may send; the model sees a window of them around the cursor")
    max_queue: int = Field(16, ge=0, description="requests that may wait for the model behind the one it is working "
                           "on; one more is answered 503 with Retry-After")
    max_body_bytes: int = Field(2**20, ge=1, description="largest request body, in bytes")
