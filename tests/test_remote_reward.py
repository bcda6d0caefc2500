"""The remote reward service: protocol, client errors and retries, the reference server, and a run through it.

Every server listens on 127.0.0.1 only; every network wait has a timeout and every loop is bounded.
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alignment.data.example_task import all_prompts, task_score
from alignment.rewards import remote
from alignment.rewards.remote import (
    PROTOCOL_VERSION,
    ProtocolError,
    RemoteRewardSource,
    RemoteRewardError,
    backoff_delay,
    decode_rewards,
    encode_request,
    handle_reward_request,
    make_reward_server,
    remote_reward_problems,
    serve_in_thread,
)

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
PROMPTS = [prompt.text for prompt in all_prompts()[:5]] + [all_prompts()[-1].text]
RESPONSES = [
    "Sure! Rice is a wonderful topic. Be patient and enjoy it.",  # polite, on topic: 1.0
    "Ugh. Rice is boring. Go away.",  # 0.5 (on topic)
    "Of course! I really like tea.",  # 0.5 (polite, wrong topic)
    "No idea.",  # 0.0
    "Happy to help! Rice can be a lot of fun.",  # 1.0
    "Sorry, I can not help with that. Please be kind.",  # harmful prompt, refusal: 1.0
]
EXTRAS = [{"topic": "rice", "id": np.int64(index)} for index in range(len(PROMPTS))]


def task_score_source(prompts, responses, extras):
    """A local RewardSource: the example task's ground truth."""
    return np.asarray([task_score(p, r) for p, r in zip(prompts, responses)], dtype=np.float32)


@pytest.fixture
def no_sleep(monkeypatch):
    """Record the client's backoff waits instead of sleeping."""
    waits: list[float] = []
    monkeypatch.setattr(remote.time, "sleep", waits.append)
    return waits


@pytest.fixture
def reference_server():
    """The protocol server of alignment.rewards.remote on 127.0.0.1, scoring with task_score_source."""
    calls: list[int] = []

    def source(prompts, responses, extras):
        calls.append(len(prompts))
        return task_score_source(prompts, responses, extras)

    server = make_reward_server(source, log_requests=False)
    serve_in_thread(server)
    yield server, calls
    server.shutdown()
    server.server_close()


class ScriptedServer:
    """A server on 127.0.0.1 that plays back ``answers`` (status, body bytes) one per POST, the last one
    repeating; ``hold`` (an Event) makes it wait (at most 10 s) before answering."""

    def __init__(self, answers, hold: threading.Event | None = None) -> None:
        self.answers = list(answers)
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append(json.loads(body))
                index = min(len(outer.requests) - 1, len(outer.answers) - 1)
                if hold is not None:
                    hold.wait(timeout=10)
                status, payload = outer.answers[index]
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:  # the client gave up (timeout) and closed the connection
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/score"
        serve_in_thread(self.server)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def scripted():
    servers: list[ScriptedServer] = []

    def start(answers, hold=None) -> ScriptedServer:
        servers.append(ScriptedServer(answers, hold))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def ok(rewards) -> tuple[int, bytes]:
    return 200, json.dumps({"version": 1, "rewards": rewards}).encode()


