"""The benchmark's quick mode writes a complete report.

Each run starts scripts/benchmark.py --quick in a subprocess, against a
redis-server that the test starts, into a temporary folder. Nothing here
checks speed: only that the report and results.json are written with every
section, and that contenders whose package is missing say so.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import redis

from servers import RedisServer

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCHMARK = REPO_ROOT / "scripts" / "benchmark.py"
RUN_TIMEOUT_S = 300

REPORT_SECTIONS = (
    "# Benchmark: concurrent-runs",
    "## Targets",
    "## Acquire+release pairs",
    "### sync",
    "### async",
    "## Server time per call",
    "## Scaling",
    "## Worst single call and memory",
    "## Contention",
    "## Plots",
)
RESULT_SECTIONS = (
    "settings",
    "environment",
    "pairs",
    "server_time",
    "contention",
    "worst_call",
    "scaling",
    "targets",
    "plots",
)
PLOTS = ("latency.png", "server_time.png", "scaling.png")
# Contender keys in results.json, and the module each one imports.
OPTIONAL_CONTENDERS = {
    "sync:python_redis_lock": "redis_lock",
    "sync:limiters_semaphore": "limiters",
    "async:limiters_semaphore": "limiters",
}
CORE_CONTENDERS = (
    "sync:floor",
    "sync:limiter",
    "sync:fcall",
    "sync:watch",
    "sync:redis_lock",
    "async:floor",
    "async:limiter",
    "async:fcall",
    "async:redis_lock",
)


@pytest.fixture
def bench_server(server_folder: Path) -> Iterator[RedisServer]:
    with RedisServer(server_folder / "redis") as server:
        yield server


def run_benchmark(
    args: list[str], extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key != "REDIS_URL"}
    env.update(extra_env or {})
    return subprocess.run(
        [sys.executable, str(BENCHMARK), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        cwd=REPO_ROOT,
    )


def hide_optional_packages(folder: Path) -> Path:
    """Write modules that fail to import, to stand first on PYTHONPATH."""
    folder.mkdir()
    for package in ("redis_lock", "limiters", "matplotlib"):
        (folder / package).mkdir()
        (folder / package / "__init__.py").write_text(
            f"raise ImportError('{package} is hidden from this benchmark run')\n"
        )
    return folder


def check_complete(
    out: Path, result: subprocess.CompletedProcess[str]
) -> tuple[str, dict]:
    """Return the report and results of a run, after checking that it finished."""
    assert result.returncode == 0, result.stderr
    report = (out / "report.md").read_text()
    results = json.loads((out / "results.json").read_text())
    for section in REPORT_SECTIONS:
        assert f"\n{section}\n" in f"\n{report}", f"report.md lacks {section!r}"
    for section in RESULT_SECTIONS:
        assert section in results, f"results.json lacks {section!r}"
    for key in CORE_CONTENDERS:
        assert results["pairs"][key]["status"] == "ok", results["pairs"][key]
    return report, results


class TestQuickBenchmark:
    def test_quick_run_without_optional_packages_reports_not_installed(
        self, bench_server: RedisServer, tmp_path: Path
    ) -> None:
        hidden = hide_optional_packages(tmp_path / "hidden")
        out = tmp_path / "report"

        result = run_benchmark(
            ["--quick", "--out", str(out), "--redis-url", bench_server.url],
            {"PYTHONPATH": str(hidden)},
        )

        report, results = check_complete(out, result)
        for key in OPTIONAL_CONTENDERS:
            contender = results["pairs"][key]
            assert contender["status"] == "not installed"
            assert f"| {contender['label']} | not installed (pip install -r" in report
        assert "No plots: matplotlib not installed" in report
        assert results["plots"] == []
        for name in PLOTS:
            assert not (out / name).exists()

    def test_quick_run_reports_every_target_and_installed_contender(
        self, bench_server: RedisServer, tmp_path: Path
    ) -> None:
        out = tmp_path / "report"

        result = run_benchmark(
            ["--quick", "--out", str(out), "--redis-url", bench_server.url]
        )

        report, results = check_complete(out, result)
        assert len(results["targets"]) == 9
        for target in results["targets"]:
            assert target["goal"] in report
            assert target["met"] in (True, False, None)
        modes = results["contention"]["modes"]
        assert set(modes) == {"without_wait", "with_wait"}
        for mode in modes.values():
            assert mode["grants"] > 0
            assert mode["peak_holders"] <= mode["max_slots"]
        for key, module in OPTIONAL_CONTENDERS.items():
            installed = importlib.util.find_spec(module) is not None
            expected = "ok" if installed else "not installed"
            assert results["pairs"][key]["status"] == expected
        has_matplotlib = importlib.util.find_spec("matplotlib") is not None
        for name in PLOTS:
            assert (out / name).exists() == has_matplotlib

    def test_server_with_keys_is_left_untouched(
        self, bench_server: RedisServer, tmp_path: Path
    ) -> None:
        out = tmp_path / "report"
        with bench_server.client() as client:
            client.set("precious", "data")

            result = run_benchmark(
                ["--quick", "--out", str(out), "--redis-url", bench_server.url]
            )

            assert result.returncode != 0
            assert "contains 1 keys" in result.stderr
            assert "--allow-flush" in result.stderr
            assert client.get("precious") == b"data"
        assert not out.exists()


def load_server_module():
    """Import scripts/bench/server.py, which imports nothing else of the benchmark."""
    path = REPO_ROOT / "scripts" / "bench" / "server.py"
    spec = importlib.util.spec_from_file_location("bench_server_module", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TestThrowawayRedis:
    def test_throwaway_server_answers_then_stops_and_removes_folder(
        self, server_folder: Path
    ) -> None:
        server = load_server_module().ThrowawayRedis()

        with server:
            folder = Path(server.folder.name)
            client = redis.Redis.from_url(server.url, socket_timeout=5)
            assert client.ping() is True
            assert client.config_get("enable-debug-command") == {
                "enable-debug-command": "local"
            }
            client.close()

        assert server.process.poll() is not None
        assert not folder.exists()
