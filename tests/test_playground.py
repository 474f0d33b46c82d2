"""The playground page in a real headless Chromium (the system's, driven by Playwright): load `/`,
type a prompt, press Generate, watch the text stream in, stop a long generation; a screenshot is saved.

Skips with the reason when Playwright or Chromium is missing (CI installs Chromium with apt-get).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from test_server import Server, _one_thread, ckpt, serve_cfg  # noqa: F401  (fixtures)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield b
        finally:
            b.close()


def set_slider(page, selector: str, value: int) -> None:
    page.eval_on_selector(
        selector, f"el => {{ el.value = '{value}'; el.dispatchEvent(new Event('input')); }}"
    )


def test_playground_streams_text_and_stops(ckpt, browser, tmp_path):  # noqa: F811
    with Server(serve_cfg(ckpt, max_tokens=120)) as s:
        page = browser.new_page(viewport={"width": 1100, "height": 700})
        page.goto(s.url + "/")
        page.wait_for_function("document.getElementById('model').textContent === 'tiny-bytes'")
        page.fill("#prompt", "The quick brown")
        page.fill("#seed", "3")
        set_slider(page, "#max_tokens", 100)
        s.slow_down(0.03)  # ~30 tokens/s: slow enough to watch the text grow
        page.click("#generate")
        page.wait_for_function("(document.getElementById('completion') || {}).textContent?.length > 0")
        first = len(page.text_content("#completion"))
        page.wait_for_function(f"document.getElementById('completion').textContent.length > {first + 5}")
        assert page.is_enabled("#stop") and not page.is_enabled("#generate")
        page.click("#stop")
        page.wait_for_function("document.getElementById('status').textContent === 'stopped'")
        t0 = time.monotonic()
        while s.engine.active and time.monotonic() - t0 < 2:
            time.sleep(0.01)
        assert s.engine.active == 0  # the aborted fetch freed the row
        stopped = page.text_content("#completion")
        assert 0 < len(stopped) < 100  # stopped before max_tokens

        del s.engine._step
        page.eval_on_selector(
            "#max_tokens", "el => { el.value = '40'; el.dispatchEvent(new Event('input')); }"
        )
        page.click("#generate")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('done')")
        text = page.text_content("#completion")
        assert text and "tokens: 40" in page.text_content("#stats")  # the usage chunk's count
        assert page.text_content("#output") == "The quick brown" + text
        page.screenshot(path=str(tmp_path / "playground.png"))
    assert (tmp_path / "playground.png").stat().st_size > 10_000


@pytest.fixture
def quickstart_ckpt(tmp_path):
    """The README's quick-start model: recipe shakespeare-char (preset char-tiny, context 64) over the
    tinyshakespeare characters, random weights (what the page must handle is its shape, not its text)."""
    from conftest import SHARED_DATA

    from gpt2lab import GPT, GPTConfig
    from gpt2lab.checkpoint import save_checkpoint
    from gpt2lab.config import load_recipe
    from gpt2lab.tokenizer import CharTokenizer

    corpus = SHARED_DATA / "tinyshakespeare.txt"
    if not corpus.is_file():
        pytest.skip(f"tinyshakespeare not found at {corpus}")
    recipe = load_recipe("shakespeare-char")
    tok = CharTokenizer.from_corpus(corpus)
    config = GPTConfig.preset(recipe["preset"], **recipe["model"], vocab_size=tok.vocab_size)
    assert config.block_size == 64
    return save_checkpoint(tmp_path / "shakespeare-char", GPT(config), extra={"tokenizer": tok.to_spec()})


def test_playground_works_with_the_quick_start_model(quickstart_ckpt, browser):
    """Context 64: the max-tokens slider (default 128) shows the 63 it really allows, and Generate
    fits the prompt and the completion into the context instead of failing with a 400."""
    with Server(serve_cfg(quickstart_ckpt, max_tokens=1024)) as s:
        page = browser.new_page()
        page.goto(s.url + "/")
        page.wait_for_function("document.getElementById('model').textContent === 'shakespeare-char'")
        assert page.eval_on_selector("#max_tokens", "el => [el.max, el.value]") == ["63", "63"]
        assert page.text_content("output[for=max_tokens]") == "63"
        page.fill("#prompt", "ROMEO:")
        page.fill("#seed", "1")
        page.click("#generate")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('done')")
        status = page.text_content("#status")
        text = page.text_content("#completion")
        assert "error" not in page.get_attribute("#status", "class")
        if "length" in status:  # 6 prompt characters leave 58 of the 64 positions
            assert status == "done (length, max tokens 58 (context 64))" and len(text) == 58
        else:
            assert status.startswith("done (stop") and len(text) < 58
        page.fill("#prompt", "x" * 70)  # longer than the context: said plainly, not a 400
        page.click("#generate")
        page.wait_for_function("document.getElementById('status').className === 'error'")
        assert "fills the model's context of 64" in page.text_content("#status")
