"""The roles of an embedfleet deployment, each with a principal of its own (issue 25).

A shared login lets anyone who can read ``embed.requests`` and write a reply topic forge a result,
and a shared Redis user overwrite any cached vector or the published model contract. Here each
role gets the least its job needs, enforced by the broker (KRaft's ``StandardAuthorizer``) and by
Redis (ACL users):

* ``worker``: consumes the requests, publishes results and dead letters, writes the cache;
* ``gateway``: an ``embedfleet gateway`` (Python client with ``gw-`` reply topics it reaps);
* ``client``: a Python/Go client with a private reply topic ``{results}.{principal}-...``;
* ``keda``: reads consumer lag for autoscaling, nothing else.

The ACLs are data (``AclBinding`` rows with the reason for each), built for any topic names
(``FleetNames``): ``embedfleet stack roles`` grants them for the stack's default names, the tests
for their own fleet's topics. They are written with the CreateAcls API (aiokafka's protocol
structs, one request per batch), over a super user's connection (the stack's PLAINTEXT listener).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from schemas.cache_layout import index_name

# Kafka's ACL enums (org.apache.kafka.common.resource / acl).
TOPIC: Final = 2
GROUP: Final = 3
CLUSTER: Final = 4
TRANSACTIONAL_ID: Final = 5
LITERAL: Final = 3
PREFIXED: Final = 4
PATTERN_ANY: Final = 1
READ: Final = 3
WRITE: Final = 4
CREATE: Final = 5
DELETE: Final = 6
DESCRIBE: Final = 8
DESCRIBE_CONFIGS: Final = 10
OPERATION_ANY: Final = 1
DENY: Final = 2
ALLOW: Final = 3
PERMISSION_ANY: Final = 1
RESOURCE_ANY: Final = 1

RESOURCE_NAMES: Final = {TOPIC: "topic", GROUP: "group", CLUSTER: "cluster", TRANSACTIONAL_ID: "txn-id"}
OPERATION_NAMES: Final = {
    READ: "READ",
    WRITE: "WRITE",
    CREATE: "CREATE",
    DELETE: "DELETE",
    DESCRIBE: "DESCRIBE",
    DESCRIBE_CONFIGS: "DESCRIBE_CONFIGS",
}
SECURITY_DISABLED: Final = 54  # the broker runs no authorizer

# The stack's principals (SCRAM-SHA-512 users) and Redis users.
WORKER: Final = "embedfleet-worker"
GATEWAY: Final = "embedfleet-gateway"
CLIENT: Final = "embedfleet-client"
KEDA: Final = "embedfleet-keda"
REDIS_WORKER: Final = "embedfleet-worker"
REDIS_READER: Final = "embedfleet-reader"
# The gateway's reply topics are {results}.gw-<start>-<lease>-<id> (producer/gateway/reaper.py).
GATEWAY_REPLY_PREFIX: Final = "gw-"
_PRINCIPAL: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


class RoleError(RuntimeError):
    """The broker or Redis refused to set a role up; the message says what to do."""


@dataclass(frozen=True)
class Resource:
    kind: int  # TOPIC, GROUP, TRANSACTIONAL_ID
    name: str
    pattern: int = LITERAL  # or PREFIXED

    def __str__(self) -> str:
        star = "*" if self.pattern == PREFIXED else ""
        return f"{RESOURCE_NAMES[self.kind]}:{self.name}{star}"


@dataclass(frozen=True)
class AclBinding:
    principal: str  # "User:<name>"
    resource: Resource
    operation: int
    permission: int = ALLOW
    reason: str = field(default="", compare=False)

    def row(self) -> str:
        verb = "allow" if self.permission == ALLOW else "DENY"
        operation = OPERATION_NAMES[self.operation]
        return f"{self.principal:28} {verb:5} {operation:16} {self.resource!s:48} {self.reason}"


@dataclass(frozen=True)
class FleetNames:
    """The Kafka names one fleet uses. The stack's defaults are prefixes that cover every model's
    topics (``embed.requests.<model>``) and groups; a test fleet passes its own literal names."""

    requests: Resource = Resource(TOPIC, "embed.requests", PREFIXED)
    results: str = "embed.results"  # the shared results topic; reply topics are {results}.<client>
    dlq: str = "embed.requests.dlq"
    group: Resource = Resource(GROUP, "embedfleet", PREFIXED)
    # worker/delivery.py: an exactly-once worker's transactional ids are
    # embedfleet-{group}-{topic}-{partition}.
    transactional_prefix: str = "embedfleet-"

    @classmethod
    def for_fleet(cls, requests: str, results: str, dlq: str, group: str) -> FleetNames:
        return cls(
            requests=Resource(TOPIC, requests),
            results=results,
            dlq=dlq,
            group=Resource(GROUP, group),
            transactional_prefix=f"embedfleet-{group}-",
        )

    def reply_prefix(self, principal_name: str) -> str:
        """A client principal's own reply topics: configure its client_id as ``<name>-...``."""
        return f"{self.results}.{principal_name}-"


