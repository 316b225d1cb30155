"""ksbpf: a Linux-native VPN kill switch in three independent kernel layers."""

__version__ = "0.1.0"
