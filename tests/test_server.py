"""`gpt2lab serve`: the batching engine against generate(), OpenAI's own client against the live server,
streamed == non-streamed, bad input -> OpenAI-style 4xx, disconnects, timeouts and a full queue.

The server runs for real: uvicorn on a free loopback port in a background thread, serving a small
random checkpoint with the byte tokenizer (so no vocabulary files are needed).
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from test_generate import small_model

from gpt2lab.checkpoint import save_checkpoint
from gpt2lab.cli import main
from gpt2lab.config import ServeConfig
from gpt2lab.decoder import Decoder
from gpt2lab.engine import Engine, Event, Job, choice_seed
from gpt2lab.errors import UserError
from gpt2lab.generate import Sampling, draw, generate
from gpt2lab.tokenizer import ByteTokenizer

KEY = "sk-test-key"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: extra intra-op threads only contend (10x slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- the engine, no HTTP -----------------------------------------------------------------------


def ids_text(ids: list[int]) -> bytes:
    """A decode_bytes under which text spells out the ids ("12,7,"), so tests can read tokens back."""
    return b"".join(b"%d," % i for i in ids)


class Collector:
    """A Job's deliver(): gathers each choice's text and finish, and signals when all are done."""

    def __init__(self, n: int):
        self.text = [""] * n
        self.finish: list[str | None] = [None] * n
        self.tokens = [0] * n
        self.done = threading.Event()
        self.left = n

    def __call__(self, events: list[Event]) -> None:
        for ev in events:
            assert ev.finish != "error", ev.text
            self.text[ev.choice] += ev.text
            if ev.finish is not None:
                self.finish[ev.choice], self.tokens[ev.choice] = ev.finish, ev.tokens
                self.left -= 1
        if self.left == 0:
            self.done.set()

    def ids(self, choice: int = 0) -> list[int]:
        return [int(t) for t in self.text[choice].split(",") if t]


def run_jobs(engine: Engine, specs: list[dict], stagger: float = 0.0) -> list[Collector]:
    """Submit jobs (dicts of Job fields), optionally one every `stagger` seconds; wait for all."""
    out = []
    for spec in specs:
        spec = dict(spec)
        c = Collector(spec.get("n", 1))
        spec.setdefault("sampling", Sampling(temperature=0.0))
        engine.submit([Job(deliver=c, **spec)])
        out.append(c)
        time.sleep(stagger)
    for c in out:
        assert c.done.wait(30), "the engine did not finish a job"
    return out


@contextlib.contextmanager
def running(engine: Engine):
    engine.start()
    try:
        yield engine
    finally:
        engine.stop()


@pytest.mark.parametrize("pos_embedding", ["learned", "sinusoidal", "rope"])
def test_decoder_rows_of_different_lengths_match_the_uncached_model(pos_embedding):
    """One batched prefill of prompts of different lengths into chosen rows, then decode steps of
    rows 0..n-1: each row's logits == the plain forward of its own sequence."""
    torch.manual_seed(0)
    model = small_model(pos_embedding=pos_embedding)
    seqs = [torch.randint(0, 101, (n,)).tolist() for n in (3, 9, 5)]
    core = Decoder(model, 4)
    with torch.no_grad():
        got = core.prefill([2, 0, 1], [seqs[2], seqs[0], seqs[1]])  # rows in any order
        for row, s in zip([2, 0, 1], [seqs[2], seqs[0], seqs[1]], strict=True):
            torch.testing.assert_close(
                got[[2, 0, 1].index(row)], model(torch.tensor([s]))[0, -1], atol=1e-5, rtol=0
            )
        for _ in range(3):
            nxt = torch.randint(0, 101, (3,))
            for b in range(3):
                seqs[b].append(int(nxt[b]))
            got = core.decode(nxt)
            for b, s in enumerate(seqs):
                torch.testing.assert_close(got[b], model(torch.tensor([s]))[0, -1], atol=1e-5, rtol=0)
    assert [core.length(b) for b in range(3)] == [6, 12, 8]


