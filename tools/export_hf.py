"""Export a checkpoint as a Hugging Face model + tokenizer directory.

    python -m tools.export_hf runs/default out/hf            # latest checkpoint of the run
    python -m tools.export_hf runs/default/step-200 out/hf   # a given one

The result loads with `AutoModelForCausalLM.from_pretrained(out)` and `AutoTokenizer.from_pretrained(out)`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


from amllm import checkpoint as ckpt
from amllm.config import ConfigError, load_config
from amllm.data import DataError, load_tokenizer
from transformers import LlamaForCausalLM

from amllm.model import load_llama_config
from amllm.parallel.full_state import full_model_state


def resolve_checkpoint(path: Path) -> Path:
    """A step-N/ directory, or the latest complete one inside a run directory."""
    if (path / ckpt.META).is_file():
        return path
    found = ckpt.latest_checkpoint(path)
    if found is None:
        raise ckpt.CheckpointError(f"{path}: no complete step-N/ checkpoint here; give a run directory or a step-N/ path")
    return found


def export(src: Path, out: Path) -> Path:
    step = resolve_checkpoint(src)
    cfg = load_config(step / "config.yaml")
    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.data_dir)
    hf_config = load_llama_config(cfg.model, vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id)
    model = LlamaForCausalLM(hf_config)  # not amllm's LlamaLM (same weights): config.json names the HF class
    model.load_state_dict(full_model_state(step))  # model.pt, FSDP2's dcp/ or DeepSpeed's shards
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_hf(out)
    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="run directory or step-N/ directory")
    p.add_argument("out", type=Path, help="output directory (created)")
    a = p.parse_args(argv)
    try:
        step = export(a.checkpoint, a.out)
    except (ConfigError, DataError, ckpt.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {step} -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
