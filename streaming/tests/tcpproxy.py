"""A TCP proxy that can stall like a network partition: for tests that cut a node off.

    with TcpProxy("127.0.0.1", 5432) as proxy:   # its own event loop, in a thread
        ... connect to proxy.port ...
        proxy.stall()   # nothing moves, either way; connections stay open
        proxy.heal()    # what was held back goes through, as TCP would resend it

While stalled, new connections are accepted (the SYN is answered, as the
kernel of a host behind a partition would not, but a client cannot tell the
difference until it waits for an answer) and nothing is forwarded for them
either: their upstream connection is opened only once the proxy heals. Bytes
read while stalled are held, not dropped, and each side stops being read
until they go, so the sender's socket buffers fill as they would.

``TcpProxy(..., port=n)`` listens on a chosen port (a service that comes
back where it was). ``reset()`` cuts every open connection. ``stall_when(predicate)`` stalls
at a chosen moment instead: when an answer comes back from upstream for
which ``predicate(last_request, answer)`` holds (``last_request``: the last
bytes the client sent on that connection), that answer is held and
everything stalls; ``triggered`` is then set.
"""

import asyncio
import contextlib
import socket
import threading

CHUNK = 64 * 1024


class TcpProxy:
    def __init__(
        self, upstream_host: str, upstream_port: int, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.host = host
        self.port = port  # 0: any free one
        self.connections = 0  # accepted so far
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._flowing: asyncio.Event | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task] = set()
        self._predicate = None
        self.triggered = threading.Event()
        self.trigger = (b"", b"")  # the request and the answer that set it off

    # -- from the test's thread --------------------------------------------------

    def start(self) -> "TcpProxy":
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="tcpproxy", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the proxy did not start")
        return self

    def stall(self) -> None:
        """Stop forwarding in both directions; keep every connection open."""
        self._call(lambda: self._flowing.clear())

    def heal(self) -> None:
        """Forward again, held bytes first."""
        self._call(lambda: self._flowing.set())

    def reset(self) -> None:
        """Cut every open connection (RST), as a database restart or a firewall
        that forgot them would; new ones go through (unless stalled)."""

        async def cut() -> None:
            for writer in list(self._writers):
                writer.transport.abort()

        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(cut(), self._loop).result(10)

    def stall_when(self, predicate) -> None:
        """Stall as soon as an answer for which ``predicate(last_request, answer)`` holds comes back."""
        self.triggered.clear()

        def arm() -> None:
            self._predicate = predicate

        self._call(arm)

    @property
    def stalled(self) -> bool:
        return self._flowing is not None and not self._flowing.is_set()

    def stop(self) -> None:
        if self._loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop already ended
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop = None

    def __enter__(self) -> "TcpProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, fn) -> None:
        if self._loop is None:
            return  # stopped

        async def call() -> None:
            fn()

        asyncio.run_coroutine_threadsafe(call(), self._loop).result(10)

    # -- in the proxy's thread ---------------------------------------------------

    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)

        async def listen() -> None:
            self._flowing = asyncio.Event()
            self._flowing.set()
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            self.port = sock.getsockname()[1]
            self._server = await asyncio.start_server(self._accept, sock=sock)

        loop.run_until_complete(listen())
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            await self._flowing.wait()  # a partition answers nothing, not even a refusal
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            self._writers.add(up_writer)
            sent = [b""]  # the last bytes the client sent
            try:
                await asyncio.gather(
                    self._pump(reader, up_writer, sent=sent), self._pump(up_reader, writer, answers=sent)
                )
            finally:
                self._writers.discard(up_writer)
                up_writer.close()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)
            writer.close()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        sent: list[bytes] | None = None,
        answers: list[bytes] | None = None,
    ) -> None:
        try:
            while True:
                data = await reader.read(CHUNK)
                if answers is not None and self._predicate is not None and self._predicate(answers[0], data):
                    self._predicate = None
                    self.trigger = (answers[0], data)
                    self._flowing.clear()
                    self.triggered.set()
                await self._flowing.wait()  # held (and nothing more read) while stalled
                if sent is not None:
                    sent[0] = data
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()
        except OSError:
            writer.close()

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
