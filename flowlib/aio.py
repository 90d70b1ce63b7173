"""An asyncio adapter for flows: await reads, writes, allocations and accepts.

Flows are file descriptors, so the loop waits on them directly; allocation
and accept, which wait on the IRMd, run in the loop's executor.
"""

from __future__ import annotations

import asyncio
import functools

from flowlib.flow import Flow
from flowlib.flow import flow_accept as _accept
from flowlib.flow import flow_alloc as _alloc
from proto.errors import FlowWouldBlock
from proto.qos import QosSpec


class AsyncFlow:
    """A flow whose read and write are coroutines; the wrapped flow is non-blocking."""

    def __init__(self, flow: Flow) -> None:
        self.flow = flow
        flow.set_blocking(False)

    async def read(self) -> bytes:
        while True:
            try:
                return self.flow.read()
            except FlowWouldBlock:
                await _ready(self.flow.fd, write=False)

    async def write(self, sdu: bytes) -> int:
        while True:
            try:
                return self.flow.write(sdu)
            except FlowWouldBlock:
                await _ready(self.flow.fd, write=True)

    def close(self) -> None:
        self.flow.close()

    async def __aenter__(self) -> AsyncFlow:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


async def _ready(fd: int, write: bool) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    add, remove = (loop.add_writer, loop.remove_writer) if write else (loop.add_reader, loop.remove_reader)

    def wake() -> None:
        if not fut.done():
            fut.set_result(None)

    add(fd, wake)
    try:
        await fut
    finally:
        remove(fd)


async def flow_alloc(
    name: str, qos: QosSpec | None = None, timeout: float | None = None, encrypt: bool = False
) -> AsyncFlow:
    alloc = functools.partial(_alloc, name, qos, timeout, encrypt=encrypt)
    return AsyncFlow(await asyncio.get_running_loop().run_in_executor(None, alloc))


async def flow_accept(qos: QosSpec | None = None, timeout: float | None = None) -> AsyncFlow:
    return AsyncFlow(await asyncio.get_running_loop().run_in_executor(None, _accept, qos, timeout))
