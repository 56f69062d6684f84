"""One shared subscription per limiter that wakes waiters by their token.

The library wakes the first waiter in line by publishing its token on the
sharded channel named like the key (SPUBLISH). A limiter keeps one PubSub
connection for all its waiters and routes each message to the waiter whose
token it carries. A channel stays subscribed after its last waiter leaves, up
to MAX_IDLE_CHANNELS channels, so that waiting again on a busy key costs no
SSUBSCRIBE round trip.

This serves a single Redis server. On a cluster each waiting operation
subscribes on its own (see the drivers), because redis-py's ClusterPubSub
reads one node at a time.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections import OrderedDict
from typing import Any, Protocol

from redis.exceptions import TimeoutError as RedisTimeoutError

from ._core import CONNECTION_ERRORS, KeyT

logger = logging.getLogger("concurrent_runs")

MAX_IDLE_CHANNELS = 64
# How long the listener waits for one message before looking again; it
# bounds how long closing the limiter waits for the listener to stop.
LISTEN_TIMEOUT_S = 0.5


class Flag(Protocol):
    def set(self) -> None: ...


def as_bytes(value: KeyT) -> bytes:
    return value.encode() if isinstance(value, str) else value


class WakeupRegistry:
    """The waiters of each channel, by token, with their flags; no I/O.

    ``add`` and ``remove`` return the channels to subscribe or unsubscribe;
    ``dispatch`` sets the flag of the waiter a message is for.
    """

    def __init__(self) -> None:
        self.waiters: dict[bytes, dict[bytes, Flag]] = {}
        self.idle: OrderedDict[bytes, None] = OrderedDict()
        self.confirmations: dict[bytes, Flag] = {}

    def add(self, channel: bytes, token: bytes, flag: Flag) -> bool:
        """Register a waiter; return True when its channel is not subscribed yet."""
        is_new = channel not in self.waiters and channel not in self.idle
        self.idle.pop(channel, None)
        self.waiters.setdefault(channel, {})[token] = flag
        return is_new

    def remove(self, channel: bytes, token: bytes) -> list[bytes]:
        """Forget a waiter; return the idle channels to unsubscribe from."""
        waiters = self.waiters.get(channel)
        if waiters is None:
            return []
        waiters.pop(token, None)
        if waiters:
            return []
        del self.waiters[channel]
        self.idle[channel] = None
        evicted = []
        while len(self.idle) > MAX_IDLE_CHANNELS:
            oldest, _ = self.idle.popitem(last=False)
            evicted.append(oldest)
        return evicted

    def expect_confirmation(self, channel: bytes, flag: Flag) -> None:
        self.confirmations[channel] = flag

    def forget_channel(self, channel: bytes) -> None:
        """Drop a channel whose subscription failed; its waiters poll instead."""
        self.waiters.pop(channel, None)
        self.idle.pop(channel, None)
        self.confirmations.pop(channel, None)

    def dispatch(self, message: dict[str, Any]) -> None:
        channel = as_bytes(message["channel"])
        if message["type"] == "ssubscribe":
            confirmation = self.confirmations.pop(channel, None)
            if confirmation is not None:
                confirmation.set()
        elif message["type"] == "smessage":
            data = message["data"]
            flag = self.waiters.get(channel, {}).get(as_bytes(data))
            if flag is not None:
                flag.set()

    def channels(self) -> list[bytes]:
        return [*self.waiters, *self.idle]


class Wakeups:
    """The shared subscription of a sync limiter, read by a daemon thread."""

    def __init__(self, client: Any, confirm_timeout_s: float) -> None:
        self._client = client
        self._confirm_timeout_s = confirm_timeout_s
        self._lock = threading.Lock()
        self._registry = WakeupRegistry()
        self._pubsub: Any = None
        self._listener: threading.Thread | None = None
        self._closed = threading.Event()
        self._pid = os.getpid()

    def register(self, channel: KeyT, token: KeyT) -> tuple[threading.Event, bool]:
        """Wait for messages to ``token``; return its flag and whether the
        subscription was already active (else it has just been confirmed).

        Raise the connection error when the subscription could not be made.
        """
        flag = threading.Event()
        channel_bytes = as_bytes(channel)
        with self._lock:
            self._forget_other_process()
            if self._registry.add(channel_bytes, as_bytes(token), flag):
                self._registry.expect_confirmation(channel_bytes, threading.Event())
                try:
                    self._subscribe(channel_bytes)
                except BaseException:
                    self._registry.forget_channel(channel_bytes)
                    raise
            # Set while another waiter's SSUBSCRIBE of this channel is unconfirmed.
            confirmed = self._registry.confirmations.get(channel_bytes)
        if confirmed is not None and not confirmed.wait(self._confirm_timeout_s):
            with self._lock:
                self._registry.forget_channel(channel_bytes)
            raise RedisTimeoutError(f"SSUBSCRIBE {channel!r} was not confirmed in time")
        return flag, confirmed is None

    def unregister(self, channel: KeyT, token: KeyT) -> None:
        with self._lock:
            evicted = self._registry.remove(as_bytes(channel), as_bytes(token))
            if evicted and self._pubsub is not None:
                try:
                    self._pubsub.sunsubscribe(*evicted)
                except CONNECTION_ERRORS as exc:
                    logger.debug("could not unsubscribe idle channels: %s", exc)

    def close(self) -> None:
        self._closed.set()
        listener = self._listener
        if listener is not None and listener is not threading.current_thread():
            listener.join(timeout=LISTEN_TIMEOUT_S * 4)
        with self._lock:
            if self._pubsub is not None:
                self._pubsub.close()
                self._pubsub = None

    def _subscribe(self, channel: bytes) -> None:
        if self._pubsub is None:
            self._pubsub = self._client.pubsub()
        self._pubsub.ssubscribe(channel)
        if self._listener is None or not self._listener.is_alive():
            self._listener = threading.Thread(
                target=self._listen, name="concurrent_runs wakeups", daemon=True
            )
            self._listener.start()

    def _forget_other_process(self) -> None:
        """Drop state inherited through fork: the listener thread did not come along."""
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._registry = WakeupRegistry()
        self._pubsub = None
        self._listener = None

    def _listen(self) -> None:
        pubsub = self._pubsub
        while not self._closed.is_set():
            try:
                message = pubsub.get_sharded_message(timeout=LISTEN_TIMEOUT_S)
            except CONNECTION_ERRORS as exc:
                # Waiters fall back to polling meanwhile; redis-py subscribes
                # the channels again when it reconnects.
                logger.debug("wake-up subscription lost, reconnecting: %s", exc)
                self._closed.wait(LISTEN_TIMEOUT_S)
                continue
            except (AttributeError, RuntimeError, ValueError) as exc:
                if self._closed.is_set():
                    return  # closed under the listener's feet
                logger.warning("wake-up listener stopped: %s", exc)
                return
            if message is not None:
                with self._lock:
                    self._registry.dispatch(message)


class AsyncWakeups:
    """The shared subscription of an asyncio limiter, read by a task."""

    def __init__(self, client: Any, confirm_timeout_s: float) -> None:
        self._client = client
        self._confirm_timeout_s = confirm_timeout_s
        self._registry = WakeupRegistry()
        self._pubsub: Any = None
        self._listener: asyncio.Task[None] | None = None

    async def register(self, channel: KeyT, token: KeyT) -> tuple[asyncio.Event, bool]:
        """Wait for messages to ``token``; see Wakeups.register."""
        flag = asyncio.Event()
        channel_bytes = as_bytes(channel)
        try:
            if self._registry.add(channel_bytes, as_bytes(token), flag):
                self._registry.expect_confirmation(channel_bytes, asyncio.Event())
                if self._pubsub is None:
                    self._pubsub = self._client.pubsub()
                await self._pubsub.ssubscribe(channel_bytes)
                if self._listener is None or self._listener.done():
                    self._listener = asyncio.ensure_future(self._listen())
            # Set while a SSUBSCRIBE of this channel is unconfirmed.
            confirmed = self._registry.confirmations.get(channel_bytes)
            if confirmed is not None:
                await asyncio.wait_for(confirmed.wait(), self._confirm_timeout_s)
        except asyncio.TimeoutError:
            self._registry.forget_channel(channel_bytes)
            raise RedisTimeoutError(f"SSUBSCRIBE {channel!r} was not confirmed in time")
        except BaseException:
            self._registry.forget_channel(channel_bytes)
            raise
        return flag, confirmed is None

    async def unregister(self, channel: KeyT, token: KeyT) -> None:
        evicted = self._registry.remove(as_bytes(channel), as_bytes(token))
        if evicted and self._pubsub is not None:
            try:
                await self._pubsub.sunsubscribe(*evicted)
            except CONNECTION_ERRORS as exc:
                logger.debug("could not unsubscribe idle channels: %s", exc)

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
            self._listener = None
        if self._pubsub is not None:
            await self._pubsub.aclose()
            self._pubsub = None

    async def _listen(self) -> None:
        pubsub = self._pubsub
        while True:
            try:
                message = await pubsub.get_sharded_message(timeout=LISTEN_TIMEOUT_S)
            except CONNECTION_ERRORS as exc:
                logger.debug("wake-up subscription lost, reconnecting: %s", exc)
                await asyncio.sleep(LISTEN_TIMEOUT_S)
                continue
            if message is not None:
                self._registry.dispatch(message)


def wait_flag(flag: threading.Event, timeout_s: float) -> bool:
    """Wait for a sync waiter's flag and clear it; return True when it was set."""
    woken = flag.wait(timeout_s)
    flag.clear()
    return woken


async def async_wait_flag(flag: asyncio.Event, timeout_s: float) -> bool:
    """Wait for an asyncio waiter's flag and clear it; return True when it was set."""
    try:
        await asyncio.wait_for(flag.wait(), timeout_s)
    except asyncio.TimeoutError:
        return False
    finally:
        flag.clear()
    return True

