"""The OpenAI-compatible server, started with our console entry point.

``python -m vllm_retro.cli serve MODEL --attention-backend retro`` runs the API
server in the test's child process and the engine core and its worker in
processes spawned from it (CPU vLLM uses ``spawn``), so this is also the check
that the name ``retro`` and ``additional_config["retro"]`` survive pickling into a
fresh process that loads the plugin only after unpickling the config.

``/metrics`` is checked for retro's statistics against the requests' token counts
and the worker's own stats lines.

Everything is bounded: start-up (``STARTUP_TIMEOUT_S``), each HTTP request, the
SSE stream, and the shutdown (``SHUTDOWN_TIMEOUT_S``).
"""

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from vllm_retro.tiny_model import stdlib_text

STARTUP_TIMEOUT_S = 180.0
REQUEST_TIMEOUT_S = 60.0
SHUTDOWN_TIMEOUT_S = 30.0
# Stats every second, so the disconnect test sees the index memory soon.
RETRO_OPTIONS = {"segment_size": 256, "update_interval": 128, "log_stats_interval_s": 1.0}
STATS_LINE = re.compile(r"retro: (\d+) decode attention calls, .*?, (\d+) live requests, "
                        r"index memory [\d.]+ MiB \((\d+) B\), (\d+) requests freed")
# ~1500 tokens of the tiny tokenizer (about 3 characters per token on this text):
# long enough that the prompt's KV is clustered into a wave index.
PROMPT = stdlib_text(20_000)[:4600]

# No proxy, whatever the environment says: only 127.0.0.1 is ever contacted.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(path, n=60) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError as e:
        return f"<no log: {e}>"


def _read_log(path) -> str:
    with open(path, errors="replace") as f:
        return f.read()


class Server:
    def __init__(self, proc, base_url, log_path, model):
        self.proc, self.base_url, self.log_path, self.model = proc, base_url, log_path, model

    def get(self, path):
        with _OPENER.open(self.base_url + path, timeout=REQUEST_TIMEOUT_S) as r:
            return r.status, r.read()

    def post(self, path, body):
        req = urllib.request.Request(self.base_url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        return _OPENER.open(req, timeout=REQUEST_TIMEOUT_S)

    def post_json(self, path, body):
        try:
            with self.post(path, body) as r:
                assert r.status == 200
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            pytest.fail(f"{path} -> HTTP {e.code}: {e.read()[:2000]!r}\n"
                        f"{_log_tail(self.log_path)}")


def _wait_healthy(proc, base_url, log_path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode} during start-up; log tail:\n"
                        f"{_log_tail(log_path)}")
        try:
            with _OPENER.open(base_url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, socket.timeout, OSError):
            pass
        time.sleep(0.5)
    pytest.fail(f"server not healthy after {STARTUP_TIMEOUT_S:.0f} s; log tail:\n"
                f"{_log_tail(log_path)}")