def test_draw_follows_the_probabilities_and_never_picks_a_filtered_token():
    """Each row's draws, with its own generator, have the row's distribution (4-sigma bounds)."""
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0], [0.1, 0.2, 0.3, 0.4, 0.0]])
    probs[2] *= 0.999  # softmax output need not sum to exactly 1
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    n = 4000
    counts = torch.zeros(3, 5)
    for _ in range(n):
        t = draw(probs, gens)
        counts[torch.arange(3), t] += 1
    expected = probs / probs.sum(-1, keepdim=True)
    sigma = (expected * (1 - expected) / n).sqrt()
    assert ((counts / n - expected).abs() <= 4 * sigma + 1e-9).all(), counts
    assert counts[0, 1] == counts[0, 4] == 0 and counts[1, 4] == n and counts[2, 4] == 0
    again = [torch.Generator().manual_seed(i) for i in range(3)]
    first = draw(probs, again)
    assert first.tolist() == draw(probs, [torch.Generator().manual_seed(i) for i in range(3)]).tolist()


@pytest.mark.parametrize("compile", [False, True])
def test_engine_greedy_equals_generate_with_requests_joining_and_leaving(compile):
    """Continuous batching: 6 jobs of different lengths through 3 slots, joining as others finish;
    every job's greedy tokens == generate() on its prompt alone. compile: the fixed-shape decode step
    over batch buckets (CUDA graphs on a GPU, run eagerly here), free rows of a bucket computed too."""
    model = small_model(block_size=48)
    prompts = [[1, 2, 3], [7] * 11, [5, 9], [42] * 20, [3, 1, 4, 1, 5], [99]]
    max_tokens = [12, 5, 20, 9, 16, 25]
    engine = Engine(model, ids_text, 101, max_batch_size=3, max_queue=10, compile=compile)
    with running(engine):
        specs = [dict(prompt=p, max_tokens=m) for p, m in zip(prompts, max_tokens, strict=True)]
        results = run_jobs(engine, specs, stagger=0.002)
    for p, m, c in zip(prompts, max_tokens, results, strict=True):
        ref = generate(model, p, m, temperature=0.0, eot_id=None)
        assert c.ids() == ref
        assert c.finish == ["length"] and c.tokens == [m]
    assert engine.steps < sum(max_tokens)  # rows shared decode steps
    assert engine.active == 0 and engine.waiting == 0


