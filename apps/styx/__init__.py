"""Styx: a 9P2000 file service over Ouroboros flows.

wire (codec), server (sans-IO sessions), tree/fs/irmfs/netfs (what is served, fs confined
by beneath and fscreds), identity (who a client is, the policy), agent (a peer's agent, apps.agent:
work as the client), transport (flows, streams), serve (the accept loop), bridge, client, mount and cli.
"""
