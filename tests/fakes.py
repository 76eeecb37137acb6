"""In-memory stand-ins for unit tests of pure logic (never for the integration path): a Redis
that keeps hashes in a dict and can be switched off, in the spirit of httpx's MockTransport, and a
clock that moves only when told."""

from __future__ import annotations

import hashlib
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError


class FakeClock:
    """A monotonic clock for code that takes one (``clock=``): ``now`` is moved by the test."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeRedis:
    """The part of redis.asyncio.Redis the vector cache uses: pipelines of HMGET, HSET and
    EXPIRE, FT.CREATE, PING, and the lookup script (EVALSHA/EVAL, answered as the script's contract
    says: the given fields of every key, flat, and the positions of keys of another type, none
    here; the script itself is tested on the real server).
    ``down = True`` makes every call fail like a refused connection; ``scripts = False`` refuses
    scripts like a server with scripting disabled."""

    def __init__(self) -> None:
        self.scripts = True
        self.loaded_scripts: set[str] = set()
        self.hashes: dict[str, dict[bytes, bytes]] = {}
        self.expiry: dict[str, int] = {}
        self.indexes: set[str] = set()
        self.down = False
        self.round_trips = 0

    def _check(self) -> None:
        if self.down:
            raise RedisConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    def pipeline(self, transaction: bool = True) -> FakePipeline:
        return FakePipeline(self)

    async def execute_command(self, *args: Any) -> Any:
        self._check()
        self.round_trips += 1
        if args[0] == "FT.CREATE":
            if args[1] in self.indexes:
                raise ResponseError("Index already exists")
            self.indexes.add(args[1])
            return b"OK"
        raise ResponseError(f"unknown command '{args[0]}'")

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> list[list[bytes | None]]:
        self._check()
        self.round_trips += 1
        if not self.scripts:
            raise ResponseError("unknown command 'evalsha', with args beginning with: ")
        if sha not in self.loaded_scripts:
            raise NoScriptError("No matching script. Please use EVAL.")
        return self._script_reply(numkeys, keys_and_args)

    async def eval(self, script: str, numkeys: int, *keys_and_args: Any) -> list[list[bytes | None]]:
        self._check()
        self.round_trips += 1
        if not self.scripts:
            raise ResponseError("unknown command 'eval', with args beginning with: ")
        self.loaded_scripts.add(hashlib.sha1(script.encode(), usedforsecurity=False).hexdigest())
        return self._script_reply(numkeys, keys_and_args)

    def _script_reply(self, numkeys: int, keys_and_args: tuple[Any, ...]) -> list[list[bytes | None]]:
        keys, fields = keys_and_args[:numkeys], keys_and_args[numkeys:]
        return [[self.hashes.get(key, {}).get(field.encode()) for key in keys for field in fields], []]

    async def hset(self, name: str, mapping: dict[str, Any]) -> int:
        self._check()
        self.round_trips += 1
        return self._hset(name, mapping)

    def _hset(self, name: str, mapping: dict[str, Any]) -> int:
        stored = self.hashes.setdefault(name, {})
        for field, value in mapping.items():
            stored[field.encode()] = value if isinstance(value, bytes) else str(value).encode()
        return len(mapping)

    async def hget(self, name: str, field: str) -> bytes | None:
        self._check()
        self.round_trips += 1
        return self.hashes.get(name, {}).get(field.encode())

    async def ping(self) -> bool:
        self._check()
        return True

    async def aclose(self) -> None:
        return None


class FakePipeline:
    def __init__(self, redis: FakeRedis) -> None:
        self._redis = redis
        self._calls: list[tuple[str, tuple[Any, ...]]] = []

    def hmget(self, name: str, fields: list[str]) -> None:
        self._calls.append(("hmget", (name, fields)))

    def hset(self, name: str, mapping: dict[str, Any]) -> None:
        self._calls.append(("hset", (name, mapping)))

    def expire(self, name: str, seconds: int) -> None:
        self._calls.append(("expire", (name, seconds)))

    def delete(self, name: str) -> None:
        self._calls.append(("delete", (name,)))

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        self._redis._check()
        self._redis.round_trips += 1
        replies: list[Any] = []
        for operation, args in self._calls:
            if operation == "hmget":
                name, fields = args
                stored = self._redis.hashes.get(name, {})
                replies.append([stored.get(field.encode()) for field in fields])
            elif operation == "hset":
                replies.append(self._redis._hset(*args))
            elif operation == "delete":
                replies.append(int(self._redis.hashes.pop(args[0], None) is not None))
            else:
                self._redis.expiry[args[0]] = args[1]
                replies.append(True)
        return replies
