"""Serving under load: concurrent streaming clients against `gpt2lab serve`, continuous batching vs
one request at a time, the same request mix in the same run.

The server is the real command in a subprocess (`python -m gpt2lab serve`, loopback); the clients are
asyncio + httpx in this process, each looping streamed /v1/completions requests until the time is up
(requests started before then are finished and counted). Request k of client c has a fixed prompt and
seed, so both modes serve the same requests. Every response is checked: HTTP 200, no error event,
each choice ends with a finish_reason, a usage chunk whose prompt_tokens is the prompt's length and
whose completion_tokens is max_tokens when finish_reason is "length" (at most that when "stop"), then
`data: [DONE]`. Meanwhile --malformed-clients more clients each loop hostile requests (the cases the
fuzzer found: bad JSON, deep nesting, huge numbers, wrong types, unknown fields, ...) on one kept-alive
connection; each must be a 4xx, and no valid request may fail because of them. Then the prefill of
joining requests: all prompts in one forward (as the engine does) against one forward per prompt.
Prints markdown tables.

    python bench/serve.py                                   # 32 clients, 60 s per mode, a tiny model
    python bench/serve.py --ckpt out/shakespeare-char --screenshot docs/img/playground.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Once upon a time",
    "The meaning of life is",
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "In a hole in the ground there lived",
    "To be, or not to be",
    "The quick brown fox",
    "It was the best of times, it was the worst of times,",
    "Call me",
]


def tiny_checkpoint(out: Path) -> Path:
    """A random-init 4-layer x 128-wide GPT (context 256) with the byte tokenizer (vocab padded to 320)."""
    sys.path.insert(0, str(ROOT))
    from gpt2lab import GPT, GPTConfig
    from gpt2lab.checkpoint import save_checkpoint
    from gpt2lab.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=256, vocab_size=320))
    return save_checkpoint(out / "tiny-bytes", model, extra={"tokenizer": ByteTokenizer().to_spec()})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, ckpt: Path, batch: int, max_tokens: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "gpt2lab", "serve", "--ckpt", str(ckpt), "--port", str(self.port)]
        cmd += ["--device", "cpu", "--max-batch-size", str(batch), "--max-n", "1", "--max-queue", "1024"]
        cmd += ["--max-tokens", str(max_tokens), "--max-streams", "1024"]
        self.cmd = cmd
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in __exit__); not an unread pipe
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, text=True)

    def __enter__(self) -> ServerProcess:
        import httpx

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"server exited: {self.log.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise SystemExit("server did not start in 120 s")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


async def one_request(
    client, url: str, prompt: str, seed: int, max_tokens: int, prompt_len: int | None = None
) -> dict:
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "top_k": 50,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first, finish, usage, done, problem = None, None, None, False, None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    return {"error": chunk["error"]["message"]}
                if first is None:
                    first = time.perf_counter() - t0
                for c in chunk["choices"]:
                    finish = c["finish_reason"] or finish
                if chunk.get("usage"):
                    usage = chunk["usage"]
    except Exception as e:  # a broken connection is an error of the run, not of the benchmark
        return {"error": f"{type(e).__name__}: {e}"}
    latency = time.perf_counter() - t0
    if not done or finish is None or usage is None:
        problem = f"incomplete: done={done} finish={finish} usage={usage}"
    elif prompt_len is not None and usage["prompt_tokens"] != prompt_len:
        problem = f"prompt_tokens {usage['prompt_tokens']} != {prompt_len}"
    elif finish == "length" and usage["completion_tokens"] != max_tokens:
        problem = f"finish length with {usage['completion_tokens']} tokens"
    elif finish == "stop" and not 1 <= usage["completion_tokens"] <= max_tokens:
        problem = f"finish stop with {usage['completion_tokens']} tokens"
    if problem:
        return {"error": problem}
    return {
        "latency": latency,
        "ttft": first if first is not None else latency,
        "tokens": usage["completion_tokens"],
    }


async def load(
    url: str,
    clients: int,
    duration: float,
    max_tokens: int,
    prompt_lens: dict[str, int],
    bad_clients: int = 0,
) -> tuple[list[dict], float, dict[str, int]]:
    import httpx

    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await one_request(client, url, "warm up", 0, 8)
        results: list[dict] = []
        t0 = time.perf_counter()
        stop_at = t0 + duration

        async def worker(c: int) -> None:
            k = 0
            while time.perf_counter() < stop_at:
                prompt = PROMPTS[(c + k) % len(PROMPTS)]
                request = one_request(client, url, prompt, 1000 * c + k, max_tokens, prompt_lens[prompt])
                results.append(await request)
                k += 1

        bad = malformed(url, bad_clients, stop_at)
        seen = (await asyncio.gather(bad, *(worker(c) for c in range(clients))))[0]
        return results, time.perf_counter() - t0, seen


MALFORMED = [
    b'{"prompt": "x",',
    b"[1, 2]",
    b'{"prompt": "a", "temperature": 1' + b"0" * 399 + b"}",
    b'{"prompt": "a", "max_tokens": 1' + b"0" * 4300 + b"}",
    b'{"prompt": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
    b'{"prompt": "a", "max_tokens": "many"}',
    b'{"prompt": "a", "file": "/etc/passwd"}',
    b'{"prompt": [1.5]}',
    json.dumps({"prompt": "a", "stop": ["x"] * 17}).encode(),
    b'{"prompt": "a", "n": 1000}',
    b'{"prompt": "\xff"}',
    b'{"prompt": "a", "temperature": NaN}',
]


async def malformed(url: str, clients: int, stop_at: float) -> dict[str, int]:
    """Hostile requests in a loop, each client on one kept-alive connection: {status or error: count}."""
    import httpx

    seen: dict[str, int] = {}

    async def worker(c: int) -> None:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=1)) as client:
            k = c
            while time.perf_counter() < stop_at:
                body = MALFORMED[k % len(MALFORMED)]
                k += 1
                try:
                    r = await client.post(url + "/v1/completions", content=body)
                    key = str(r.status_code)
                except Exception as e:  # a dropped connection counts against the server
                    key = type(e).__name__
                seen[key] = seen.get(key, 0) + 1
                await asyncio.sleep(0.01)

    await asyncio.gather(*(worker(c) for c in range(clients)))
    return seen


def prefill_ratio(ckpt: Path, prompts: list[list[int]], rounds: int = 5) -> tuple[float, float]:
    """Seconds to prefill the prompts in one forward (rows of their own lengths) and one at a time."""
    from gpt2lab.checkpoint import load_model
    from gpt2lab.decoder import Decoder

    model = load_model(ckpt).eval()
    core = Decoder(model, len(prompts))
    together = alone = float("inf")
    with torch.inference_mode():
        for _ in range(rounds):  # alternating, best of each
            t0 = time.perf_counter()
            core.prefill(slice(0, len(prompts)), prompts)
            together = min(together, time.perf_counter() - t0)
            t0 = time.perf_counter()
            for i, p in enumerate(prompts):
                core.prefill([i], [p])
            alone = min(alone, time.perf_counter() - t0)
    return together, alone


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


def screenshot(url: str, path: Path, prompt: str, max_tokens: int) -> None:
    """The playground in headless Chromium after one generation (the docs' picture)."""
    from playwright.sync_api import sync_playwright

    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
    args += ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=args)
        page = browser.new_page(viewport={"width": 1100, "height": 640})
        page.goto(url + "/")
        page.fill("#prompt", prompt)
        page.fill("#seed", "1")
        page.eval_on_selector(
            "#max_tokens", f"el => {{ el.value = '{max_tokens}'; el.dispatchEvent(new Event('input')); }}"
        )
        page.click("#generate")
        page.wait_for_function("!document.getElementById('status').textContent.startsWith('generating')")
        status = page.text_content("#status")
        if not status.startswith("done"):
            raise SystemExit(f"playground: {status}")
        path.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(path))
        browser.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default=None, help="checkpoint to serve (default: a tiny random one)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load per mode")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32, help="--max-batch-size of the batched server")
    ap.add_argument("--modes", default="batched,sequential", help="batched, sequential (max batch 1)")
    ap.add_argument("--malformed-clients", type=int, default=4, help="clients sending hostile requests")
    ap.add_argument("--screenshot", default=None, metavar="PNG", help="also save a playground screenshot")
    ap.add_argument("--screenshot-prompt", default="ROMEO:")
    ap.add_argument("--screenshot-tokens", type=int, default=200, help="max tokens of the screenshot's run")
    args = ap.parse_args(argv)

    tmp = tempfile.TemporaryDirectory()
    ckpt = Path(args.ckpt) if args.ckpt else tiny_checkpoint(Path(tmp.name))
    from gpt2lab.checkpoint import read_config
    from gpt2lab.tokenizer import model_tokenizer

    # usage.prompt_tokens is checked against the served model's own tokenizer
    tok = model_tokenizer(read_config(ckpt).get("tokenizer"))
    prompt_lens = {p: len(tok.encode(p)) for p in PROMPTS}
    batch_of = {"batched": args.batch, "sequential": 1}
    rows, rates = [], {}
    for mode in args.modes.split(","):
        with ServerProcess(ckpt, batch_of[mode], args.max_tokens) as server:
            results, wall, seen = asyncio.run(
                load(
                    server.url,
                    args.clients,
                    args.duration,
                    args.max_tokens,
                    prompt_lens,
                    args.malformed_clients,
                )
            )
            if args.screenshot and mode == "batched":
                screenshot(server.url, Path(args.screenshot), args.screenshot_prompt, args.screenshot_tokens)
        ok = [r for r in results if "latency" in r]
        errors = [r["error"] for r in results if "error" in r]
        tokens = sum(r["tokens"] for r in ok)
        rates[mode] = tokens / wall
        lat, ttft = [r["latency"] for r in ok], [r["ttft"] for r in ok]
        hostile = sum(seen.values())
        refused = sum(n for k, n in seen.items() if k.isdigit() and 400 <= int(k) < 500)
        rows.append(
            f"| {mode} (max batch {batch_of[mode]}) | {hostile} ({refused} 4xx) | {args.clients} | "
            f"{len(results)} | {len(errors)} | "
            f"{len(ok)}/{len(results)} | {tokens} | {wall:.1f} | {rates[mode]:.0f} | {pct(lat, 50):.2f} | "
            f"{pct(lat, 99):.2f} | {pct(ttft, 50) * 1000:.0f} | {pct(ttft, 99) * 1000:.0f} |"
        )
        for e in sorted(set(errors))[:5]:
            print(f"  {mode} error: {e}", file=sys.stderr)
    print(
        f"\n{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
        f"load average {os.getloadavg()[0]:.1f}; model {ckpt.name}, {args.max_tokens} tokens per request, "
        f"temperature 1, top-k 50, streamed\n"
    )
    print(
        "| mode | hostile requests | clients | requests | errors | complete | completion tokens | wall s "
        "| tokens/s "
        "| p50 latency s | p99 latency s | p50 TTFT ms | p99 TTFT ms |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    if "batched" in rates and "sequential" in rates:
        print(f"\nthroughput, batched / one at a time: {rates['batched'] / rates['sequential']:.1f}x")
    prompts = [tok.encode(p) for p in PROMPTS] * 2  # 16 joining requests
    together, alone = prefill_ratio(ckpt, prompts)
    print(
        f"\nprefill of {len(prompts)} joining prompts ({min(map(len, prompts))}-{max(map(len, prompts))} "
        f"tokens): one forward {together * 1000:.1f} ms, one forward each {alone * 1000:.1f} ms, "
        f"{alone / together:.1f}x"
    )


if __name__ == "__main__":
    main()
