"""What every node's launcher of one job shares: the attempt number, the launch id and how the job ended.

`randlift-launch` runs each attempt of a job as one torchrun launch (`elastic_launch`, no restarts
of its own) whose c10d rendezvous round is `<rdzv id>-<attempt>`. The nodes agree on the attempt
through keys in the rendezvous store, a `torch.distributed.TCPStore` that the launcher of the
host node opens at the rendezvous endpoint for the whole job (`multi_tenant=True`, so the
rendezvous of every attempt, in the same process, uses the same server and the keys outlive
attempts); the other nodes' launchers are its clients. Keys, under `randlift-launch/<rdzv id>/`:

- `attempt`: the attempt the job is at (0 first). A launcher that decides a restart advances it
  from the attempt it ran with `compare_set`, so nodes deciding at once advance it once; a
  launcher started again (a node that died) reads it and joins the current attempt's round.
- `launch_id`: the first launcher's id (or `RANDLIFT_LAUNCH_ID`), which the workers write into
  `exit_status.json`, so that every node recognises the trainer's status of this job.
- `end`: `{"code", "message"}` once a launcher ended the job (done, a final error, a stop, no
  restarts left). A launcher that ends the job sets it, then closes the rendezvous round of the
  attempt the job is at if another node already moved to it (`set_closed` of the public
  rendezvous handler), so a node waiting there stops waiting (its round raises
  RendezvousClosedError) and ends with the same status. A launcher that advanced the attempt reads
  `end` after advancing: either it sees the end, or the ending launcher sees its advance and
  closes its round (one store, one order of operations).

Every call is bounded by the store's timeout. If the host's launcher is gone the store is gone:
the job must be started again (as with torchrun's c10d rendezvous, whose store it also hosts).
"""

from __future__ import annotations

import json
import socket
import uuid
from datetime import timedelta

import torch.distributed as dist


def is_local_address(host: str) -> bool:
    """True if `host` names this machine: it resolves to an address a socket here can bind."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    for family, _, _, _, addr in infos:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((addr[0], 0))
            return True
        except OSError:
            continue
    return False


class JobStore:
    """The shared keys of one job (see the module docstring)."""

    def __init__(self, host: str, port: int, is_host: bool, rdzv_id: str, timeout_s: float):
        self.host, self.is_host, self.rdzv_id = host, is_host, rdzv_id
        self.store = dist.TCPStore(host, port, is_master=is_host, multi_tenant=True,
                                   timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
        self.port = self.store.port  # the chosen one when `port` was 0
        self.prefix = f"randlift-launch/{rdzv_id}/"
        self.store.compare_set(self.prefix + "attempt", "", "0")  # create it if absent

    def attempt(self) -> int:
        return int(self.store.get(self.prefix + "attempt"))

    def advance(self, ran: int) -> int:
        """Move the job from attempt `ran` to `ran + 1` (once, whoever asks first); the attempt now."""
        return int(self.store.compare_set(self.prefix + "attempt", str(ran), str(ran + 1)))

    def launch_id(self, mine: str | None) -> str:
        """The job's launch id: the first launcher's (`mine`, or a new one)."""
        return self.store.compare_set(self.prefix + "launch_id", "", mine or uuid.uuid4().hex[:16]).decode()

    def ended(self) -> tuple[int, str] | None:
        if not self.store.check([self.prefix + "end"]):
            return None
        end = json.loads(self.store.get(self.prefix + "end"))
        return int(end["code"]), str(end["message"])

    def end(self, code: int, message: str, ran: int, close_round) -> None:
        """Record the job's end; close the round of a later attempt another node already waits in
        (`close_round(attempt)`)."""
        self.store.set(self.prefix + "end", json.dumps({"code": code, "message": message}))
        now = self.attempt()
        if now > ran:
            close_round(now)


def close_round(endpoint: str, run_id: str, nodes: tuple[int, int], is_host: bool, local_addr: str | None) -> None:
    """Close the c10d rendezvous round `run_id` at `endpoint` (torch's public handler API): a node
    waiting in it raises RendezvousClosedError, and no node can join it any more."""
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler
    params = RendezvousParameters(backend="c10d", endpoint=endpoint, run_id=run_id, min_nodes=nodes[0],
                                  max_nodes=nodes[1], local_addr=local_addr, is_host=is_host, read_timeout=30)
    get_rendezvous_handler(params).set_closed()