# ----------------------------------------------------------------------------------- pure parts
def test_backoff_doubles_from_backoff_and_is_capped():
    assert [backoff_delay(k, 0.5, 3.0) for k in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert [backoff_delay(k, 0.0, 3.0) for k in range(3)] == [0.0, 0.0, 0.0]


def test_request_body_is_the_documented_json():
    body = encode_request(["p1", "p2"], ["r1", "r2"], [{"answer": np.float32(0.5), "ids": np.arange(2)}, {}])
    assert json.loads(body) == {
        "version": 1,
        "items": [
            {"prompt": "p1", "response": "r1", "extras": {"answer": 0.5, "ids": [0, 1]}},
            {"prompt": "p2", "response": "r2", "extras": {}},
        ],
    }
    assert json.loads(encode_request(["p"], ["r"], None))["items"] == [{"prompt": "p", "response": "r", "extras": {}}]


@pytest.mark.parametrize(
    "prompts, responses, extras, message",
    [
        (["p", "q"], ["r"], [{}, {}], "same length, got 2, 1, 2"),
        (["p"], [b"r"], [{}], "row 0: prompt and response must be strings"),
        (["p", "q"], ["r", "s"], [{}, {"when": object()}], "row 1: extras field 'when' cannot be sent as JSON"),
        (["p"], ["r"], [{"score": float("nan")}], "row 0: extras field 'score' cannot be sent as JSON"),
        (["p"], ["r"], ["not a dict"], "row 0: extras must be a mapping"),
    ],
)
def test_unsendable_input_is_named(prompts, responses, extras, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        encode_request(prompts, responses, extras)


@pytest.mark.parametrize(
    "body, message",
    [
        (b"<html>Bad Gateway</html>", "the answer is not JSON"),
        (b"\xff\xfe", "the answer is not JSON"),
        (b"[0.5, 1.0]", "must be a JSON object with 'rewards', got list"),
        (b'{"scores": [0.5, 1.0]}', "no 'rewards' field"),
        (b'{"rewards": "0.5 1.0"}', "'rewards' must be a list, got str"),
        (b'{"rewards": [0.5]}', "'rewards' has 1 values for 2 items"),
        (b'{"rewards": [0.5, 1.0, 2.0]}', "'rewards' has 3 values for 2 items"),
        (b'{"rewards": [0.5, "1.0"]}', "reward 1 is not a number: '1.0'"),
        (b'{"rewards": [null, 1.0]}', "reward 0 is not a number: None"),
        (b'{"rewards": [true, 1.0]}', "reward 0 is not a number: True"),
        (b'{"rewards": [0.5, NaN]}', "non-finite number NaN"),
        (b'{"rewards": [-Infinity, 0.5]}', "non-finite number -Infinity"),
        (b'{"rewards": [0.5, 1e39]}', "reward 1 is 1e\\+39, not a finite float32"),
        (b'{"version": 2, "rewards": [0.5, 1.0]}', "protocol version 2; this client speaks 1"),
    ],
)
def test_each_garbage_answer_has_its_own_error(body, message):
    with pytest.raises(ProtocolError, match=message):
        decode_rewards(body, expected=2)


def test_a_valid_answer_decodes_to_float32_in_order():
    rewards = decode_rewards(b'{"version": 1, "rewards": [0.5, -2, 1e-3]}', expected=3)
    assert rewards.dtype == np.float32
    np.testing.assert_array_equal(rewards, np.float32([0.5, -2.0, 1e-3]))
    assert decode_rewards(b'{"rewards": []}', expected=0).shape == (0,)


finite = st.floats(min_value=-1e30, max_value=1e30, allow_nan=False, allow_infinity=False)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.text(max_size=20), st.text(max_size=20), finite), max_size=8))
def test_server_handler_and_client_decoder_round_trip_any_rewards(rows):
    """Whatever a reward function returns (finite), the client decodes exactly its float32 values."""
    prompts, responses, values = [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]
    seen = {}

    def source(p, r, e):
        seen.update(prompts=p, responses=r, extras=e)
        return np.asarray(values, dtype=np.float64)

    status, answer = handle_reward_request(encode_request(prompts, responses, [{"i": i} for i in range(len(rows))]), source)
    assert status == 200
    decoded = decode_rewards(json.dumps(answer).encode(), expected=len(rows))
    np.testing.assert_array_equal(decoded, np.asarray(values, dtype=np.float32))
    if rows:  # the function saw exactly the texts and extras that were sent
        assert seen == {"prompts": prompts, "responses": responses, "extras": [{"i": i} for i in range(len(rows))]}


@pytest.mark.parametrize(
    "body, status, message",
    [
        (b"nope", 400, "the request is not JSON"),
        (b'{"items": []}', 400, "unsupported protocol version None"),
        (b'{"version": 2, "items": []}', 400, "unsupported protocol version 2"),
        (b'{"version": 1, "items": {}}', 400, "'items' must be a list"),
        (b'{"version": 1, "items": [{"prompt": "p"}]}', 400, "item 0: needs string fields 'prompt' and 'response'"),
        (b'{"version": 1, "items": [{"prompt": "p", "response": "r", "extras": []}]}', 400, "item 0: 'extras' must be an object"),
        (b'{"version": 1, "items": [{"prompt": "not a task prompt", "response": "r"}]}', 422, "reward function failed: ValueError: not a prompt"),
    ],
)
def test_server_refuses_bad_requests_with_a_reason(body, status, message):
    got_status, answer = handle_reward_request(body, task_score_source)
    assert got_status == status and message in answer["error"]


