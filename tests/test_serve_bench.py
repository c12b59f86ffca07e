"""`slmforge bench serve` and ``slmforge.serve.bench``: a real load test against a live uvicorn serving
the tiny generation model, the cost arithmetic on fixed numbers, and the CLI's JSON and its errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from slmforge.config import ServeCostConfig
from slmforge.serve import create_app
from slmforge.serve.bench import (
    BENCH_PROMPTS,
    BenchError,
    LoadResult,
    RequestRecord,
    cost_report,
    free_port,
    percentile,
    run_load,
    start_server,
)

from conftest import TINY, LiveServer, build_peaky_model, build_tiny_tokenizer

EXE = Path(sys.executable).parent / "slmforge"


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("bench")
    return build_peaky_model(build_tiny_tokenizer(workdir, vocab_size=400), workdir / "tiny", TINY)


@pytest.fixture(scope="module")
def base_url(model_dir):
    from slmforge.generate import TorchGenerator

    with LiveServer(create_app({"tiny": TorchGenerator.from_pretrained(model_dir, device="cpu")})) as url:
        yield url


def slm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(EXE), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "SLMFORGE_NO_PROGRESS": "1"})


# --------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize(("values", "q", "want"), [
    ([1.0, 2.0, 3.0, 4.0], 50, 2.5),
    ([1.0, 2.0, 3.0, 4.0], 0, 1.0),
    ([1.0, 2.0, 3.0, 4.0], 100, 4.0),
    ([3.0, 1.0, 2.0], 50, 2.0),
    (list(map(float, range(101))), 95, 95.0),
    ([5.0], 99, 5.0),
    ([], 50, None),
])
def test_percentile_interpolates_like_numpy(values, q, want):
    got = percentile(values, q)
    assert got is None if want is None else got == pytest.approx(want)


def fixed_result() -> LoadResult:
    # 4 successes of 100 output and 50 prompt tokens, one 429, in 10 s: 40 tokens/s, 0.4 requests/s.
    ok = [RequestRecord(True, 200, 2.0 + i, 0.1 * (i + 1), 100, 50) for i in range(4)]
    return LoadResult("m", concurrency=2, requests=5, max_tokens=100, wall_s=10.0,
                      records=[*ok, RequestRecord(False, 429, 0.01, error="slow down")])


def test_load_result_summary_counts_only_successes():
    r = fixed_result()
    d = r.as_dict()
    assert (d["succeeded"], d["errors"], d["errors_by_kind"]) == (4, 1, {"http_429": 1})
    assert d["tokens_per_s"] == 40.0 and d["requests_per_s"] == 0.4
    assert d["mean_completion_tokens"] == 100 and d["mean_prompt_tokens"] == 50
    assert d["latency_s"] == {"p50": 3.5, "p95": 4.85, "p99": 4.97}
    assert d["ttft_s"]["p50"] == pytest.approx(0.25)
    assert json.loads(json.dumps(r.as_dict(records=True)))["records"][4]["error"] == "slow down"


def test_cost_report_prices_tokens_against_the_api():
    cost = ServeCostConfig(hardware_usd_per_hour=0.36, api_usd_per_1m_input_tokens=0.15,
                           api_usd_per_1m_output_tokens=0.60, api_name="some-api")
    c = cost_report(fixed_result(), cost)
    # ours: 0.36 $/h / (40 tok/s * 3600) * 1000; total tokens flow at 60/s.
    assert c["usd_per_1k_output_tokens"] == pytest.approx(0.0025)
    assert c["usd_per_1k_total_tokens"] == pytest.approx(0.36 / (60 * 3600) * 1000)
    # the API, same mix: (50 * 0.15 + 100 * 0.60) / 1e6 = 6.75e-5 $ per request.
    assert c["api_usd_per_request"] == pytest.approx(6.75e-5)
    assert c["api_usd_per_1k_output_tokens"] == pytest.approx(6.75e-4)
    assert c["api_usd_per_1k_total_tokens"] == pytest.approx(4.5e-4)
    assert c["cost_ratio"] == pytest.approx(0.0025 / 6.75e-4, rel=1e-3)
    assert c["usd_per_request"] == pytest.approx(0.36 / (0.4 * 3600))
    assert c["break_even_requests_per_day"] == pytest.approx(0.36 * 24 / 6.75e-5, abs=0.1)  # 128,000
    assert c["capacity_requests_per_day"] == pytest.approx(0.4 * 86400)
    assert c["api_name"] == "some-api"
    # A different prompt length changes only the API's side and our per-total price.
    longer = cost_report(fixed_result(), cost, prompt_tokens_per_request=1000)
    assert longer["usd_per_1k_output_tokens"] == c["usd_per_1k_output_tokens"]
    assert longer["api_usd_per_request"] == pytest.approx((1000 * 0.15 + 100 * 0.60) / 1e6)


def test_cost_report_without_tokens_or_price_gives_none_not_a_crash():
    empty = LoadResult("m", 1, 1, 8, 1.0, [RequestRecord(False, None, 0.1, error="refused")])
    c = cost_report(empty, ServeCostConfig())
    assert c["usd_per_1k_output_tokens"] is None and c["cost_ratio"] is None
    free = cost_report(fixed_result(), ServeCostConfig(api_usd_per_1m_input_tokens=0, api_usd_per_1m_output_tokens=0))
    assert free["break_even_requests_per_day"] is None and free["cost_ratio"] is None


# --------------------------------------------------------------------------- against a live server


def test_run_load_against_a_live_server(base_url):
    done: list[RequestRecord] = []
    r = run_load(f"{base_url}/v1", None, concurrency=4, requests=8, prompts=BENCH_PROMPTS, max_tokens=12,
                 on_result=done.append)
    assert r.model == "tiny"  # the server's first model
    assert len(r.records) == len(done) == 8 and r.error_count == 0, [x.error for x in r.records]
    assert all(x.completion_tokens > 0 and x.prompt_tokens > 0 for x in r.records)
    assert all(x.completion_tokens <= 12 for x in r.records)
    assert all(0 < x.ttft_s <= x.latency_s for x in r.records)
    lat, ttft = r.latency_percentiles(), r.ttft_percentiles()
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= max(x.latency_s for x in r.records)
    assert 0 < ttft["p50"] <= ttft["p95"] <= ttft["p99"] <= lat["p99"]
    assert r.tokens_per_s > 0 and r.requests_per_s == pytest.approx(8 / r.wall_s)
    # The server's own counters agree with what the client summed from the usage chunks.
    metrics = httpx.get(f"{base_url}/metrics").text
    line = next(ln for ln in metrics.splitlines() if ln.startswith('slmforge_completion_tokens_total{model="tiny"}'))
    assert int(line.split()[-1]) >= r.completion_tokens


def test_run_load_raises_clear_errors_before_sending_load(base_url):
    with pytest.raises(BenchError, match="does not serve a model named 'nope'; it serves: tiny"):
        run_load(base_url, "nope", 1, 1)
    with pytest.raises(BenchError, match="Could not reach a server at http://127.0.0.1:1"):
        run_load("http://127.0.0.1:1", None, 1, 1)
    with pytest.raises(BenchError, match="at least 1"):
        run_load(base_url, None, 0, 1)


def test_cli_json_has_the_load_and_the_cost(base_url):
    proc = slm("bench", "serve", "--url", base_url, "--concurrency", "2", "--requests", "4", "--max-tokens", "8",
               "--json", "--set", "serve.cost.hardware_usd_per_hour=1.5")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert (report["model"], report["succeeded"], report["errors"], report["started_server"]) == ("tiny", 4, 0, False)
    assert report["tokens_per_s"] > 0 and report["latency_s"]["p50"] <= report["latency_s"]["p99"]
    cost = report["cost"]
    assert cost["hardware_usd_per_hour"] == 1.5 and cost["api_name"] == "gpt-4o-mini"
    assert cost["usd_per_1k_output_tokens"] == pytest.approx(1.5 / (report["tokens_per_s"] * 3600) * 1000, rel=0.01)
    assert cost["cost_ratio"] > 0 and cost["break_even_requests_per_day"] > 0


def test_cli_completions_sends_text_completions(base_url):
    before = _served_requests(base_url, "/v1/completions")
    proc = slm("bench", "serve", "--url", base_url, "--concurrency", "2", "--requests", "3", "--max-tokens", "4",
               "--completions", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["endpoint"] == "completions" and (report["succeeded"], report["errors"]) == (3, 0)
    assert _served_requests(base_url, "/v1/completions") - before >= 3


def _served_requests(base_url: str, path: str) -> float:
    """Requests the server has answered on ``path`` (its Prometheus counter, summed over status codes)."""
    total = 0.0
    for line in httpx.get(f"{base_url}/metrics").text.splitlines():
        if line.startswith("slmforge_requests_total{") and f'endpoint="{path}"' in line:
            total += float(line.split()[-1])
    return total


def test_cli_table_names_the_numbers(base_url):
    proc = slm("bench", "serve", "--url", base_url, "--concurrency", "1", "--requests", "2", "--max-tokens", "4")
    assert proc.returncode == 0, proc.stderr
    for label in ("throughput", "latency P50 / P95 / P99", "TTFT P50 / P95 / P99", "gpt-4o-mini per 1K output tokens",
                  "ours / API", "break-even requests/day"):
        assert label in proc.stdout


def test_cli_errors_are_one_message_and_a_nonzero_exit():
    proc = slm("bench", "serve", "--url", f"http://127.0.0.1:{free_port()}", "--requests", "1")
    assert proc.returncode == 1
    assert "error: Could not reach a server at" in proc.stderr and "Traceback" not in proc.stderr
    proc = slm("bench", "serve", "some/model", "--url", "http://127.0.0.1:1")
    assert proc.returncode == 2 and "either a MODEL" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_sends_no_key_in_clear_text_off_this_machine():
    # 192.0.2.1 is TEST-NET-1: refused before any connection is attempted.
    proc = slm("bench", "serve", "--url", "http://192.0.2.1:8000", "--api-key", "sk-secret", "--requests", "1")
    assert proc.returncode == 2 and "clear text" in proc.stderr and "sk-secret" not in proc.stderr


def test_start_server_reports_a_server_that_dies(tmp_path):
    with pytest.raises(BenchError, match=r"exited with code \d+ before it was ready:(.|\n)*missing"):
        start_server(str(tmp_path / "missing"), ready_timeout_s=60, log_path=tmp_path / "serve.log")


def test_cli_starts_and_stops_a_server_for_a_model_folder(model_dir):
    # --set reaches the server too (serve.* keys); --max-batch-size goes to it as a flag.
    proc = slm("bench", "serve", str(model_dir), "--concurrency", "2", "--requests", "2", "--max-tokens", "4",
               "--max-batch-size", "2", "--set", "serve.request_timeout_s=60", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["started_server"] and report["model"] == "tiny" and report["succeeded"] == 2
    assert report["max_batch_size"] == 2
    with pytest.raises(httpx.HTTPError):  # stopped: nothing listens there any more
        httpx.get(f"{report['url']}/health", timeout=2)
