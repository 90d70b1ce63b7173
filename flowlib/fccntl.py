"""fccntl's commands and flags, named and valued as C Ouroboros 0.23's fccntl.h, for `Flow.fccntl`.

The Fccntl members without the FLOW prefix (Fccntl.SRCVTIMEO) are the older Python names, kept;
GMTU and the socket buffer sizes are ours, valued past C's.
"""

from __future__ import annotations

import enum

# Flow flags (FLOWSFLAGS / FLOWGFLAGS).
FLOWFRDONLY = 0o0  # read-only flow
FLOWFWRONLY = 0o1  # write-only flow
FLOWFRDWR = 0o2  # read-write flow
FLOWFACCMODE = 0o3  # the access mode bits
FLOWFDOWN = 0o4  # the flow is down: reads and writes fail; FLOW_DOWN, then FLOW_UP when cleared
FLOWFRNOBLOCK = 0o1000  # non-blocking reads
FLOWFWNOBLOCK = 0o2000  # non-blocking writes
FLOWFNONBLOCK = FLOWFRNOBLOCK | FLOWFWNOBLOCK
FLOWFRNOPART = 0o10000  # no partial reads: an SDU longer than the read asks fails (and is dropped)
FLOWFWNOPART = 0o20000  # no partial writes: an SDU longer than the MTU fails
FLOWFDEFAULT = FLOWFRDWR | FLOWFWNOPART
FLOWFINVALID = FLOWFWRONLY | FLOWFRDWR  # an access mode that is none
FLOWFRNONBLOCK = FLOWFRDWR | FLOWFNONBLOCK  # the older Python name: non-blocking reads and writes

# FRCT flags (FRCTSFLAGS / FRCTGFLAGS).
FRCTFRTX = 0o1  # retransmission (qos loss 0): fixed by the QoS, not by fccntl
FRCTFRESCNTL = 0o2  # the sender keeps to the receiver's window
FRCTFLINGER = 0o4  # closing waits until what was sent is acknowledged


class Fccntl(enum.IntEnum):
    """fccntl commands."""

    SRCVTIMEO = 0o1  # read timeout in seconds, None: none (the default)
    GRCVTIMEO = 0o2
    SSNDTIMEO = 0o3  # write timeout
    GSNDTIMEO = 0o4
    GQOSSPEC = 0o5
    SFLAGS = 0o6  # the FLOWF flags, all of them
    GFLAGS = 0o7
    GRXQLEN = 0o10  # SDUs waiting to be read
    GTXQLEN = 0o11  # SDUs written and not yet taken by the layer (or unacknowledged, with FRCT)
    FRCTSFLAGS = 0o1000
    FRCTGFLAGS = 0o2000
    GMTU = 0o100  # ours from here on
    SRCVBUF = 0o101  # the kernel's SO_RCVBUF of the flow's socket
    GRCVBUF = 0o102
    SSNDBUF = 0o103  # SO_SNDBUF
    GSNDBUF = 0o104
    FRCTSRCVBUF = 0o105  # bytes FRCT holds for the application (its receive window; one whole SDU at least)
    FRCTGRCVBUF = 0o106


FLOWSRCVTIMEO = Fccntl.SRCVTIMEO
FLOWGRCVTIMEO = Fccntl.GRCVTIMEO
FLOWSSNDTIMEO = Fccntl.SSNDTIMEO
FLOWGSNDTIMEO = Fccntl.GSNDTIMEO
FLOWGQOSSPEC = Fccntl.GQOSSPEC
FLOWSFLAGS = Fccntl.SFLAGS
FLOWGFLAGS = Fccntl.GFLAGS
FLOWGRXQLEN = Fccntl.GRXQLEN
FLOWGTXQLEN = Fccntl.GTXQLEN
FRCTSFLAGS = Fccntl.FRCTSFLAGS
FRCTGFLAGS = Fccntl.FRCTGFLAGS
FLOWGMTU = Fccntl.GMTU
FRCTSRCVBUF = Fccntl.FRCTSRCVBUF
FRCTGRCVBUF = Fccntl.FRCTGRCVBUF
