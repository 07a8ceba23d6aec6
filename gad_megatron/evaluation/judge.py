"""An LLM judge behind any OpenAI-compatible `/v1/chat/completions` endpoint.

Protocol (the GAD paper's, after MiniLLM): for each prompt the judge first writes its own
reference answer; then, shown the reference next to a candidate answer, it rates both 1-10.
The candidate's score is `candidate / (candidate + reference rating)`: 0.5 means "as good as
the judge's own answer". Student and teacher are rated the same way, so the teacher's score
is the ceiling the student is distilled towards.

Only the standard library talks HTTP here (no extra dependency). The API key is read from
an environment variable, sent only in the Authorization header, and never logged or put
in an error message.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Sequence

REFERENCE_SYSTEM = "You are a helpful, accurate assistant."
RATE_SYSTEM = "You are a strict, fair judge of answer quality."
RATE_TEMPLATE = """[Question]
{question}

[The Start of Assistant 1's Answer]
{reference}
[The End of Assistant 1's Answer]

[The Start of Assistant 2's Answer]
{answer}
[The End of Assistant 2's Answer]

Rate the helpfulness, relevance, accuracy and level of detail of each answer on a scale of
1 to 10 (higher is better). Reply with only a JSON object:
{{"assistant_1": <rating>, "assistant_2": <rating>}}"""

# Status codes worth another try: overload, rate limit, and server-side failures.
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class JudgeError(RuntimeError):
    """The judge endpoint could not give a usable answer; names the URL and the reason."""


class _Retryable(Exception):
    """One failed attempt that another attempt may fix."""


def chat_url(base_url: str) -> str:
    """The chat-completions URL for a base URL given with or without `/v1`."""
    url = base_url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


class OpenAIJudge:
    """A judge model served with the OpenAI chat-completions protocol."""

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY",
                 timeout_s: float = 30.0, max_retries: int = 3, backoff_s: float = 1.0,
                 max_tokens: int = 1024):
        if urllib.parse.urlsplit(base_url).scheme not in ("http", "https"):
            raise ValueError(f"judge URL {base_url!r} must start with http:// or https://")
        if max_retries < 0 or timeout_s <= 0 or backoff_s < 0:
            raise ValueError("judge: max_retries >= 0, timeout_s > 0 and backoff_s >= 0")
        self.url, self.model = chat_url(base_url), model
        self.timeout_s, self.max_retries, self.backoff_s = timeout_s, max_retries, backoff_s
        self.max_tokens = max_tokens
        self._api_key = os.environ.get(api_key_env) or None  # None: a local, open server
        host = urllib.parse.urlsplit(self.url).hostname or ""
        # A proxy from the environment must not capture a judge served on this machine.
        handlers = [urllib.request.ProxyHandler({})] if host in LOOPBACK_HOSTS else []
        self._opener = urllib.request.build_opener(*handlers)

    @property
    def name(self) -> str:
        return f"{self.model} @ {self.url}"

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAIJudge(url={self.url!r}, model={self.model!r})"

    # ------------------------------------------------------------------ protocol

    def reference(self, question: str) -> str:
        """The judge's own answer to the question."""
        return self._ask([{"role": "system", "content": REFERENCE_SYSTEM},
                          {"role": "user", "content": question}], _nonempty)

    def rate(self, question: str, reference: str, answer: str) -> tuple[int, int]:
        """(reference rating, answer rating), each in 1..10."""
        prompt = RATE_TEMPLATE.format(question=question, reference=reference, answer=answer)
        return self._ask([{"role": "system", "content": RATE_SYSTEM},
                          {"role": "user", "content": prompt}], parse_ratings)

    # ------------------------------------------------------------------ transport

    def _ask(self, messages: list[dict], parse) -> Any:
        """POST with retries and exponential backoff; `parse(content)` raising ValueError
        counts as a failed attempt too (a sampled judge may answer well the next time)."""
        reason = "no attempt made"
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                content = self._post(messages)
                return parse(content)
            except _Retryable as exc:
                reason = str(exc)
            except ValueError as exc:
                reason = f"unusable answer ({exc})"
        raise JudgeError(f"judge {self.url}: gave up after {self.max_retries + 1} attempt(s): "
                         f"{self._mask(reason)}")

    def _mask(self, text: str) -> str:
        # Error bodies are quoted in messages, and some servers echo the key they refused.
        return text.replace(self._api_key, "***") if self._api_key else text

    def _post(self, messages: list[dict]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0.0,
                           "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with self._opener.open(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            detail = _short(exc.read())
            if exc.code in RETRY_STATUS:
                raise _Retryable(f"HTTP {exc.code} {detail}") from None
            # 4xx (bad key, unknown model, bad request): retrying cannot help.
            raise JudgeError(f"judge {self.url}: HTTP {exc.code} {self._mask(detail)}") from None
        except (urllib.error.URLError, OSError) as exc:  # refused, DNS, timeout, reset
            raise _Retryable(f"cannot reach the endpoint ({getattr(exc, 'reason', exc)})") \
                from None
        return _content(raw)


def _content(raw: bytes) -> str:
    """The first choice's message text of a chat-completions response body."""
    try:
        doc = json.loads(raw)
        content = doc["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise _Retryable(f"not a chat-completions response: {_short(raw)}") from None
    if not isinstance(content, str):
        raise _Retryable(f"message content is {type(content).__name__}, not text")
    return content


def _short(raw: bytes | str, limit: int = 200) -> str:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    text = " ".join(text.split())
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _nonempty(content: str) -> str:
    if not content.strip():
        raise ValueError("empty reference answer")
    return content.strip()


_KEYS = (("assistant_1", "reference", "rating_1", "score_1"),
         ("assistant_2", "answer", "rating_2", "score_2", "rating", "score"))
_LABELLED = (r"(?:assistant[ _]?1|reference)", r"(?:assistant[ _]?2|answer|rating|score)")
_NUMBER = r"(\d+(?:\.\d+)?)"


def parse_ratings(content: str) -> tuple[int, int]:
    """(reference, answer) ratings from a judge reply, tolerant of its format.

    Tried in order: a JSON object (alone, fenced or inside prose) with `assistant_1` /
    `assistant_2` (or `reference` / `answer`); labelled lines such as `Assistant 1: 7` or
    `Reference: 7` + `Rating: 8`; a first line of exactly two numbers (the MT-bench pair
    format). Ratings must lie in 1..10; anything else is a ValueError.
    """
    pair = _from_json(content) or _from_labels(content) or _from_first_line(content)
    if pair is None:
        raise ValueError(f"no pair of ratings found in {_short(content)}")
    out = []
    for value in pair:
        rating = float(value)
        if not 1 <= rating <= 10:
            raise ValueError(f"rating {value} is outside 1..10")
        out.append(int(round(rating)))
    return out[0], out[1]


def _from_json(content: str) -> tuple[Any, Any] | None:
    for match in re.finditer(r"\{[^{}]*\}", content):
        try:
            doc = json.loads(match.group(0))
        except ValueError:
            continue
        if not isinstance(doc, dict):
            continue
        doc = {str(k).lower().replace(" ", "_"): v for k, v in doc.items()}
        found = [next((doc[k] for k in keys if k in doc), None) for keys in _KEYS]
        if all(isinstance(v, (int, float, str)) and _is_number(v) for v in found):
            return found[0], found[1]
    return None


def _from_labels(content: str) -> tuple[str, str] | None:
    # Line by line, so "Assistant 1's rating: 7" is not also read as the answer's rating.
    found: list[str | None] = [None, None]
    for line in content.splitlines():
        for side, label in enumerate(_LABELLED):
            m = re.search(label + r"[^\n\d]{0,20}?" + _NUMBER, line, re.IGNORECASE)
            if m is not None:
                found[side] = found[side] or m.group(1)  # the first mention counts
                break
    return (found[0], found[1]) if None not in found else None


def _from_first_line(content: str) -> tuple[str, str] | None:
    first = content.strip().splitlines()[0] if content.strip() else ""
    m = re.fullmatch(r"\s*" + _NUMBER + r"\s*[, ]\s*" + _NUMBER + r"\s*", first)
    return (m.group(1), m.group(2)) if m else None


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    try:
        float(value)
        return True
    except (TypeError, ValueError):
        return False


def judge_answers(judge, questions: Sequence[str], students: Sequence[str],
                  teachers: Sequence[str]) -> tuple[dict, list[dict]]:
    """Run the protocol on every prompt: (summary, per-prompt verdicts).

    `judge` needs `reference(question) -> str` and `rate(question, reference, answer) ->
    (reference_rating, answer_rating)`. Summary scores are per-prompt means of
    `rating / (rating + reference rating)`, plus the ratio of totals (MiniLLM's figure).
    """
    if not len(questions) == len(students) == len(teachers):
        raise ValueError("judge_answers: questions, students and teachers differ in length")
    verdicts = []
    for q, s, t in zip(questions, students, teachers):
        ref = judge.reference(q)
        ref_s, rating_s = judge.rate(q, ref, s)
        ref_t, rating_t = judge.rate(q, ref, t)
        verdicts.append({"reference": ref, "student_rating": rating_s,
                         "student_reference_rating": ref_s, "teacher_rating": rating_t,
                         "teacher_reference_rating": ref_t,
                         "student_score": rating_s / (rating_s + ref_s),
                         "teacher_score": rating_t / (rating_t + ref_t)})
    return _judge_summary(verdicts), verdicts


def _judge_summary(verdicts: list[dict]) -> dict:
    n = len(verdicts)
    if n == 0:
        return {"n": 0}

    def mean(key: str) -> float:
        return sum(v[key] for v in verdicts) / n

    def total_ratio(side: str) -> float:
        own = sum(v[f"{side}_rating"] for v in verdicts)
        return own / (own + sum(v[f"{side}_reference_rating"] for v in verdicts))

    return {"n": n, "student_score": mean("student_score"),
            "teacher_score": mean("teacher_score"),
            "student_rating": mean("student_rating"), "teacher_rating": mean("teacher_rating"),
            "student_total_ratio": total_ratio("student"),
            "teacher_total_ratio": total_ratio("teacher")}
