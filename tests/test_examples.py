"""The example scripts, run as a user would (subprocess, in-process engine)."""

import json
import os
import re
import subprocess
import sys

from vllm_retro.tiny_model import stdlib_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_batch_jsonl(tiny_model, tmp_path):
    text = stdlib_text(20_000)
    prompts = [
        {"prompt": text[:4600], "max_tokens": 12},          # ~1500 tokens: indexed
        {"prompt": "def main():\n    "},                     # default --max-tokens
        {"prompt_token_ids": list(range(3, 403)), "max_tokens": 5},
    ]
    inp, outp = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(p) + "\n" for p in prompts[:2]) + "\n" +
                   json.dumps(prompts[2]) + "\n")              # a blank line is skipped
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1")
    cmd = [sys.executable, os.path.join(ROOT, "examples", "batch_jsonl.py"),
           "--model", tiny_model, "--input", str(inp), "--output", str(outp),
           "--max-tokens", "7", "--dtype", "float32", "--max-model-len", "4096",
           "--enforce-eager", "--retro-options",
           json.dumps({"segment_size": 256, "update_interval": 128})]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180,
                       stdin=subprocess.DEVNULL)
    log = r.stdout + r.stderr               # vLLM logs to stdout
    assert r.returncode == 0, log[-4000:]
    assert "retro attention backend active" in log, log[-4000:]

    rows = [json.loads(l) for l in outp.read_text().splitlines()]
    assert [row["index"] for row in rows] == [0, 1, 2]
    for row, want in zip(rows, (12, 7, 5)):
        assert row["finish_reason"] in ("length", "stop"), row
        n = len(row["token_ids"])
        assert n == want if row["finish_reason"] == "length" else 1 <= n <= want, row
        assert isinstance(row["text"], str)
    assert 1000 <= rows[0]["num_prompt_tokens"] <= 3000
    assert rows[2]["num_prompt_tokens"] == 400


def test_batch_jsonl_rejects_bad_input(tmp_path):
    """Bad input is refused before any model is loaded (argparse error, exit 2)."""
    inp = tmp_path / "bad.jsonl"
    inp.write_text('{"prompt": "ok"}\n{"prompt_token_ids": "nope"}\n')
    cmd = [sys.executable, os.path.join(ROOT, "examples", "batch_jsonl.py"),
           "--model", "unused", "--input", str(inp), "--output", str(tmp_path / "o")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and "bad.jsonl:2" in r.stderr, r.stderr
    inp.write_text('{"prompt": "ok"}\n')
    r = subprocess.run(cmd + ["--retro-options", '{"segment_size": -3}'],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and "segment_size" in r.stderr, r.stderr


def _demo(*args, timeout=600):
    cmd = [sys.executable, os.path.join(ROOT, "examples", "demo.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def test_demo_finds_the_needle_with_dense_and_retro(smollm2_model):
    """The README's demo: SmolLM2 answers with the hidden code, dense and retro,
    while retro's decode attention reads a minority of the context exactly and
    fewer KV bytes than dense."""
    r = _demo()
    out = r.stdout
    assert r.returncode == 0, (out + r.stderr)[-4000:]
    code = re.search(r"The secret code to open the garden gate is (\d{5})\.", out)
    assert code, out
    answers = dict(re.findall(r"^  (dense|retro)  '(.*)'\n\s+(?:right|WRONG);", out, re.M))
    assert set(answers) == {"dense", "retro"}, out
    for label, text in answers.items():
        assert code.group(1) in text, f"{label} missed the code:\n{out}"
    assert out.count("right;") == 2 and "WRONG" not in out, out
    summary = out.replace("\n", " ")
    shares = re.search(r"read ([\d.]+)% of the context tokens exactly, estimated "
                       r"([\d.]+)%", summary)
    assert shares, out
    exact, est = map(float, shares.groups())
    assert 0 < exact < 50 and 0 < est and exact + est <= 100, out
    kv = re.search(r"([\d.]+) MiB of KV read per step against dense attention's "
                   r"([\d.]+) MiB", summary)
    assert kv and 0 < float(kv.group(1)) < float(kv.group(2)), out


def test_demo_rejects_bad_options():
    """Refused by argparse (exit 2) before any model is loaded."""
    for args, name in ((["--depth", "1.5"], "--depth"),
                       (["--context-tokens", "9000"], "--context-tokens")):
        r = _demo(*args, timeout=120)
        assert r.returncode == 2 and name in r.stderr, r.stderr


def test_demo_needles_rejects_bad_options():
    """The demo's needle grid (benchmarks/demo_needles.py) refuses unknown
    configurations, depths outside [0, 1] and seeds that are not integers before
    any model is loaded."""
    script = os.path.join(ROOT, "benchmarks", "demo_needles.py")
    for args, name in ((["--configs", "dense,fast"], "--configs"),
                       (["--depths", "0.5,1.5"], "--depths"),
                       (["--seeds", "a"], "--seeds")):
        r = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                           timeout=120, stdin=subprocess.DEVNULL)
        assert r.returncode == 2 and name in r.stderr, r.stderr
