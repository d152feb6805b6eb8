"""The tests' settings: the project's own, with development's defaults asked for explicitly.

DEBUG is off unless set (emailops/settings.py); the tests run servers over plain http on this
machine (uvicorn, the sandbox, Chromium against them), so they set DEBUG=true before the settings
are read, unless the environment already says otherwise. Processes the tests start inherit it.
(Django's test runner still runs each test with settings.DEBUG False.)
"""

import os

os.environ.setdefault("DEBUG", "true")

from emailops.settings import *  # noqa: F403
