"""Pulumi dynamic providers for the host resources of dn's stacks (applied over SSH)."""
