"""`llmctl serve` as a client meets it: a real server process on 127.0.0.1 (a free port), the official
`openai` client and raw httpx. One server for most tests (started with LLMCTL_API_KEY set and no
--host); a second, with one row and a queue of one, for 429 and SIGTERM."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from conftest import cli_env, run_cli

KEY = "sk-test-key"
PROMPTS = ["The people of", "Once upon a time", "hello world", "A", "Numbers: 1 2 3", "x y z", "The", "Wyn"]


def write_model_folder(folder: Path) -> Path:
    """test-1m with a BPE tokenizer (ChatML template, as llmctl's tokenizers carry), weights scaled so
    greedy text varies, and a context of 1024 so a long request lasts long enough to drain."""
    import torch

    from llmctl.data.synthetic import iter_documents
    from llmctl.data.tokenizer import train_tokenizer
    from llmctl.model.checkpoint import save_model_folder
    from llmctl.model.config import preset
    from llmctl.model.transformer import Transformer

    tok = train_tokenizer((d["text"] for d in iter_documents(200, seed=1)), vocab_size=512)
    torch.manual_seed(0)
    model = Transformer(preset("test-1m", vocab_size=tok.vocab_size, max_seq_len=1024))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4)
    save_model_folder(model, folder, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    tok.save(folder, model_max_length=model.config.max_seq_len)
    return folder


class Server:
    """`python -m llmctl serve --port 0 ...` in a subprocess; `url` from its "serving ..." line."""

    def __init__(self, folder: Path, *args: str, env: dict | None = None):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmctl", "serve", "--ckpt", str(folder), "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env or cli_env(),
        )
        self.lines: list[str] = []
        ready = threading.Event()

        def drain() -> None:
            for line in self.proc.stderr:
                self.lines.append(line)
                if "serving" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=drain, daemon=True).start()
        assert ready.wait(60), self.lines
        found = [re.search(r"http://([\d.]+):(\d+)", line) for line in self.lines]
        match = next((m for m in found if m), None)
        assert match, "".join(self.lines)
        self.host, self.port = match.group(1), int(match.group(2))
        self.url = f"http://{self.host}:{self.port}"

    def client(self, key: str | None = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or "none", max_retries=0, timeout=60)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_model_folder(tmp_path_factory.mktemp("serve") / "model")


@pytest.fixture(scope="module")
def server(folder):
    s = Server(folder, env=cli_env(LLMCTL_API_KEY=KEY))  # no --host: the default
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def tok(folder):
    from llmctl.model.hf_tokenizer import load_folder_tokenizer

    return load_folder_tokenizer(folder)


def headers(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat(client, server, content: str, **kw):
    return client.chat.completions.create(
        model=str(server_model(server)), messages=[{"role": "user", "content": content}], **kw
    )


def server_model(server: Server) -> str:
    return httpx.get(server.url + "/v1/models", headers=headers()).json()["data"][0]["id"]


# ---- the API ----------------------------------------------------------------------------------------


def test_models_health_and_the_default_address(server, client, folder):
    assert [m.id for m in client.models.list().data] == [str(folder)]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert server.host == "127.0.0.1"
    # the listening socket itself: 127.0.0.1 (0100007F) in /proc/net/tcp, state 0A = LISTEN
    listening = [
        line.split()[1]
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
        if line.split()[3] == "0A"
    ]
    assert f"0100007F:{server.port:04X}" in listening


def test_streamed_deltas_concatenate_to_the_non_streamed_text(server, client):
    model = server_model(server)
    for prompt in PROMPTS[:4]:
        messages = [{"role": "user", "content": prompt}]
        whole = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)
        chunks = list(
            client.chat.completions.create(
                model=model,
                messages=messages,
                max_tokens=24,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content and text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
        done = client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0)
        pieces = client.completions.create(
            model=model, prompt=prompt, max_tokens=24, temperature=0, stream=True
        )
        assert "".join(c.choices[0].text for c in pieces) == done.choices[0].text


def test_n_choices_with_a_seed(server, client):
    model = server_model(server)
    kw = dict(model=model, prompt="The people of", max_tokens=12, temperature=1.0, n=3, seed=5)
    first = client.completions.create(**kw, extra_body={"return_token_ids": True})
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.text for c in first.choices]
    assert len(set(texts)) > 1  # each choice has its own random stream
    assert [c.text for c in client.completions.create(**kw).choices] == texts  # the seed fixes them
    streamed = ["", "", ""]
    for chunk in client.completions.create(**kw, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == texts
    assert first.usage.completion_tokens == sum(len(c.token_ids) for c in first.choices)
    assert all(len(c.token_ids) == 12 for c in first.choices if c.finish_reason == "length")


def test_stop_sequences_cut_the_text_before_them(server, client):
    model = server_model(server)
    kw = dict(model=model, prompt="A", max_tokens=30, temperature=0)
    free = client.completions.create(**kw, logprobs=0)
    text, pieces = free.choices[0].text, free.choices[0].logprobs.tokens
    # A stop string across two tokens: its first character arrives a token early and must be held back.
    k = next(
        k
        for k in range(len(pieces) - 1)
        if pieces[k]
        and pieces[k + 1]
        and "\ufffd" not in pieces[k] + pieces[k + 1]
        and (pieces[k][-1] + pieces[k + 1][0]) not in "".join(pieces[: k + 1])
    )
    stop = pieces[k][-1] + pieces[k + 1][0]
    cut = client.completions.create(**kw, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop" and free.choices[0].finish_reason == "length"
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stop=stop, stream=True))
    assert streamed == cut.choices[0].text


def test_logprobs_and_usage_match_the_tokenizer(server, client, tok):
    model = server_model(server)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world"}]
    r = client.chat.completions.create(
        model=model, messages=messages, max_tokens=10, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert r.usage.prompt_tokens == len(tok.encode_chat(messages))
    assert r.usage.completion_tokens == len(content) == 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + 10
    for step in content:
        assert len(step.top_logprobs) == 3
        assert [t.logprob for t in step.top_logprobs] == sorted(
            (t.logprob for t in step.top_logprobs), reverse=True
        )
        assert step.logprob == pytest.approx(step.top_logprobs[0].logprob)  # greedy takes the most likely
        assert step.logprob < 0
    c = client.completions.create(model=model, prompt="hello world", max_tokens=6, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert c.usage.prompt_tokens == len(tok.encode("hello world"))
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == c.usage.completion_tokens == 6
    assert all(len(t) <= 2 for t in lp.top_logprobs)


def test_the_chat_prompt_is_the_one_sft_trains_on(server, tok):
    from llmctl.train.chat_tokens import trained_spans

    model = server_model(server)
    messages = [
        {"role": "system", "content": "You answer in French."},
        {"role": "user", "content": "Bonjour ! Ça va ?"},
        {"role": "assistant", "content": "Oui."},
        {"role": "user", "content": "Et toi ?"},
    ]
    body = {"model": model, "messages": messages, "max_tokens": 2, "temperature": 0, "return_token_ids": True}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers()).json()
    # what sft renders for the same conversation with an assistant reply, up to where the reply starts
    text, spans = trained_spans(tok, [*messages, {"role": "assistant", "content": "Très bien."}])
    prompt_text = text[: spans[-1][0]]
    assert tok.tokenizer.decode(r["prompt_token_ids"], skip_special_tokens=False) == prompt_text
    assert r["prompt_token_ids"] == tok.tokenizer.encode(prompt_text, add_special_tokens=False).ids


def request_for(k: int, model: str) -> dict:
    """Request k of the concurrency test: chat or completion, streamed or not, its own length."""
    return {
        "model": model,
        "max_tokens": 4 + k % 9,
        "temperature": 0,
        "stream": k % 3 == 0,
        **(
            {"messages": [{"role": "user", "content": PROMPTS[k % 8]}]}
            if k % 2
            else {"prompt": PROMPTS[k % 8]}
        ),
    }


def send(client: openai.OpenAI, body: dict) -> tuple[str, str, int]:
    """(text, finish_reason, completion tokens) of one request, read the way its client would."""
    kind = client.chat.completions if "messages" in body else client.completions
    if not body["stream"]:
        r = kind.create(**body)
        choice = r.choices[0]
        return (
            (getattr(choice, "message", None) and choice.message.content) or getattr(choice, "text", ""),
            choice.finish_reason,
            r.usage.completion_tokens,
        )
    text, finish, usage = "", None, None
    for chunk in kind.create(**body, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        for c in chunk.choices:
            text += (c.delta.content or "") if hasattr(c, "delta") else c.text
            finish = c.finish_reason or finish
    return text, finish, usage


def test_32_concurrent_clients_get_what_each_gets_alone(server):
    model = server_model(server)
    bodies = [request_for(k, model) for k in range(64)]  # 32 clients x 2 requests
    one = server.client()
    alone = [send(one, b) for b in bodies]

    def client_session(c: int) -> list:
        mine = server.client()
        return [send(mine, bodies[c]), send(mine, bodies[32 + c])]

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(client_session, range(32)))
    together = [r[0] for r in results] + [r[1] for r in results]
    assert together == alone
    assert all(finish in ("stop", "length") and text for text, finish, _ in together)
    assert len({t for t, _, _ in alone}) > 8  # the outputs differ: the comparison means something


# ---- errors -----------------------------------------------------------------------------------------

M = b'"model": "MODEL"'
FUZZ = {
    "wrong type": b"{" + M + b', "prompt": 5}',
    "missing prompt": b"{" + M + b"}",
    "huge max_tokens": b"{" + M + b', "prompt": "x", "max_tokens": 100000000000000000000000000000}',
    "negative max_tokens": b"{" + M + b', "prompt": "x", "max_tokens": -1}',
    "negative temperature": b"{" + M + b', "prompt": "x", "temperature": -1}',
    "string temperature": b"{" + M + b', "prompt": "x", "temperature": "hot"}',
    "string bool": b"{" + M + b', "prompt": "x", "stream": "true"}',
    "n zero": b"{" + M + b', "prompt": "x", "n": 0}',
    "n huge": b"{" + M + b', "prompt": "x", "n": 1000000}',
    "infinite top_p": b"{" + M + b', "prompt": "x", "top_p": 1e999}',
    "NaN": b"{" + M + b', "prompt": "x", "temperature": NaN}',
    "huge seed": b"{" + M + b', "prompt": "x", "seed": 100000000000000000000000}',
    "unknown field": b"{" + M + b', "prompt": "x", "max_token": 3}',
    "token id too big": b"{" + M + b', "prompt": [999999]}',
    "negative token id": b"{" + M + b', "prompt": [-1]}',
    "empty prompt list": b"{" + M + b', "prompt": []}',
    "five stops": b"{" + M + b', "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}',
    "prompt too long": b"{" + M + b', "prompt": "' + b"word " * 3000 + b'"}',
    "unknown model": b'{"model": "gpt-5", "prompt": "x"}',
    "invalid utf-8": b"{" + M + b', "prompt": "\xff\xfe"}',
    "deeply nested": b"[" * 100000 + b"]" * 100000,
    "nested in a field": b"{" + M + b', "prompt": ' + b"[" * 3000 + b"]" * 3000 + b"}",
    "not json": b"hello",
    "empty body": b"",
    "json array": b"[1, 2]",
    "10 MB body": b"{" + M + b', "prompt": "' + b"a" * 10_000_000 + b'"}',
    "chat: no messages": b"{" + M + b', "messages": []}',
    "chat: bad role": b"{" + M + b', "messages": [{"role": "robot", "content": "x"}]}',
    "chat: null content": b"{" + M + b', "messages": [{"role": "user", "content": null}]}',
    "chat: top_logprobs without logprobs": b"{"
    + M
    + b', "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}',
    "chat: messages not a list": b"{" + M + b', "messages": {"role": "user"}}',
}


@pytest.mark.parametrize("name", list(FUZZ))
def test_fuzzed_bodies_get_a_4xx_json_error_and_the_server_keeps_answering(server, name):
    model = server_model(server).encode()
    body = FUZZ[name].replace(b"MODEL", model)
    path = "/v1/chat/completions" if name.startswith("chat:") else "/v1/completions"
    r = httpx.post(
        server.url + path, content=body, headers={**headers(), "Content-Type": "application/json"}, timeout=60
    )
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    error = r.json()["error"]
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    expected = {"unknown model": 404, "10 MB body": 413}.get(name, 400)
    assert r.status_code == expected, r.text[:300]
    if name in ("wrong type", "huge max_tokens", "unknown field", "negative temperature"):
        assert error["param"] in ("prompt", "max_tokens", "max_token", "temperature")
    ok = httpx.post(
        server.url + "/v1/completions",
        json={"model": model.decode(), "prompt": "The", "max_tokens": 2, "temperature": 0},
        headers=headers(),
    )
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_unknown_paths_and_methods_are_json_errors(server):
    for r in (
        httpx.get(server.url + "/v2/nothing"),
        httpx.get(server.url + "/v1/completions", headers=headers()),
    ):
        assert r.status_code in (404, 405) and r.json()["error"]["message"]


def test_the_api_key_is_enforced_on_v1_only(server):
    model = server_model(server)
    body = {"model": model, "prompt": "x", "max_tokens": 2}
    assert httpx.post(server.url + "/v1/completions", json=body).status_code == 401
    wrong = httpx.post(server.url + "/v1/completions", json=body, headers=headers("sk-wrong"))
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        server.client(key="sk-wrong").models.list()
    assert httpx.post(server.url + "/v1/completions", json=body, headers=headers()).status_code == 200
    assert httpx.get(server.url + "/health").status_code == 200


def test_metrics_are_prometheus_text(server, client):
    chat(client, server, "hello", max_tokens=3, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values['llmctl_requests_total{endpoint="/v1/chat/completions",status="200"}'] >= 1
    assert values["llmctl_prompt_tokens_total"] > 0 and values["llmctl_generation_tokens_total"] >= 3
    assert values["llmctl_time_to_first_token_seconds_count"] >= 1
    assert values["llmctl_inter_token_latency_seconds_count"] >= 2
    assert (
        values['llmctl_time_to_first_token_seconds_bucket{le="+Inf"}']
        == values["llmctl_time_to_first_token_seconds_count"]
    )
    assert "llmctl_queue_length" in values and "llmctl_running_rows" in values


# ---- limits and shutdown ------------------------------------------------------------------------------


def test_a_full_queue_gets_429_and_sigterm_drains_then_exits_0(folder):
    s = Server(folder, "--max-num-seqs", "1", "--max-queue", "1", "--drain-timeout", "60")
    try:
        model = server_model(s)
        body = {"model": model, "prompt": "The people of", "max_tokens": 100, "temperature": 0}
        with ThreadPoolExecutor(6) as pool:
            answers = list(
                pool.map(lambda _: httpx.post(s.url + "/v1/completions", json=body, timeout=60), range(6))
            )
        codes = sorted(r.status_code for r in answers)
        assert 429 in codes and 200 in codes, codes  # one row, one waiting: the rest are refused
        for r in answers:
            if r.status_code == 429:
                assert r.json()["error"]["code"] == "queue_full"
            else:
                assert r.json()["choices"][0]["finish_reason"] == "length"

        # A client that goes away mid-stream frees its row (the only one) at once, not after 1000 tokens.
        def metric(name: str) -> float:
            lines = httpx.get(s.url + "/metrics").text.splitlines()
            return float(next(line.split()[1] for line in lines if line.startswith(name + " ")))

        before = metric("llmctl_generation_tokens_total")
        with httpx.stream(
            "POST", s.url + "/v1/completions", json={**body, "max_tokens": 1000, "stream": True}
        ) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break
        deadline = time.time() + 60
        while metric("llmctl_running_rows") != 0:
            assert time.time() < deadline
            time.sleep(0.1)
        assert metric("llmctl_generation_tokens_total") - before < 300  # greedy runs 1000 without a stop

        # SIGTERM while a long request streams: it still gets every token, then the server exits 0
        got, finish = [], []
        with httpx.stream(
            "POST", s.url + "/v1/completions", json={**body, "max_tokens": 200, "stream": True}, timeout=60
        ) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    import json

                    choice = json.loads(line[6:])["choices"][0]
                    got.append(choice["text"])
                    finish.append(choice["finish_reason"])
                    if len(got) == 3:
                        s.proc.send_signal(signal.SIGTERM)
                        time.sleep(0.3)
                        with pytest.raises(httpx.TransportError):  # no new connections while draining
                            httpx.get(s.url + "/health", timeout=5)
        assert finish[-1] == "length" and finish.count("length") == 1
        assert s.proc.wait(30) == 0
    finally:
        if s.proc.poll() is None:
            s.proc.kill()


def test_while_draining_requests_get_503(folder):
    from starlette.testclient import TestClient

    from llmctl.inference import load_model
    from llmctl.model.scheduler import Scheduler
    from llmctl.serve.app import ServeState, build_app

    loaded = load_model(folder)
    scheduler = Scheduler(loaded.engine)
    state = ServeState(loaded, scheduler, model_id="m")
    client = TestClient(build_app(state))
    scheduler.start()
    try:
        assert client.get("/health").status_code == 200
        state.draining = True
        r = client.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        assert client.get("/health").status_code == 503
    finally:
        scheduler.stop()


def test_vllm_engine_says_what_is_missing(folder):
    r = run_cli("serve", "--ckpt", str(folder), "--engine", "vllm")
    assert r.code == 2, r.stderr
    import importlib.util

    import torch

    assert ("vllm is not installed" in r.stderr) == (importlib.util.find_spec("vllm") is None), r.stderr
    assert ("no CUDA device" in r.stderr) == (not torch.cuda.is_available()), r.stderr
