"""Host resources applied over SSH: nginx (base and vhosts), the firewall (baseline and tenant
chains), LUKS volumes and systemd timers.

Each module offers ``read`` (the current state, also for drift), a pure ``plan`` (what changes and
why; empty when nothing does), ``apply`` (exactly that plan, never leaving the host
half-configured) and removal. The Pulumi dynamic providers in ``stacks/providers`` are thin
wrappers over these.
"""