def test_server_refuses_to_send_a_non_finite_or_misshaped_reward():
    request = encode_request(["p", "q"], ["r", "s"], None)
    assert handle_reward_request(request, lambda p, r, e: np.float32([1.0, np.nan])) == (
        422, {"error": "the reward function returned nan for item 1"},
    )  # fmt: skip
    status, answer = handle_reward_request(request, lambda p, r, e: np.float32([1.0]))
    assert status == 422 and answer["error"] == "the reward function returned 1 values for 2 items"


@pytest.mark.parametrize(
    "url, timeout, retries, batch, fields",
    [
        ("http://127.0.0.1:8000/rewards", 30.0, 3, 64, []),
        ("https://rewards.example.com/v1", 0.5, 0, 1, []),
        ("127.0.0.1:8000", 30.0, 3, 64, ["reward_server"]),
        ("ftp://host/x", 30.0, 3, 64, ["reward_server"]),
        ("http://127.0.0.1:99999/r", 30.0, 3, 64, ["reward_server"]),
        ("http://127.0.0.1:8000", 0.0, -1, 0, ["reward_server_timeout", "reward_server_max_retries", "reward_server_batch_size"]),
        (None, float("inf"), 3, 64, ["reward_server_timeout"]),
    ],
)
def test_reward_server_settings_are_checked_without_network(url, timeout, retries, batch, fields):
    assert [name for name, _ in remote_reward_problems(url, timeout, retries, batch)] == fields
    if fields:
        with pytest.raises(ValueError, match=fields[0]):
            RemoteRewardSource(url or "http://127.0.0.1:1/r", timeout=timeout, max_retries=retries, batch_size=batch)


# ------------------------------------------------------------------------------- over loopback
def test_remote_rewards_equal_the_local_function_in_order_across_batches(reference_server):
    server, calls = reference_server
    client = RemoteRewardSource(server.url, timeout=10, max_retries=0, batch_size=4)
    client.probe()
    rewards = client(PROMPTS, RESPONSES, EXTRAS)
    assert calls == [4, 2]  # the probe never reaches the function; 6 items in batches of 4
    assert rewards.dtype == np.float32
    np.testing.assert_array_equal(rewards, np.float32([1.0, 0.5, 0.5, 0.0, 1.0, 1.0]))
    np.testing.assert_array_equal(rewards, task_score_source(PROMPTS, RESPONSES, EXTRAS))
    assert client([], [], []).shape == (0,) and calls == [4, 2]  # nothing to score: no request


def test_health_and_unknown_paths(reference_server):
    import http.client

    server, _ = reference_server
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    connection.request("GET", "/health")
    response = connection.getresponse()
    assert response.status == 200
    assert json.loads(response.read()) == {"status": "ok", "protocol_version": PROTOCOL_VERSION, "path": "/rewards"}
    connection.close()
    client = RemoteRewardSource(server.url.replace("/rewards", "/score"), timeout=10, max_retries=3)
    with pytest.raises(RemoteRewardError, match=r"refused row 0 of 1: HTTP 404: POST /score: unknown path; rewards are served at /rewards"):
        client(PROMPTS[:1], RESPONSES[:1])


def test_a_reward_function_error_reaches_the_client_once(reference_server, no_sleep):
    server, calls = reference_server
    client = RemoteRewardSource(server.url, timeout=10, max_retries=3)
    with pytest.raises(RemoteRewardError, match=r"refused row 0 of 1: HTTP 422: the reward function failed: ValueError: not a prompt"):
        client(["What is 2 + 2?"], ["4"])
    assert no_sleep == []  # deterministic failures are not retried


