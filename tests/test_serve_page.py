"""The chat page (llava/serve/static/chat.html) in a real headless Chromium: an image upload, a streamed answer
equal to the API's, the stats line, multi-turn history, and errors shown in red.

Needs Debian's Chromium (``apt-get install chromium``; .ci/run installs it when missing); Playwright drives it
through its Python API, no ``playwright install`` needed."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest

from llava.inference import load_pipeline
from llava.serve.api import BackgroundServer, ChatServer
from llava.serve.engine import BatchingEngine

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else shutil.which("chromium")
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync"]  # fmt: skip
QUESTION = "What is in this picture?"
ERROR_RED = "rgb(179, 38, 30)"  # .error's colour in chat.html

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is missing (install it with: apt-get install chromium); the page test needs it"
)


@pytest.fixture(scope="module")
def engine(chat_model):
    model_dir, _ = chat_model
    engine = BatchingEngine(load_pipeline(model_dir, device="cpu"))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def server_url(engine):
    with BackgroundServer(ChatServer(engine, "model")) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 960, "height": 760})
    page = context.new_page()
    yield page
    context.close()


@pytest.fixture(scope="module")
def image(chat_model) -> Path:
    _, playground = chat_model
    return sorted((playground / "images").glob("*.png"))[0]


def open_page(page, url: str) -> None:
    page.goto(url)
    page.wait_for_selector('#preset[data-loaded="true"]', state="attached", timeout=10_000)


def ask(page, question: str, max_tokens: int, timeout: float = 60_000):
    """Type ``question``, send it and wait for its answer's stream to end; the answer's element."""
    answers = page.locator(".assistant")
    count = answers.count()
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#prompt", question)
    page.click("#send")
    answer = answers.nth(count)
    answer.wait_for(state="attached", timeout=10_000)
    page.wait_for_function(f"document.querySelectorAll('.assistant')[{count}].dataset.done === 'true'", timeout=timeout)
    return answer


def test_page_streams_the_answer_the_api_gives(page, server_url, image, tmp_path):
    open_page(page, server_url)
    options = page.eval_on_selector_all("#preset option", "options => options.map(o => o.value)")
    assert "duet_128" in options and "none" in options
    models = httpx.get(f"{server_url}/v1/models").json()["data"][0]
    assert page.input_value("#preset") == models["default_compression"]

    page.set_input_files("#image-input", str(image))
    page.wait_for_selector("#thumb", state="visible")
    page.select_option("#preset", "duet_128")
    page.fill("#temperature", "0")
    requests = []
    page.on("request", lambda request: requests.append(request) if request.method == "POST" else None)
    answer = ask(page, QUESTION, max_tokens=12)
    shown = answer.text_content().strip()

    data_url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    reference = httpx.post(f"{server_url}/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url}}, {"type": "text", "text": QUESTION},
        ]}],
        "max_tokens": 12, "temperature": 0, "compression": "duet_128",
    })  # fmt: skip
    assert reference.status_code == 200, reference.text
    expected = reference.json()
    assert shown, "the page shows an empty answer"
    assert shown == expected["choices"][0]["message"]["content"].strip()
    assert int(answer.get_attribute("data-chunks")) > 1, "the answer arrived in one piece: it did not stream"
    assert page.locator(".user img").count() == 1, "the sent image is not shown in the user's message"
    assert page.locator(".error").count() == 0

    sent = json.loads(requests[0].post_data)
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert sent["max_tokens"] == 12 and sent["temperature"] == 0 and sent["compression"] == "duet_128"

    stats = page.text_content("#stats")
    assert re.search(r"time to first token: \d+ ms", stats), stats
    assert re.search(r"[\d.]+ tokens/s", stats), stats
    kept = expected["usage"]["visual_tokens_per_layer"]
    line = f"visual tokens per layer: {kept[0]} \u2192 {kept[-1]} (avg {round(sum(kept) / len(kept))})"
    assert line in stats and "compression: duet_128" in stats, stats

    # a second turn sends the whole conversation, the image only in the message it came with
    ask(page, "And the colours?", max_tokens=8)
    history = json.loads(requests[-1].post_data)["messages"]
    assert [message["role"] for message in history] == ["user", "assistant", "user"]
    assert history[0]["content"][0]["image_url"]["url"] == data_url
    assert history[1]["content"] == shown
    assert history[2]["content"] == "And the colours?"
    assert page.locator(".assistant[data-done='true']").count() == 2

    page.screenshot(path=str(tmp_path / "chat_page.png"), full_page=True)
    assert (tmp_path / "chat_page.png").stat().st_size > 10_000
    if os.environ.get("UPDATE_SCREENSHOT") == "1":
        (REPO / "docs" / "images").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / "chat_page.png", REPO / "docs" / "images" / "chat_page.png")


def test_errors_show_in_red(page, server_url, engine):
    # a JSON error body: max tokens 0 is refused with a 400
    open_page(page, server_url)
    page.fill("#temperature", "0")
    ask(page, "hello", max_tokens=0, timeout=10_000)
    error = page.locator(".error").last
    assert "400" in error.text_content() and "max_tokens" in error.text_content()
    assert error.evaluate("el => getComputedStyle(el).color") == ERROR_RED

    # an {"error": ...} event in the middle of a stream keeps what came before it
    chunk = {"choices": [{"index": 0, "delta": {"content": "partial"}, "finish_reason": None}]}
    failure = {"error": {"message": "the engine failed", "type": "server_error", "param": None, "code": None}}
    events = f"data: {json.dumps(chunk)}\n\ndata: {json.dumps(failure)}\n\n"
    page.route("**/v1/chat/completions", lambda route: route.fulfill(content_type="text/event-stream", body=events))
    answer = ask(page, "hello again", max_tokens=5, timeout=10_000)
    assert answer.text_content() == "partial"
    assert "the engine failed" in page.locator(".error").last.text_content()
    assert page.locator(".error").count() == 2

    # a server with an API key: the page without one shows the 401, with it the presets load
    with BackgroundServer(ChatServer(engine, "model", api_key="sesame")) as url:
        page.goto(url)
        page.wait_for_selector(".error", timeout=10_000)
        assert "401" in page.text_content(".error") and page.locator("#preset option").count() == 0
        page.fill("#api-key", "sesame")
        page.dispatch_event("#api-key", "change")
        page.wait_for_selector('#preset[data-loaded="true"]', state="attached", timeout=10_000)
        assert page.evaluate("sessionStorage.getItem('duet-api-key')") == "sesame"


def test_stop_aborts_the_stream_and_the_server_cancels(page, server_url, engine):
    open_page(page, server_url)
    cancelled = engine.stats.cancelled
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "1024")
    page.fill("#prompt", "Tell me a long story.")
    page.click("#send")
    page.wait_for_selector('.assistant:not([data-chunks="0"])', timeout=30_000)
    page.click("#stop")
    page.wait_for_selector('.assistant[data-done="true"]', timeout=10_000)
    assert page.text_content(".assistant").endswith("[stopped]")
    assert page.is_enabled("#send") and not page.is_enabled("#stop")
    deadline = time.monotonic() + 10
    while engine.stats.cancelled == cancelled and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.stats.cancelled == cancelled + 1, "the server kept generating after the page stopped reading"
