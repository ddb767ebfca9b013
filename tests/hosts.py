"""Test hosts for multi-host tests: ``from hosts import TestHosts`` (the API is in plait.bench._hosts,
where ``plait bench comm --hosts`` finds it too; the pytest fixture ``make_hosts`` is in conftest.py)."""
from plait.bench._hosts import (HostCommandFailed, HostsUnavailable, Host, TestHosts,  # noqa: F401
                                remove_stale, unavailable_reason)
