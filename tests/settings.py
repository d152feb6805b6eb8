"""The tests' settings: the project's own, with development's defaults asked for explicitly.

DEBUG is off unless set (emailops/settings.py); the tests run servers over plain http on this
machine (uvicorn, the sandbox, Chromium against them), so they set DEBUG=true before the settings
are read, unless the environment already says otherwise. Processes the tests start inherit it.
(Django's test runner still runs each test with settings.DEBUG False.)
"""

import os

os.environ.setdefault("DEBUG", "true")

from emailops.settings import *  # noqa: F403

# The sending-domain check never asks this machine's resolvers: a test that wants answers starts
# a DNS server of its own (tests/dns_server.py) and points these at it. Port 9 has no listener,
# so a page that looks something up unasked (the admin crawl) is refused at once.
DNS_NAMESERVERS = ["127.0.0.1"]
DNS_PORT = 9
DNS_TIMEOUT_S = 0.5