def _stop(proc) -> None:
    """Safety net for teardown: SIGTERM, then SIGKILL of the whole process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)   # the server's own session (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    port = _free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    env = dict(os.environ)
    env.update(VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               VLLM_NO_USAGE_STATS="1", VLLM_LOGGING_LEVEL="INFO",
               # conftest turns this off for the in-process engine tests; the
               # server must run its engine core in a spawned process.
               VLLM_ENABLE_V1_MULTIPROCESSING="1")
    env.pop("VLLM_PLUGINS", None)
    cmd = [sys.executable, "-m", "vllm_retro.cli", "serve", tiny_model,
           "--attention-backend", "retro", "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--max-model-len", "4096", "--enforce-eager",
           "--enable-log-requests",            # "Request ... aborted." on hang-ups
           "--additional-config", json.dumps({"retro": RETRO_OPTIONS})]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, base_url, log_path)
        yield Server(proc, base_url, log_path, tiny_model)
    finally:
        _stop(proc)


def _completion_body(server, **kw):
    body = {"model": server.model, "prompt": PROMPT, "max_tokens": 16, "temperature": 0,
            "ignore_eos": True}
    body.update(kw)
    return body


def _stream_texts(server, body, max_events=1000):
    """POSTs a streaming request; returns the text of each SSE chunk and whether
    the stream ended with ``[DONE]``."""
    texts, done = [], False
    with server.post("/v1/completions", body) as r:
        assert r.status == 200
        assert r.headers.get("Content-Type", "").startswith("text/event-stream")
        for _ in range(max_events * 2):        # data lines and blank separators
            line = r.readline()
            if not line:
                break
            line = line.decode().strip()
            if not line:
                continue
            assert line.startswith("data: "), line
            payload = line[len("data: "):]
            if payload == "[DONE]":
                done = True
                break
            chunk = json.loads(payload)
            texts.extend(c["text"] for c in chunk["choices"])
    return texts, done


def test_retro_active_in_spawned_worker(server):
    log = _read_log(server.log_path)
    lines = [l for l in log.splitlines() if "retro attention backend active" in l]
    assert lines, f"no 'retro attention backend active' line; log tail:\n{_log_tail(server.log_path)}"
    # Logged by the metadata builder in the worker, with the options from the CLI.
    assert "segment_size=256" in lines[0] and "update_interval=128" in lines[0], lines[0]
    assert "prefix caching disabled" in log


def test_completion_and_stream_agree(server):
    out = server.post_json("/v1/completions", _completion_body(server))
    choice = out["choices"][0]
    assert out["usage"]["completion_tokens"] == 16
    assert 1000 <= out["usage"]["prompt_tokens"] <= 3000, out["usage"]
    assert choice["finish_reason"] == "length"
    text = choice["text"]
    assert isinstance(text, str) and text

    texts, done = _stream_texts(server, _completion_body(server, stream=True))
    assert done, "stream did not end with [DONE]"
    assert len(texts) >= 4, texts
    assert "".join(texts) == text


def test_chat_completion(server):
    out = server.post_json("/v1/chat/completions", {
        "model": server.model, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
        "messages": [{"role": "system", "content": "You are terse."},
                     {"role": "user", "content": "Name a Python module."}]})
    msg = out["choices"][0]["message"]
    assert msg["role"] == "assistant"
    assert isinstance(msg["content"], str)
    assert out["usage"]["completion_tokens"] == 8


def test_stats_log_line(server):
    """The periodic stats line (every 10 s, at the next scheduled step) reports the
    decode calls so far; the long prompts above read well under 100% exactly."""
    pattern = re.compile(r"retro: (\d+) decode attention calls, ([\d.]+)% of tokens "
                         r"read exactly")
    server.post_json("/v1/completions", _completion_body(server))   # indexed decodes
    deadline = time.monotonic() + 25
    found = None
    while time.monotonic() < deadline:
        found = pattern.search(_read_log(server.log_path))
        if found:
            break
        # A step is needed for the line to be written: a 2-token request.
        server.post_json("/v1/completions", _completion_body(server, prompt="import os",
                                                             max_tokens=2))
        time.sleep(1.0)
    assert found, f"no retro stats line; log tail:\n{_log_tail(server.log_path)}"
    assert int(found.group(1)) > 0
    assert float(found.group(2)) < 99.0, found.group(0)


ROWS_LINE = re.compile(r"retro: \d+ decode attention calls, .*?; decode rows (\d+) on the "
                       r"index, (\d+) dense")


def _scrape(server):
    """Retro's samples on ``/metrics``: {(sample name, path label): value} (one
    engine, one model)."""
    from prometheus_client.parser import text_string_to_metric_families
    status, body = server.get("/metrics")
    assert status == 200
    return {(s.name, s.labels.get("path")): s.value
            for fam in text_string_to_metric_families(body.decode())
            for s in fam.samples if s.name.startswith("vllm:retro_")}


def _metrics_when(server, accept, what, timeout=30.0):
    """Scrapes until ``accept(samples)``: a step's numbers reach the front end with
    its outputs, possibly just after the HTTP response."""
    deadline = time.monotonic() + timeout
    while True:
        m = _scrape(server)
        if accept(m):
            return m
        if time.monotonic() > deadline:
            pytest.fail(f"/metrics never showed {what} in {timeout:.0f} s: {m}\n"
                        f"{_log_tail(server.log_path)}")
        time.sleep(0.2)


def test_prometheus_metrics_match_engine(server):
    """vLLM's ``/metrics`` carries retro's numbers: decode rows per path and context
    tokens exactly as the requests' usage implies (one decode row per generated
    token after the first; long prompts on the index, a 2-token one dense), the
    fractions and bytes consistent with them, the index gauges back to 0 once the
    requests are freed, and the row totals equal to the sum of the worker's own
    stats lines."""
    from vllm_retro.config import RetroConfig
    with open(os.path.join(server.model, "config.json")) as f:
        mc = json.load(f)
    heads, layers = mc["num_key_value_heads"], mc["num_hidden_layers"]
    head_dim = mc["hidden_size"] // mc["num_attention_heads"]
    indexed_from = RetroConfig(**RETRO_OPTIONS).min_indexed_tokens

    def get(m, name, path=None):
        return m.get((name, path), 0.0)

    # Once the engine has freed every index, every earlier step has been reported.
    before = _metrics_when(server, lambda m: get(m, "vllm:retro_indexed_requests") == 0,
                           "an idle engine")
    want = {"retro": 0, "dense": 0}
    ctx = 0
    for prompt, n in ((PROMPT, 16), (PROMPT[:3000], 9), ("import os", 6)):
        usage = server.post_json("/v1/completions", _completion_body(
            server, prompt=prompt, max_tokens=n))["usage"]
        p, c = usage["prompt_tokens"], usage["completion_tokens"]
        assert c == n, usage
        want["retro" if p >= indexed_from else "dense"] += c - 1
        ctx += heads * layers * sum(p + i for i in range(1, c))
    assert want["retro"] and want["dense"], want
    rows = "vllm:retro_decode_rows_total"

    def delta(m, name, path=None):
        return get(m, name, path) - get(before, name, path)

    after = _metrics_when(
        server, lambda m: delta(m, rows, "retro") + delta(m, rows, "dense")
        >= sum(want.values()) and get(m, "vllm:retro_indexed_requests") == 0,
        f"{want} more decode rows and no index left")
    assert {k: delta(after, rows, k) for k in want} == want
    assert delta(after, "vllm:retro_context_tokens_total") == ctx
    exact = delta(after, "vllm:retro_exact_tokens_total")
    est = delta(after, "vllm:retro_estimated_tokens_total")
    assert 0 < exact < ctx and est > 0 and exact + est <= ctx, (exact, est, ctx)
    dense_bytes = delta(after, "vllm:retro_kv_dense_bytes_total")
    assert dense_bytes == ctx * 2 * head_dim * 4                  # float32 K and V
    assert 0 < delta(after, "vllm:retro_kv_read_bytes_total") < dense_bytes
    assert get(after, "vllm:retro_exact_fraction") == pytest.approx(
        get(after, "vllm:retro_exact_tokens_total") /
        get(after, "vllm:retro_context_tokens_total"))
    assert get(after, "vllm:retro_estimated_fraction") == pytest.approx(
        get(after, "vllm:retro_estimated_tokens_total") /
        get(after, "vllm:retro_context_tokens_total"))
    assert get(after, "vllm:retro_index_bytes") == 0
    assert get(after, "vllm:retro_index_faults_total") == 0

    # The worker's stats line reports the rows since its last line, at a step: a
    # 1-token request (a step with no decode row) makes it write the rows above.
    offset = len(_read_log(server.log_path))
    deadline = time.monotonic() + 30
    while not ROWS_LINE.search(_read_log(server.log_path)[offset:]):
        if time.monotonic() > deadline:
            pytest.fail(f"no retro stats line; log tail:\n{_log_tail(server.log_path)}")
        server.post_json("/v1/completions", _completion_body(server, prompt="import os",
                                                             max_tokens=1))
        time.sleep(0.5)
    logged = [tuple(map(int, x)) for x in ROWS_LINE.findall(_read_log(server.log_path))]
    final = _scrape(server)
    assert (get(final, rows, "retro"), get(final, rows, "dense")) == \
        tuple(map(sum, zip(*logged))), logged


def _stats_after(server, offset):
    """(live requests, index bytes, freed) of each stats line after log offset."""
    log = _read_log(server.log_path)[offset:]
    return [(int(m.group(2)), int(m.group(3)), int(m.group(4)))
            for m in STATS_LINE.finditer(log)]


def _flush_until(server, offset, accept, timeout=30.0):
    """Sends 8-token requests (each is a real engine step that can write the stats
    line) until a stats line after ``offset`` satisfies ``accept``; returns it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hits = [x for x in _stats_after(server, offset) if accept(x)]
        if hits:
            return hits[0]
        server.post_json("/v1/completions", _completion_body(server, prompt="import os",
                                                             max_tokens=8))
        time.sleep(0.3)
    pytest.fail(f"no stats line matching after {timeout:.0f} s: {_stats_after(server, offset)}"
                f"\n{_log_tail(server.log_path)}")


