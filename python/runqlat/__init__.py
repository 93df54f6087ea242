"""runqlat-core: run-queue latency of chosen processes and containers, with eBPF."""

__version__ = "0.1.0"
