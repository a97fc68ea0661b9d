"""The edgetok test bed: gateway and server namespaces on a shaped veth link, CPU quotas."""

from testbed.net import Host, Testbed, TestbedError, available, cleanup

__all__ = ["Host", "Testbed", "TestbedError", "available", "cleanup"]