N_DISCONNECTS = 4


def test_client_disconnect_mid_stream_frees_index(server):
    """Clients that hang up mid-stream: vLLM aborts their requests and every index
    they held is freed. Index memory is read from the worker's stats line: with only
    an 8-token flush request running it must be back to that request's own size
    (measured alone first, slack 2x; it is 0 B when the flush prompt is too short to
    index), down from the peak while the long streams were live."""
    offset = len(_read_log(server.log_path))
    _, idle_bytes, _ = _flush_until(server, offset, lambda x: x[0] <= 1)
    started = threading.Barrier(N_DISCONNECTS + 1, timeout=REQUEST_TIMEOUT_S)
    hang_up = threading.Event()
    errors = []
    host, port = server.base_url.rsplit("//", 1)[1].split(":")

    def stream_then_hang_up():
        conn = http.client.HTTPConnection(host, int(port), timeout=REQUEST_TIMEOUT_S)
        try:
            body = _completion_body(server, stream=True, max_tokens=2000)
            conn.request("POST", "/v1/completions", json.dumps(body),
                         {"Content-Type": "application/json"})
            r = conn.getresponse()
            assert r.status == 200, r.status
            chunks = 0
            while chunks < 3:                   # a few decode tokens streamed
                line = r.readline()
                assert line, "stream ended early"
                chunks += line.startswith(b"data: ")
        except Exception as e:                  # reported by the main thread
            errors.append(repr(e))
        finally:
            started.wait()
            hang_up.wait(REQUEST_TIMEOUT_S)
            if conn.sock is not None:
                conn.sock.shutdown(socket.SHUT_RDWR)
            conn.close()

    threads = [threading.Thread(target=stream_then_hang_up) for _ in range(N_DISCONNECTS)]
    for t in threads:
        t.start()
    try:
        started.wait()
        assert not errors, errors
        live_offset = len(_read_log(server.log_path))
        live, peak_bytes, _ = _flush_until(server, live_offset,
                                           lambda x: x[0] >= N_DISCONNECTS)
    finally:
        gone_offset = len(_read_log(server.log_path))
        hang_up.set()
        for t in threads:
            t.join(REQUEST_TIMEOUT_S)
    # Aborts reach the worker a step or more after the hang-up (the API server, then
    # the engine core, then the next step's connector metadata), so the lines right
    # after it may still show an index; within the timeout one must show them gone.
    after_live, after_bytes, _ = _flush_until(
        server, gone_offset, lambda x: x[0] <= 1 and x[1] <= 2 * idle_bytes)
    log = _read_log(server.log_path)[gone_offset:]
    aborted = len(re.findall(r"Request \S+ aborted", log))
    print(f"{N_DISCONNECTS} streams hung up: {aborted} aborts logged; index memory "
          f"flush-alone {idle_bytes} B, peak {peak_bytes} B ({live} live), after "
          f"{after_bytes} B ({after_live} live)")
    assert aborted == N_DISCONNECTS, log[-3000:]
    assert peak_bytes > 10 * max(idle_bytes, 1), (peak_bytes, idle_bytes)
    assert after_bytes <= 2 * idle_bytes, (after_bytes, idle_bytes)
    assert server.proc.poll() is None


