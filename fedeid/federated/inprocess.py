"""An in-process Grid: the real ServerApp logic and the real ClientApp, no SuperLink, no Ray.

The messages are Flower ``Message`` objects built by the strategy and answered by calling the
``ClientApp`` object (``client_app(message, context)``) — the same path a SuperNode takes, minus
the network. Used by the tests (reply inspection, drop-outs, kill-and-resume) and by the
sweeps in ``simulations/`` where Ray's start-up and memory would dominate on 2 cores.
``drop(round, node_id, message) -> bool`` makes a node vanish mid-round (its reply never
arrives); an exception in a client becomes an error reply, as on a SuperNode.
"""

from __future__ import annotations

import copy
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

DropFn = Callable[[int, int, Message], bool]


class InProcessGrid(Grid):
    def __init__(self, client_app: Any, node_configs: list[dict[str, Any]], run_config: dict[str, Any],
                 *, drop: DropFn | None = None, run_id: int = 1,
                 on_reply: Callable[[Message, Message], None] | None = None) -> None:
        self.client_app = client_app
        self.run_config = dict(run_config)
        self.drop = drop
        self.on_reply = on_reply
        self._run = Run.create_empty(run_id)
        # Messages take their run/node/task ids from the process' task identity, which the
        # SuperLink sets for a real ServerApp process.
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        self._run.override_config = dict(run_config)  # type: ignore[assignment]
        self.contexts: dict[int, Context] = {}
        for i, nc in enumerate(node_configs):
            node_id = 1000 + i
            self.contexts[node_id] = Context(run_id=run_id, node_id=node_id, node_config=dict(nc),
                                             state=RecordDict(), run_config=dict(run_config))
        self._replies: dict[str, Message] = {}
        self.log: list[dict[str, Any]] = []

    def set_run(self, run: Run) -> None:  # pragma: no cover - runs are created in __init__
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, ttl=ttl,
                       group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            if "_run_id" in msg.metadata.__dict__:
                msg.metadata.__dict__["_run_id"] = self._run.run_id
            node = msg.metadata.dst_node_id
            server_round = _round_of(msg)
            t0 = time.perf_counter()
            if self.drop is not None and self.drop(server_round, node, msg):
                self.log.append({"round": server_round, "node": node, "type": msg.metadata.message_type,
                                 "dropped": True})
                ids.append(msg.metadata.message_id)
                continue
            try:
                reply = self.client_app(_delivered(msg), self.contexts[node])
            except Exception as exc:  # noqa: BLE001 - a failing site is a reply with an error
                reply = Message(Error(code=1, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
            self.log.append({"round": server_round, "node": node, "type": msg.metadata.message_type,
                             "seconds": time.perf_counter() - t0, "error": reply.has_error()})
            if self.on_reply is not None:
                self.on_reply(msg, reply)
            self._replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def _delivered(msg: Message) -> Message:
    """What a SuperNode hands its ClientApp: a copy of its own (Flower sends the same content object
    to several nodes, and a ClientApp or mod may change what it receives, as ``secaggplus_mod`` does)."""
    out = copy.copy(msg)
    out.content = copy.deepcopy(msg.content)
    return out


def _round_of(msg: Message) -> int:
    try:
        return int(msg.content.config_records["config"]["server-round"])  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError):
        return 0
