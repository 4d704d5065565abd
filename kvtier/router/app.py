"""``kvtier route``: an OpenAI-compatible proxy in front of vLLM replicas (Starlette on uvicorn,
``httpx`` upstream) that sends each request where its prompt's prefix is cached.

Per request: tokenize the prompt as vLLM will (``tokens.py``), ask the index for each candidate
node's cached prefix within a few milliseconds (``scores.py``), let the policy choose
(``policy.py``), and relay the replica's answer (streamed as it arrives for ``stream: true``).

Fails soft: no scores (index down, slow, unconfigured; a prompt that cannot be tokenized) means
least-loaded; a replica that refuses the connection is taken out of rotation and the request
goes to another (nothing was sent, so it is safe to retry), while the poller tries the replica
again until it answers; a replica's error status and body pass through unchanged; a client that
disconnects closes the upstream request, which makes vLLM abort it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from kvtier.config import RouterConfig
from kvtier.router.metrics import RouterMetrics
from kvtier.router.policy import CachedPrefix, Decision, RouteRequest, RoutingPolicy
from kvtier.router.replicas import Replica, ServedModel, nodes_by_host
from kvtier.router.scores import IndexScores, IndexUnanswered
from kvtier.router.tokens import UnroutableBody, tokenizer_for

log = logging.getLogger(__name__)
decisions_log = logging.getLogger("kvtier.router.decisions")

_FORWARDED_REQUEST_HEADERS = ("content-type", "accept", "x-request-id")
_RETURNED_HEADERS = ("content-type", "x-request-id")


def error_response(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    """An error in the OpenAI API's shape."""
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


@dataclass(eq=False)
class _Accounting:
    """One request's share of a replica's load, undone exactly once each."""

    replica: Replica
    prefill_tokens: int
    arrived: float
    metrics: RouterMetrics
    prefilled: bool = False
    finished: bool = False

    def __post_init__(self) -> None:
        self.replica.in_flight += 1
        self.replica.pending_prefill_tokens += self.prefill_tokens

    def first_bytes(self) -> None:
        if not self.prefilled:
            self.prefilled = True
            self.replica.pending_prefill_tokens -= self.prefill_tokens
            self.metrics.first_byte_seconds.observe(time.perf_counter() - self.arrived)

    def finish(self) -> None:
        if not self.finished:
            self.finished = True
            if not self.prefilled:
                self.prefilled = True
                self.replica.pending_prefill_tokens -= self.prefill_tokens
            self.replica.in_flight -= 1


