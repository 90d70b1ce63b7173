"""oecho: the simplest flow application, as Ouroboros's oecho.

`oecho -l` echoes one message per flow; `oecho` sends one and prints the reply.
"""

from __future__ import annotations

import sys

from apps.common import CParser, alloc_failed, ends_quietly, fail, serve
from flowlib import Flow, FlowError, flow_alloc
from proto import logs
from proto.version import add_version
from proto.visible import visible

GREETING = b"Client says hi!"
FAILED = 255  # C's status when its client fails: main returns -1


def text(sdu: bytes) -> str:
    """A message as C's oecho prints it (%.*s): up to the NUL its client ends the string with; its
    control characters as escapes (ours): the peer's words must not drive the terminal showing them."""
    return visible(sdu.split(b"\0", 1)[0].decode(errors="surrogateescape"))


def reply(_: Flow, sdu: bytes) -> bytes:
    print(f"Message from client is {text(sdu)}.", flush=True)
    return sdu


@ends_quietly
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
    with flow:
        try:
            flow.write(args.message.encode() + b"\0")  # a C string, NUL and all, as C's client sends it
        except FlowError as e:
            fail("oecho", e, "Failed to write packet.", FAILED)
        try:
            flow.set_timeout(5.0)
            sdu = flow.read()
        except FlowError as e:
            fail("oecho", e, "Failed to read packet.", FAILED)
    print(f"Server replied with {text(sdu)}")
    sys.exit(0)