@pytest.mark.gpu
def test_engine_cuda_graph_decode_equals_generate():
    """--compile on a GPU: decode steps replayed from CUDA graphs (one per batch bucket) give each
    request the tokens of the eager path."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = small_model(block_size=48).cuda()
    prompts = [[1, 2, 3], [7] * 11, [5, 9], [42] * 20, [3, 1, 4, 1, 5]]
    engine = Engine(model, ids_text, 101, max_batch_size=4, compile=True)
    with running(engine):
        results = run_jobs(engine, [dict(prompt=p, max_tokens=15) for p in prompts], stagger=0.002)
    assert len(engine.core._graphs) >= 2  # several buckets were captured and replayed
    for p, c in zip(prompts, results, strict=True):
        assert c.ids() == generate(model, p, 15, temperature=0.0, eot_id=None)


def test_joining_requests_are_prefilled_together():
    """Jobs waiting when the engine looks are prefilled in one forward (prompts of different lengths
    in their own rows), and each still gets exactly its own greedy continuation."""
    model = small_model(block_size=48)
    prompts = [[1, 2, 3], [7] * 11, [5, 9], [42] * 20, [3, 1, 4, 1, 5], [99]]
    engine = Engine(model, ids_text, 101, max_batch_size=8)
    collectors = [Collector(1) for _ in prompts]
    for p, c in zip(prompts, collectors, strict=True):
        engine.submit([Job(p, 10, Sampling(temperature=0.0), c)])
    with running(engine):
        assert all(c.done.wait(30) for c in collectors)
    assert engine.prefills == 1 and engine.steps == 9  # one prefill, then 9 decode steps for all 6
    for p, c in zip(prompts, collectors, strict=True):
        assert c.ids() == generate(model, p, 10, temperature=0.0, eot_id=None)


def test_engine_request_in_a_busy_batch_equals_it_alone():
    """Per-request generators: a seeded sampled job, and a greedy one, give the same tokens alone
    and among other jobs (the batch changes only float rounding, not the choices, on this model)."""
    model = small_model(block_size=64)
    sampled = dict(
        prompt=[4, 8, 15], max_tokens=30, sampling=Sampling(0.9, top_k=50), seeds=[choice_seed(3, 0)]
    )
    greedy = dict(prompt=[16, 23, 42], max_tokens=30)
    noise = [dict(prompt=[i + 1] * (i + 2), max_tokens=10 + 3 * i, sampling=Sampling(1.0)) for i in range(5)]
    engine = Engine(model, ids_text, 101, max_batch_size=8)
    with running(engine):
        alone = [c.ids() for c in run_jobs(engine, [sampled])] + [c.ids() for c in run_jobs(engine, [greedy])]
        busy = run_jobs(engine, noise[:3] + [sampled] + noise[3:] + [greedy], stagger=0.001)
    assert [busy[3].ids(), busy[6].ids()] == alone
    assert engine.steps > 0


def test_engine_n_samples_share_a_prefill_and_sample_0_is_the_n_1_request():
    model = small_model(block_size=64)
    sampling = Sampling(1.0)
    engine = Engine(model, ids_text, 101, max_batch_size=4)
    with running(engine):
        seeds = [choice_seed(11, s) for s in range(3)]
        (three,) = run_jobs(engine, [dict(prompt=[5, 6], max_tokens=20, sampling=sampling, n=3, seeds=seeds)])
        (one,) = run_jobs(engine, [dict(prompt=[5, 6], max_tokens=20, sampling=sampling, seeds=seeds[:1])])
    assert three.ids(0) == one.ids(0)
    assert len({tuple(three.ids(s)) for s in range(3)}) == 3  # independent streams per sample


def test_engine_stops_at_stop_ids_and_never_samples_padded_vocab():
    """A stop id ends the row (finish "stop", counted, not shown); ids >= vocab_size never appear."""
    model = small_model(block_size=64)
    full = generate(model, [1, 2], 20, temperature=0.0, eot_id=None)
    limit = max(full)  # as if ids >= limit were the model's padding: greedy would choose one of them
    engine = Engine(model, ids_text, limit, max_batch_size=2)
    with running(engine):
        (c,) = run_jobs(engine, [dict(prompt=[1, 2], max_tokens=20)])
        ids = c.ids()
        assert all(t < limit for t in ids) and len(ids) == 20
        (s,) = run_jobs(engine, [dict(prompt=[1, 2], max_tokens=20, stop_ids=frozenset([ids[4]]))])
    first = ids.index(ids[4])
    assert s.ids() == ids[:first] and s.finish == ["stop"] and s.tokens == [first + 1]


# --- the live server ---------------------------------------------------------------------------


TEXT = (
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
    "Every good boy does fine. Pack my box with five dozen liquor jugs. "
)


def tiny_byte_model(steps: int = 60) -> torch.nn.Module:
    """A small model with the byte tokenizer's ids (vocab padded to 320), trained for a few steps on
    a few English sentences, so that it writes letters and spaces (whole characters, stop strings)."""
    model = small_model(vocab_size=320, block_size=128, n_embd=64, n_head=4, n_layer=2).train()
    data = torch.tensor(list((TEXT * 20).encode()))
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - 65, (16,), generator=g)
        x = torch.stack([data[i : i + 64] for i in starts])
        y = torch.stack([data[i + 1 : i + 65] for i in starts])
        opt.zero_grad()
        model(x, y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """tiny_byte_model saved as a checkpoint with the byte tokenizer's spec."""
    model = tiny_byte_model()
    path = tmp_path_factory.mktemp("serve") / "tiny-bytes"
    save_checkpoint(path, model, extra={"tokenizer": ByteTokenizer().to_spec()})
    return path


class Server:
    """uvicorn serving create_app(cfg) on a free loopback port, in a background thread."""

    def __init__(self, cfg: ServeConfig, api_key: str | None = None):
        import uvicorn

        from gpt2lab.server import create_app, uvicorn_config

        self.app = create_app(cfg, api_key=api_key)
        self.engine = self.app.state.engine
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn_config(self.app, cfg, lifespan="on"))  # as `gpt2lab serve` runs
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()

    def slow_down(self, seconds: float) -> None:
        """Make each engine step take at least `seconds` (to observe requests mid-generation)."""
        step = self.engine._step

        def slow(*args):
            time.sleep(seconds)
            return step(*args)

        self.engine._step = slow


