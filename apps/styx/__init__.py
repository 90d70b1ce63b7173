"""Styx: a 9P2000 file service over Ouroboros flows.

wire (codec), server (sans-IO sessions), tree/fs/irmfs/netfs (what is served),
transport (flows, streams, bridge), client and cli.
"""