def user(name: str) -> str:
    if not _PRINCIPAL.fullmatch(name):
        raise RoleError(f"principal name {name!r}: letters, digits, '_', '.', '-' only")
    return f"User:{name}"


def _acls(principal: str, resource: Resource, operations: Iterable[int], reason: str) -> list[AclBinding]:
    return [AclBinding(principal, resource, op, ALLOW, reason) for op in operations]


def worker_acls(name: str, names: FleetNames) -> list[AclBinding]:
    """What `embedfleet worker` needs, and why (found by running it under the authorizer)."""
    p = user(name)
    results = Resource(TOPIC, names.results, PREFIXED)
    dlq = Resource(TOPIC, names.dlq)
    return [
        *_acls(p, names.requests, (READ, DESCRIBE), "consume the requests (Fetch, ListOffsets, Metadata)"),
        *_acls(
            p,
            names.group,
            (READ, DESCRIBE),
            "join the group and commit (READ); committed offsets, OffsetFetch require_stable (DESCRIBE)",
        ),
        *_acls(p, results, (WRITE, DESCRIBE), "publish results: the shared topic and every reply topic"),
        AclBinding(
            p,
            results,
            DESCRIBE_CONFIGS,
            ALLOW,
            "exactly-once vets reply topics' message.timestamp.before.max.ms (worker/cluster.py)",
        ),
        *_acls(p, dlq, (WRITE, DESCRIBE), "publish dead letters"),
        AclBinding(p, dlq, DESCRIBE_CONFIGS, ALLOW, "read the DLQ's max.message.bytes (topic_record_limit)"),
        *_acls(
            p,
            Resource(TRANSACTIONAL_ID, names.transactional_prefix, PREFIXED),
            (WRITE, DESCRIBE),
            "exactly-once: one transactional producer per input partition",
        ),
    ]


def client_acls(name: str, names: FleetNames, *, reply_prefix: str | None = None) -> list[AclBinding]:
    """A client (or gateway) principal: sends requests, owns the reply topics under its prefix.
    It may neither read nor write the shared results topic nor another principal's replies (no
    ACL there), nor write dead letters (the DLQ's name starts like the requests prefix: DENY)."""
    p = user(name)
    own = Resource(TOPIC, reply_prefix or names.reply_prefix(name), PREFIXED)
    acls = [
        *_acls(
            p, names.requests, (WRITE, DESCRIBE), "send requests (also lets the idempotent producer start)"
        ),
        *_acls(p, own, (CREATE, READ, DESCRIBE, DELETE), "create, read and delete its own reply topics"),
    ]
    if names.requests.pattern == PREFIXED and names.dlq.startswith(names.requests.name):
        acls.append(
            AclBinding(
                p,
                Resource(TOPIC, names.dlq, PREFIXED),
                WRITE,
                DENY,
                "DLQs (embed.requests.dlq*) are under the requests prefix",
            )
        )
    return acls


def gateway_acls(name: str, names: FleetNames) -> list[AclBinding]:
    """A gateway: a client whose reply topics are ``{results}.gw-...``; it also writes heartbeats to
    its own topic and reaps other gateways' topics (same role, same prefix)."""
    prefix = f"{names.results}.{GATEWAY_REPLY_PREFIX}"
    own = Resource(TOPIC, prefix, PREFIXED)
    return [
        *client_acls(name, names, reply_prefix=prefix),
        AclBinding(user(name), own, WRITE, ALLOW, "heartbeats to its reply topic (the reaper reads them)"),
    ]


def keda_acls(name: str, names: FleetNames) -> list[AclBinding]:
    """KEDA's Kafka scaler: partition end offsets and the group's committed offsets."""
    p = user(name)
    return [
        AclBinding(p, names.requests, DESCRIBE, ALLOW, "topic metadata and end offsets (ListOffsets)"),
        AclBinding(p, names.group, DESCRIBE, ALLOW, "the group's committed offsets (OffsetFetch)"),
    ]


def check_prefixes(names: FleetNames, principals: Sequence[str]) -> None:
    """No client principal's reply prefix may contain another's (``a-`` would cover ``a-b-``)."""
    prefixes = sorted(names.reply_prefix(p) for p in principals)
    for a, b in itertools.pairwise(prefixes):
        if b.startswith(a):
            raise RoleError(f"reply prefix {a!r} covers {b!r}: choose client principal names apart")


# --- writing ACLs (CreateAcls / DeleteAcls v1, as AclCommand would) ------------------------------


def _batch_request(kind: str, rows: list[tuple[Any, ...]]) -> Any:
    from aiokafka.protocol import admin as proto
    from aiokafka.protocol.api import Request

    struct = proto.CreateAclsRequest_v1 if kind == "create" else proto.DeleteAclsRequest_v1

    class Batch(Request[struct]):  # type: ignore[misc]
        API_KEY = struct.API_KEY

        def build(self, request_struct_class: Any) -> Any:
            return request_struct_class(rows)

    Batch._CLASSES = (struct,)
    return Batch()


def _row(acl: AclBinding) -> tuple[Any, ...]:
    r = acl.resource
    return (r.kind, r.name, r.pattern, acl.principal, "*", acl.operation, acl.permission)


