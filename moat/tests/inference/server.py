"""A minimal OpenAI-compatible inference server: a STAND-IN, not a language model.

moat's local inference tests (and anyone trying workspace services out) run it as a
workspace service: `moat run --service llm:8000='python3 /run/moat-services/llm/models/server.py'`.
No CPU-only OpenAI-compatible server that ships a model inside its package installs from the
registries moat's machines reach within the size the project allows (docs/inference.md), so
this one stands in: Python's standard library only, and a "model" that is a table of word
bigrams (model.json beside it, in the service's models directory), walked greedily. It answers
what the `openai` client asks of a server: GET /v1/models, POST /v1/chat/completions (also
streamed, as server-sent events) and POST /v1/completions, with OpenAI's JSON shapes.

It listens on 127.0.0.1 at $MOAT_SERVICE_PORT (guest-init sets it from the service's spec) and
reads its model from $MOAT_SERVICE_DIR/models/model.json, or from the arguments: PORT [MODEL],
MODEL a path or the model's JSON itself.
"""

import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_BODY = 1 << 20


def load_model(path):
    """The model file, or the model itself where the argument is JSON (a VM's service runs
    the server as `python3 -c`, with no file of ours in the root image)."""
    if path.lstrip().startswith("{"):
        model = json.loads(path)
    else:
        with open(path, encoding="utf-8") as f:
            model = json.load(f)
    return model["name"], model["bigrams"]


def generate(bigrams, prompt, max_tokens):
    """Greedy walk of the bigram table from the prompt's last known word."""
    words = [w.strip(".,!?").lower() for w in prompt.split()]
    word = next((w for w in reversed(words) if w in bigrams), "<s>")
    out = []
    for _ in range(max_tokens):
        word = bigrams.get(word)
        if word is None or word == "</s>":
            break
        out.append(word)
    return " ".join(out), len(out)


def prompt_of(messages):
    return " ".join(m.get("content", "") for m in messages if isinstance(m.get("content"), str))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "moat-standin/1"

    def log_message(self, fmt, *args):
        pass

    def send_json(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def error(self, status, message):
        self.send_json(status, {"error": {"message": message, "type": "invalid_request_error"}})

    def read_json(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ValueError("body too large")
        return json.loads(self.rfile.read(length) or b"{}")

    def do_GET(self):
        if self.path.rstrip("/") == "/v1/models":
            name = self.server.model_name
            self.send_json(200, {"object": "list", "data": [
                {"id": name, "object": "model", "created": 0, "owned_by": "moat-standin"}]})
        else:
            self.error(404, "not found")

    def do_POST(self):
        try:
            req = self.read_json()
        except ValueError as e:
            self.error(400, str(e))
            return
        max_tokens = min(int(req.get("max_tokens") or req.get("max_completion_tokens") or 16), 256)
        created = int(time.time())
        name = self.server.model_name
        if self.path == "/v1/chat/completions":
            prompt = prompt_of(req.get("messages") or [])
            text, n = generate(self.server.bigrams, prompt, max_tokens)
            if req.get("stream"):
                self.stream_chat(name, created, text)
                return
            self.send_json(200, {
                "id": "chatcmpl-standin", "object": "chat.completion", "created": created,
                "model": name,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": n,
                          "total_tokens": len(prompt.split()) + n},
            })
        elif self.path == "/v1/completions":
            prompt = req.get("prompt") or ""
            text, n = generate(self.server.bigrams, str(prompt), max_tokens)
            self.send_json(200, {
                "id": "cmpl-standin", "object": "text_completion", "created": created,
                "model": name,
                "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
                "usage": {"prompt_tokens": len(str(prompt).split()), "completion_tokens": n,
                          "total_tokens": len(str(prompt).split()) + n},
            })
        else:
            self.error(404, "not found")

    def stream_chat(self, name, created, text):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        pieces = [{"role": "assistant", "content": ""}]
        pieces += [{"content": w + (" " if i + 1 < len(text.split()) else "")}
                   for i, w in enumerate(text.split())]
        for i, delta in enumerate(pieces + [None]):
            chunk = {"id": "chatcmpl-standin", "object": "chat.completion.chunk",
                     "created": created, "model": name,
                     "choices": [{"index": 0, "delta": delta or {},
                                  "finish_reason": None if delta is not None else "stop"}]}
            self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        self.wfile.write(b"data: [DONE]\n\n")


def main():
    port = int(sys.argv[1] if len(sys.argv) > 1 else os.environ["MOAT_SERVICE_PORT"])
    default_model = os.path.join(os.environ.get("MOAT_SERVICE_DIR", "."), "models", "model.json")
    name, bigrams = load_model(sys.argv[2] if len(sys.argv) > 2 else default_model)
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.model_name, server.bigrams = name, bigrams
    server.serve_forever()


if __name__ == "__main__":
    main()