class Router:
    def __init__(self, settings: RouterConfig, replicas: Sequence[Replica], policy: RoutingPolicy, *,
                 scores: IndexScores | None = None, list_nodes: Any = None, dns: tuple[str, int] | None = None,
                 api_key: str | None = None, upstream_api_key: str | None = None) -> None:
        """``list_nodes``: a callable returning {node: advertised address} (the index's
        ListNodes, called on a thread), to name the node of replicas given without one."""
        self.settings = settings
        self.replicas: list[Replica] = list(replicas)
        self.policy = policy
        self.scores = scores if policy.uses_index else None
        self._list_nodes = list_nodes
        self._dns = dns
        self._api_key = api_key
        self._upstream_api_key = upstream_api_key
        self.metrics = RouterMetrics()
        self._http: httpx.AsyncClient | None = None
        self._tasks: list[asyncio.Task] = []
        self._health_tried: dict[str, float] = {}

    # ---- lifecycle ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        timeout = httpx.Timeout(self.settings.request_timeout_s, connect=self.settings.connect_timeout_s)
        # Idle connections are dropped before the replicas' own keep-alive timeout (uvicorn's 5 s)
        # could close one just as a request is sent on it.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256, keepalive_expiry=2.0)
        self._http = httpx.AsyncClient(timeout=timeout, limits=limits)
        await self._discover()
        await self._poll()
        await self._load_tokenizers()
        self._tasks = [asyncio.create_task(self._every(self.settings.metrics_interval_s, self._poll)),
                       asyncio.create_task(self._every(self.settings.discovery_interval_s, self._discover))]
        try:
            yield
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if self.scores is not None:
                self.scores.close()
            await self._http.aclose()

    async def _every(self, interval_s: float, job: Any) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await job()
            except Exception:  # a failed round is retried next interval
                log.exception("router background job %s failed", job.__name__)

    # ---- replicas: discovery, load, health ---------------------------------------------------

    async def _discover(self) -> None:
        if self._dns is not None:
            await self._resolve_dns()
        if self._list_nodes is not None and any(not r.node_explicit for r in self.replicas):
            try:
                by_host = nodes_by_host(await asyncio.to_thread(self._list_nodes))
            except Exception as exc:  # the index is down: keep what is known
                log.warning("cannot list the index's nodes to name the replicas' nodes: %s", exc)
            else:
                for replica in self.replicas:
                    if not replica.node_explicit:
                        replica.node = by_host.get(replica.host, replica.node)
        for replica in self.replicas:
            if replica.up and not replica.models:
                await self._fetch_models(replica)

    async def _load_tokenizers(self) -> None:
        """Load the served models' tokenizers before the first request needs them (seconds each)."""
        if self.scores is None:
            return
        roots = {self._model_root(model, self.settings.tokenizer) for r in self.replicas for model in r.models} or (
            {self.settings.tokenizer} if self.settings.tokenizer else set())
        for root in roots:
            try:
                await asyncio.to_thread(tokenizer_for, root)
            except Exception as exc:  # requests for it are routed by load; the error is logged again then
                log.warning("cannot load the tokenizer of %s: %s", root, exc)

    async def _resolve_dns(self) -> None:
        host, port = self._dns
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            log.warning("cannot resolve the replicas' name %s: %s (keeping %d replicas)", host, exc, len(self.replicas))
            return
        urls = []
        for family, *_rest, sockaddr in infos:
            address = f"[{sockaddr[0]}]" if family == socket.AF_INET6 else sockaddr[0]
            urls.append(f"http://{address}:{port}")
        known = {r.url: r for r in self.replicas}
        self.replicas = [known.get(url) or Replica(url) for url in dict.fromkeys(sorted(urls))]

    async def _fetch_models(self, replica: Replica) -> None:
        try:
            reply = await self._http.get(f"{replica.url}/v1/models", headers=self._upstream_auth(None),
                                         timeout=self.settings.connect_timeout_s)
            if reply.status_code == 200:
                replica.models = {m["id"]: ServedModel(m.get("root") or m["id"], m.get("parent")) for m in reply.json().get("data", [])}
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            log.debug("cannot list %s's models: %s", replica.url, exc)

    async def _poll(self) -> None:
        await asyncio.gather(*(self._poll_one(r) for r in self.replicas))
        for replica in self.replicas:
            self.metrics.replica_up.labels(replica.url).set(1 if replica.up else 0)
            self.metrics.in_flight.labels(replica.url).set(replica.in_flight)

    async def _poll_one(self, replica: Replica) -> None:
        timeout = self.settings.connect_timeout_s
        if replica.up:
            try:
                reply = await self._http.get(f"{replica.url}/metrics", timeout=timeout)
                reply.raise_for_status()
                replica.observe_metrics(reply.text)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # nothing listens there
                replica.take_out(f"its /metrics refused the connection ({type(exc).__name__}: {exc})")
            except httpx.HTTPError as exc:  # slow or broken once (a busy machine): out after a few in a row
                replica.poll_failed(f"its /metrics failed ({type(exc).__name__}: {exc})")
            except ValueError as exc:  # a garbled exposition: the load is unknown, not the replica down
                log.warning("cannot parse %s/metrics: %s", replica.url, exc)
            return
        now = time.monotonic()
        if now - self._health_tried.get(replica.url, 0.0) < self.settings.health_interval_s:
            return
        self._health_tried[replica.url] = now
        try:
            reply = await self._http.get(f"{replica.url}/health", timeout=timeout)
        except httpx.HTTPError:
            return
        if reply.status_code == 200:
            replica.put_back()
            if not replica.models:
                await self._fetch_models(replica)

    # ---- requests ----------------------------------------------------------------------------

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
        ], lifespan=self.lifespan)

    async def completions(self, request: Request) -> Response:
        return await self._proxy(request, "/v1/completions", chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._proxy(request, "/v1/chat/completions", chat=True)

    async def models(self, request: Request) -> Response:
        if (denied := self._check_key(request)) is not None:
            return denied
        for replica in [r for r in self.replicas if r.up]:
            try:
                reply = await self._http.get(f"{replica.url}/v1/models", headers=self._upstream_auth(request))
            except httpx.TransportError as exc:
                replica.take_out(f"{type(exc).__name__}: {exc}")
                continue
            return Response(reply.content, status_code=reply.status_code, headers=_returned(reply))
        return error_response(503, "no replica is available", "service_unavailable")

    async def health(self, _request: Request) -> Response:
        up = sum(1 for r in self.replicas if r.up)
        return JSONResponse({"replicas": len(self.replicas), "replicas_up": up}, status_code=200 if up else 503)

    async def prometheus(self, _request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def _proxy(self, request: Request, path: str, *, chat: bool) -> Response:
        arrived = time.perf_counter()
        if (denied := self._check_key(request)) is not None:
            return denied
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError as exc:
            return error_response(400, f"the request body is not valid JSON: {exc}")
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return error_response(400, "the request body must be a JSON object with a 'model' string")
        tokens = await self._tokens(body, chat)
        cached = await self._cached(body, tokens) if tokens else None
        tried: set[Replica] = set()
        while True:
            # Replicas in rotation first; if none is, the others anyway (the poller may be behind).
            candidates = [r for r in self.replicas if r.up and r not in tried] or [r for r in self.replicas if r not in tried]
            if not candidates:
                return error_response(503, "no replica is available: " + "; ".join(
                    f"{r.url}: {r.down_reason or 'failed this request'}" for r in self.replicas) if self.replicas else
                    "no replica is configured", "service_unavailable")
            decision = self.policy.choose(candidates, RouteRequest(len(tokens or ()), cached))
            replica = decision.replica
            accounting = _Accounting(replica, max(len(tokens or ()) - decision.cached_tokens, 0), arrived, self.metrics)
            try:
                upstream = await self._http.send(self._http.build_request(
                    "POST", f"{replica.url}{path}", content=raw, headers=self._upstream_headers(request)), stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                accounting.finish()
                replica.take_out(f"{type(exc).__name__}: {exc}")
                self.metrics.fallbacks.labels("replica_down").inc()
                tried.add(replica)
                continue
            except httpx.HTTPError as exc:  # sent, then failed: not safe to send again
                accounting.finish()
                self.metrics.responses.labels(replica.url, "502").inc()
                return error_response(502, f"the replica {replica.url} failed: {type(exc).__name__}: {exc}", "bad_gateway")
            except BaseException:
                accounting.finish()
                raise
            break
        replica.put_back()  # (a replica out of rotation that answered: the poller was behind)
        self._log_decision(request, decision, tokens)
        self.metrics.requests.labels(replica.url, decision.policy).inc()
        self.metrics.responses.labels(replica.url, str(upstream.status_code)).inc()
        if tokens:
            self.metrics.cached_fraction.observe(min(decision.cached_tokens / len(tokens), 1.0))
        headers = {**_returned(upstream), "x-kvtier-replica": replica.describe()}
        if upstream.headers.get("content-type", "").startswith("text/event-stream"):
            return StreamingResponse(self._relay(upstream, accounting), status_code=upstream.status_code, headers=headers)
        try:
            content = await _read_unless_disconnected(upstream, request, accounting)
        finally:
            accounting.finish()
            await upstream.aclose()
        if content is None:
            return Response(status_code=499)  # the client is gone; nobody reads this
        return Response(content, status_code=upstream.status_code, headers=headers)

    async def _relay(self, upstream: httpx.Response, accounting: _Accounting) -> AsyncIterator[bytes]:
        """The replica's stream as it arrives. Closing it (the client disconnected, the server
        stopped) closes the upstream connection, and vLLM aborts the request."""
        try:
            async for chunk in upstream.aiter_raw():
                accounting.first_bytes()
                yield chunk
        except httpx.HTTPError as exc:
            log.warning("the stream from %s broke: %s", accounting.replica.url, exc)
        finally:
            accounting.finish()
            await upstream.aclose()

    async def _tokens(self, body: dict[str, Any], chat: bool) -> list[int] | None:
        if not self.policy.uses_index or self.scores is None:
            return None
        started = time.perf_counter()
        try:
            tokenizer = await asyncio.to_thread(tokenizer_for, self._model_root(body["model"], self.settings.tokenizer))
            tokens = await asyncio.to_thread(tokenizer.chat if chat else tokenizer.completion, body)
        except UnroutableBody as exc:
            log.debug("routing by load: %s", exc)
            self.metrics.fallbacks.labels("no_tokens").inc()
            return None
        except Exception as exc:  # a tokenizer that cannot load or a template that fails: route by load
            log.warning("cannot tokenize a request for %s (routing it by load): %s", body["model"], exc)
            self.metrics.fallbacks.labels("no_tokens").inc()
            return None
        self.metrics.tokenize_seconds.observe(time.perf_counter() - started)
        return tokens

    async def _cached(self, body: dict[str, Any], tokens: list[int]) -> dict[str, CachedPrefix] | None:
        model = body["model"]
        salt = body.get("cache_salt")
        nodes = sorted({r.node for r in self.replicas if r.up and r.node})
        if not nodes:
            self.metrics.fallbacks.labels("no_nodes").inc()
            return None
        started = time.perf_counter()
        try:
            cached = await self.scores.score(self._model_root(model, self.settings.index_model), tokens, nodes,
                                             lora_name=self._lora_name(model), cache_salt=salt if isinstance(salt, str) else "")
        except IndexUnanswered as exc:
            self.metrics.fallbacks.labels(f"index_{exc.reason}").inc()
            return None
        self.metrics.index_seconds.observe(time.perf_counter() - started)
        return cached

    def _model_root(self, model: str, override: str | None) -> str:
        """The base model's path or hub name: how daemons name it in the index, and where its
        tokenizer is (a LoRA adapter's requests use its base model's)."""
        if override:
            return override
        served = self._served(model)
        if served is not None and served.parent is not None:
            base = self._served(served.parent)
            return base.root if base is not None else served.parent
        return served.root if served is not None else model

    def _lora_name(self, model: str) -> str:
        """The adapter's name when ``model`` is a LoRA adapter (its blocks are hashed with it)."""
        served = self._served(model)
        return model if served is not None and served.parent is not None else ""

    def _served(self, model: str) -> ServedModel | None:
        for replica in self.replicas:
            if model in replica.models:
                return replica.models[model]
        return None

    # ---- headers and auth --------------------------------------------------------------------

    def _check_key(self, request: Request) -> Response | None:
        if self._api_key is None:
            return None
        sent = request.headers.get("authorization", "")
        if hmac.compare_digest(sent.encode(), f"Bearer {self._api_key}".encode()):
            return None
        return error_response(401, "a valid API key is required: send 'Authorization: Bearer <key>'", "authentication_error")

    def _upstream_auth(self, request: Request | None) -> dict[str, str]:
        if self._upstream_api_key is not None:
            return {"authorization": f"Bearer {self._upstream_api_key}"}
        if self._api_key is None and request is not None and "authorization" in request.headers:
            return {"authorization": request.headers["authorization"]}  # the replicas check the client's own key
        return {}

    def _upstream_headers(self, request: Request) -> dict[str, str]:
        headers = {name: request.headers[name] for name in _FORWARDED_REQUEST_HEADERS if name in request.headers}
        return {**headers, **self._upstream_auth(request)}

    def _log_decision(self, request: Request, decision: Decision, tokens: list[int] | None) -> None:
        if not self.settings.log_decisions:
            return
        costs = ", ".join(f"{url} {cost:.0f}" for url, cost in decision.costs.items())
        decisions_log.info("%s %s (%s tokens) -> %s [%s] %s%s", request.method, request.url.path,
                           len(tokens) if tokens else "?", decision.replica.url, decision.policy, decision.reason,
                           f"; costs: {costs}" if costs else "")


def _returned(reply: httpx.Response) -> dict[str, str]:
    return {name: reply.headers[name] for name in _RETURNED_HEADERS if name in reply.headers}


async def _read_unless_disconnected(upstream: httpx.Response, request: Request, accounting: _Accounting) -> bytes | None:
    """The whole reply, or None if the client disconnected first (the caller closes upstream)."""
    read = asyncio.ensure_future(upstream.aread())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({read, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if read.done():
        accounting.first_bytes()
        return read.result()
    read.cancel()
    with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
        await read
    return None


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
