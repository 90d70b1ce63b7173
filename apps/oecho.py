"""oecho: the simplest flow application, as Ouroboros's oecho.

`oecho -l` echoes one message per flow; `oecho` sends one and prints the reply.
"""

from __future__ import annotations

import sys

from apps.common import CParser, alloc_failed, fail, quiet_when_stdout_closes, serve
from flowlib import Flow, FlowError, flow_alloc
from proto import logs
from proto.version import add_version
from proto.visible import visible

GREETING = b"Client says hi!"


def text(sdu: bytes) -> str:
    """A message as C's oecho prints it (%.*s): up to the NUL its client ends the string with; its
    control characters as escapes (ours): the peer's words must not drive the terminal showing them."""
    return visible(sdu.split(b"\0", 1)[0].decode(errors="surrogateescape"))


def reply(_: Flow, sdu: bytes) -> bytes:
    print(f"Message from client is {text(sdu)}.", flush=True)
    return sdu


@quiet_when_stdout_closes
def main(argv: list[str] | None = None) -> None:
    p = CParser(prog="oecho", description="Send an echo between a server and a client.", usage_status=0)
    p.add_argument("-l", "--listen", action="store_true", help="run as the server")
    p.add_argument("-n", "--name", default="oecho", help="name of the server (default: oecho)")
    p.add_argument("-m", "--message", default=GREETING.decode(), help="what to send")
    logs.add_arguments(p)
    add_version(p)
    args = p.parse_args(argv)
    logs.setup("oecho", args, daemon=args.listen)
    if args.listen:
        serve(  # C's lines; as C's, one message a flow, then the flow is closed
            "oecho", reply, idle_timeout=10.0, greeting="Starting the server.", new_flow="New flow.", ends="after_reply"
        )
        return
    try:
        flow = flow_alloc(args.name, timeout=10.0)
    except FlowError as e:
        alloc_failed("oecho", e)
    try:
        with flow:
            flow.write(args.message.encode() + b"\0")  # a C string, NUL and all, as C's client sends it
            flow.set_timeout(5.0)
            print(f"Server replied with {text(flow.read())}")
    except FlowError as e:
        fail("oecho", e)
    sys.exit(0)
