"""obc: messages to every member of a broadcast layer, as C Ouroboros 0.23's obc (over flow_join).

`obc -n LAYER -m TEXT` sends one message; `obc -l -n LAYER` prints every message; `obc -c -n LAYER`
(ours) is a chat: it prints what the others say and sends each line typed.
"""

from __future__ import annotations

import signal
import sys
import threading

from apps.common import CParser, ends_quietly, fail, handed_over
from flowlib import Flow, FlowError, flow_join
from proto.version import add_version
from proto.visible import visible

DEFAULT_MESSAGE = "Ouroboros multicast rocks!"
BUF_SIZE = 256  # what a reader takes of a message, as C's
LINGER = 2.0  # seconds a writer waits for the layer to take its message before it leaves
FAILED = 255  # C's status when it cannot join or write: its main returns -1


def join(layer: str) -> Flow:
    try:
        return flow_join(layer, timeout=10)
    except FlowError as e:
        fail("obc", e, "Failed to join broadcast.", FAILED)


def text_of(sdu: bytes) -> str:
    """As C prints it: up to its NUL (C's writer sends one), at most BUF_SIZE bytes; its control
    characters as escapes (ours): any member's words must not drive the terminal showing them."""
    return visible(sdu[:BUF_SIZE].split(b"\0", 1)[0].decode(errors="surrogateescape"))


def reader(flow: Flow) -> int:
    """Every message until the flow fails; then 0, as C's reader ends."""
    while True:
        try:
            sdu = flow.read()
        except FlowError:
            print("Failed to read.", flush=True)
            flow.close()
            return 0
        print(f"Message is {text_of(sdu)}.", flush=True)


def send(flow: Flow, message: str) -> bool:
    try:
        flow.write(message.encode() + b"\0")  # with the NUL, as C's strlen + 1
    except FlowError:
        print("Failed to write packet.", flush=True)
        return False
    return True


def chat(flow: Flow) -> int:
    threading.Thread(target=reader, args=(flow,), daemon=True).start()
    for line in sys.stdin:
        if line.strip() and not send(flow, line.rstrip("\n")):
            return 1
    handed_over(flow, LINGER)
    flow.close()
    return 0


@ends_quietly
def main(argv: list[str] | None = None) -> None:
    p = CParser(prog="obc", description="Sends a message to a broadcast network.", usage_status=0)
    p.add_argument("-n", "--name", help="name of the broadcast layer")
    p.add_argument("-m", "--message", default=DEFAULT_MESSAGE, help="a message to send")
    p.add_argument("-l", "--listen", action="store_true", help="listen mode")
    p.add_argument("-c", "--chat", action="store_true", help="chat: print the others, send each line typed (ours)")
    add_version(p)
    args = p.parse_args(argv)
    if args.name is None:
        print("Please specify a name.\n")
        p.exit_with_usage(1)
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
    if args.listen:
        print("Starting a reader.", flush=True)
        flow = join(args.name)
        print("New flow.", flush=True)
        sys.exit(reader(flow))
    flow = join(args.name)
    if args.chat:
        sys.exit(chat(flow))
    ok = send(flow, args.message)
    handed_over(flow, LINGER)
    flow.close()
    sys.exit(0 if ok else FAILED)
