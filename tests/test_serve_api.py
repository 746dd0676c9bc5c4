"""The OpenAI-compatible server on the playground model, over real HTTP on 127.0.0.1: answers equal the pipeline's,
streams equal non-streamed answers, batched answers equal one-by-one answers, hostile input gets OpenAI-style
errors while the server keeps serving, disconnects free their slot, the API key guards /v1."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from llava.data.templates import conversation_to_turns
from llava.data.tokenization import tokenize_conversation
from llava.inference import load_pipeline
from llava.serve.api import BackgroundServer, ChatServer
from llava.serve.engine import BatchingEngine
from llava.serve.protocol import ServeLimits

QUESTION = "Is there a black star in the image?"


@pytest.fixture(scope="module")
def pipeline(chat_model):
    return load_pipeline(chat_model[0], device="cpu")


@pytest.fixture(scope="module")
def images(chat_model) -> list[Path]:
    return sorted((chat_model[1] / "images").glob("*.png"))[:3]


@pytest.fixture(scope="module")
def server(pipeline, chat_model):
    """A server that batches generously (so concurrent requests share batches), local files allowed in the
    playground's image folder, small limits for the hostile-input cases."""
    limits = ServeLimits(max_body_bytes=2_000_000, max_image_bytes=600_000, max_image_pixels=1_000_000, max_images=3)
    chat = ChatServer(
        BatchingEngine(pipeline, batch_wait_s=0.3, max_batch=8), "playground", limits,
        image_folder=chat_model[1] / "images",
    )  # fmt: skip
    with BackgroundServer(chat) as url:
        yield url, chat


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def user(text: str, *image_urls: str) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in image_urls]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def chat(url: str, timeout: float = 120, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json={"temperature": 0, **body}, timeout=timeout)


def stream(url: str, **body) -> tuple[str, list[dict]]:
    """The streamed text and every chunk (the usage chunk included)."""
    chunks, text = [], ""
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=120,
                      json={"temperature": 0, "stream": True, **body}) as response:  # fmt: skip
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        chunk = json.loads(line.removeprefix("data: "))
        chunks.append(chunk)
        for choice in chunk.get("choices", []):
            text += choice["delta"].get("content", "")
    return text, chunks