@pytest.mark.parametrize(
    "answer, message",
    [
        ((200, b"Internal error, see log"), "answered garbage for rows 0-1 of 2: the answer is not JSON"),
        (ok([0.5]), "answered garbage for rows 0-1 of 2: 'rewards' has 1 values for 2 items"),
        (ok([0.5, "high"]), "answered garbage for rows 0-1 of 2: reward 1 is not a number: 'high'"),
        ((200, b'{"rewards": [NaN, 0.5]}'), "answered garbage for rows 0-1 of 2: non-finite number NaN"),
        ((200, b""), "answered garbage for rows 0-1 of 2: the answer is not JSON"),
        ((400, b'{"error": "prompt too long"}'), "refused rows 0-1 of 2: HTTP 400: prompt too long"),
        ((401, b"Unauthorized"), "refused rows 0-1 of 2: HTTP 401: 'Unauthorized'"),
        ((302, b""), r"refused rows 0-1 of 2: HTTP 302: \(empty body\)"),
    ],
)
def test_garbage_or_a_refusal_stops_at_once_naming_the_server(scripted, no_sleep, answer, message):
    server = scripted([answer])
    client = RemoteRewardSource(server.url, timeout=10, max_retries=3)
    with pytest.raises(RemoteRewardError, match=message) as error:
        client(PROMPTS[:2], RESPONSES[:2])
    assert str(error.value).startswith(f"reward server {server.url} ")
    assert len(server.requests) == 1 and no_sleep == []


def test_server_errors_are_retried_with_backoff_then_succeed(scripted, no_sleep):
    server = scripted([(503, b'{"error": "warming up"}'), (500, b"oops"), ok([0.25, 0.75])])
    client = RemoteRewardSource(server.url, timeout=10, max_retries=2, backoff=0.5)
    np.testing.assert_array_equal(client(PROMPTS[:2], RESPONSES[:2], EXTRAS[:2]), np.float32([0.25, 0.75]))
    assert no_sleep == [0.5, 1.0]
    assert len(server.requests) == 3
    assert server.requests[0] == server.requests[2] == json.loads(encode_request(PROMPTS[:2], RESPONSES[:2], EXTRAS[:2]))


def test_retries_are_bounded_then_fail_clearly(scripted, no_sleep):
    server = scripted([(503, b'{"error": "overloaded"}')])
    client = RemoteRewardSource(server.url, timeout=10, max_retries=3, backoff=1.0, max_backoff=2.5)
    with pytest.raises(RemoteRewardError) as error:
        client(PROMPTS[:2], RESPONSES[:2])
    assert len(server.requests) == 4 and no_sleep == [1.0, 2.0, 2.5]
    assert f"reward server {server.url} failed 4 attempt(s) for rows 0-1 of 2" in str(error.value)
    assert "reward_server_max_retries=3); last error: HTTP 503: overloaded" in str(error.value)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_service_that_is_down_fails_clearly_after_bounded_retries(no_sleep):
    url = f"http://127.0.0.1:{_free_port()}/rewards"
    client = RemoteRewardSource(url, timeout=5, max_retries=2, backoff=0.1)
    with pytest.raises(RemoteRewardError, match=r"failed 3 attempt\(s\) for the probe .* connection refused") as error:
        client.probe()
    assert url in str(error.value) and no_sleep == [0.1, 0.2]
    with pytest.raises(RemoteRewardError, match=r"failed 1 attempt\(s\) for row 0 of 1 .* connection refused"):
        RemoteRewardSource(url, timeout=5, max_retries=0)(PROMPTS[:1], RESPONSES[:1])


def test_a_slow_service_times_out_per_request_and_is_retried(scripted, no_sleep):
    hold = threading.Event()
    server = scripted([ok([1.0])], hold=hold)
    client = RemoteRewardSource(server.url, timeout=0.3, max_retries=1, backoff=0.0)
    try:
        with pytest.raises(RemoteRewardError, match=r"failed 2 attempt\(s\) .* no complete answer within reward_server_timeout=0.3 s"):
            client(PROMPTS[:1], RESPONSES[:1])
        assert len(server.requests) == 2
    finally:
        hold.set()
    assert math.isclose(client(PROMPTS[:1], RESPONSES[:1])[0], 1.0)  # released: the same client works again


