"""The sending app's admin, one module per page family: messages (and their send buttons),
recipients (and the delivery log), the recipient import page, the engine's read-only tables, and
the live pages with their steering."""

from . import engine, messages, recipients  # noqa: F401  (each registers its ModelAdmins)
