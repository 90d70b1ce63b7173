"""The IRMd's registry, one module per entity as in Ouroboros's src/irmd/reg: flows, names (with
their bindings), processes and IPCPs. Free of I/O: the decisions are plain functions, tested alone.
"""

from irmd.reg.flow import Flow, FlowEvent, FlowState, IllegalFlowTransition
from irmd.reg.ipcp import Ipcp
from irmd.reg.name import Name, ProcBinding, ProgBinding, prog_key
from irmd.reg.proc import Acceptor
from irmd.reg.registry import Registry

__all__ = [
    "Acceptor",
    "Flow",
    "FlowEvent",
    "FlowState",
    "IllegalFlowTransition",
    "Ipcp",
    "Name",
    "ProcBinding",
    "ProgBinding",
    "Registry",
    "prog_key",
]
