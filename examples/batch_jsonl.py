"""Offline batch generation: a JSONL file of prompts in, a JSONL file of outputs out.

Each input line is one JSON object, either

    {"prompt": "some text", "max_tokens": 32}      # max_tokens optional
    {"prompt_token_ids": [1, 2, 3], "max_tokens": 8}

Blank lines are skipped. Each output line is

    {"index": 0, "text": "...", "token_ids": [...], "finish_reason": "length",
     "num_prompt_tokens": 1500}

in input order (``index`` is the prompt's position among the non-blank input lines).
All prompts run in one ``vllm.LLM.generate`` call (vLLM batches them itself),
greedy unless ``--temperature`` is set.

    python examples/batch_jsonl.py --model MODEL --input prompts.jsonl \\
        --output outputs.jsonl --retro-options '{"segment_size": 2048}'

``--backend dense`` runs vLLM's default attention backend instead of retro (for
comparison); any other value is passed to vLLM as ``attention_backend``.
"""

from __future__ import annotations

import argparse
import json
import sys


def read_prompts(path: str) -> list[dict]:
    """Parses and checks the input file; raises ValueError naming the bad line."""
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object")
            has_text, has_ids = "prompt" in obj, "prompt_token_ids" in obj
            if has_text == has_ids:
                raise ValueError(f"{path}:{lineno}: give exactly one of 'prompt' and "
                                 "'prompt_token_ids'")
            if has_text and not isinstance(obj["prompt"], str):
                raise ValueError(f"{path}:{lineno}: 'prompt' must be a string")
            if has_ids:
                ids = obj["prompt_token_ids"]
                if not (isinstance(ids, list) and ids and
                        all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                            for t in ids)):
                    raise ValueError(f"{path}:{lineno}: 'prompt_token_ids' must be a "
                                     "non-empty list of token ids")
            mt = obj.get("max_tokens")
            if mt is not None and (isinstance(mt, bool) or not isinstance(mt, int) or mt < 1):
                raise ValueError(f"{path}:{lineno}: 'max_tokens' must be a positive integer")
            items.append(obj)
    if not items:
        raise ValueError(f"{path}: no prompts")
    return items


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model directory or name")
    ap.add_argument("--input", required=True, help="JSONL file of prompts")
    ap.add_argument("--output", required=True, help="JSONL file to write")
    ap.add_argument("--backend", default="retro",
                    help='attention backend: "retro" (default), "dense" (vLLM\'s '
                         "default) or any vLLM backend name")
    ap.add_argument("--max-tokens", type=int, default=64,
                    help="tokens per prompt unless its line sets max_tokens (default 64)")
    ap.add_argument("--retro-options", default="{}",
                    help='retro options as a JSON object, e.g. \'{"segment_size": 2048}\' '
                         "(see docs/configuration.md)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--enforce-eager", action="store_true",
                    help="skip torch.compile (much faster start on CPU)")
    args = ap.parse_args(argv)
    if args.max_tokens < 1:
        ap.error("--max-tokens must be >= 1")
    try:
        args.retro_options = json.loads(args.retro_options)
    except json.JSONDecodeError as e:
        ap.error(f"--retro-options is not JSON: {e}")
    if not isinstance(args.retro_options, dict):
        ap.error("--retro-options must be a JSON object")
    if args.backend.lower() == "retro":
        # The engine validates too, but only after loading the model.
        from vllm_retro.config import RetroConfig
        try:
            RetroConfig.from_dict(args.retro_options)
        except (TypeError, ValueError) as e:
            ap.error(f"--retro-options: {e}")
    try:
        args.prompts = read_prompts(args.input)
    except (OSError, ValueError) as e:
        ap.error(str(e))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kw = dict(dtype=args.dtype, enforce_eager=args.enforce_eager)
    if args.max_model_len is not None:
        kw["max_model_len"] = args.max_model_len
    if args.backend.lower() != "dense":
        kw["attention_backend"] = args.backend
    if args.backend.lower() == "retro":
        kw["additional_config"] = {"retro": args.retro_options}
    llm = LLM(args.model, **kw)

    prompts, params = [], []
    for item in args.prompts:
        if "prompt" in item:
            prompts.append(item["prompt"])
        else:
            prompts.append(TokensPrompt(prompt_token_ids=item["prompt_token_ids"]))
        params.append(SamplingParams(max_tokens=item.get("max_tokens") or args.max_tokens,
                                     temperature=args.temperature))
    outputs = llm.generate(prompts, params, use_tqdm=True)

    with open(args.output, "w", encoding="utf-8") as f:
        for i, out in enumerate(outputs):
            comp = out.outputs[0]
            f.write(json.dumps({
                "index": i, "text": comp.text, "token_ids": list(comp.token_ids),
                "finish_reason": comp.finish_reason,
                "num_prompt_tokens": len(out.prompt_token_ids or ())}) + "\n")
    print(f"wrote {len(outputs)} outputs to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