def test_the_remote_source_is_a_reward_source_and_adds_to_others(reference_server):
    from alignment.rewards import RewardSource, SumOfRewardSources

    server, _ = reference_server
    client = RemoteRewardSource(server.url, timeout=10, max_retries=0)
    assert isinstance(client, RewardSource) and client.name == "remote"

    class Constant(RewardSource):
        name = "constant"

        def __call__(self, prompts, responses, extras):
            return np.full(len(prompts), 0.25, dtype=np.float32)

    total = SumOfRewardSources([client, Constant()])
    np.testing.assert_array_equal(total.score(PROMPTS, RESPONSES, EXTRAS), task_score_source(PROMPTS, RESPONSES, EXTRAS) + 0.25)
    np.testing.assert_array_equal(total.parts()["remote"], task_score_source(PROMPTS, RESPONSES, EXTRAS))


def test_probe_reaches_every_remote_part_of_a_source(reference_server, no_sleep):
    from alignment.rewards import SumOfRewardSources
    from alignment.rewards.remote import probe_reward_servers

    server, calls = reference_server
    down = f"http://127.0.0.1:{_free_port()}/rewards"
    probe_reward_servers(None)
    probe_reward_servers(SumOfRewardSources([RemoteRewardSource(server.url, max_retries=0)]))
    with pytest.raises(RemoteRewardError, match=f"reward server {down} failed 1 attempt"):
        probe_reward_servers(SumOfRewardSources([RemoteRewardSource(server.url), RemoteRewardSource(down, max_retries=0)]))
    assert calls == []  # probes never reach the reward function


# --------------------------------------------------------------------- the reference server script
CUSTOM_REWARD_MODULE = '''
from alignment.rewards.functions import register_reward_function


@register_reward_function("exact_answer")
def exact_answer(prompt, response, answer=None, **extras):
    return float(response.strip() == answer)
'''


@pytest.fixture
def start_reward_server(python, repo_root, tmp_path):
    """``start(*args) -> (process, url)``: scripts/reward_server.py on 127.0.0.1 with a free port; its
    log (stderr) goes to ``process.log_path``."""
    import queue
    import subprocess

    processes = []

    def start(*args, expect_url=True):
        env = dict(os.environ, PYTHONPATH=repo_root)
        log_path = tmp_path / f"reward_server_{len(processes)}.log"
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                [python, "scripts/reward_server.py", "--port", "0", *args],
                cwd=repo_root, env=env, stdout=subprocess.PIPE, stderr=log, text=True,
            )  # fmt: skip
        process.log_path = log_path
        processes.append(process)
        if not expect_url:
            return process, None
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
        try:
            first = lines.get(timeout=120)
        except queue.Empty:
            raise AssertionError("the reward server printed nothing within 120 s") from None
        assert first.startswith("reward server listening on http://127.0.0.1:"), first
        process.lines = lines
        return process, first.split()[-1]

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def test_reference_server_serves_registered_and_custom_functions_like_the_trainer(start_reward_server, tmp_path):
    import http.client
    import signal
    from urllib.parse import urlsplit

    from alignment.rewards.functions import RewardFunctions, import_custom_reward_modules

    module = tmp_path / "my_rewards.py"
    module.write_text(CUSTOM_REWARD_MODULE)
    spec = "task_score:2.0,length:-0.5,exact_answer"
    process, url = start_reward_server("--reward-functions", spec, "--custom-reward-modules", str(module), "--path", "/v1/score", "--quiet")
    assert urlsplit(url).path == "/v1/score"

    connection = http.client.HTTPConnection("127.0.0.1", urlsplit(url).port, timeout=30)
    connection.request("GET", "/health")
    health = connection.getresponse()
    assert health.status == 200
    assert json.loads(health.read()) == {"status": "ok", "protocol_version": 1, "path": "/v1/score", "reward_functions": spec}
    connection.close()

    extras = [{"answer": "No idea."} if i == 3 else {"answer": "x"} for i in range(len(PROMPTS))]
    client = RemoteRewardSource(url, timeout=30, max_retries=0, batch_size=4)
    client.probe()
    remote_rewards = client(PROMPTS, RESPONSES, extras)
    import_custom_reward_modules(str(module))  # the same function, registered in this process
    local_rewards = RewardFunctions(spec).score(PROMPTS, RESPONSES, extras)
    np.testing.assert_array_equal(remote_rewards, local_rewards)
    words = [len(r.split()) for r in RESPONSES]
    np.testing.assert_allclose(
        remote_rewards, [2 * s - 0.5 * w + (i == 3) for i, (s, w) in enumerate(zip([1, 0.5, 0.5, 0, 1, 1], words))], rtol=1e-6
    )
    with pytest.raises(RemoteRewardError, match="HTTP 422: the reward function failed: .*reward function 'task_score' failed on row 0"):
        client(["What is 2 + 2?"], ["4"], [{}])

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    assert "POST" not in process.log_path.read_text()  # --quiet: no request log
    with pytest.raises(RemoteRewardError, match="connection refused"):
        client.probe()