def serve_cfg(ckpt: Path, **kw) -> ServeConfig:
    fields = dict(
        ckpt=str(ckpt), device="cpu", max_tokens=100, max_n=4, max_batch_size=8, max_body_bytes=20_000
    )
    return ServeConfig(**{**fields, **kw})


@pytest.fixture(scope="module")
def server(ckpt):
    with Server(serve_cfg(ckpt), api_key=KEY) as s:
        yield s


@pytest.fixture
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=30)


def test_openai_client_completes_and_streams_the_same_text(client):
    (model,) = client.models.list().data
    assert model.id == "tiny-bytes"
    kw = dict(model=model.id, prompt="Hello", max_tokens=40, temperature=0.9, top_p=0.95, seed=7, n=2)
    full = client.completions.create(**kw)
    assert full.object == "text_completion" and full.model == "tiny-bytes"
    assert [c.index for c in full.choices] == [0, 1]
    assert full.usage.prompt_tokens == 5  # "Hello" is 5 bytes
    streamed, finishes, usage = ["", ""], [None, None], None
    for chunk in client.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            streamed[c.index] += c.text
            finishes[c.index] = c.finish_reason or finishes[c.index]
    assert streamed == [c.text for c in full.choices]
    assert finishes == [c.finish_reason for c in full.choices]
    assert usage.model_dump() == full.usage.model_dump()
    assert streamed[0] != streamed[1]  # two samples, two seeds
    for c in full.choices:
        assert c.finish_reason in ("stop", "length") and c.logprobs is None
    again = client.completions.create(**kw)
    assert [c.text for c in again.choices] == [c.text for c in full.choices]  # seeded: repeatable


def test_stop_strings_token_prompts_and_prompt_lists(client):
    greedy = client.completions.create(model="tiny-bytes", prompt="abc", max_tokens=30, temperature=0)
    text = greedy.choices[0].text
    assert greedy.choices[0].finish_reason == "length" and greedy.usage.completion_tokens == 30
    stop = next(ch for ch in text[3:] if ch != "\ufffd")  # a whole character from the middle
    cut = client.completions.create(
        model="tiny-bytes", prompt="abc", max_tokens=30, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    by_ids = client.completions.create(model="tiny-bytes", prompt=[97, 98, 99], max_tokens=30, temperature=0)
    assert by_ids.choices[0].text == text
    both = client.completions.create(model="tiny-bytes", prompt=["abc", "xyz"], max_tokens=30, temperature=0)
    assert both.choices[0].text == text and both.usage.prompt_tokens == 6 and len(both.choices) == 2


def test_concurrent_requests_are_decoded_together_and_match_alone(server, client):
    kw = dict(model="tiny-bytes", max_tokens=50, temperature=0)
    alone = client.completions.create(prompt="The quick", **kw).choices[0].text
    steps = server.engine.steps
    prompts = ["The quick", "brown fox", "jumps", "over the", "lazy dog", "again and"]
    with ThreadPoolExecutor(len(prompts)) as pool:
        texts = list(pool.map(lambda p: client.completions.create(prompt=p, **kw).choices[0].text, prompts))
    assert texts[0] == alone
    assert server.engine.steps - steps < 50 * len(prompts) * 0.6  # many rows per decode step


def test_disconnected_stream_frees_its_row_at_once(server):
    httpx = pytest.importorskip("httpx")
    server.slow_down(0.02)
    try:
        cancelled = []
        body = {"prompt": "x", "max_tokens": 100, "stream": True}
        with httpx.Client(timeout=10) as h:
            with h.stream("POST", server.url + "/v1/completions", json=body, headers=auth()) as r:
                assert r.status_code == 200
                lines = r.iter_lines()  # kept: a dropped iterator would close the response itself
                next(lines)  # the first chunk has come: the row is decoding
                time.sleep(0.1)
                assert server.engine.active == 1
            # Leaving the block closed the connection after a few of 100 tokens. Counted in decode
            # steps, not seconds, so that a busy machine cannot make the check pass or fail.
            steps, t0 = server.engine.steps, time.monotonic()
            while server.engine.active and time.monotonic() - t0 < 10:
                time.sleep(0.01)
            cancelled.append(server.engine.steps - steps)
        assert server.engine.active == 0, "the row of a closed stream is still decoding"
        assert cancelled[0] <= 5  # freed within a few steps, not after the ~90 left
    finally:
        del server.engine._step  # back to the class's method


def test_disconnected_non_streamed_request_frees_its_row(server):
    """A client that gives up on a non-streamed request: the server notices within its 0.5 s poll."""
    httpx = pytest.importorskip("httpx")
    server.slow_down(0.02)
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                server.url + "/v1/completions",
                json={"prompt": "x", "max_tokens": 100},
                headers=auth(),
                timeout=0.3,
            )
        assert server.engine.active == 1  # still decoding: 100 tokens take >= 2 s
        steps, t0 = server.engine.steps, time.monotonic()
        while server.engine.active and time.monotonic() - t0 < 10:
            time.sleep(0.02)
        # The 0.5 s poll spans at most 25 steps of >= 20 ms: freed well before the ~85 tokens left.
        assert server.engine.active == 0 and server.engine.steps - steps <= 40
    finally:
        del server.engine._step


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


