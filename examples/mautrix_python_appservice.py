#!/usr/bin/env python3
"""An appservice built on mautrix-python that reads what synapse-account-data-relay sends.

mautrix-python hands every top-level key of a transaction body it does not know itself to
`AppService.handle_transaction(..., extra_data=...)`. The relay's MSC3682 fields arrive there:

- `org.matrix.msc3682.account_data`: {user_id: {"events": [{"type": ..., "content": ...}]}}
- `org.matrix.msc3682.room_account_data`: {user_id: {room_id: {"events": [...]}}}

This program keeps the latest value per (user, room, type) -- a `content` of `{}` is a deletion
(MSC3391) and stays as `{}` -- and prints one JSON line per transaction on stdout:

    {"txn_id": "...", "account_data": {...}, "room_account_data": {...}}

The relay's integration test (`tests/integration/mautrix_python.rs`) runs it against the relay
and checks those lines against the database; `.ci/synapse-venv.sh` puts the pinned `mautrix`
into the test virtualenv. By hand:

    python3 -m venv venv && venv/bin/pip install mautrix==0.21.1
    venv/bin/python examples/mautrix_python_appservice.py --port 9009 \
        --hs-token HS_TOKEN --as-token AS_TOKEN --server-name example.org \
        --homeserver http://127.0.0.1:8008 --bot-localpart relaybot --id my-appservice

with a registration (`url: http://127.0.0.1:9009`, the same tokens) that has
`org.matrix.msc3682.account_data: true`.
"""

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile

from mautrix.appservice import AppService
from mautrix.appservice.state_store import FileASStateStore

GLOBAL_FIELD = "org.matrix.msc3682.account_data"
ROOM_FIELD = "org.matrix.msc3682.room_account_data"


class AccountDataAppService(AppService):
    """An AppService that also handles the relay's account data."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Latest value per key. Keys are independent: the relay gives no order between keys, and
        # none against Synapse's own transactions (which carry `events`, handled as usual).
        self.global_account_data: dict[tuple[str, str], dict] = {}
        self.room_account_data: dict[tuple[str, str, str], dict] = {}

    async def handle_transaction(self, txn_id, *, events, extra_data, **kwargs):
        account_data = extra_data.get(GLOBAL_FIELD) or {}
        room_account_data = extra_data.get(ROOM_FIELD) or {}
        for user_id, user in account_data.items():
            for event in user.get("events", []):
                self.on_account_data(user_id, None, event["type"], event["content"])
        for user_id, rooms in room_account_data.items():
            for room_id, room in rooms.items():
                for event in room.get("events", []):
                    self.on_account_data(user_id, room_id, event["type"], event["content"])
        if account_data or room_account_data:
            line = {"txn_id": txn_id, "account_data": account_data, "room_account_data": room_account_data}
            print(json.dumps(line, sort_keys=True), flush=True)
        # Everything else (events, ephemeral, to-device) the usual way.
        return await super().handle_transaction(txn_id, events=events, extra_data=extra_data, **kwargs)

    def on_account_data(self, user_id: str, room_id: str | None, event_type: str, content: dict) -> None:
        """One changed key. Delivery is at least once: the same value may come again (after a
        relay restart, say), so this must be idempotent -- storing the latest value is."""
        if room_id is None:
            self.global_account_data[(user_id, event_type)] = content
        else:
            self.room_account_data[(user_id, room_id, event_type)] = content
        what = "deleted" if content == {} else "set"
        where = f" in {room_id}" if room_id else ""
        print(f"{user_id}{where}: {event_type} {what}", file=sys.stderr, flush=True)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--hs-token", required=True, help="the registration's hs_token")
    parser.add_argument("--as-token", required=True, help="the registration's as_token")
    parser.add_argument("--server-name", required=True)
    parser.add_argument("--homeserver", default="http://127.0.0.1:8008", help="Synapse's client API")
    parser.add_argument("--bot-localpart", default="relaybot")
    parser.add_argument("--id", default="mautrix-python-example")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as state_dir:
        appservice = AccountDataAppService(
            server=args.homeserver,
            domain=args.server_name,
            as_token=args.as_token,
            hs_token=args.hs_token,
            bot_localpart=args.bot_localpart,
            id=args.id,
            # mautrix keeps a small state file (rooms and members it saw); a throw-away one here.
            state_store=FileASStateStore(os.path.join(state_dir, "mx-state.json"), binary=False),
        )
        await appservice.start(host=args.host, port=args.port)
        print(f"listening on {args.host}:{args.port}", file=sys.stderr, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await appservice.stop()

if __name__ == "__main__":
    asyncio.run(main())