async def _send(admin_options: dict[str, Any], kind: str, rows: list[tuple[Any, ...]]) -> Any:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**admin_options)
    await admin.start()
    try:
        return await admin._send_request(_batch_request(kind, rows))
    finally:
        await admin.close()


def _raise_for(code: int, message: str | None, what: str) -> None:
    if code == 0:
        return
    if code == SECURITY_DISABLED:
        raise RoleError(
            f"{what}: the broker runs no authorizer (it was started before the authorizer was "
            "configured): `embedfleet stack down --service kafka` then `embedfleet stack up --secure`"
        )
    raise RoleError(f"{what}: Kafka error {code} ({message})")


async def grant(admin_options: dict[str, Any], acls: Sequence[AclBinding]) -> None:
    """Creates the ACLs (idempotent: an existing binding stays as it is)."""
    if not acls:
        return
    response = await _send(admin_options, "create", [_row(a) for a in acls])
    for acl, (code, message) in zip(acls, response.creation_responses, strict=True):
        _raise_for(code, message, f"creating ACL {acl.row()}")


async def revoke(admin_options: dict[str, Any], acls: Sequence[AclBinding]) -> int:
    """Deletes exactly these ACLs; returns how many were found."""
    if not acls:
        return 0
    response = await _send(admin_options, "delete", [_row(a) for a in acls])
    found = 0
    for acl, (code, message, matching) in zip(acls, response.filter_responses, strict=True):
        _raise_for(code, message, f"deleting ACL {acl.row()}")
        found += len(matching)
    return found


async def revoke_principal(admin_options: dict[str, Any], principal_name: str) -> int:
    """Deletes every ACL of one principal (a role retired, or a test's leftovers)."""
    row = (RESOURCE_ANY, None, PATTERN_ANY, user(principal_name), None, OPERATION_ANY, PERMISSION_ANY)
    response = await _send(admin_options, "delete", [row])
    code, message, matching = response.filter_responses[0]
    _raise_for(code, message, f"deleting the ACLs of {principal_name}")
    return len(matching)


# --- Redis users -------------------------------------------------------------------------------

# The models whose HNSW indexes the stack's workers create (the default model and `make run`'s
# second one); a worker of another model needs its name in redis_worker_rules' ``models``.
INDEXED_MODELS: Final = ("all-MiniLM-L6-v2", "all-mpnet-base-v2")
# Commands every user needs to connect: redis-py sends HELLO/AUTH and CLIENT SETINFO on connect.
_CONNECT: Final = ("+ping", "+hello", "+auth", "+client|setinfo")
# worker/cache.py: lookups (EVALSHA/EVAL of a read-only HMGET script, HMGET fallback), stores
# (HSET, EXPIRE, DEL of a key of another type), the contract (HGET, HSET), the HNSW index
# (FT.CREATE, whose index name is a key to Redis' ACLs). Scripts run with the user's
# permissions: the script's HMGETs are checked too.
WORKER_COMMANDS: Final = (
    *_CONNECT,
    "+hmget",
    "+hget",
    "+hset",
    "+expire",
    "+del",
    "+evalsha",
    "+eval",
    "+ft.create",
)
# producer/cache.py (Python client, gateway) and producer/go/cache.go: HGETALL of the contract,
# HMGET of entries, SCAN for the published models (the gateway's /v1/models). No FT.SEARCH: no
# client searches the index.
READER_COMMANDS: Final = (*_CONNECT, "+hgetall", "+hget", "+hmget", "+scan")


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def redis_worker_rules(prefix: str, models: Sequence[str] = INDEXED_MODELS) -> list[str]:
    """Read and write ``{prefix}:*`` (vectors and ``{prefix}:models:*``) and the HNSW index names
    of ``models`` (FT.CREATE declares its index name a read-write key): ``{prefix}-{model}-*``, one
    pattern per model, so that another fleet's ``{prefix}-<something>:*`` keys stay out of reach."""
    indexes = [f"~{_glob_escape(index_name(prefix, model, 0)[: -len('0')])}*" for model in models]
    return ["resetkeys", f"~{_glob_escape(prefix)}:*", *indexes, "resetchannels", "-@all", *WORKER_COMMANDS]


def redis_reader_rules(prefix: str) -> list[str]:
    """Read ``{prefix}:*`` only (``%R~``: a write to such a key is refused too)."""
    return ["resetkeys", f"%R~{_glob_escape(prefix)}:*", "resetchannels", "-@all", *READER_COMMANDS]


def set_redis_user(client: Any, username: str, password: str, rules: Sequence[str]) -> None:
    """ACL SETUSER from scratch (idempotent), through a connection allowed to (the stack's
    default user). The password goes in the command, never on a command line."""
    if not _PRINCIPAL.fullmatch(username):
        raise RoleError(f"redis user name {username!r}: letters, digits, '_', '.', '-' only")
    client.execute_command("ACL", "SETUSER", username, "reset", "on", f">{password}", *rules)


def delete_redis_user(client: Any, username: str) -> None:
    client.execute_command("ACL", "DELUSER", username)
