"""The unicast IPCP, split by component as Ouroboros's: dt, fa, dir, routing, enroll."""
