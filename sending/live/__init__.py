"""The live pages' data: samples built from the engine's rows each conductor tick, published to
whoever watches, and what a page opens with. Callers use this package's names, not its modules.

- presence: who watches (presence keys), channel-layer groups, the cache key scheme;
- samples: the rows a sample is read from, in two statements, and the sample built from them;
- publishing: the conductor's per-tick step and the per-process publisher loop;
- snapshots: the per-minute history, limit annotations and last samples a page opens with;
- hub: the web process's end of the live group, handing each page the items addressed to it.
"""

from .hub import Subscription, subscribe
from .presence import (
    LIVE_GROUP,
    OVERVIEW_GROUP,
    PRESENCE_TTL_S,
    customer_group,
    key,
    mark_watched,
    unmark_watched,
    watched,
)
from .publishing import (
    FLUSH_EVERY_MS,
    OVERVIEW_EVERY_MS,
    PUBLISH_EVERY_MS,
    STATE_TTL_S,
    Tick,
    close_publisher,
    on_tick,
    on_ticks,
    publish,
    publish_annotation,
    register_consumer_loop,
)
from .samples import (
    MESSAGE_STATS_TTL_S,
    MINUTE_COLUMNS,
    SECONDS_KEPT,
    build,
    message_stats,
    overview_line,
    read_rows,
    read_rows_many,
    window_ms,
)
from .snapshots import HISTORY_HOURS, history, last_samples, limit_changes, snapshot

__all__ = [
    "FLUSH_EVERY_MS",
    "HISTORY_HOURS",
    "LIVE_GROUP",
    "MESSAGE_STATS_TTL_S",
    "MINUTE_COLUMNS",
    "OVERVIEW_EVERY_MS",
    "OVERVIEW_GROUP",
    "PRESENCE_TTL_S",
    "PUBLISH_EVERY_MS",
    "SECONDS_KEPT",
    "STATE_TTL_S",
    "Subscription",
    "Tick",
    "build",
    "close_publisher",
    "customer_group",
    "history",
    "key",
    "last_samples",
    "limit_changes",
    "mark_watched",
    "message_stats",
    "on_tick",
    "on_ticks",
    "overview_line",
    "publish",
    "publish_annotation",
    "read_rows",
    "read_rows_many",
    "register_consumer_loop",
    "snapshot",
    "subscribe",
    "unmark_watched",
    "watched",
    "window_ms",
]
