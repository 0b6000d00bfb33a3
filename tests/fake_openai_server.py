"""A local OpenAI-compatible chat endpoint on 127.0.0.1 that injects faults, for tests.

Faults are planned per prompt: `plan[marker] = ["429", "500", "timeout", "malformed", ...]`
gives the responses to the first attempts of any request whose last user message contains
`marker`; later attempts succeed. "always:<fault>" fails every attempt. Every request is
counted per user message, so tests can check what was (re)sent after a retry or a resume.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeOpenAI:
    def __init__(self, api_key: str | None = None, delay_s: float = 0.0, hang_s: float = 5.0,
                 reasoning_split: bool = False, serial: bool = False):
        self.api_key, self.delay_s, self.hang_s, self.reasoning_split = api_key, delay_s, hang_s, reasoning_split
        self.serial = threading.Lock() if serial else None  # one answer at a time: a slow teacher
        self.plan: dict[str, list[str]] = {}
        self.requests: Counter = Counter()       # user message -> attempts
        self.faults: Counter = Counter()         # fault kind -> times injected
        self.bodies: list[dict] = []
        self.last_request = time.monotonic()
        self._attempts: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeOpenAI":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()
            self.faults.clear()
            self.bodies.clear()

    def _fault_for(self, user: str) -> str | None:
        with self._lock:
            self.requests[user] += 1
            self.last_request = time.monotonic()
            for marker, faults in self.plan.items():
                if marker in user:
                    n = self._attempts[marker + "\0" + user]
                    self._attempts[marker + "\0" + user] += 1
                    if faults and faults[0].startswith("always:"):
                        return faults[0].split(":", 1)[1]
                    return faults[n] if n < len(faults) else None
        return None

    def completion(self, body: dict) -> dict:
        user = body["messages"][-1]["content"]
        words = user.split()
        think, answer = f"echo {len(words)} words", f"The answer is \\boxed{{{len(user)}}}."
        msg = ({"role": "assistant", "content": answer, "reasoning_content": think} if self.reasoning_split
               else {"role": "assistant", "content": f"<think>{think}</think> {answer}"})
        reason = "length" if body.get("max_tokens", 1 << 30) < 8 else "stop"
        return {"id": "cmpl-fake", "object": "chat.completion", "model": body.get("model"),
                "choices": [{"index": 0, "message": msg, "finish_reason": reason}],
                "usage": {"prompt_tokens": len(words), "completion_tokens": 8,
                          "total_tokens": len(words) + 8}}

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def _send(self, code: int, payload: bytes, ctype: str = "application/json") -> None:
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                if not self.path.endswith("/chat/completions"):
                    return self._send(404, b'{"error": {"message": "not found"}}')
                if fake.api_key and self.headers.get("Authorization") != f"Bearer {fake.api_key}":
                    return self._send(401, b'{"error": {"message": "bad api key"}}')
                with fake._lock:
                    fake.bodies.append(body)
                fault = fake._fault_for(body["messages"][-1]["content"])
                if fault:
                    with fake._lock:
                        fake.faults[fault] += 1
                if fault == "timeout":
                    time.sleep(fake.hang_s)
                    return self._send(200, json.dumps(fake.completion(body)).encode())
                if fault == "malformed":
                    return self._send(200, b'{"choices": [{"message": ')
                if fault and fault.isdigit():
                    return self._send(int(fault), json.dumps({"error": {"message": f"injected {fault}"}}).encode())
                if fake.serial:
                    with fake.serial:
                        time.sleep(fake.delay_s)
                elif fake.delay_s:
                    time.sleep(fake.delay_s)
                return self._send(200, json.dumps(fake.completion(body)).encode())

        return Handler
