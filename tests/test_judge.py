"""The LLM judge client against a small OpenAI-compatible server on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gad_megatron.evaluation import JudgeError, OpenAIJudge, judge_answers, parse_ratings
from gad_megatron.evaluation.judge import chat_url

REFERENCE = "The answer is 42."


class FakeServer:
    """Answers chat completions from a script: `replies` is a list of (status, body) consumed
    one per request; once it runs out, `default(request) -> (status, body)` answers."""

    def __init__(self, default=None):
        self.replies: list[tuple[int, bytes]] = []
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.default = default or answer_normally
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, **body})
                server.headers.append(dict(self.headers))
                status, payload = (server.replies.pop(0) if server.replies
                                   else server.default(body))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):  # keep test output clean
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def completion(content: str) -> bytes:
    return json.dumps({"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": content},
         "finish_reason": "stop"}]}).encode()


def answer_normally(body: dict) -> tuple[int, bytes]:
    """Reference first; ratings: reference 8, a 'good' answer 6, anything else 2."""
    prompt = body["messages"][-1]["content"]
    if "[Question]" not in prompt:
        return 200, completion(REFERENCE)
    ref = 8
    rating = 6 if "Assistant 2's Answer]\ngood" in prompt else 2
    return 200, completion(f'{{"assistant_1": {ref}, "assistant_2": {rating}}}')


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.close()


def judge_for(url: str, **kw) -> OpenAIJudge:
    return OpenAIJudge(url, "judge-model", timeout_s=kw.pop("timeout_s", 5.0),
                       max_retries=kw.pop("max_retries", 2), backoff_s=0.01, **kw)


def test_protocol_and_scores_by_hand(server, monkeypatch):
    monkeypatch.setenv("GAD_TEST_JUDGE_KEY", "sk-secret-value")
    judge = judge_for(server.url, api_key_env="GAD_TEST_JUDGE_KEY")
    summary, rows = judge_answers(judge, ["q1", "q2"], ["good", "bad"], ["good", "good"])
    # Prompt 1: student 6 vs reference 8 -> 6/14; prompt 2: 2/(2+8) = 0.2. Teacher: 6/14 both.
    assert rows[0]["student_score"] == pytest.approx(6 / 14)
    assert rows[1]["student_score"] == pytest.approx(0.2)
    assert summary["student_score"] == pytest.approx((6 / 14 + 0.2) / 2)
    assert summary["teacher_score"] == pytest.approx(6 / 14)
    assert summary["student_total_ratio"] == pytest.approx(8 / (8 + 16))
    assert summary["student_rating"] == 4.0 and rows[0]["reference"] == REFERENCE
    # Three calls per prompt (reference, student, teacher), to the chat-completions path.
    assert len(server.requests) == 6
    assert {r["path"] for r in server.requests} == {"/v1/chat/completions"}
    assert all(r["model"] == "judge-model" and r["temperature"] == 0.0 for r in server.requests)
    assert REFERENCE in server.requests[1]["messages"][-1]["content"]
    assert server.headers[0]["Authorization"] == "Bearer sk-secret-value"
    assert "sk-secret" not in repr(judge)


def test_server_down_fails_quickly_with_the_url():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    judge = judge_for(url, max_retries=2)
    start = time.monotonic()
    with pytest.raises(JudgeError) as info:
        judge.reference("q")
    assert time.monotonic() - start < 5
    msg = str(info.value)
    assert f"127.0.0.1:{port}/v1/chat/completions" in msg and "3 attempt(s)" in msg
    assert "cannot reach" in msg


def test_non_json_body_is_retried_then_fails(server):
    server.default = lambda body: (200, b"<html>gateway says hi</html>")
    with pytest.raises(JudgeError, match="not a chat-completions response"):
        judge_for(server.url, max_retries=2).reference("q")
    assert len(server.requests) == 3  # the first try and two retries


def test_missing_rating_is_retried_then_fails(server):
    server.default = lambda body: (200, completion("Both answers are fine, I think."))
    with pytest.raises(JudgeError, match="no pair of ratings"):
        judge_for(server.url, max_retries=1).rate("q", "ref", "answer")
    assert len(server.requests) == 2


def test_garbage_then_good_answer_recovers(server):
    server.replies = [(200, completion("Rating: eleventy")), (200, b"{}")]
    assert judge_for(server.url).rate("q", "ref", "good") == (8, 6)
    assert len(server.requests) == 3


def test_server_error_then_success(server):
    server.replies = [(500, b'{"error": "overloaded"}'), (503, b"busy")]
    assert judge_for(server.url).reference("q") == REFERENCE
    assert len(server.requests) == 3


def test_client_error_is_not_retried(server):
    server.replies = [(401, b'{"error": "bad key"}')]
    with pytest.raises(JudgeError, match="HTTP 401"):
        judge_for(server.url).reference("q")
    assert len(server.requests) == 1


def test_urls_and_arguments():
    assert chat_url("http://h:1/v1") == "http://h:1/v1/chat/completions"
    assert chat_url("http://h:1/") == "http://h:1/v1/chat/completions"
    assert chat_url("http://h:1/v1/chat/completions") == "http://h:1/v1/chat/completions"
    with pytest.raises(ValueError):
        OpenAIJudge("127.0.0.1:8000", "m")


@pytest.mark.parametrize("content, expected", [
    ('{"assistant_1": 8, "assistant_2": 6}', (8, 6)),
    ('Here you go:\n```json\n{"reference": 9, "answer": "7"}\n```', (9, 7)),
    ("Reference: 8\nRating: 7", (8, 7)),
    ("Assistant 1's rating: 7\nAssistant 2's rating: 4", (7, 4)),
    ("8 6\nAssistant 1 was more precise.", (8, 6)),
    ('{"assistant_1": 7.6, "assistant_2": 3}', (8, 3)),
])
def test_parse_ratings(content, expected):
    assert parse_ratings(content) == expected


@pytest.mark.parametrize("content", ["Rating: 7", "no numbers", "", '{"assistant_1": 11, '
                                     '"assistant_2": 3}', '{"assistant_1": 0, "assistant_2": 3}'])
def test_parse_ratings_refuses(content):
    with pytest.raises(ValueError):
        parse_ratings(content)