BAD = [
    # (description, body bytes or dict, headers, status, param)
    ("malformed JSON", b'{"prompt": "x",', None, 400, None),
    ("not an object", b"[1, 2]", None, 400, None),
    ("max_tokens wrong type", {"prompt": "x", "max_tokens": "x"}, None, 400, "max_tokens"),
    ("temperature wrong type", {"prompt": "x", "temperature": "hot"}, None, 400, "temperature"),
    ("max_tokens over the limit", {"prompt": "x", "max_tokens": 101}, None, 400, "max_tokens"),
    ("prompt over the context", {"prompt": "y" * 128, "max_tokens": 1}, None, 400, "prompt"),
    ("prompt + max_tokens over the context", {"prompt": "y" * 60, "max_tokens": 80}, None, 400, "max_tokens"),
    ("n over the limit", {"prompt": "x", "n": 5}, None, 400, "n"),
    ("token id outside the vocab", {"prompt": [1, 257]}, None, 400, "prompt"),
    ("no prompt", {"max_tokens": 3}, None, 400, "prompt"),
    ("suffix unsupported", {"prompt": "x", "suffix": "y"}, None, 400, "suffix"),
    ("logprobs over 20", {"prompt": "x", "logprobs": 21}, None, 400, "logprobs"),
    ("unknown field", {"prompt": "x", "file": "/etc/passwd"}, None, 400, "file"),
    ("unknown model", {"prompt": "x", "model": "gpt-4"}, None, 404, "model"),
    ("missing API key", {"prompt": "x"}, {}, 401, None),
    ("wrong API key", {"prompt": "x"}, auth("sk-wrong"), 401, None),
    ("body too large", {"prompt": "x" * 30_000}, None, 413, None),
]


@pytest.mark.parametrize("what, body, headers, status, param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_an_openai_style_4xx_and_the_server_keeps_serving(
    server, what, body, headers, status, param
):
    httpx = pytest.importorskip("httpx")
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = auth() if headers is None else headers
    r = httpx.post(server.url + "/v1/completions", content=data, headers=headers, timeout=10)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"


def test_context_and_route_errors_name_the_problem(server):
    httpx = pytest.importorskip("httpx")
    r = httpx.post(
        server.url + "/v1/completions", json={"prompt": "y" * 60, "max_tokens": 80}, headers=auth()
    )
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert "maximum context length is 128 tokens" in r.json()["error"]["message"]
    r = httpx.get(server.url + "/v1/nothing", headers=auth())
    assert r.status_code == 404 and r.json()["error"]["message"] == "Unknown request URL: GET /v1/nothing"
    r = httpx.get(server.url + "/v1/completions", headers=auth())
    assert r.status_code == 405 and "error" in r.json()
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/").status_code == 200  # the playground page itself is public


