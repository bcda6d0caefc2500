"""Rewards from a remote HTTP service: the client (:class:`RemoteRewardSource`) and the server side.

Protocol version 1 (:data:`PROTOCOL_VERSION`, described for service authors in docs/rewards.md)::

    POST <reward_server URL>            Content-Type: application/json
    {"version": 1, "items": [{"prompt": "...", "response": "...", "extras": {...}}, ...]}

    200 {"version": 1, "rewards": [0.5, 1.0, ...]}     one finite number per item, same order
    other 4xx {"error": "why the request is wrong"}    not retried: the run stops with the message
    5xx, 408, 429 {"error": "..."}                     retried (bounded, with backoff)

``extras`` holds the dataset row's extra fields (e.g. a ground-truth answer). An empty ``items``
list is a valid request (answered with ``"rewards": []``); the client sends one as a probe before
training starts.

:class:`RemoteRewardSource` is a :class:`~alignment.rewards.RewardSource`:
``source(prompts, responses, extras) -> float32 [B]``. It never invents a reward: a service that is
down, slow or answers anything but one finite number per item raises :class:`RemoteRewardError`
naming the URL, the rows and what was wrong.

The server side (:func:`handle_reward_request`, :func:`make_reward_server`) wraps any local
``RewardSource``; ``scripts/reward_server.py`` serves the registered reward functions with it.
Only the standard library is used (``http.client``, ``http.server``); the client connects directly,
without HTTP proxies.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import urlsplit

import numpy as np

from alignment.rewards import RewardError, RewardSource

__all__ = [
    "PROTOCOL_VERSION",
    "RETRYABLE_STATUS",
    "RemoteRewardError",
    "RemoteRewardSource",
    "probe_reward_servers",
    "remote_reward_problems",
    "backoff_delay",
    "encode_request",
    "decode_rewards",
    "handle_reward_request",
    "make_reward_server",
    "serve_in_thread",
]

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
#: HTTP statuses worth retrying (the service is overloaded or restarting); other 4xx fail at once.
RETRYABLE_STATUS = frozenset({408, 429}) | frozenset(range(500, 600))
#: Largest answer (client) / request (server) body accepted, in bytes.
MAX_BODY_BYTES = 64 * 1024 * 1024

#: What the server side scores with: any ``RewardSource``, or a plain function of the same signature.
LocalRewardSource = Callable[[Sequence[str], Sequence[str], Sequence[Mapping[str, Any]]], np.ndarray]


class RemoteRewardError(RewardError):
    """The reward service is unreachable, too slow, refused the request or answered garbage."""


class ProtocolError(ValueError):
    """A message that does not follow the protocol; the text says what is wrong (no URL)."""


# ------------------------------------------------------------------------------------- pure parts
def backoff_delay(attempt: int, backoff: float, max_backoff: float) -> float:
    """Seconds to wait after failed attempt ``attempt`` (0-based): ``min(backoff * 2**attempt, max_backoff)``."""
    return float(min(backoff * (2.0**attempt), max_backoff))


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serializable")


def encode_request(prompts: Sequence[str], responses: Sequence[str], extras: Sequence[Mapping[str, Any]] | None) -> bytes:
    """The JSON body of one request: ``{"version": 1, "items": [{"prompt", "response", "extras"}, ...]}``.

    NumPy scalars and arrays in ``extras`` become numbers and lists; anything else that JSON cannot
    hold (or NaN/inf) raises ``ValueError`` naming the row and field.
    """
    prompts, responses = list(prompts), list(responses)
    extras = [{} for _ in prompts] if extras is None else list(extras)
    if not len(prompts) == len(responses) == len(extras):
        raise ValueError(
            f"prompts, responses and extras must have the same length, got {len(prompts)}, {len(responses)}, {len(extras)}"
        )
    items = []
    for row, (prompt, response, extra) in enumerate(zip(prompts, responses, extras)):
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise ValueError(f"row {row}: prompt and response must be strings, got {type(prompt).__name__}, {type(response).__name__}")
        if not isinstance(extra, Mapping):
            raise ValueError(f"row {row}: extras must be a mapping of field -> value, got {type(extra).__name__}")
        items.append({"prompt": prompt, "response": response, "extras": dict(extra)})
    try:
        return json.dumps({"version": PROTOCOL_VERSION, "items": items}, allow_nan=False, default=_jsonable).encode()
    except (TypeError, ValueError) as error:
        for row, item in enumerate(items):  # name the offending field
            for key, value in item["extras"].items():
                try:
                    json.dumps(value, allow_nan=False, default=_jsonable)
                except (TypeError, ValueError) as field_error:
                    raise ValueError(f"row {row}: extras field {key!r} cannot be sent as JSON: {field_error}") from None
        raise ValueError(f"the request cannot be encoded as JSON: {error}") from None


def _reject_constant(name: str) -> Any:
    raise ProtocolError(f"non-finite number {name} (rewards must be finite)")


def _excerpt(body: bytes, limit: int = 200) -> str:
    text = body[:limit].decode("utf-8", errors="replace")
    return repr(text + ("..." if len(body) > limit else ""))


def decode_rewards(body: bytes, expected: int) -> np.ndarray:
    """``float32 [expected]`` rewards of a 200 answer; :class:`ProtocolError` saying what is wrong otherwise.

    The answer must be a JSON object whose ``"rewards"`` is a list of ``expected`` finite numbers
    (``true``/``false``, strings, null, NaN and infinities are refused); a ``"version"``, when
    present, must be :data:`PROTOCOL_VERSION`.
    """
    try:
        answer = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except ProtocolError:
        raise
    except (UnicodeDecodeError, ValueError) as error:
        raise ProtocolError(f"the answer is not JSON ({error}): {_excerpt(body)}") from None
    if not isinstance(answer, dict):
        raise ProtocolError(f"the answer must be a JSON object with 'rewards', got {type(answer).__name__}: {_excerpt(body)}")
    if "version" in answer and answer["version"] != PROTOCOL_VERSION:
        raise ProtocolError(f"the answer speaks protocol version {answer['version']!r}; this client speaks {PROTOCOL_VERSION}")
    if "rewards" not in answer:
        raise ProtocolError(f"the answer has no 'rewards' field: {_excerpt(body)}")
    rewards = answer["rewards"]
    if not isinstance(rewards, list):
        raise ProtocolError(f"'rewards' must be a list, got {type(rewards).__name__}")
    if len(rewards) != expected:
        raise ProtocolError(f"'rewards' has {len(rewards)} values for {expected} items")
    for index, value in enumerate(rewards):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProtocolError(f"reward {index} is not a number: {value!r}")
    array = np.asarray(rewards, dtype=np.float64)
    with np.errstate(over="ignore"):
        array32 = array.astype(np.float32)
    bad = np.flatnonzero(~np.isfinite(array32))
    if bad.size:
        raise ProtocolError(f"reward {int(bad[0])} is {rewards[int(bad[0])]!r}, not a finite float32")
    return array32


def _error_message(body: bytes) -> str:
    """The ``"error"`` of an error answer, or an excerpt of whatever came back."""
    try:
        answer = json.loads(body.decode("utf-8"))
        if isinstance(answer, dict) and isinstance(answer.get("error"), str):
            return answer["error"]
    except (UnicodeDecodeError, ValueError):
        pass
    return _excerpt(body) if body else "(empty body)"


def remote_reward_problems(url: str | None, timeout: float, max_retries: int, batch_size: int) -> list[tuple[str, str]]:
    """``(argument, message)`` for every unusable ``reward_server*`` setting (no network access)."""
    problems = []
    if url is not None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            problems.append(("reward_server", f"{url!r} is not an http:// or https:// URL with a host (e.g. http://127.0.0.1:8000/rewards)"))
        else:
            try:
                parts.port  # noqa: B018 - raises on a malformed port
            except ValueError as error:
                problems.append(("reward_server", f"{url!r} has a bad port: {error}"))
    if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
        problems.append(("reward_server_timeout", f"must be a number of seconds > 0, got {timeout!r}"))
    if not (isinstance(max_retries, int) and max_retries >= 0):
        problems.append(("reward_server_max_retries", f"must be an integer >= 0, got {max_retries!r}"))
    if not (isinstance(batch_size, int) and batch_size >= 1):
        problems.append(("reward_server_batch_size", f"must be an integer >= 1, got {batch_size!r}"))
    return problems


# ----------------------------------------------------------------------------------------- client
class _Timeout(Exception):
    pass


class RemoteRewardSource(RewardSource):
    """A :class:`~alignment.rewards.RewardSource` that asks a reward service over HTTP (protocol :data:`PROTOCOL_VERSION`).

    Args:
        url: the endpoint requests are POSTed to (``http://host:port/path``; the reference server's is
            ``http://127.0.0.1:PORT/rewards``).
        timeout: seconds one request may take, from connecting to the last byte of the answer.
        max_retries: further attempts after a failed one (connection error, timeout, HTTP 5xx/408/429);
            ``0`` = one attempt. Garbage answers and other 4xx are not retried.
        batch_size: items per request; larger calls are split into consecutive requests.
        backoff, max_backoff: the wait after failed attempt ``k`` is ``min(backoff * 2**k, max_backoff)`` s.

    ``reward(prompts, responses, extras)`` returns ``float32 [B]`` in the order of the inputs, or raises
    :class:`RemoteRewardError` naming the URL, the rows and the last failure.
    """

    name = "remote"

    def __init__(
        self,
        url: str,
        timeout: float = 60.0,
        max_retries: int = 3,
        batch_size: int = 128,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
    ) -> None:
        problems = remote_reward_problems(url, timeout, max_retries, batch_size)
        if backoff < 0 or max_backoff < 0:
            problems.append(("backoff", f"backoff and max_backoff must be >= 0, got {backoff}, {max_backoff}"))
        if problems:
            raise ValueError("; ".join(f"{name}: {message}" for name, message in problems))
        self.url = url
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.batch_size = int(batch_size)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        parts = urlsplit(url)
        self._https = parts.scheme == "https"
        self._host, self._port = parts.hostname, parts.port
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")

    def __repr__(self) -> str:
        return f"RemoteRewardSource({self.url!r}, timeout={self.timeout}, max_retries={self.max_retries}, batch_size={self.batch_size})"

    def __call__(
        self, prompts: Sequence[str], responses: Sequence[str], extras: Sequence[Mapping[str, Any]] | None = None
    ) -> np.ndarray:
        prompts, responses = list(prompts), list(responses)
        extras = [{} for _ in prompts] if extras is None else list(extras)
        if not len(prompts) == len(responses) == len(extras):
            raise ValueError(
                f"prompts, responses and extras must have the same length, got {len(prompts)}, {len(responses)}, {len(extras)}"
            )
        rewards = []
        for start in range(0, len(prompts), self.batch_size):
            stop = min(start + self.batch_size, len(prompts))
            body = encode_request(prompts[start:stop], responses[start:stop], extras[start:stop])
            rows = f"row {start}" if stop - start == 1 else f"rows {start}-{stop - 1}"
            rewards.append(self._request(body, stop - start, f"{rows} of {len(prompts)}"))
        return np.concatenate(rewards) if rewards else np.zeros([0], dtype=np.float32)

    def probe(self) -> None:
        """Send an empty batch: fails early (before any model loads) if the service is unusable."""
        self._request(encode_request([], [], []), 0, "the probe (an empty batch)")

    # -- one request, with retries
    def _request(self, body: bytes, expected: int, what: str) -> np.ndarray:
        attempts = self.max_retries + 1
        started = time.monotonic()
        failure = ""
        for attempt in range(attempts):
            try:
                status, answer = self._post(body)
            except _Timeout:
                failure = f"no complete answer within reward_server_timeout={self.timeout:g} s"
            except ConnectionRefusedError:
                failure = "connection refused (nothing listens there: is the service running?)"
            except (OSError, http.client.HTTPException) as error:
                failure = f"connection failed: {type(error).__name__}: {error}"
            else:
                if status == 200:
                    try:
                        return decode_rewards(answer, expected)
                    except ProtocolError as error:
                        raise RemoteRewardError(
                            f"reward server {self.url} answered garbage for {what}: {error} "
                            f"(protocol version {PROTOCOL_VERSION}, see docs/rewards.md)"
                        ) from None
                message = _error_message(answer)
                if status not in RETRYABLE_STATUS:
                    raise RemoteRewardError(f"reward server {self.url} refused {what}: HTTP {status}: {message}")
                failure = f"HTTP {status}: {message}"
            if attempt + 1 < attempts:
                delay = backoff_delay(attempt, self.backoff, self.max_backoff)
                logger.warning(
                    "reward server %s: attempt %d/%d for %s failed (%s); retrying in %.3g s",
                    self.url, attempt + 1, attempts, what, failure, delay,
                )  # fmt: skip
                time.sleep(delay)
        raise RemoteRewardError(
            f"reward server {self.url} failed {attempts} attempt(s) for {what} over {time.monotonic() - started:.1f} s "
            f"(reward_server_max_retries={self.max_retries}); last error: {failure}"
        )

    def _post(self, body: bytes) -> tuple[int, bytes]:
        """``(status, body)`` of one POST that must finish within ``timeout`` (raises :class:`_Timeout`)."""
        deadline = time.monotonic() + self.timeout
        connection_type = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        connection = connection_type(self._host, self._port, timeout=self.timeout)
        try:
            connection.connect()
            sock = connection.sock
            connection.request(
                "POST", self._path, body=body,
                headers={"Content-Type": "application/json", "Accept": "application/json", "Connection": "close"},
            )  # fmt: skip
            sock.settimeout(max(deadline - time.monotonic(), 1e-3))
            response = connection.getresponse()
            chunks, size = [], 0
            while not response.isclosed():  # the response closes the socket after its last byte
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _Timeout()
                sock.settimeout(remaining)
                chunk = response.read(65536)
                if not chunk:
                    break
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise http.client.HTTPException(f"answer larger than {MAX_BODY_BYTES} bytes")
                chunks.append(chunk)
            return response.status, b"".join(chunks)
        except TimeoutError:  # socket.timeout
            raise _Timeout() from None
        finally:
            connection.close()


def probe_reward_servers(source: RewardSource | None) -> None:
    """:meth:`RemoteRewardSource.probe` every remote service in ``source`` (itself, or the parts of a
    :class:`~alignment.rewards.SumOfRewardSources`): call it before loading models."""
    if isinstance(source, RemoteRewardSource):
        source.probe()
    for part in getattr(source, "sources", []):
        probe_reward_servers(part)


# ----------------------------------------------------------------------------------------- server
def handle_reward_request(body: bytes, reward_source: LocalRewardSource) -> tuple[int, dict[str, Any]]:
    """``(HTTP status, JSON answer)`` for one request body, scoring it with ``reward_source``.

    400: not a protocol request (the message says why); 422: the reward function failed or returned
    a non-finite value (deterministic: the client does not retry); 200: ``{"version", "rewards"}``.
    """
    try:
        request = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        return 400, {"error": f"the request is not JSON: {error}"}
    if not isinstance(request, dict):
        return 400, {"error": "the request must be a JSON object {'version': 1, 'items': [...]}"}
    if request.get("version") != PROTOCOL_VERSION:
        return 400, {"error": f"unsupported protocol version {request.get('version')!r}; this server speaks {PROTOCOL_VERSION}"}
    items = request.get("items")
    if not isinstance(items, list):
        return 400, {"error": "'items' must be a list of {'prompt', 'response', 'extras'} objects"}
    prompts, responses, extras = [], [], []
    for index, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not isinstance(item.get("response"), str):
            return 400, {"error": f"item {index}: needs string fields 'prompt' and 'response'"}
        extra = item.get("extras", {})
        if not isinstance(extra, dict):
            return 400, {"error": f"item {index}: 'extras' must be an object"}
        prompts.append(item["prompt"])
        responses.append(item["response"])
        extras.append(extra)
    if not items:
        return 200, {"version": PROTOCOL_VERSION, "rewards": []}
    try:
        rewards = np.asarray(reward_source(prompts, responses, extras), dtype=np.float64).reshape(-1)
    except Exception as error:  # the function's failure goes back to the client, the server stays up
        logger.exception("reward function failed")
        return 422, {"error": f"the reward function failed: {type(error).__name__}: {error}"}
    if rewards.shape[0] != len(items):
        return 422, {"error": f"the reward function returned {rewards.shape[0]} values for {len(items)} items"}
    bad = np.flatnonzero(~np.isfinite(rewards))
    if bad.size:
        return 422, {"error": f"the reward function returned {rewards[bad[0]]} for item {int(bad[0])}"}
    return 200, {"version": PROTOCOL_VERSION, "rewards": rewards.tolist()}


class _RewardHandler(BaseHTTPRequestHandler):
    server: "_RewardServer"
    protocol_version = "HTTP/1.1"

    def _answer(self, status: int, payload: Mapping[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        self.close_connection = True

    def do_GET(self) -> None:  # noqa: N802 - http.server hook
        if urlsplit(self.path).path.rstrip("/") == "/health":
            self._answer(200, {"status": "ok", "protocol_version": PROTOCOL_VERSION, "path": self.server.path, **self.server.info})
        else:
            self._answer(404, {"error": f"GET {self.path}: unknown path; POST requests to {self.server.path}, GET /health"})

    def do_POST(self) -> None:  # noqa: N802 - http.server hook
        if urlsplit(self.path).path != self.server.path:
            self._answer(404, {"error": f"POST {self.path}: unknown path; rewards are served at {self.server.path}"})
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._answer(411, {"error": "a Content-Length header is required"})
            return
        if length < 0 or length > MAX_BODY_BYTES:
            self._answer(413, {"error": f"request of {length} bytes; the limit is {MAX_BODY_BYTES}"})
            return
        status, payload = handle_reward_request(self.rfile.read(length), self.server.reward_source)
        self._answer(status, payload)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server hook
        if self.server.log_requests:
            logger.info("%s %s", self.address_string(), format % args)


class _RewardServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, reward_source: LocalRewardSource, path: str, info: Mapping[str, Any], log_requests: bool) -> None:
        super().__init__(address, _RewardHandler)
        self.reward_source = reward_source
        self.path = path
        self.info = dict(info)
        self.log_requests = log_requests

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}{self.path}"


def make_reward_server(
    reward_source: LocalRewardSource,
    host: str = "127.0.0.1",
    port: int = 0,
    path: str = "/rewards",
    info: Mapping[str, Any] | None = None,
    log_requests: bool = True,
) -> _RewardServer:
    """A threaded HTTP server answering protocol requests at ``path`` with ``reward_source``.

    ``port=0`` picks a free port; the endpoint is ``server.url``. ``GET /health`` answers
    ``{"status": "ok", "protocol_version": 1, "path": path, **info}``. Run it with
    ``server.serve_forever()`` (or :func:`serve_in_thread`), stop it with ``server.shutdown()``.
    """
    if not path.startswith("/"):
        raise ValueError(f"path must start with '/', got {path!r}")
    return _RewardServer((host, port), reward_source, path, info or {}, log_requests)


def serve_in_thread(server: _RewardServer) -> threading.Thread:
    """Run ``server.serve_forever()`` in a daemon thread (stop with ``server.shutdown(); server.server_close()``)."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return thread