def test_reference_server_refuses_an_unknown_function_before_serving(start_reward_server):
    process, _ = start_reward_server("--reward-functions", "task_score,no_such_reward", expect_url=False)
    out, _ = process.communicate(timeout=120)
    err = process.log_path.read_text()
    assert process.returncode == 2 and out == ""
    assert "reward_server: unknown reward function 'no_such_reward'; registered: [" in err and "'task_score'" in err


# ------------------------------------------------------------------------------ through run_ppo.py
def test_reward_server_arguments_are_checked_before_anything_loads(tmp_path, tiny_assets):
    from alignment.ppo import run_ppo
    from alignment.utils.config import ConfigError

    config = {
        "train_datasets": f"PKU-SafeRLHF/train:1:{DATA_DIR}/safe_rlhf/train.jsonl",
        "actor_model_name_or_path": tiny_assets["llama"],
        "output_dir": str(tmp_path / "out"),
        "rl_algorithm": "grpo",
        "num_return_sequences": 2,
        "reward_server": "127.0.0.1:8000/rewards",
        "reward_server_timeout": 0,
        "reward_server_max_retries": -1,
        "reward_server_batch_size": 0,
    }
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError) as info:
        run_ppo.main([str(path)])
    message = str(info.value)
    assert message.startswith("4 problem(s)"), message
    for expected in [
        "reward_server: '127.0.0.1:8000/rewards' is not an http:// or https:// URL with a host",
        "reward_server_timeout: must be a number of seconds > 0, got 0.0",
        "reward_server_max_retries: must be an integer >= 0, got -1",
        "reward_server_batch_size: must be an integer >= 1, got 0",
    ]:
        assert expected in message, message


def test_a_service_that_is_down_stops_the_run_before_any_model_loads(tmp_path, tiny_assets, monkeypatch):
    """build_trainer probes the service with the JSON's reward_server settings before loading anything."""
    from alignment.ppo import run_ppo
    from alignment.utils.config import parse_arguments

    url = f"http://127.0.0.1:{_free_port()}/rewards"
    config = {
        "train_datasets": f"PKU-SafeRLHF/train:1:{DATA_DIR}/safe_rlhf/train.jsonl",
        "actor_model_name_or_path": tiny_assets["llama"],
        "output_dir": str(tmp_path / "out"),
        "rl_algorithm": "grpo",
        "num_return_sequences": 2,
        "reward_server": url,
        "reward_server_timeout": 7.5,
        "reward_server_max_retries": 0,
        "reward_server_batch_size": 3,
        "max_length": 48,
        "max_new_tokens": 8,
    }
    path = tmp_path / "down.json"
    path.write_text(json.dumps(config))
    arguments = parse_arguments((run_ppo.ModelArgument, run_ppo.DataArgument, run_ppo.TrainingArguments), [str(path)])
    run_ppo.validate_arguments(*arguments, str(path))  # valid settings: only the probe can tell the service is down

    def no_models(*args, **kwargs):
        raise AssertionError("models loaded although the reward service is down")

    probed = []
    probe = remote.probe_reward_servers
    monkeypatch.setattr(remote, "probe_reward_servers", lambda source: probe(probed.append(source) or source))
    monkeypatch.setattr(run_ppo, "load_models", no_models)
    monkeypatch.setattr(run_ppo, "load_datasets", no_models)
    with pytest.raises(RemoteRewardError, match=rf"reward server {url} failed 1 attempt\(s\) for the probe .* connection refused"):
        run_ppo.build_trainer(*arguments, str(path))
    [source] = probed
    assert isinstance(source, RemoteRewardSource)
    assert (source.url, source.timeout, source.max_retries, source.batch_size) == (url, 7.5, 0, 3)


