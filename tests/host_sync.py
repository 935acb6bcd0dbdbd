"""The host-read counter tests use (it lives in the library: ``train.sync_debug`` uses it too)."""

from amllm.debug import HostReadError, HostReads, no_host_reads  # noqa: F401
