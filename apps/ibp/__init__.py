"""IBP, the Internet Backplane Protocol, over flows: depots, capabilities, a client and exNodes.

See docs/ibp.md.
"""