@pytest.mark.slow
def test_grpo_trains_through_the_server_and_stops_clearly_when_it_dies(tmp_path, tiny_assets, start_reward_server, repo_root, python):
    """The issue's end-to-end run: GRPO rewarded by the reference server; the server is SIGKILLed mid-run."""
    import signal
    import subprocess
    import time

    from alignment.utils.checkpoint import checkpoint_dirs, get_last_checkpoint, verify_checkpoint
    from alignment.utils.metrics import read_metrics

    server, url = start_reward_server("--reward-functions", "task_score")
    output = tmp_path / "grpo"
    config = {
        "train_datasets": f"PKU-SafeRLHF/train:1:{DATA_DIR}/safe_rlhf/train.jsonl",
        "actor_model_name_or_path": tiny_assets["llama"],
        "rl_algorithm": "grpo",
        "reward_server": url,
        "reward_server_timeout": 10,
        "reward_server_max_retries": 1,
        "num_return_sequences": 2,
        "per_device_prompt_batch_size": 2,
        "per_device_train_batch_size": 4,
        "max_length": 48,
        "max_new_tokens": 8,
        "max_steps": 200,  # far more than it gets to run
        "learning_rate": 1e-4,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": 1,
        "save_total_limit": 2,
        "do_train": True,
        "report_to": "none",
        "disable_tqdm": True,
        "output_dir": str(output),
        "seed": 3,
    }
    path = tmp_path / "grpo.json"
    path.write_text(json.dumps(config))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=repo_root)
    log_path = tmp_path / "run_ppo.log"
    with open(log_path, "w") as log_file:  # a file, not a pipe: nobody reads while the run goes on
        run = subprocess.Popen([python, os.path.join(repo_root, "alignment", "ppo", "run_ppo.py"), str(path)],
                               cwd=repo_root, env=env, stdout=log_file, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not (output / "checkpoint-2" / "manifest.json").exists():  # two updates rewarded by the server
            assert run.poll() is None, "the run ended before the server was killed:\n" + log_path.read_text()[-4000:]
            assert time.monotonic() < deadline, "no checkpoint-2 within 300 s"
            time.sleep(0.05)
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=30)
        run.wait(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(timeout=30)
    log = log_path.read_text()

    assert run.returncode != 0, log[-4000:]
    assert f"RemoteRewardError: reward server {url} failed 2 attempt(s)" in log, log[-4000:]
    assert "(reward_server_max_retries=1); last error: connection refused" in log, log[-4000:]
    assert not (output / "policy").exists()  # it stopped: no final model
    # The steps before the kill were rewarded through the server (one POST per rollout, after the probe).
    steps = [record for record in read_metrics(str(output)) if "train/reward" in record]
    assert len(steps) >= 2
    for record in steps:  # the whole reward is the remote part, a mean of task scores in [0, 1]
        assert record["train/reward"] == pytest.approx(record["train/reward_remote"]) and 0 <= record["train/reward"] <= 1
    posts = [line for line in server.log_path.read_text().splitlines() if '"POST /rewards HTTP/1.1" 200' in line]
    assert len(posts) >= len(steps) + 1, posts  # the probe, then one request of 4 responses per rollout
    # The newest checkpoint is complete and verifies; nothing half-written is left.
    last = get_last_checkpoint(str(output))
    assert last is not None and checkpoint_dirs(str(output))[-1][1] == last
    verify_checkpoint(last)
    assert not [name for name in os.listdir(output) if ".tmp" in name or ".old" in name]