def test_shutdown_is_clean(server):
    """SIGINT: vLLM's launcher shuts the engine down and exits with 0, leaving no
    child process (engine core, worker, resource tracker) behind."""
    psutil = pytest.importorskip("psutil")
    proc = server.proc
    assert proc.poll() is None, _log_tail(server.log_path)
    assert "Traceback" not in _read_log(server.log_path), _log_tail(server.log_path)
    children = psutil.Process(proc.pid).children(recursive=True)
    assert children, "expected an engine-core child process"
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    try:
        rc = proc.wait(timeout=SHUTDOWN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"server still running {SHUTDOWN_TIMEOUT_S:.0f} s after SIGINT; "
                    f"log tail:\n{_log_tail(server.log_path)}")
    elapsed = time.monotonic() - t0
    assert rc == 0, f"exit code {rc} after {elapsed:.1f} s; log tail:\n{_log_tail(server.log_path)}"
    _, alive = psutil.wait_procs(children, timeout=10)
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [(p.pid, p.name()) for p in alive]


def test_cli_version_and_serve_help():
    env = dict(os.environ, VLLM_NO_USAGE_STATS="1")
    cmds = {"version": [sys.executable, "-m", "vllm_retro.cli", "--version"],
            "help": [sys.executable, "-m", "vllm_retro.cli", "serve", "--help"]}
    procs = {k: subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 stdin=subprocess.DEVNULL, env=env, text=True)
             for k, c in cmds.items()}
    results = {}
    try:
        for k, p in procs.items():
            out, err = p.communicate(timeout=120)
            results[k] = (p.returncode, out, err)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    rc, out, err = results["version"]
    assert rc == 0, err[-3000:]
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", out.strip()), out
    rc, out, err = results["help"]
    assert rc == 0, err[-3000:]
    assert "usage: vllm serve" in out, out[-3000:]
