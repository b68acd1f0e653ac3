#!/usr/bin/env python3
"""A TCP proxy that makes one node slow or stalled, for tests: a real process between a client and a node.

    python tests/slowproxy.py LISTEN_PORT TARGET_HOST:TARGET_PORT [--delay S | --hold S | --stall] [--pass N]
        [--only PREFIX]

Forwards bytes both ways on 127.0.0.1:LISTEN_PORT (0 picks a free port). Prints one line,
`listening on 127.0.0.1:PORT`, once it accepts connections.

--delay SECONDS  holds the first bytes of each response for SECONDS (a response starts when the target
                 sends after the client last sent: one HTTP/1.1 request/response turn, keep-alive or not);
                 the rest of the response flows at full speed.
--hold SECONDS   holds the first bytes of each request for SECONDS before the target sees them (so a
                 PUT's share reaches the node that much later); the rest flows at full speed.
--stall          accepts connections and never answers (the request is read and dropped).
--pass N         the first N responses (over all connections) are exempt: e.g. `--pass 1` lets the node
                 answer the reader's "which shares do you hold" and slows only what follows.
--only PREFIX    slows only requests whose first bytes are PREFIX (e.g. `PUT /v1/immutable/`); others
                 pass at full speed and use up no exemption.

Stdlib only (asyncio). Stops on SIGTERM/SIGINT; the connections die with the process.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

CHUNK = 64 * 1024


class Proxy:
    def __init__(
        self,
        target_host: str,
        target_port: int,
        delay: float,
        stall: bool,
        exempt: int,
        hold: float = 0.0,
        only: bytes = b"",
    ) -> None:
        self.target = (target_host, target_port)
        self.delay = delay
        self.hold = hold
        self.only = only
        self.stall = stall
        self.exempt = exempt  # responses still to pass undelayed

    def _slow_down(self, request_start: bytes) -> bool:
        """Whether the request starting with these bytes (and its response) is slowed (uses up one
        exemption if not)."""
        if not request_start.startswith(self.only):
            return False
        if self.exempt > 0:
            self.exempt -= 1
            return False
        return True

    async def handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if self.stall and self.exempt <= 0:
            await self._swallow(client_r, client_w)
            return
        try:
            node_r, node_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.close()
            return
        turn = {"awaiting_response": False, "slow": False}
        try:
            async with asyncio.TaskGroup() as tasks:  # one direction failing ends the other
                tasks.create_task(self._upstream(client_r, node_w, turn))
                tasks.create_task(self._downstream(node_r, client_w, turn))
        except* OSError:
            pass
        finally:
            for w in (client_w, node_w):
                w.close()

    async def _upstream(
        self, client_r: asyncio.StreamReader, node_w: asyncio.StreamWriter, turn: dict[str, bool]
    ) -> None:
        while data := await client_r.read(CHUNK):
            if not turn["awaiting_response"]:  # a new request starts
                turn["slow"] = self._slow_down(data)
                if turn["slow"] and self.hold:
                    await asyncio.sleep(self.hold)
            turn["awaiting_response"] = True
            node_w.write(data)
            await node_w.drain()
        node_w.write_eof()

    async def _downstream(
        self, node_r: asyncio.StreamReader, client_w: asyncio.StreamWriter, turn: dict[str, bool]
    ) -> None:
        while data := await node_r.read(CHUNK):
            if turn["awaiting_response"]:
                turn["awaiting_response"] = False
                if turn["slow"] and not self.hold:
                    if self.stall:
                        await asyncio.Event().wait()  # never answer
                    await asyncio.sleep(self.delay)
            client_w.write(data)
            await client_w.drain()
        client_w.close()

    async def _swallow(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            while await client_r.read(CHUNK):
                pass
        except OSError:
            pass
        finally:
            client_w.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("listen_port", type=int)
    parser.add_argument("target", metavar="TARGET_HOST:TARGET_PORT")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--delay", type=float, metavar="SECONDS")
    mode.add_argument("--hold", type=float, metavar="SECONDS")
    mode.add_argument("--stall", action="store_true")
    parser.add_argument("--pass", dest="exempt", type=int, default=0, metavar="N")
    parser.add_argument("--only", default="", metavar="PREFIX")
    args = parser.parse_args()
    host, _, port = args.target.rpartition(":")
    proxy = Proxy(
        host, int(port), args.delay or 0.0, args.stall, args.exempt, args.hold or 0.0, args.only.encode()
    )
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", args.listen_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    bound = server.sockets[0].getsockname()[1]
    print(f"listening on 127.0.0.1:{bound}", flush=True)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)