def test_fastapi_validation_errors_become_openai_style_400(server):
    """A typed parameter FastAPI itself rejects (its default is a 422 with its own body) -> our 400."""
    httpx = pytest.importorskip("httpx")

    @server.app.get("/typed-probe")
    def probe(count: int) -> dict:
        return {"count": count}

    assert httpx.get(server.url + "/typed-probe?count=3").json() == {"count": 3}
    r = httpx.get(server.url + "/typed-probe?count=many")
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error" and r.json()["error"]["param"] == "count"


def test_full_queue_is_503_with_retry_after_and_too_many_streams_429(ckpt):
    httpx = pytest.importorskip("httpx")
    cfg = serve_cfg(ckpt, max_batch_size=1, max_n=1, max_queue=0, max_streams=1)
    with Server(cfg) as s, httpx.Client(timeout=10) as h:
        s.slow_down(0.02)
        body = {"prompt": "x", "max_tokens": 100, "stream": True}
        with h.stream("POST", s.url + "/v1/completions", json=body) as first:
            lines = first.iter_lines()
            next(lines)  # the one batch slot is busy
            r = h.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 5})
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "server_error"
            r = h.post(s.url + "/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 5})
            assert r.status_code == 400 and "needs 2 sequences" in r.json()["error"]["message"]
            r = h.post(s.url + "/v1/completions", json={**body, "max_tokens": 5})
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
        deadline = time.monotonic() + 3
        while s.engine.active and time.monotonic() < deadline:
            time.sleep(0.01)
        r = h.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 5})  # served again
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 5


def test_request_timeout_ends_the_request_with_finish_length(ckpt):
    httpx = pytest.importorskip("httpx")
    with Server(serve_cfg(ckpt, request_timeout_s=0.3)) as s:
        s.slow_down(0.02)
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 100}, timeout=10)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    # Each step takes >= 0.02 s, so 0.3 s leaves room for at most ~16 of the 100 tokens asked for (a
    # bound on tokens, not on wall time, which a busy machine stretches).
    assert r.json()["usage"]["completion_tokens"] <= 16


@pytest.mark.slow
def test_the_serve_command_answers_with_its_api_key(ckpt):
    """`python -m gpt2lab serve --ckpt DIR --host 127.0.0.1 --port P --api-key KEY`, as a user runs it."""
    httpx = pytest.importorskip("httpx")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "gpt2lab", "serve", "--ckpt", str(ckpt), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--api-key", KEY, "--device", "cpu"]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "gpt2lab serve did not answer /health in 60 s"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        body = {"model": "tiny-bytes", "prompt": "The ", "max_tokens": 8, "temperature": 0}
        assert httpx.post(url + "/v1/completions", json=body).status_code == 401
        r = httpx.post(url + "/v1/completions", json=body, headers=auth(), timeout=30)
        assert r.status_code == 200 and r.json()["usage"] == {
            "prompt_tokens": 4,
            "completion_tokens": r.json()["usage"]["completion_tokens"],
            "total_tokens": 4 + r.json()["usage"]["completion_tokens"],
        }
        assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert "tiny-bytes" in out and "API key required" in out


def test_serve_refuses_a_public_host_without_an_api_key(ckpt, capsys, monkeypatch):
    monkeypatch.delenv("GPT2LAB_API_KEY", raising=False)
    code = main(["serve", "--ckpt", str(ckpt), "--host", "0.0.0.0", "--port", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--api-key" in err, err


def test_missing_serve_extra_is_a_one_line_install_hint(ckpt, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    code = main(["serve", "--ckpt", str(ckpt)])
    err = capsys.readouterr().err
    assert code == 2 and 'pip install -e ".[serve]"' in err and err.count("\n") == 1


def test_serve_config_checks_its_limits():
    with pytest.raises(UserError, match="exactly one"):
        ServeConfig()
    with pytest.raises(UserError, match="max-n 9 exceeds --max-batch-size 8"):
        ServeConfig(ckpt="x", max_n=9, max_batch_size=8)
    with pytest.raises(UserError, match="max-tokens"):
        ServeConfig(ckpt="x", max_tokens=0)
