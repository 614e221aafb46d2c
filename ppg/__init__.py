"""Partial Policy Gradients for multi-turn LLM conversational agents.

Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, when it is imported: with ``0`` a local node
uses 127.0.0.1 and its servers listen on loopback only (without it Ray picks the machine's external
address). Every ppg module that imports Ray is imported after this package, so setting it here, once,
lets those modules import Ray at the top like any other library. An explicit value wins.
"""

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