def test_answer_equals_the_pipelines_and_reports_usage(server, pipeline, images):
    url, _ = server
    response = chat(url, model="playground", messages=[user(QUESTION, data_url(images[0]))], max_tokens=12)
    assert response.status_code == 200, response.text
    body = response.json()
    expected = pipeline.generate([{"image": str(images[0]), "prompt": QUESTION}], max_new_tokens=12)[0]
    answer = body["choices"][0]["message"]["content"]
    assert answer.strip() == expected and answer
    assert body["object"] == "chat.completion" and body["choices"][0]["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["visual_tokens_per_layer"] == [576] * pipeline.model.config.text_config.num_hidden_layers
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens"] > 576 and 0 < usage["completion_tokens"] <= 12


def test_stream_equals_the_answer_and_has_openais_chunks(server, images):
    url, _ = server
    body = dict(messages=[user(QUESTION, data_url(images[1]))], max_tokens=10, compression="duet_128")
    whole = chat(url, **body).json()
    text, chunks = stream(url, stream_options={"include_usage": True}, **body)
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert sum(bool(chunk["choices"] and chunk["choices"][0]["delta"].get("content")) for chunk in chunks) > 1
    finals = [chunk for chunk in chunks if chunk["choices"] and chunk["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and usage["compression"] == "duet_128"
    kept = usage["visual_tokens_per_layer"]
    assert kept[0] < 576 and kept[-1] < kept[0]  # V2V merged, T2V dropped more in later layers
    assert usage == whole["usage"] | {"batch_size": usage["batch_size"]}


def test_multi_turn_prompt_is_the_training_conversation(pipeline, images):
    conversation = [
        {"from": "human", "value": "<image>\nWhat is it?"},
        {"from": "gpt", "value": "A red star."},
        {"from": "human", "value": "<image>\nAnd this one?"},
        {"from": "gpt", "value": "X"},
    ]
    request = {"prompt": "And this one?", "image": [str(images[0]), str(images[1])],
               "history": [("<image>\nWhat is it?", "A red star.")]}  # fmt: skip
    ids = pipeline.prepare([request])["input_ids"][0].tolist()
    turns = conversation_to_turns(pipeline.template, conversation)
    image_token_id = pipeline.model.config.image_token_id
    training = tokenize_conversation(pipeline.tokenizer, pipeline.template, turns, image_token_id=image_token_id)
    assert ids == list(training["input_ids"])[: len(ids)]  # the prompt is training's conversation up to the answer


def test_batched_answers_equal_one_by_one(server, images):
    """Different presets, image counts, lengths and sampling settings, sent at once, then alone."""
    url, chat_server = server
    bodies = [
        dict(messages=[user(QUESTION, data_url(images[0]))], max_tokens=9),
        dict(messages=[user("Describe both.", data_url(images[1]), data_url(images[2]))], max_tokens=6,
             compression="duet_128"),
        dict(messages=[user("What is a star?")], max_tokens=12, compression="visionzip_64"),
        dict(messages=[user(QUESTION, data_url(images[2]))], max_tokens=7, temperature=0.9, top_p=0.9, seed=11),
        dict(messages=[user("What colour?", data_url(images[0])), {"role": "assistant", "content": "Red."},
                       user("Are you sure?")], max_tokens=8, temperature=1.1, seed=3, compression="duet_128"),
        dict(messages=[user(QUESTION, data_url(images[1]))], max_tokens=11, stop=["the", "."]),
    ]  # fmt: skip
    batches_before = chat_server.engine.stats.batches
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda body: chat(url, **body).json(), bodies))
    alone = [chat(url, **body).json() for body in bodies]
    assert max(answer["usage"]["batch_size"] for answer in together) > 1  # they really were batched
    assert all(answer["usage"]["batch_size"] == 1 for answer in alone)
    for batched, single in zip(together, alone, strict=True):
        assert batched["choices"][0]["message"] == single["choices"][0]["message"]
        assert batched["choices"][0]["finish_reason"] == single["choices"][0]["finish_reason"]
        assert batched["usage"] | {"batch_size": 1} == single["usage"]
    assert sum(bool(answer["choices"][0]["message"]["content"]) for answer in together) >= 4
    assert "the" not in together[5]["choices"][0]["message"]["content"].split()
    assert chat_server.engine.stats.batches - batches_before < 2 * len(bodies)


def test_local_files_only_inside_the_image_folder(server, images, tmp_path):
    url, _ = server
    ok = chat(url, messages=[user(QUESTION, images[0].name)], max_tokens=3)
    assert ok.status_code == 200, ok.text
    outside = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(outside)
    for path in (f"../{images[0].parent.name}/../../{outside}", str(outside), f"file://{outside}"):
        response = chat(url, messages=[user(QUESTION, path)], max_tokens=3)
        assert response.status_code == 403, (path, response.text)
        assert "outside the server's image folder" in response.json()["error"]["message"]


def png_data_url(size: tuple[int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")  # compresses well: small body, many pixels
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_hostile_input_gets_openai_errors_and_the_server_goes_on(server, images):
    url, chat_server = server
    good = dict(messages=[user(QUESTION, data_url(images[0]))], max_tokens=3)
    endpoint = f"{url}/v1/chat/completions"
    cases = [
        (httpx.post(endpoint, content=b'{"messages": [', timeout=30), 400, "not valid JSON"),
        (httpx.post(endpoint, content=b"\xff\xfe", timeout=30), 400, "not valid JSON"),
        (chat(url, **good, frequency_penalty=1), 400, "unknown field(s) 'frequency_penalty'"),
        (chat(url, messages="hello"), 400, "'messages' must be a non-empty list"),
        (chat(url, **good | {"max_tokens": 0}), 400, "'max_tokens' must be an integer"),
        (chat(url, **good | {"temperature": "hot"}), 400, "'temperature' must be a number"),
        (chat(url, **good, n=2), 400, "'n' must be"),
        (chat(url, **good, model="gpt-4o"), 404, "not served here"),
        (chat(url, **good, compression="duet_7"), 400, "unknown compression preset 'duet_7'"),
        (chat(url, messages=[user("<image>\nsneaky", data_url(images[0]))]), 400, "may not hold <image>"),
        (chat(url, messages=[{"role": "assistant", "content": "hi"}]), 400, "must alternate"),
        (chat(url, messages=[{"role": "tool", "content": "hi"}]), 400, "role must be"),
        (chat(url, messages=[user("x", "https://example.com/a.png")]), 400, "does not fetch https URLs"),
        (chat(url, messages=[user("x", "data:image/png;base64,bm90IGFuIGltYWdl")]), 400, "cannot be decoded"),
        (chat(url, messages=[user("x", "data:image/png;base64,***")]), 400, "not valid base64"),
        (chat(url, messages=[user("x", "data:text/plain;base64,aGk=")]), 400, "data:image/<type>;base64"),
        (chat(url, messages=[user("x", png_data_url((1200, 1000)))]), 413, "pixels"),
        (chat(url, messages=[user("x", "data:image/png;base64," + "A" * 900_000)]), 413, "larger than 600000"),
        (chat(url, messages=[user("x", *[data_url(images[0])] * 4)]), 400, "at most 3 images"),
        (httpx.post(endpoint, content=b"{" + b" " * 2_100_000 + b"}", timeout=30), 413, "body is larger"),
        (chat(url, messages=[user("star " * 5000, data_url(images[0]))], max_tokens=8), 400, "context is"),
        (httpx.get(f"{url}/v1/nothing", timeout=30), 404, "no route"),
        (httpx.get(endpoint, timeout=30), 405, "not allowed"),
    ]
    for response, status, message in cases:
        assert response.status_code == status, (message, response.text)
        error = response.json()["error"]
        assert message in error["message"], error
        assert set(error) == {"message", "type", "param", "code"}
    assert cases[-3][0].json()["error"]["code"] == "context_length_exceeded"
    assert chat(url, **good).status_code == 200  # still serving
    assert chat_server.engine.stats.active == 0
    assert not list(chat_server.images.scratch_dir.iterdir())  # decoded uploads are deleted after their answer


def wait_for(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_a_client_leaving_mid_stream_frees_its_slot(server, images):
    url, chat_server = server
    stats = chat_server.engine.stats
    cancelled = stats.cancelled
    body = {"messages": [user(QUESTION, data_url(images[0]))], "max_tokens": 1000, "stream": True,
            "stop": ["never-appears-in-the-answer"]}  # fmt: skip
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    assert wait_for(lambda: stats.active == 0 and stats.cancelled == cancelled + 1)
    assert chat(url, **body | {"stream": False, "max_tokens": 3}).status_code == 200


def test_api_key_guards_v1_and_is_never_logged(pipeline, caplog):
    key = "sk-test-7f3a9c"
    chat_server = ChatServer(BatchingEngine(pipeline), "playground", api_key=key)
    caplog.set_level(logging.DEBUG)
    with BackgroundServer(chat_server) as url:
        body = {"messages": [user("Hello")], "max_tokens": 2, "temperature": 0}
        endpoint = f"{url}/v1/chat/completions"
        assert httpx.post(endpoint, json=body).status_code == 401
        wrong = httpx.post(endpoint, json=body, headers={"Authorization": "Bearer sk-wrong"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert (
            httpx.post(endpoint, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60).status_code == 200
        )
        models = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}).json()
        assert models["data"][0]["id"] == "playground" and "duet_128" in models["data"][0]["compression_presets"]
        assert httpx.get(f"{url}/health").status_code == 200 and httpx.get(url).status_code == 200
    chat_server.engine.close()
    assert key not in caplog.text


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_command_line_server(chat_model, images):
    """``python -m llava.serve.api`` as users start it: the key from the environment, loopback by default."""
    port = free_port()
    env = {**os.environ, "LLAVA_API_KEY": "sk-env-key"}
    process = subprocess.Popen(
        [sys.executable, "-m", "llava.serve.api", "--model", str(chat_model[0]), "--port", str(port),
         "--device", "cpu", "--compression", "duet_128", "--presets", "duet_128", "visionzip_64"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: _up(url), timeout=120), "the server did not come up"
        headers = {"Authorization": "Bearer sk-env-key"}
        models = httpx.get(f"{url}/v1/models", headers=headers).json()["data"][0]
        assert models["compression_presets"] == ["none", "duet_128", "visionzip_64"]
        assert models["default_compression"] == "duet_128"
        body = {"messages": [user(QUESTION, data_url(images[0]))], "max_tokens": 4, "temperature": 0}
        answer = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60).json()
        assert answer["usage"]["compression"] == "duet_128"
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=60)
    assert "sk-env-key" not in output
    assert "serving" in output and "duet_128" in output


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_failing_sink_cancels_only_its_own_job(pipeline):
    import queue

    from llava.serve.engine import Finished, GenerationJob

    engine = BatchingEngine(pipeline, batch_wait_s=0.2)

    def broken_sink(event):
        raise RuntimeError("client code failed")

    answers: queue.SimpleQueue = queue.SimpleQueue()
    engine.submit(GenerationJob({"prompt": "Hello"}, broken_sink, max_tokens=30, temperature=0, stop=("zzz",)))
    engine.submit(GenerationJob({"prompt": "What is a star?"}, answers.put, max_tokens=5, temperature=0))
    events = []
    while not isinstance(events[-1] if events else None, Finished):
        events.append(answers.get(timeout=60))
    assert events[-1].reason in ("stop", "length") and events[-1].usage.batch_size == 2
    assert wait_for(lambda: engine.stats.active == 0)
    assert engine.stats.cancelled + engine.stats.answered == 2
    engine.submit(GenerationJob({"prompt": "Hi"}, answers.put, max_tokens=2, temperature=0))
    assert wait_for(lambda: engine.stats.answered + engine.stats.cancelled == 3)  # the worker is alive
    engine.close()


def test_ignore_eos_writes_exactly_max_tokens(server, images):
    url, _ = server
    body = dict(messages=[user(QUESTION, data_url(images[0]))], max_tokens=40, ignore_eos=True)
    answer = chat(url, **body).json()
    assert answer["usage"]["completion_tokens"] == 40 and answer["choices"][0]["finish_reason"] == "length"
    bad = chat(url, **body | {"ignore_eos": "yes"})
    assert bad.status_code == 400 and "'ignore_eos' must be true or false" in bad.json()["error"]["message"]
