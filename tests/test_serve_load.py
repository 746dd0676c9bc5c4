"""llava.bench.serve_load: the load test against an in-process server of the playground chat model (every request
answered, ordered percentiles, batching seen in usage), its percentile helper, and failures counted, not fatal."""

from __future__ import annotations

import asyncio
import json
import math

import pytest

from llava.bench.serve_load import LoadConfig, main, percentile, run_load


def test_percentile_interpolates_linearly_between_ranks():
    values = [4.0, 1.0, 3.0, 2.0]  # sorted: 1, 2, 3, 4; rank position (n - 1) * q / 100
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == pytest.approx(2.5)  # position 1.5
    assert percentile(values, 90) == pytest.approx(3.7)  # position 2.7: 3 + 0.7 * (4 - 3)
    assert percentile(values, 99) == pytest.approx(3.97)  # position 2.97
    assert percentile(values, 100) == 4.0
    assert percentile([10.0, 20.0], 25) == pytest.approx(12.5)
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile(values, 101)


def test_load_test_streams_every_request_and_sees_batching(chat_model, tmp_path):
    model_dir, playground_dir = chat_model
    out = tmp_path / "serve_load.json"
    rows = main([
        "--model", str(model_dir), "--requests", "8", "--concurrency", "4", "--max-tokens", "8",
        "--presets", "none", "duet_128", "--device", "cpu", "--batch-wait-ms", "50", "--warmup", "0",
        "--timeout-s", "120", "--out", str(out),
    ])  # fmt: skip
    written = json.loads(out.read_text())
    assert [row["preset"] for row in written] == ["none", "duet_128"] == [row["preset"] for row in rows]
    assert out.with_suffix(".md").read_text().count("| duet_128 |") == 1
    for row in written:
        assert row["succeeded"] == row["requests"] == 8 and row["errors"] == 0, row["error_kinds"]
        assert row["images"] > 0  # the playground's demo images, found through the checkpoint's run_config.json
        assert all(name.startswith(str(playground_dir / "images")) for name in row["settings"]["image_files"])
        assert row["requests_per_s"] > 0 and row["output_tokens_per_s"] > 0
        for name in ("ttft", "itl"):
            p50, p90, p99 = (row[f"{name}_p{q}_ms"] for q in (50, 90, 99))
            assert 0 <= p50 <= p90 <= p99, (name, p50, p90, p99)
        assert all(record["completion_tokens"] <= 8 for record in row["request_records"])
        assert 1 <= row["mean_batch_size"] <= 4 and row["max_batch_size"] <= 4
    assert max(row["mean_batch_size"] for row in written) > 1  # concurrent requests shared batches


async def _against_silent_server(config: LoadConfig) -> list[dict]:
    """run_load against a server that accepts connections and never answers."""

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 16)
        await asyncio.sleep(30)

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        return await run_load(f"http://127.0.0.1:{port}", config)
    finally:
        server.close()


def test_failures_are_counted_and_the_run_is_bounded():
    config = LoadConfig(requests=3, concurrency=2, presets=("none", "duet_128"), warmup=0, request_timeout_s=0.3,
                        timeout_s=0.5)  # fmt: skip
    rows = asyncio.run(asyncio.wait_for(_against_silent_server(config), 20))
    assert [row["preset"] for row in rows] == ["none", "duet_128"]
    first, second = rows
    assert first["errors"] == 3 and first["succeeded"] == 0 and first["requests_per_s"] == 0
    assert any(kind.startswith("timed out") for kind in first["error_kinds"])
    # The second wave of the first preset and the whole second preset find the run's 0.5 s spent.
    assert second["errors"] == 3 and second["error_kinds"] == {"run timeout": 3}
    assert math.isnan(first["ttft_p50_ms"])
