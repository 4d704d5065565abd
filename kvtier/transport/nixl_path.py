"""The NIXL data path: the puller READs offered blocks straight out of the holder's arena.

One NIXL agent per daemon, created at start: it registers the whole host arena once (so it can
serve as a holder and receive as a puller) and keeps the agents of the holders it has read from.
A read prepares two descriptor lists (the holder's blocks, this daemon's slots) and issues one
batched READ; NIXL has no transfer timeout, so the read polls the transfer against its own
deadline and releases the handle (cancelling it) when the deadline passes.

The backend is chosen explicitly: UCX (any network; TCP or shared memory on one host) or
LIBFABRIC (EFA). A backend that cannot be instantiated is a start-up error, never a silent
fallback: UCX over EFA hardware runs at TCP speeds without saying so (docs/peer.md).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from kvtier.errors import ConfigError, MissingDependencyError
from kvtier.transport.base import NixlEndpoint, Offer, PeerError, PeerTransport

if TYPE_CHECKING:
    from kvtier.tiers.arena import SharedArena
    from kvtier.tiers.host import Slot

log = logging.getLogger(__name__)

_POLL_FIRST_S = 20e-6
_POLL_MAX_S = 1e-3
_MAX_GROUPS = 8  # at most this many READs per fetch


def nixl_available() -> bool:
    try:
        import nixl._api  # noqa: F401
    except ImportError:
        return False
    return True


def _new_agent(name: str, progress_delay_us: int) -> Any:
    """A NIXL agent whose progress thread pauses ``progress_delay_us`` between polls.

    ``nixl_agent`` sets ``pthrDelay = 0`` on its config, which keeps a core spinning in every idle
    daemon (measured: 0.99 of a core idle; 0.03 with 100 us, transfers no slower). The config
    class it builds is swapped for the duration of the call for one that keeps the delay.
    """
    import nixl._api as api

    base = api.nixlBind.nixlAgentConfig

    class _DelayedConfig(base):  # type: ignore[misc, valid-type]
        @property
        def pthrDelay(self) -> int:
            return base.pthrDelay.__get__(self)

        @pthrDelay.setter
        def pthrDelay(self, value: int) -> None:
            base.pthrDelay.__set__(self, max(value, progress_delay_us))

    with _AGENT_CREATION:
        api.nixlBind.nixlAgentConfig = _DelayedConfig
        try:
            return api.nixl_agent(name, api.nixl_agent_config(backends=[]))
        finally:
            api.nixlBind.nixlAgentConfig = base


_AGENT_CREATION = threading.Lock()


def _groups(count: int) -> list[range]:
    """The READs of a fetch of ``count`` blocks: 1, 2, 4... blocks, the last taking the rest (at
    most ``_MAX_GROUPS``). All are in flight at once; the first blocks land (and are checked, and
    count for the waiting request's budget) early instead of after the whole batch."""
    groups, start, size = [], 0, 1
    while start < count:
        end = count if len(groups) == _MAX_GROUPS - 1 else min(start + size, count)
        groups.append(range(start, end))
        start, size = end, size * 2
    return groups


class NixlTransport(PeerTransport):
    name: ClassVar[str] = "nixl"

    def __init__(self, arena: SharedArena, *, agent_name: str, backend: str = "UCX", progress_delay_us: int = 100) -> None:
        try:
            import nixl._api  # noqa: F401
        except ImportError as exc:
            raise MissingDependencyError(
                "peer.transport is 'nixl' but NIXL is not installed: pip install 'kvtier[peer]' (or nixl), "
                "or set peer.transport to 'tcp' or 'auto'") from exc
        self.backend = backend
        self._arena = arena
        self._lock = threading.Lock()  # one caller of the agent at a time (it is not thread-safe by default)
        self._agent = _new_agent(agent_name, progress_delay_us)
        try:
            self._agent.create_backend(backend, self._agent.get_plugin_params(backend))
        except Exception as exc:  # nixl raises its own binding errors (NIXL_ERR_NOT_FOUND...)
            hint = (" LIBFABRIC needs libfabric >= 1.21 from the EFA installer (/opt/amazon/efa/lib first in "
                    "LD_LIBRARY_PATH) and an EFA device (vpc.amazonaws.com/efa); see docs/peer.md") if backend == "LIBFABRIC" else ""
            raise ConfigError(f"NIXL backend {backend} cannot be instantiated ({exc}); kvtier does not fall back to "
                              f"another backend on its own.{hint}") from exc
        self._base = arena.base_address()
        self._registration = self._agent.register_memory(
            self._agent.get_reg_descs([(self._base, arena.nbytes, 0, "")], "DRAM"))
        self.endpoint = NixlEndpoint(agent_name, bytes(self._agent.get_agent_metadata()), self._base, backend)
        self._remote_agents: set[str] = set()
        log.info("NIXL agent %s: backend %s, arena of %d bytes registered", agent_name, backend, arena.nbytes)

    def usable_for(self, offer: Offer) -> bool:
        return offer.nixl is not None and offer.nixl.backend == self.backend

    def connect(self, offer: Offer) -> None:
        """Load the holder's agent and open the connection now: the first transfer to a new peer
        otherwise pays UCX's connection set-up (tens of milliseconds) inside a request's wait."""
        if offer.nixl is None:
            return
        try:
            agent = self._remote(offer.nixl)
            with self._lock:
                self._agent.make_connection(agent)
        except PeerError:
            raise
        except Exception as exc:
            raise PeerError(f"peer {offer.peer}: NIXL could not connect ({exc})", peer=offer.peer, reason="unreachable") from exc

    def _remote(self, endpoint: NixlEndpoint) -> str:
        with self._lock:
            if endpoint.agent not in self._remote_agents:
                name = self._agent.add_remote_agent(endpoint.metadata)
                name = name.decode() if isinstance(name, bytes) else str(name)
                if name != endpoint.agent:
                    self._agent.remove_remote_agent(name)
                    raise PeerError(f"NIXL metadata names agent {name!r}, the offer {endpoint.agent!r}", reason="invalid")
                self._remote_agents.add(name)
            return endpoint.agent

    def _forget(self, agent: str) -> None:
        with self._lock:
            if agent in self._remote_agents:
                self._remote_agents.discard(agent)
                try:
                    self._agent.remove_remote_agent(agent)
                except Exception as exc:  # noqa: BLE001 - nixl's binding errors have no common type
                    log.debug("removing NIXL agent %s: %s", agent, exc)

    def read(self, offer: Offer, indexes: Sequence[int], slots: Sequence[Slot], deadline: float,
             arrived: Callable[[int], None] | None = None) -> None:
        endpoint = offer.nixl
        if endpoint is None:
            raise PeerError(f"peer {offer.peer} offered no NIXL endpoint", peer=offer.peer, reason="invalid")
        try:
            remote = self._remote(endpoint)
        except PeerError:
            raise
        except Exception as exc:
            raise PeerError(f"peer {offer.peer}: NIXL could not load its agent metadata ({exc})", peer=offer.peer,
                            reason="invalid") from exc
        blocks = [offer.blocks[i] for i in indexes]
        count = len(blocks)
        groups = _groups(count)
        handles: list[tuple[str, Any]] = []
        pending: dict[int, Any] = {}
        try:
            with self._lock:
                local = self._agent.prep_xfer_dlist("", [(self._base + s.offset, s.nbytes, 0) for s in slots], "DRAM")
                handles.append(("dlist", local))
                far = self._agent.prep_xfer_dlist(remote, [(endpoint.arena_base + b.offset, b.nbytes, 0) for b in blocks], "DRAM")
                handles.append(("dlist", far))
                for number, positions in enumerate(groups):
                    xfer = self._agent.make_prepped_xfer("READ", local, list(positions), far, list(positions))
                    handles.append(("xfer", xfer))
                    if self._agent.transfer(xfer) == "ERR":
                        raise PeerError(f"peer {offer.peer}: NIXL could not start a READ", peer=offer.peer, reason="failed")
                    pending[number] = xfer
            pause = _POLL_FIRST_S
            while pending:
                done: list[int] = []
                with self._lock:
                    for number, xfer in pending.items():
                        state = self._agent.check_xfer_state(xfer)
                        if state == "DONE":
                            done.append(number)
                        elif state != "PROC":
                            raise PeerError(f"peer {offer.peer}: NIXL READ of {count} blocks failed ({state})", peer=offer.peer,
                                            reason="failed")
                for number in done:
                    del pending[number]
                    if arrived is not None:
                        for position in groups[number]:
                            arrived(position)
                if not pending:
                    break
                if done:
                    pause = _POLL_FIRST_S
                    continue
                if time.monotonic() >= deadline:
                    raise PeerError(f"peer {offer.peer}: NIXL READ of {count} blocks passed its deadline; cancelled",
                                    peer=offer.peer, reason="timeout")
                time.sleep(pause)
                pause = min(pause * 2, _POLL_MAX_S)
        except PeerError as exc:
            if exc.reason == "failed":
                self._forget(remote)  # a fresh connection next time (the peer may have restarted)
            raise
        except Exception as exc:  # nixl binding errors: bad descriptors, a vanished peer
            self._forget(remote)
            raise PeerError(f"peer {offer.peer}: NIXL READ failed ({exc})", peer=offer.peer, reason="failed") from exc
        finally:
            self._release(handles)  # cancels READs still in flight

    def _release(self, handles: list[tuple[str, Any]]) -> None:
        """Release the transfer (cancelling it if still running), then the descriptor lists."""
        with self._lock:
            for kind, handle in reversed(handles):
                try:
                    if kind == "xfer":
                        self._agent.release_xfer_handle(handle)
                    else:
                        self._agent.release_dlist_handle(handle)
                except Exception:
                    log.exception("releasing a NIXL %s handle failed", kind)

    def close(self) -> None:
        with self._lock:
            for agent in list(self._remote_agents):
                try:
                    self._agent.remove_remote_agent(agent)
                except Exception as exc:  # noqa: BLE001 - nixl's binding errors have no common type
                    log.debug("removing NIXL agent %s: %s", agent, exc)
            self._remote_agents.clear()
            try:
                self._agent.deregister_memory(self._registration)
            except Exception:
                log.exception("deregistering the arena from NIXL failed")
