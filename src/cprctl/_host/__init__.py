"""The host around QEMU: its init (systemd scopes for VMs, the unit cprctl runs in, sd_notify).

On a host whose init is not systemd, everything here is a no-op and cprctl behaves as before.
"""
