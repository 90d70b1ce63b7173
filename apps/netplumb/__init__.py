"""netplumb: encrypted remote execution over flows (netplumbd, plumb, plumb-keygen).

See docs/netplumb.md.
"""
